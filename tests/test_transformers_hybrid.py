"""transformers integration: hybrid sliding/global models (Gemma-3-, Gemma-2-, Qwen2-style), head dims 64-256, the
KVStoreCache that generate and pipeline build for attn_implementation="kvstore", the device and dtype taken from
the key states, reset, and the refusals (beam search, crop, other caches, softcapping)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvstore import KVStore, StoreConfig  # noqa: E402
from kvstore.integrations import transformers as integ  # noqa: E402
from kvstore.integrations.transformers import KVStoreCache, KVStoreLayer, KVStoreSlidingLayer  # noqa: E402

FULL = {"method": "wave", "candidates": 1.0, "retrieval": 1.0, "estimation": 0, "candidate_dtype": "kv"}  # exact
SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, max_position_embeddings=1024,
             bos_token_id=None, eos_token_id=None, pad_token_id=0)


def gemma3_config(**kw):
    """Gemma-3 layout: sliding and global layers, head_dim 256, one KV head, query_pre_attn_scalar != head_dim."""
    return transformers.Gemma3TextConfig(
        **SMALL, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=256,
        query_pre_attn_scalar=128, sliding_window=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"], **kw)


def gemma2_config(**kw):
    kw.setdefault("attn_logit_softcapping", None)
    return transformers.Gemma2Config(**SMALL, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     head_dim=64, query_pre_attn_scalar=32, sliding_window=24,
                                     final_logit_softcapping=None, **kw)


def qwen2_config():
    return transformers.Qwen2Config(**SMALL, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    use_sliding_window=True, sliding_window=24, max_window_layers=1)


def llama_config(head_dim=None, layers=2):
    heads = 2 if head_dim else 4
    return transformers.LlamaConfig(**SMALL, num_hidden_layers=layers, num_attention_heads=heads,
                                    num_key_value_heads=1 if head_dim else 2, head_dim=head_dim)


CLASSES = {"gemma3_text": transformers.Gemma3ForCausalLM, "gemma2": transformers.Gemma2ForCausalLM,
           "qwen2": transformers.Qwen2ForCausalLM, "llama": transformers.LlamaForCausalLM}


def models(cfg, ref_attn="sdpa"):
    """(reference, kvstore) models with the same random weights; one config each (set_attn_implementation
    changes the config object)."""
    cls = CLASSES[cfg.model_type]
    torch.manual_seed(0)
    ref = cls(copy.deepcopy(cfg)).eval()
    ref.set_attn_implementation(ref_attn)
    ours = cls(copy.deepcopy(cfg)).eval()
    ours.load_state_dict(ref.state_dict())
    ours.set_attn_implementation("kvstore")
    return ref, ours


def generate(model, ids, new=12, **kw):
    return model.generate(input_ids=ids, attention_mask=kw.pop("attention_mask", torch.ones_like(ids)),
                          max_new_tokens=new, do_sample=False, pad_token_id=0, **kw)


@pytest.fixture
def attends(monkeypatch):
    """Counts KVStore.attend calls (the real method runs)."""
    calls = []
    real = KVStore.attend
    monkeypatch.setattr(KVStore, "attend", lambda self, layer, q: calls.append(layer) or real(self, layer, q))
    return calls


@pytest.mark.parametrize("make", [gemma3_config, gemma2_config, qwen2_config, llama_config])
def test_cache_layers_follow_the_model_like_dynamic_cache(make):
    cfg = make()
    ours, theirs = KVStoreCache(cfg), transformers.DynamicCache(config=cfg)
    assert ours.is_sliding == theirs.is_sliding
    for a, b in zip(ours.layers, theirs.layers):
        assert isinstance(a, KVStoreSlidingLayer if b.is_sliding else KVStoreLayer)
        if b.is_sliding:
            assert a.sliding_window == b.sliding_window


@pytest.mark.parametrize("make", [gemma3_config, gemma2_config, qwen2_config])
def test_hybrid_generation_equals_exact_attention(make):
    """A left-padded batch of prompts longer than the window: sliding layers exact on their window, global layers
    through the store; each row's tokens equal the exact model's for that prompt alone."""
    cfg = make()
    ref, ours = models(cfg, "eager" if cfg.model_type == "gemma2" else "sdpa")
    ids = torch.randint(1, 128, (2, 56), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :12] = 0
    cache = KVStoreCache(cfg, StoreConfig(window=16, update_interval=8, **FULL))
    got = generate(ours, ids, cache=cache, attention_mask=mask)
    for row, start in ((0, 0), (1, 12)):
        alone = ids[row:row + 1, start:]
        assert torch.equal(got[row, 56:], generate(ref, alone)[0, alone.shape[1]:])
    stats = cache.store.stats()["layers"]
    for i, sliding in enumerate(cache.is_sliding):
        assert (stats[i] is None) == sliding  # the store holds the global layers only
        if sliding:
            assert cache.layers[i].keys.shape[2] == cfg.sliding_window - 1
    glob = cache.is_sliding.index(False)
    assert cache.store.seq_lengths(glob) == [56 + 11, 44 + 11]
    assert cache.get_seq_length() == 56 + 11


def test_gemma3_decode_logits_honour_the_query_scaling():
    """Decode logits equal sdpa's; Gemma-3's scaling (query_pre_attn_scalar ** -0.5) is not 1/sqrt(head_dim)."""
    cfg = gemma3_config()
    ref, ours = models(cfg)
    assert ours.model.layers[1].self_attn.scaling != cfg.head_dim ** -0.5
    ids = torch.randint(1, 128, (2, 60), generator=torch.Generator().manual_seed(2))
    steps = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(3))

    def logits(model, cache):
        with torch.no_grad():
            model(ids, cache=cache)
            return torch.stack([model(steps[:, t:t + 1], cache=cache).logits[:, -1] for t in range(6)])

    expected = logits(ref, transformers.DynamicCache(config=cfg))
    got = logits(ours, KVStoreCache(cfg, StoreConfig(window=16, update_interval=4, **FULL)))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_head_dims_generate_like_sdpa(head_dim):
    cfg = llama_config(head_dim, layers=1)
    ref, ours = models(cfg)
    ids = torch.randint(1, 128, (1, 70), generator=torch.Generator().manual_seed(head_dim))
    cache = KVStoreCache(cfg, StoreConfig(window=16, update_interval=8, **FULL))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = generate(ours, ids, cache=cache)
    assert not [w for w in caught if "deprecat" in str(w.message).lower()]  # cache= is the current keyword
    assert torch.equal(got, generate(ref, ids))
    assert cache.store.head_dim == head_dim


@pytest.mark.parametrize("make", [llama_config, gemma3_config])
def test_attn_implementation_alone_decodes_through_the_store(make, attends):
    """No cache passed: generate builds a KVStoreCache (cache_config: its StoreConfig; default StoreConfig())."""
    cfg = make()
    ref, ours = models(cfg)
    ids = torch.randint(1, 128, (2, 50), generator=torch.Generator().manual_seed(4))
    expected = generate(ref, ids, new=8)
    assert attends == []
    assert torch.equal(generate(ours, ids, new=8, cache_config=FULL), expected)
    n_global = KVStoreCache(cfg).is_sliding.count(False)
    assert len(attends) == 7 * n_global  # every decode step of every global layer
    out = ours.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert isinstance(out.cache, KVStoreCache)
    assert out.cache.store_config == StoreConfig()
    assert out.cache.store.seq_lengths(out.cache.is_sliding.index(False)) == [52, 52]


def word_tokenizer():
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

    tok = Tokenizer(tok_models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0")


def test_pipeline_decodes_through_the_store(attends):
    cfg = llama_config()
    ref, ours = models(cfg)
    tok = word_tokenizer()
    prompt = " ".join(f"w{i}" for i in torch.randint(1, 128, (60,), generator=torch.Generator().manual_seed(5)))
    kw = dict(max_new_tokens=8, do_sample=False)
    expected = transformers.pipeline("text-generation", model=ref, tokenizer=tok)(prompt, **kw)
    assert attends == []
    got = transformers.pipeline("text-generation", model=ours, tokenizer=tok)(prompt, cache_config=FULL, **kw)
    assert got == expected
    assert len(attends) == 7 * cfg.num_hidden_layers



def test_answer_runs_exact_attention_or_the_store():
    """generation.answer: config=None runs the model's exact attention (kvstore is restored after), a StoreConfig
    a KVStoreCache; with full budgets the answers agree."""
    from kvstore.generation import answer

    _, ours = models(llama_config())
    ids = torch.randint(1, 128, (1, 60), generator=torch.Generator().manual_seed(8))
    full = answer(ours, word_tokenizer(), ids, None, max_new_tokens=8)
    assert ours.config._attn_implementation == "kvstore"
    through = answer(ours, word_tokenizer(), ids, StoreConfig(window=16, **FULL), max_new_tokens=8)
    assert full.text and full.text == through.text
    assert (full.method, full.read_fraction, through.method) == ("full", 1.0, "wave")

def test_cache_takes_device_and_dtype_from_the_key_states():
    """No device given: no store until the first update, then one on the keys' device (the store picks its layer
    implementation from it); after reset a batch of another size and dtype; a pinned device is checked."""
    cfg = llama_config()
    _, ours = models(cfg)
    cache = KVStoreCache(cfg, StoreConfig(method="wave"))
    assert cache.store is None and cache.device is None
    ids = torch.randint(1, 128, (2, 40))
    with torch.no_grad():
        ours(ids, cache=cache)
    assert cache.device == ids.device and cache.store.device == ids.device
    assert [s["layer"] for s in cache.store.stats()["layers"]] == ["heads", "heads"]  # the CPU layer
    assert cache.layers[0].device == ids.device and cache.layers[0].dtype == torch.float32
    cache.reset()
    ours.to(torch.bfloat16)
    with torch.no_grad():
        ours(torch.randint(1, 128, (3, 30)), cache=cache)
        ours(torch.randint(1, 128, (3, 1)), cache=cache)
    assert cache.layers[0].dtype == torch.bfloat16 and cache.store.seq_lengths(0) == [31] * 3
    pinned = KVStoreCache(cfg, device="meta")
    with pytest.raises(ValueError, match=r"device=meta"):
        with torch.no_grad():
            ours(ids, cache=pinned)


@pytest.mark.parametrize("make", [llama_config, gemma3_config])
def test_reset_then_a_batch_of_another_size(make):
    cfg = make()
    ref, ours = models(cfg)
    cache = KVStoreCache(cfg, StoreConfig(window=16, update_interval=8, **FULL))
    first = torch.randint(1, 128, (2, 40), generator=torch.Generator().manual_seed(6))
    generate(ours, first, new=4, cache=cache)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.store.batch_size is None
    ids = torch.randint(1, 128, (3, 36), generator=torch.Generator().manual_seed(7))
    assert torch.equal(generate(ours, ids, new=6, cache=cache), generate(ref, ids, new=6))
    assert cache.get_seq_length() == 36 + 5


def test_beam_search_assisted_decoding_and_crop_are_refused():
    cfg = gemma3_config()
    _, ours = models(cfg)
    ids = torch.randint(1, 128, (1, 30))
    with pytest.raises(ValueError, match="beam search is not supported"):
        generate(ours, ids, new=3, num_beams=2)
    with pytest.raises(ValueError, match="beam search is not supported"):
        generate(ours, ids, new=3, num_beams=2, cache=KVStoreCache(cfg))
    with pytest.raises(ValueError, match="assisted generation is not supported"):
        generate(ours, ids, new=3, prompt_lookup_num_tokens=2)
    cache = KVStoreCache(cfg)
    generate(ours, ids, new=3, cache=cache)
    length = cache.get_seq_length()
    for call, what in ((lambda: cache.crop(-1), "crop"), (lambda: cache.reorder_cache(torch.tensor([0])), "beam"),
                       (lambda: cache.batch_repeat_interleave(2), "repeat"),
                       (lambda: cache.batch_select_indices(torch.tensor([0])), "select")):
        with pytest.raises(NotImplementedError, match=what):
            call()
    assert cache.get_seq_length() == length and cache.layers[0].keys.shape[2] == cfg.sliding_window - 1
    with pytest.raises(NotImplementedError, match="sliding-window"):
        cache.save("unused.kvstore")


def test_other_caches_and_attention_implementations_are_refused():
    cfg = llama_config()
    ref, ours = models(cfg)
    ids = torch.randint(1, 128, (1, 20))
    for kw, what in (({"cache": transformers.DynamicCache()}, "got a DynamicCache"), ({"use_cache": False}, "use_cache"),
                     ({"cache_implementation": "static"}, "cache_implementation"),
                     ({"cache_config": 3}, "cache_config must be")):
        with pytest.raises((ValueError, TypeError), match=what):
            generate(ours, ids, new=2, **kw)
    with torch.no_grad():  # a forward with a DynamicCache: the prefill is exact, a decode step raises
        cache = transformers.DynamicCache()
        torch.testing.assert_close(ours(ids, cache=cache).logits, ref(ids).logits, rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match="not a KVStoreCache"):
            ours(ids[:, :1], cache=cache)
    with pytest.raises(ValueError, match="needs attn_implementation='kvstore'"):
        generate(ref, ids, new=2, cache=KVStoreCache(cfg))
    with torch.no_grad():  # a KVStoreCache in a model with another attention: its next update raises
        cache = KVStoreCache(cfg)
        ref(ids, cache=cache)
        with pytest.raises(RuntimeError, match="never reached the kvstore attention"):
            ref(ids[:, :1], cache=cache)


def test_unsupported_attention_variants_are_refused():
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        KVStoreCache(gemma2_config(attn_logit_softcapping=50.0))
    with pytest.raises(ValueError, match="sliding-window attention"):
        KVStoreCache(transformers.MistralConfig(**SMALL, num_hidden_layers=2, sliding_window=32))
    KVStoreCache(transformers.MistralConfig(**SMALL, num_hidden_layers=2, sliding_window=None))


def test_exact_attention_with_offset_window_and_softcap():
    """The exact path used for prefill, windows and cacheless forwards: queries at the end of the keys, a sliding
    window and tanh softcapping, against a direct computation in float64."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, 16, generator=g, dtype=torch.float64) for h, n in ((4, 5), (2, 40), (2, 40)))
    qpos = torch.arange(35, 40)[:, None]
    kpos = torch.arange(40)[None, :]
    for window, cap in ((None, None), (8, None), (None, 5.0), (8, 5.0)):
        s = q @ k.repeat_interleave(2, 1).transpose(2, 3) * 0.3
        if cap is not None:
            s = torch.tanh(s / cap) * cap
        keep = (kpos <= qpos) & ((kpos > qpos - window) if window else True)
        expected = (torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v.repeat_interleave(2, 1)).transpose(1, 2)
        got = integ._chunked_exact(q, k, v, None, 0.3, cap, window)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("make", [llama_config, gemma3_config])
def test_generate_on_cuda_with_defaults_runs_the_gpu_wave_layer(make):
    """A CUDA model and KVStoreCache(model.config) with no device: the store lands on the model's GPU and runs the
    batched GPU wave layer; with full budgets the tokens equal sdpa's."""
    cfg = make()
    ref, ours = (m.cuda() for m in models(cfg))
    ids = torch.randint(1, 128, (2, 300), generator=torch.Generator().manual_seed(9)).cuda()
    cache = KVStoreCache(ours.config)
    generate(ours, ids, new=8, cache=cache)
    assert cache.device.type == "cuda"
    assert {s["layer"] for s in cache.store.stats()["layers"] if s} == {"wave"}
    full = KVStoreCache(ours.config, StoreConfig(window=16, update_interval=8, **FULL))
    assert torch.equal(generate(ours, ids, cache=full), generate(ref, ids))
