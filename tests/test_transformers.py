"""transformers integration: generation through KVStoreCache equals exact attention
when the budgets cover the context; bookkeeping; clear errors."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvstore import StoreConfig  # noqa: E402
from kvstore.integrations.transformers import KVStoreCache  # noqa: E402

FULL = {
    "full": {},
    "wave": {"candidates": 1.0, "retrieval": 1.0, "estimation": 0, "candidate_dtype": "kv"},
    "graph": {"top_k": 4096, "ef": 4096},
    "quest": {"pages": 1.0},
}


def tiny(kind: str = "llama"):
    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  bos_token_id=None, eos_token_id=None, pad_token_id=0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    else:
        cfg = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    # one config each: set_attn_implementation changes the config, which models built from one object share
    ref = cls(copy.deepcopy(cfg)).eval()
    ref.set_attn_implementation("eager")  # exact, and masks left padding at decode
    ours = cls(copy.deepcopy(cfg)).eval()
    ours.load_state_dict(ref.state_dict())
    ours.set_attn_implementation("kvstore")
    return cfg, ref, ours


def generate(model, ids, mask, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, pad_token_id=0, **kw)


@pytest.mark.parametrize("method", list(FULL))
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_greedy_generation_equals_full_attention(method, kind):
    cfg, ref, ours = tiny(kind)
    ids = torch.randint(1, 128, (2, 300))
    mask = torch.ones_like(ids)
    mask[1, :60] = 0  # left padding
    cache = KVStoreCache(cfg, StoreConfig(method=method, window=16, update_interval=8, **FULL[method]))
    got = generate(ours, ids, mask, do_sample=False, cache=cache)
    # the reference generates each sequence alone, unpadded (transformers' own
    # padded-batch decode is not exact for every model family)
    for row, start in ((0, 0), (1, 60)):
        alone = ids[row:row + 1, start:]
        expected = generate(ref, alone, torch.ones_like(alone), do_sample=False)
        assert torch.equal(got[row, 300:], expected[0, alone.shape[1]:])
    assert cache.get_seq_length() == 300 + 23
    assert cache.store.seq_lengths(0) == [300 + 23, 240 + 23]


def test_sampled_generation_equals_full_attention():
    cfg, ref, ours = tiny()
    ids = torch.randint(1, 128, (1, 200))
    mask = torch.ones_like(ids)
    torch.manual_seed(1)
    expected = generate(ref, ids, mask, do_sample=True, top_k=20)
    cache = KVStoreCache(cfg, StoreConfig(method="wave", candidates=1.0, retrieval=1.0, estimation=0, window=16,
                                          candidate_dtype="kv"))
    torch.manual_seed(1)
    got = generate(ours, ids, mask, do_sample=True, top_k=20, cache=cache)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("method", ["wave", "quest"])
def test_check_finite_off_generates_the_same_and_never_checks_a_step(method, monkeypatch):
    """check_finite=False: the decode steps run no NaN/inf check (a GPU sync on CUDA) and give the same tokens."""
    cfg, _, ours = tiny()
    ids = torch.randint(1, 128, (2, 300))
    mask = torch.ones_like(ids)
    outs, checks = [], []
    for check in (True, False):
        cache = KVStoreCache(cfg, StoreConfig(method=method, window=16, update_interval=8, check_finite=check))
        import kvstore.store as store_mod

        calls = []
        orig = store_mod._check_finite
        monkeypatch.setattr(store_mod, "_check_finite",
                            lambda what, x, name: calls.append(tuple(x.shape)) or orig(what, x, name))
        outs.append(generate(ours, ids, mask, do_sample=False, cache=cache))
        monkeypatch.undo()
        checks.append([c for c in calls if len(c) == 4 and c[2] == 1])  # per-step q/k/v: one token
        assert cache.store.config.check_finite is check
    assert torch.equal(outs[0], outs[1])
    assert len(checks[0]) == 23 * cfg.num_hidden_layers * 3  # k, v, q at every layer of every decode step
    assert checks[1] == []


def test_prefill_is_chunked_and_exact(monkeypatch):
    import kvstore.integrations.transformers as integ

    monkeypatch.setattr(integ, "PREFILL_CHUNK", 64)
    cfg, ref, ours = tiny()
    ids = torch.randint(1, 128, (1, 300))
    with torch.no_grad():
        a = ref(ids).logits
        b = ours(ids, cache=KVStoreCache(cfg, StoreConfig(method="wave"))).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_one_call_causal_prefill_matches_the_chunks(monkeypatch):
    import kvstore.integrations.transformers as integ

    monkeypatch.setattr(integ, "PREFILL_CHUNK", 16)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 70, 32, generator=g, dtype=torch.float64) for h in (6, 2, 2))
    one = integ._causal_sdpa(q, k, v, 0.2)                       # the CUDA path, here on the CPU
    chunks = integ._chunked_exact(q, k, v, None, 0.2)
    assert one.shape == chunks.shape == (2, 70, 6, 32)
    torch.testing.assert_close(one, chunks, rtol=1e-10, atol=1e-10)
    # on the CPU, and with a padding mask anywhere, the chunks run
    assert torch.equal(integ._exact_prefill(q, k, v, None, 0.2), chunks)


def test_without_cache_attention_is_exact():
    cfg, ref, ours = tiny()
    ids = torch.randint(1, 128, (2, 50))
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)


def test_default_budgets_generate_and_read_little():
    cfg, ref, ours = tiny()
    ids = torch.randint(1, 128, (1, 1500))
    cache = KVStoreCache(cfg, StoreConfig(method="wave"))
    out = generate(ours, ids, torch.ones_like(ids), do_sample=False, cache=cache)
    assert out.shape == (1, 1524)
    assert cache.store.stats()["layers"][0]["read_fraction"] < 0.3


def test_unsupported_model_and_beam_search():
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16)
    with pytest.raises(ValueError, match="model types"):
        KVStoreCache(cfg, StoreConfig())
    lcfg, _, _ = tiny()
    cache = KVStoreCache(lcfg, StoreConfig())
    with pytest.raises(NotImplementedError, match="beam"):
        cache.layers[0].reorder_cache(torch.tensor([0]))


def test_version_check(monkeypatch):
    import kvstore.integrations.transformers as integ

    monkeypatch.setattr(integ, "_installed_version", lambda: "4.40.0")
    with pytest.raises(ImportError, match="supports transformers"):
        integ._require_transformers()


@pytest.mark.slow
def test_real_model_passkey_with_kvstore():
    """SmolLM2-135M finds a pass key in a ~2K-token prompt through kvstore (wave), reading < 20% per step (at 2K
    the budget floors, the steady zone and the centroids are a larger share than at longer contexts)."""
    from kvstore.datasets.text import smollm2_path

    try:
        smollm2_path()
    except ImportError as e:
        pytest.skip(str(e))
    from kvstore.demo import passkey_prompt
    from kvstore.generation import answer, chat_ids, load_model

    model, tok = load_model()
    ids = chat_ids(tok, passkey_prompt(tok, 2000, "48213", 0.4))
    ans = answer(model, tok, ids, StoreConfig(method="wave"), max_new_tokens=12)
    assert "48213" in ans.text
    assert ans.read_fraction < 0.2


def test_saved_context_answers_three_questions_like_a_fresh_prefill(tmp_path):
    """A document is prefilled once and saved; three questions continue from the
    saved context (no re-prefill) and match full attention over a fresh prefill."""
    cfg, ref, ours = tiny()
    doc = torch.randint(1, 128, (1, 400))
    cache = KVStoreCache(cfg, StoreConfig(method="wave", candidates=1.0, retrieval=1.0, estimation=0, window=16,
                                          candidate_dtype="kv"))
    with torch.no_grad():
        ours(doc, cache=cache)
    path = tmp_path / "doc.kvstore"
    cache.save(path)
    for seed in range(3):
        question = torch.randint(1, 128, (1, 12), generator=torch.Generator().manual_seed(seed))
        ids = torch.cat([doc, question], 1)
        expected = generate(ref, ids, torch.ones_like(ids), do_sample=False)
        saved = KVStoreCache.from_saved(path, cfg)
        assert saved.get_seq_length() == 400
        got = generate(ours, ids, torch.ones_like(ids), do_sample=False, cache=saved)
        assert torch.equal(got, expected)
        assert saved.get_seq_length() == 400 + 12 + 23


def test_saved_context_refused_by_another_model(tmp_path):
    cfg, _, ours = tiny()
    cache = KVStoreCache(cfg, StoreConfig())
    with torch.no_grad():
        ours(torch.randint(1, 128, (1, 50)), cache=cache)
    cache.save(tmp_path / "c.kvstore")
    other = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="different model"):
        KVStoreCache.from_saved(tmp_path / "c.kvstore", other)

