"""The wave buffer's CPU side: the C++ LRU planner against a pure-Python model, the run tables against the host
rows they must cover, input validation, the thread pool, and pinned_empty's fallback."""
from __future__ import annotations

import threading
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch

from kvstore import _C
from kvstore.gpu import wave_buffer as wbmod
from kvstore.gpu.wave_buffer import SRC_CACHE, SRC_HOST, SRC_STEADY, WaveBuffer, WaveBufferPlan, pinned_empty


# ---------------------------------------------------------------------------- reference model
class ModelSlot:
    """One slot's cache, written from the rules in csrc/wave_buffer.h."""

    def __init__(self, rows: np.ndarray, g: int, pages_per_slot: int, P: int) -> None:
        self.rows, self.g, self.Pp, self.P = rows, g, pages_per_slot, P
        self.lru: OrderedDict[int, list[int]] = OrderedDict()  # cluster -> local pages, least recent first
        self.free = list(range(pages_per_slot - 1, -1, -1))      # stack, pop() from the end
        self.evictions = 0

    def step(self, ids, steady_row: int, steady_len: int):
        P, base = self.P, self.g * self.Pp
        runs, copies, counts = [], [], [0, 0, 0, 0]
        if steady_len > 0:
            runs.append((SRC_STEADY, steady_row, steady_len))
        selected, sel_pages = set(ids), 0
        for c in ids:
            start, size = int(self.rows[c]), int(self.rows[c + 1] - self.rows[c])
            if size == 0:
                continue
            if c in self.lru:
                counts[0] += 1
                counts[2] += size
                for j, p in enumerate(self.lru[c]):
                    runs.append((SRC_CACHE, (base + p) * P, min(P, size - j * P)))
                sel_pages += len(self.lru[c])
                self.lru.move_to_end(c)
            else:
                counts[1] += 1
                counts[3] += size
                runs.append((SRC_HOST, start, size))
        for c in ids:
            start, size = int(self.rows[c]), int(self.rows[c + 1] - self.rows[c])
            if size == 0 or c in self.lru:
                continue
            need = -(-size // P)
            if need > self.Pp - sel_pages:  # free + pages of the unselected cached clusters
                continue
            while len(self.free) < need:
                victim, pages = self.lru.popitem(last=False)
                assert victim not in selected
                self.evictions += 1
                self.free.extend(reversed(pages))
            pages = [self.free.pop() for _ in range(need)]
            self.lru[c] = pages
            for j, p in enumerate(pages):
                copies.append((start + j * P, (base + p) * P, min(P, size - j * P)))
            sel_pages += need
        return runs, copies, counts


def make_rows(rng: np.random.Generator, G: int, C: int, max_size: int, p_empty: float = 0.1) -> np.ndarray:
    """[G, C + 1] host row bounds; slot g's clusters follow slot g - 1's in the host KV."""
    sizes = rng.integers(1, max_size + 1, size=(G, C))
    sizes[rng.random((G, C)) < p_empty] = 0
    flat = np.concatenate([[0], np.cumsum(sizes.reshape(-1))])
    rows = np.empty((G, C + 1), dtype=np.int64)
    for g in range(G):
        rows[g] = flat[g * C: g * C + C + 1]
    return rows


def random_ids(rng: np.random.Generator, G: int, C: int, r: int) -> np.ndarray:
    """Distinct ids per row, skewed towards low ids so that clusters come back (hits)."""
    w = 1.0 / np.arange(1, C + 1) ** 0.8
    return np.stack([rng.choice(C, size=r, replace=False, p=w / w.sum()) for _ in range(G)]).astype(np.int64)


def plan_lists(plan: WaveBufferPlan, G: int):
    off = plan.run_offsets.tolist()
    src, row, ln = plan.run_src.tolist(), plan.run_row.tolist(), plan.run_len.tolist()
    runs = [list(zip(src[off[g]:off[g + 1]], row[off[g]:off[g + 1]], ln[off[g]:off[g + 1]])) for g in range(G)]
    copies = list(zip(plan.copy_src_row.tolist(), plan.copy_dst_row.tolist(), plan.copy_len.tolist()))
    return runs, copies


# ---------------------------------------------------------------------------- against the model
@pytest.mark.parametrize("seed,G,C,max_size,P,pages,num_threads", [
    (0, 3, 40, 30, 8, 12, 1),
    (1, 5, 25, 20, 4, 30, 2),
    (2, 7, 60, 50, 8, 5, 4),      # a small cache: clusters above 40 rows never fit
    (3, 4, 30, 16, 16, 100, 3),   # a large cache: everything is admitted eventually
    (4, 2, 10, 9, 1, 7, 2),       # one-row pages
    (5, 6, 50, 24, 8, 0, 2),      # no cache at all
])
def test_planner_matches_lru_model(seed, G, C, max_size, P, pages, num_threads):
    rng = np.random.default_rng(seed)
    rows = make_rows(rng, G, C, max_size)
    wb = WaveBuffer(torch.from_numpy(rows), pages, P, num_threads)
    model = [ModelSlot(rows[g], g, pages, P) for g in range(G)]
    total = [0, 0, 0, 0]
    for step in range(40):
        r = int(rng.integers(0, C + 1))
        ids = random_ids(rng, G, C, r)
        srow = rng.integers(0, 1000, size=G)
        slen = rng.integers(0, 3, size=G).astype(np.int32)
        plan = wb.plan(torch.from_numpy(ids), torch.from_numpy(srow), torch.from_numpy(slen))
        runs, copies = plan_lists(plan, G)
        want_copies, counts = [], [0, 0, 0, 0]
        for g in range(G):
            want_runs, cps, cnt = model[g].step(ids[g].tolist(), int(srow[g]), int(slen[g]))
            assert runs[g] == want_runs, f"step {step} slot {g}"
            want_copies += cps
            counts = [a + b for a, b in zip(counts, cnt)]
            assert wb.cached_clusters(g) == list(model[g].lru), f"step {step} slot {g}"
            for c, pg in model[g].lru.items():
                assert wb.cluster_pages(g, c) == [g * pages + p for p in pg]
        assert copies == want_copies, f"step {step}"
        assert [plan.hits, plan.misses, plan.hit_tokens, plan.miss_tokens] == counts
        total = [a + b for a, b in zip(total, counts)]
        assert plan.run_offsets[0] == 0 and plan.run_offsets[-1] == plan.run_src.numel()
    st = wb.stats
    assert [st["hits"], st["misses"], st["hit_tokens"], st["miss_tokens"]] == total and st["steps"] == 40
    if pages == 0:
        assert total[0] == 0
    else:  # the sequences exercise hits, misses and (but for the large cache) evictions
        assert total[0] > 0 and total[1] > 0
        assert sum(m.evictions for m in model) > 0 or pages == 100


def test_long_run_matches_lru_model():
    """Many steps with a cache that rarely evicts: the LRU queue grows with stale uses and is compacted."""
    rng = np.random.default_rng(9)
    G, C, P, pages = 3, 24, 4, 40
    rows = make_rows(rng, G, C, 12, p_empty=0.0)
    wb = WaveBuffer(rows, pages, P, 2)
    model = [ModelSlot(rows[g], g, pages, P) for g in range(G)]
    for step in range(400):
        ids = random_ids(rng, G, C, int(rng.integers(1, 9)))
        runs, copies = plan_lists(wb.plan(ids), G)
        want_copies = []
        for g in range(G):
            want_runs, cps, _ = model[g].step(ids[g].tolist(), 0, 0)
            assert runs[g] == want_runs, f"step {step} slot {g}"
            want_copies += cps
        assert copies == want_copies, f"step {step}"
        if step % 50 == 49:
            assert [wb.cached_clusters(g) for g in range(G)] == [list(m.lru) for m in model]


def test_plan_dtypes_and_layout():
    rng = np.random.default_rng(7)
    rows = make_rows(rng, 4, 20, 20)
    wb = WaveBuffer(rows, 10, 8)
    plan = wb.plan(random_ids(rng, 4, 20, 6))
    assert plan.run_src.dtype == torch.int32 and plan.run_len.dtype == torch.int32
    assert plan.run_row.dtype == torch.int64 and plan.run_offsets.dtype == torch.int32
    assert plan.copy_src_row.dtype == torch.int64 and plan.copy_dst_row.dtype == torch.int64
    assert plan.copy_len.dtype == torch.int32
    assert plan.run_offsets.shape == (5,)
    assert all(t.device.type == "cpu" for t in plan[:7])
    moved = plan.to("cpu")
    for a, b in zip(plan[:7], moved[:7]):
        assert torch.equal(a, b)
    assert wb.cache_rows == 4 * 10 * 8 and wb.num_pages == 40
    assert "runs=" in repr(plan)


# ---------------------------------------------------------------------------- run tables cover the right rows
@pytest.mark.parametrize("seed,pages,P", [(0, 6, 8), (1, 20, 4), (2, 3, 16), (3, 0, 8)])
def test_runs_gather_the_selected_host_rows(seed, pages, P):
    """Simulate the GPU: gather each slot's runs from host / cache / steady arrays, then apply the copies to the
    cache. The gathered rows must be the steady rows followed by the selected clusters' host rows, in order."""
    rng = np.random.default_rng(seed)
    G, C, D = 4, 30, 3
    rows = make_rows(rng, G, C, 24, p_empty=0.15)
    host = rng.standard_normal((int(rows[-1, -1]), D))
    steady = rng.standard_normal((G * 5, D))
    cache = np.full((G * pages * P, D), np.nan)
    wb = WaveBuffer(rows, pages, P, 2)
    for _ in range(30):
        ids = random_ids(rng, G, C, int(rng.integers(1, 12)))
        srow = np.arange(G, dtype=np.int64) * 5
        slen = rng.integers(0, 6, size=G).astype(np.int32)
        plan = wb.plan(ids, srow, slen)
        runs, copies = plan_lists(plan, G)
        sources = {SRC_HOST: host, SRC_CACHE: cache, SRC_STEADY: steady}
        for g in range(G):
            got = [sources[s][row:row + n] for s, row, n in runs[g]]
            want = [steady[srow[g]:srow[g] + slen[g]]] + [host[rows[g, c]:rows[g, c + 1]] for c in ids[g]]
            got = np.concatenate(got) if got else np.zeros((0, D))
            np.testing.assert_array_equal(got, np.concatenate(want))
            if slen[g] > 0:
                assert runs[g][0] == (SRC_STEADY, srow[g], slen[g])
            assert all(s != SRC_STEADY for s, _, _ in runs[g][1:])
            assert all(n > 0 for _, _, n in runs[g])
            assert all(n <= P for s, _, n in runs[g] if s == SRC_CACHE)
        dst_pages = [d // P for _, d, _ in copies]
        assert len(set(dst_pages)) == len(dst_pages)  # a page is written at most once a step
        for s, d, n in copies:
            assert d % P == 0 and 0 < n <= P
            cache[d:d + n] = host[s:s + n]


def test_steady_run_only_and_no_retrieval():
    rows = np.array([[0, 4, 8]])
    wb = WaveBuffer(rows, 2, 4, 1)
    plan = wb.plan(np.zeros((1, 0), dtype=np.int64), np.array([9]), np.array([3], dtype=np.int32))
    assert plan_lists(plan, 1)[0] == [[(SRC_STEADY, 9, 3)]]
    plan = wb.plan(np.zeros((1, 0), dtype=np.int64))
    assert plan.run_src.numel() == 0 and plan.run_offsets.tolist() == [0, 0]


def test_empty_clusters_make_no_run_and_are_never_cached():
    rows = np.array([[0, 0, 5, 5, 5, 12]])  # clusters 0, 2, 3 are empty
    wb = WaveBuffer(rows, 4, 4, 1)
    for _ in range(2):
        plan = wb.plan(np.array([[0, 1, 2, 3, 4]]))
        assert {s for s, _, _ in plan_lists(plan, 1)[0][0]} <= {SRC_HOST, SRC_CACHE}
        assert plan.hits + plan.misses == 2 and plan.hit_tokens + plan.miss_tokens == 12
    assert sorted(wb.cached_clusters(0)) == [1, 4]
    assert wb.cluster_pages(0, 0) == []


def test_cache_too_small():
    rows = np.array([[0, 9, 12], [0, 3, 20]])  # pages of 4: cluster sizes need 3, 1 / 1, 5 pages
    wb = WaveBuffer(rows, 2, 4, 2)
    for _ in range(3):
        plan = wb.plan(np.array([[0, 1], [1, 0]]))
    assert wb.cached_clusters(0) == [1] and wb.cached_clusters(1) == [0]
    assert plan.hits == 2 and plan.misses == 2
    assert plan.copy_len.numel() == 0
    # pages_per_slot = 0: all misses, no copies
    wb0 = WaveBuffer(rows, 0, 4)
    plan = wb0.plan(np.array([[0, 1], [1, 0]]))
    assert plan.hits == 0 and plan.misses == 4 and plan.copy_len.numel() == 0 and wb0.cache_rows == 0


def test_selected_clusters_are_not_evicted_for_admissions():
    rows = np.array([[0, 8, 16, 24]])  # three clusters of 2 pages each (P=4); the cache holds two
    wb = WaveBuffer(rows, 4, 4, 1)
    wb.plan(np.array([[0, 1]]))
    assert wb.cached_clusters(0) == [0, 1]
    plan = wb.plan(np.array([[2, 0, 1]]))  # 0 and 1 hit; 2 would need one of them evicted: not admitted
    assert plan.hits == 2 and plan.copy_len.numel() == 0
    plan = wb.plan(np.array([[1, 2]]))      # 0 is now unselected: evicted for 2
    assert wb.cached_clusters(0) == [1, 2]
    assert plan.copy_dst_row.tolist() == [0, 4]  # 2 reuses 0's pages, in order


def test_reset_empties_the_cache():
    rows = np.array([[0, 4, 8]])
    wb = WaveBuffer(rows, 4, 4)
    wb.plan(np.array([[0, 1]]))
    assert wb.cached_clusters(0) == [0, 1]
    wb.reset()
    assert wb.cached_clusters(0) == []
    plan = wb.plan(np.array([[1]]))
    assert plan.misses == 1 and plan.copy_dst_row.tolist() == [0]


def test_stats_and_reset_stats():
    rows = np.array([[0, 4, 12]])
    wb = WaveBuffer(rows, 4, 4)
    assert wb.hit_ratio == 0.0 and wb.token_hit_ratio == 0.0
    wb.plan(np.array([[0, 1]]))
    wb.plan(np.array([[0, 1]]))
    assert wb.hit_ratio == pytest.approx(0.5) and wb.token_hit_ratio == pytest.approx(0.5)
    wb.plan(np.array([[0]]))
    assert wb.hit_ratio == pytest.approx(3 / 5) and wb.token_hit_ratio == pytest.approx(16 / 28)
    wb.reset_stats()
    assert wb.stats["steps"] == 0 and wb.hit_ratio == 0.0
    assert wb.cached_clusters(0) == [1, 0]  # the cache is untouched by reset_stats


# ---------------------------------------------------------------------------- validation
def test_duplicate_ids_raise_and_leave_the_state_untouched():
    rows = np.array([[0, 4, 8, 12], [0, 4, 8, 12]])
    wb = WaveBuffer(rows, 4, 4)
    wb.plan(np.array([[0, 1], [2, 1]]))
    with pytest.raises(ValueError, match="repeats cluster 2"):
        wb.plan(np.array([[2, 0], [2, 2]]))  # slot 0 is fine, slot 1 repeats
    assert wb.cached_clusters(0) == [0, 1] and wb.cached_clusters(1) == [2, 1]
    assert wb.stats["steps"] == 1


@pytest.mark.parametrize("bad", [-1, 3, 1 << 40])
def test_out_of_range_ids_raise(bad):
    wb = WaveBuffer(np.array([[0, 4, 8, 12]]), 4, 4)
    with pytest.raises(ValueError, match="out of range"):
        wb.plan(np.array([[0, bad]]))


def test_input_validation():
    rows = np.array([[0, 4, 8], [8, 9, 9]])
    with pytest.raises(ValueError, match="non-decreasing"):
        WaveBuffer(np.array([[0, 4, 3]]), 4, 4)
    with pytest.raises(ValueError, match="negative"):
        WaveBuffer(np.array([[-1, 4]]), 4, 4)
    with pytest.raises(ValueError, match="cluster_rows must be 2-D"):
        WaveBuffer(np.array([0, 4]), 4, 4)
    with pytest.raises(ValueError, match="cluster_rows"):
        WaveBuffer(np.zeros((0, 3), dtype=np.int64), 4, 4)
    with pytest.raises(TypeError, match="cluster_rows"):
        WaveBuffer(np.array([[0.0, 4.0]]), 4, 4)
    with pytest.raises(ValueError, match="page_tokens"):
        WaveBuffer(rows, 4, 0)
    with pytest.raises(ValueError, match="pages_per_slot"):
        WaveBuffer(rows, -1, 4)
    with pytest.raises(TypeError, match="pages_per_slot"):
        WaveBuffer(rows, 2.5, 4)
    with pytest.raises(ValueError, match="num_threads"):
        WaveBuffer(rows, 4, 4, -2)
    # the C++ layer checks on its own, too
    with pytest.raises(ValueError, match="non-decreasing"):
        _C.WaveBufferPlanner(np.array([[0, 4, 3]]), 4, 4)
    with pytest.raises(TypeError, match="integer"):
        _C.WaveBufferPlanner(np.array([[0.0, 4.0]]), 4, 4)
    wb = WaveBuffer(rows, 4, 4)
    with pytest.raises(ValueError, match="retrieval_ids has 1 rows"):
        wb.plan(np.array([[0]]))
    with pytest.raises(ValueError, match="retrieval_ids must be 2-D"):
        wb.plan(np.array([0, 1]))
    with pytest.raises(TypeError, match="retrieval_ids"):
        wb.plan(torch.zeros(2, 1))
    with pytest.raises(ValueError, match="steady_rows has 3"):
        wb.plan(np.array([[0], [1]]), np.zeros(3, dtype=np.int64), np.zeros(2, dtype=np.int32))
    with pytest.raises(ValueError, match="steady_len"):
        wb.plan(np.array([[0], [1]]), np.zeros(2, dtype=np.int64), np.array([1, -1], dtype=np.int32))
    with pytest.raises(ValueError, match="steady_rows"):
        wb.plan(np.array([[0], [1]]), np.array([0, -5]), np.zeros(2, dtype=np.int32))
    with pytest.raises(ValueError, match="columns"):
        wb.plan(np.zeros((2, 3), dtype=np.int64))  # r > C
    with pytest.raises(IndexError):
        wb.cached_clusters(2)
    assert wb.stats["steps"] == 0 and wb.cached_clusters(0) == []


def test_int32_and_noncontiguous_ids_are_accepted():
    rng = np.random.default_rng(3)
    rows = make_rows(rng, 3, 12, 10)
    ids = random_ids(rng, 3, 12, 8)
    a, b = WaveBuffer(rows, 6, 4), WaveBuffer(rows, 6, 4)
    pa = a.plan(torch.from_numpy(ids))
    pb = b.plan(torch.from_numpy(np.ascontiguousarray(ids[:, ::-1])).flip(1).to(torch.int32))
    for x, y in zip(pa[:11], pb[:11]):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


# ---------------------------------------------------------------------------- threads
def test_thread_counts_give_identical_plans():
    rng = np.random.default_rng(11)
    G, C = 64, 80
    rows = make_rows(rng, G, C, 40)
    bufs = [WaveBuffer(rows, 40, 8, n) for n in (1, 4)]
    assert [b.num_threads for b in bufs] == [1, 4]
    for _ in range(15):
        ids = random_ids(rng, G, C, 30)
        slen = rng.integers(0, 70, size=G).astype(np.int32)
        srow = np.arange(G, dtype=np.int64) * 100
        p1, p4 = (b.plan(ids, srow, slen) for b in bufs)
        for x, y in zip(p1[:11], p4[:11]):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def test_default_threads_follow_the_affinity_mask():
    import os

    wb = WaveBuffer(np.array([[0, 4]]), 1, 4)
    assert wb.num_threads == _C.affinity_cpu_count() == len(os.sched_getaffinity(0))


def test_planners_on_several_python_threads():
    """Buffers planned concurrently from Python threads (one buffer per thread, a shared pool) stay correct."""
    rng = np.random.default_rng(5)
    G, C = 16, 40
    rows = make_rows(rng, G, C, 30)
    steps = [random_ids(rng, G, C, 12) for _ in range(25)]

    def run(out: list) -> None:
        wb = WaveBuffer(rows, 10, 8, 3)
        out.extend(plan_lists(wb.plan(ids), G) for ids in steps)

    want: list = []
    run(want)
    outs: list[list] = [[] for _ in range(4)]
    threads = [threading.Thread(target=run, args=(o,)) for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(o == want for o in outs)


def test_planning_in_a_forked_child():
    """A child forked after the pool started has no workers: planning there runs on the calling thread."""
    import os

    rng = np.random.default_rng(2)
    G, C = 8, 30
    rows = make_rows(rng, G, C, 20)
    steps = [random_ids(rng, G, C, 10) for _ in range(5)]
    wb = WaveBuffer(rows, 12, 8, 4)
    wb.plan(steps[0])
    ref = WaveBuffer(rows, 12, 8, 1)
    ref.plan(steps[0])
    want = [plan_lists(ref.plan(ids), G) for ids in steps[1:]]
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            code = 0 if [plan_lists(wb.plan(ids), G) for ids in steps[1:]] == want else 2
        finally:
            os._exit(code)
    import signal
    import time

    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("planning hung in the forked child")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0


def test_thread_pool_runs_every_index_once():
    pool = _C.ThreadPool(4)
    assert pool.size == 4
    seen: list[int] = []
    lock = threading.Lock()

    def fn(i: int) -> None:
        with lock:
            seen.append(i)

    for n in (0, 1, 3, 257):
        seen.clear()
        pool.parallel_for(n, fn)
        assert sorted(seen) == list(range(n))


def test_thread_pool_many_short_jobs():
    """Back-to-back small jobs: workers that wake late must never run an index of a finished job."""
    pool = _C.ThreadPool(3)
    counts = np.zeros((2000, 41), dtype=np.int64)
    for job in range(2000):
        n = 2 + job % 39

        def fn(i: int, job: int = job) -> None:
            counts[job, i] += 1  # the GIL serialises the increments

        pool.parallel_for(n, fn)
        assert counts[job, :n].sum() == n
    want = np.zeros_like(counts)
    for job in range(2000):
        want[job, :2 + job % 39] = 1
    np.testing.assert_array_equal(counts, want)


def test_thread_pool_exceptions_surface_in_python():
    pool = _C.ThreadPool(4)

    def fn(i: int) -> None:
        if i == 37:
            raise ValueError(f"boom at {i}")

    for _ in range(3):  # and the pool stays usable afterwards
        with pytest.raises(ValueError, match="boom at 37"):
            pool.parallel_for(100, fn)
    done: list[int] = []
    pool.parallel_for(10, lambda i: done.append(i))
    assert sorted(done) == list(range(10))


def test_thread_pool_nested_call_runs_inline():
    pool = _C.ThreadPool(3)
    out: list[int] = []
    lock = threading.Lock()

    def inner(i: int) -> None:
        with lock:
            out.append(i)

    pool.parallel_for(4, lambda i: pool.parallel_for(5, inner))
    assert sorted(out) == sorted(list(range(5)) * 4)


# ---------------------------------------------------------------------------- pinned memory
@pytest.mark.skipif(torch.cuda.is_available(), reason="pinning works here; the fallback needs a CPU-only machine")
def test_pinned_empty_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(wbmod, "_pin_warned", False)
    with pytest.warns(RuntimeWarning, match="pinned"):
        t, pinned = pinned_empty((3, 5), torch.bfloat16)
    assert not pinned and t.shape == (3, 5) and t.dtype == torch.bfloat16 and t.device.type == "cpu"
    t.fill_(1.5)
    assert float(t.float().sum()) == 22.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second failure is silent
        t2, pinned2 = pinned_empty(7, torch.float16)
    assert not pinned2 and t2.shape == (7,)


def test_pinned_empty_checks_its_arguments():
    with pytest.raises(TypeError, match="dtype"):
        pinned_empty((2,), "float32")
    with pytest.raises(TypeError, match="shape"):
        pinned_empty((2.0,), torch.float32)
    with pytest.raises(ValueError, match="negative"):
        pinned_empty((2, -1), torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_plans_and_cuda_ids():
    t, pinned = pinned_empty((4, 8), torch.bfloat16)
    assert pinned and t.is_pinned()
    rng = np.random.default_rng(0)
    rows = make_rows(rng, 4, 20, 20)
    wb = WaveBuffer(rows, 10, 8)
    ids = random_ids(rng, 4, 20, 6)
    plan = wb.plan(torch.from_numpy(ids).cuda())
    assert wb.pinned and plan.buffer.is_pinned() and plan.run_row.is_pinned()
    dev = plan.to("cuda")
    for a, b in zip(plan[:7], dev[:7]):
        assert b.device.type == "cuda" and torch.equal(a, b.cpu())
    ref = WaveBuffer(rows, 10, 8, pin=False).plan(ids)
    for a, b in zip(plan[:7], ref[:7]):
        assert torch.equal(a, b)
