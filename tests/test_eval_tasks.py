"""The RULER-style task generator of ``kvstore eval`` (kvstore.evaluation.tasks)."""
from __future__ import annotations

import re

import pytest

from kvstore.evaluation import FILLER, HAYSTACKS, KINDS, Task, count_tokens, make_task, score


class WordTokenizer:
    """Stand-in tokenizer: one token per whitespace-separated word (HF-style call)."""

    def __call__(self, text, add_special_tokens=False, **_):
        return {"input_ids": list(range(len(text.split())))}


@pytest.fixture(scope="module")
def smollm2_tok():
    try:
        from kvstore.datasets.text import smollm2_path
        import transformers

        d, f = smollm2_path()
        return transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    except Exception as e:  # noqa: BLE001 - any missing piece means skip
        pytest.skip(f"SmolLM2 tokenizer not available: {e}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("haystack", HAYSTACKS)
def test_deterministic_and_seeded(kind, haystack):
    tok = WordTokenizer()
    a = make_task(kind, 600, 0.5, haystack, tok, seed=3)
    b = make_task(kind, 600, 0.5, haystack, tok, seed=3)
    c = make_task(kind, 600, 0.5, haystack, tok, seed=4)
    assert a == b
    assert a.answers != c.answers
    assert (a.kind, a.depth, a.haystack) == (kind, 0.5, haystack)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("haystack", HAYSTACKS)
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_answers_sit_in_the_needles_at_depth(kind, haystack, depth):
    t = make_task(kind, 800, depth, haystack, WordTokenizer(), seed=1)
    body = t.prompt
    # every needle is in the prompt once, in the recorded order, and every answer is in a needle
    at = [body.index(n) for n in t.needles]
    assert at == sorted(at)
    assert all(body.count(n) == 1 for n in t.needles)
    for ans in t.answers:
        assert any(ans in n for n in t.needles), ans
        assert body.count(ans) == sum(n.count(ans) for n in t.needles)   # nowhere else
    assert sorted(t.needle_depths) == t.needle_depths
    # the asked needle sits at the requested depth (within one haystack unit)
    units = body.count(FILLER.strip()) if haystack == "filler" else body.count("\n\n")
    tol = 1.5 / max(units, 1) + 1e-9
    if kind == "vt":
        first = next(i for i, n in enumerate(t.needles) if re.fullmatch(r"VAR [A-Z]{5} = \d+\.", n))
        assert abs(t.needle_depths[first] - depth) <= tol
        assert first == 0  # the chain follows its value
    else:
        asked = t.answers[0]
        i = next(i for i, n in enumerate(t.needles) if asked in n)
        assert abs(t.needle_depths[i] - depth) <= tol
    # filler units before the first needle match its depth
    if haystack == "filler":
        before = body[:at[0]].count(FILLER.strip())
        assert abs(before / units - t.needle_depths[0]) <= tol


def test_kind_specifics():
    tok = WordTokenizer()
    t = make_task("niah_number", 500, 0.5, "filler", tok, 0)
    assert len(t.answers) == 1 and re.fullmatch(r"\d{7}", t.answers[0]) and len(t.needles) == 1
    t = make_task("niah_uuid", 500, 0.5, "filler", tok, 0)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", t.answers[0])
    t = make_task("multikey", 500, 0.5, "filler", tok, 0)
    keys = [re.search(r"for (\S+) is", n).group(1) for n in t.needles]
    assert len(set(keys)) == 4 and len(t.answers) == 1
    asked = next(k for k, n in zip(keys, t.needles) if t.answers[0] in n)
    assert asked in t.prompt.rsplit("\n\n", 1)[1] and t.answers[0] not in t.prompt.rsplit("\n\n", 1)[1]
    t = make_task("multivalue", 500, 0.5, "filler", tok, 0)
    assert len({re.search(r"for (\S+) is", n).group(1) for n in t.needles}) == 1 and len(set(t.answers)) == 4
    t = make_task("multiquery", 500, 0.5, "filler", tok, 0)
    question = t.prompt.rsplit("\n\n", 1)[1]
    assert len(t.answers) == 4 and all(re.search(r"for (\S+) is", n).group(1) in question for n in t.needles)
    t = make_task("vt", 500, 0.5, "filler", tok, 0)
    names = t.answers
    assert len(names) == 5 and t.needles[0].startswith(f"VAR {names[0]} = ")
    for i in range(1, 5):
        assert t.needles[i] == f"VAR {names[i]} = VAR {names[i - 1]}."
    for t in (make_task(k, 500, 0.5, "filler", tok, 0) for k in KINDS):
        assert t.prompt.rstrip().endswith("separated by commas.") or t.prompt.rstrip().endswith("only.")
        assert t.answer_prefix


@pytest.mark.parametrize("n", [300, 2048, 8192])
@pytest.mark.parametrize("haystack", HAYSTACKS)
def test_length_with_word_tokenizer(n, haystack):
    tok = WordTokenizer()
    for kind in ("niah_number", "vt"):
        t = make_task(kind, n, 0.5, haystack, tok, 0)
        got = count_tokens(tok, t.prompt)
        assert got <= n
        slack = 30 if haystack == "filler" else 400   # one haystack unit (a text paragraph can be long)
        assert got >= n - slack, (kind, got)


@pytest.mark.parametrize("haystack", HAYSTACKS)
def test_length_with_smollm2_tokenizer(smollm2_tok, haystack):
    for n in (2048, 4096):
        for kind in KINDS:
            t = make_task(kind, n, 0.5, haystack, smollm2_tok, 0)
            got = count_tokens(smollm2_tok, t.prompt)
            assert n - 300 <= got <= n, (kind, n, got)
            if haystack == "filler":
                assert got >= n - 30


def test_count_tokens_forms():
    assert count_tokens(None, "a b  c") == 3

    class Enc:
        def encode(self, text):
            return text.split()

    assert count_tokens(Enc(), "a b") == 2


def test_score_rules():
    t = Task(prompt="", answers=["1234567"], kind="niah_number", depth=0.5, haystack="filler")
    assert score(t, "The number is 1234567.") == 1.0
    assert score(t, "1234567") == 1.0
    assert score(t, "12345678") == 0.0          # inside a longer number: not a match
    assert score(t, "123456") == 0.0
    assert score(t, "") == 0.0
    m = Task(prompt="", answers=["1111111", "2222222", "3333333", "4444444"], kind="multivalue", depth=0.5,
             haystack="filler")
    assert score(m, "1111111, 3333333") == 0.5
    assert score(m, "4444444 2222222 1111111 3333333") == 1.0
    v = Task(prompt="", answers=["ABCDE", "FGHIJ"], kind="vt", depth=0.5, haystack="filler")
    assert score(v, "abcde, FGHIJ") == 1.0      # case-insensitive
    assert score(v, "XABCDE") == 0.0
    u = Task(prompt="", answers=["4c4f7dcb-e4de-4e7c-946f-c5feb828cd3b"], kind="niah_uuid", depth=0.5,
             haystack="filler")
    assert score(u, "is 4c4f7dcb-e4de-4e7c-946f-c5feb828cd3b.") == 1.0
    assert score(u, "is 4c4f7dcb-e4de-4e7c-946f-c5feb828cd3") == 0.0


def test_bad_arguments():
    with pytest.raises(ValueError):
        make_task("nope", 100, 0.5, "filler", None, 0)
    with pytest.raises(ValueError):
        make_task("niah_number", 100, 0.5, "ocean", None, 0)
    with pytest.raises(ValueError):
        make_task("niah_number", 100, 1.5, "filler", None, 0)


def test_longeval_summary_and_budgets(tmp_path):
    import argparse

    from kvstore.benchmarks import longeval

    a = argparse.Namespace(sink=4, window=64, retrieval=0.018, estimation=0.232, top_k=100, ef=128, budget=0.1,
                           quest_page_size=32)
    assert longeval.method_config("full", 2048, a) is None
    s = longeval.method_config("streaming", 2048, a)
    assert s.sink + s.window == 205
    q = longeval.method_config("quest", 2048, a)
    assert q.page_size == 32 and isinstance(q.pages, int) and q.pages == round(204.8 - 68 - 64)
    runs = []
    for m, sc in (("full", 1.0), ("wave", 1.0), ("streaming", 0.0)):
        for task, full_ok in (("niah_number/filler", 1.0), ("vt/filler", 0.0)):
            runs.append({"method": m, "context": 2048, "task": task, "score": sc * full_ok,
                         "read_fraction": 1.0 if m == "full" else 0.1, "seconds": 1.0})
    summ = longeval.summarize(runs, ["full", "wave", "streaming"])
    assert summ["overall"]["full"]["2048"]["tasks_full_can_do"] == ["niah_number/filler"]
    assert summ["overall"]["wave"]["2048"]["score_full_can_do"] == 1.0
    assert summ["overall"]["wave"]["2048"]["score"] == 0.5
    md = longeval.table(summ, ["full", "wave", "streaming"], "t")
    assert "| wave |" in md and "-100.0" in md
    pytest.importorskip("matplotlib")
    longeval.plot(summ, ["full", "wave", "streaming"], "t", tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
