"""Models past 2 GB in bounded memory and disk (issue 19, goal 6): the float graph stored once per
run and reused by ``--prepared-from``, the Qwen2.5 configs at their real sizes, the refusal of a
model that cannot fit, a GGUF written here loaded the way a user's would be."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from quant.onnxfile import data_file, onnx_files
from simulation.prepare import load_simulation_config, prepare, seed_run_dir

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.toml"


def _inode(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_dev, st.st_ino


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("once") / "run"
    cfg = load_simulation_config(SMOKE)
    return cfg, prepare(cfg, out)


def test_float_graph_and_float_weights_are_stored_once_per_run(prepared):
    cfg, prep = prepared
    out = prep.out
    assert prep.float_onnx == out / "device" / "float.onnx" and prep.float_onnx.is_file()
    assert not (out / "float").exists()        # the export directory was linked in, then removed
    graphs = sorted(p for p in out.rglob("*.onnx*") if p.name.startswith("float.onnx"))
    assert graphs == sorted(onnx_files(prep.float_onnx)) == [prep.float_onnx, data_file(prep.float_onnx)]
    profiles = sorted(prep.initial)
    weights = {_inode(out / "device" / p / "model.weights.npz") for p in profiles}
    assert len(profiles) == 2 and len(weights) == 1  # one copy of the float weights, linked
    again = prepare(cfg, out)                  # a resumed run reuses the graph, exports nothing
    assert again.float_onnx == prep.float_onnx and _inode(again.float_onnx) == _inode(prep.float_onnx)


def test_prepared_from_links_the_float_graph_and_names_what_is_missing(prepared, tmp_path):
    cfg, prep = prepared
    seeded = tmp_path / "seeded"
    seed_run_dir(cfg, seeded, prep.out)
    assert _inode(seeded / "device" / "float.onnx") == _inode(prep.float_onnx)
    with pytest.raises(ValueError, match="no such run directory"):
        seed_run_dir(cfg, tmp_path / "other", tmp_path / "gone")
    broken = tmp_path / "broken"
    seed_run_dir(cfg, broken, prep.out)
    os.unlink(broken / "device" / "float.onnx")           # the source's own file stays
    with pytest.raises(ValueError, match="the float graph .*float.onnx is missing"):
        seed_run_dir(cfg, tmp_path / "from-broken", broken)
    assert prep.float_onnx.is_file()


def test_random_calibration_shares_the_weights_and_gives_the_same_bits():
    """The instrumented copy shares the float model's weights and does not cache fake-quantized
    ones (two models' memory saved): the starting QParams are those of a full deep copy."""
    import copy

    import numpy as np

    from quant.instrument import fingerprint, get_qparams, quantize_, set_mode, set_qparams
    from quant.ptq import calibrate_activations
    from quant.qparams import QParams
    from simulation.config import quant_config_for
    from simulation.models import tiny_qwen2
    from simulation.prepare import random_calibration
    from simulation.sequences import random_token_sequences

    cfg = load_simulation_config(SMOKE)
    model = tiny_qwen2(seed=1)
    entry = cfg.fleet[0]
    qcfg = quant_config_for(entry.load(), entry)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = random_calibration(model, qcfg, cfg, model.config.vocab_size, entry.load().name)
    assert all(torch_equal(before[k], v) for k, v in model.state_dict().items())  # untouched

    m = copy.deepcopy(model)                                   # the recipe as it was
    quantize_(m, qcfg)
    set_mode(m, "float", "activations")
    ids = random_token_sequences(model.config.vocab_size, cfg.data.random_sequences, cfg.data.seq_len, cfg.data.seed)
    points = calibrate_activations(m, [ids[i:i + 4] for i in range(0, len(ids), 4)], cfg.server.bins,
                                   cfg.server.calibrator_for(entry.load().name))
    set_qparams(m, QParams(points, model=fingerprint(m)))
    want = get_qparams(m)
    assert got.model == want.model and sorted(got.points) == sorted(want.points)
    for k, p in want.points.items():
        assert np.array_equal(got.points[k].scale, p.scale) and np.array_equal(got.points[k].zero_point, p.zero_point), k


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


# ------------------------------------------------------------------------------ a GGUF a user names

def write_gguf(model, path: Path, arch: str) -> Path:
    """``model`` (a tiny HF Llama/Qwen2) as an F32 GGUF the way llama.cpp's converter writes it:
    its tensor names, Llama's q/k rows permuted, and a byte-level BPE tokenizer (the 256 bytes as
    GPT-2 spells them, no merges, EOS 256)."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    c = model.config
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    byte = bytes_to_unicode()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([byte[b] for b in range(256)] + ["<eos>"])
    w.add_token_types([1] * 256 + [3])
    w.add_token_merges([])
    w.add_token_scores([0.0] * 257)
    w.add_eos_token_id(256)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), c.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.detach().float().numpy().copy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):  # llama.cpp's rope layout
            heads = c.num_attention_heads if ".q_proj." in name else c.num_key_value_heads
            a = a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_gguf_named_in_the_config_loads_as_the_model_it_was_written_from(arch, tmp_path):
    """The real-model path (design.md section 11): transformers' GGUF loader, q/k/v biases for
    Qwen2, an untied lm_head, the tokenizer from the file."""
    pytest.importorskip("gguf")
    import torch

    from simulation.models import load_model, tiny_llama, tiny_qwen2

    src = (tiny_llama if arch == "llama" else tiny_qwen2)(seed=5, tie_word_embeddings=False)
    path = write_gguf(src, tmp_path / f"tiny-{arch}.gguf", arch)
    model, tokenizer = load_model(path)
    assert type(model).__name__ == type(src).__name__ and not model.config.tie_word_embeddings
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    ids = torch.as_tensor([tokenizer.encode("To be, or not to be", add_special_tokens=False)])
    assert ids.tolist() == [list(b"To be, or not to be")]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, src(ids).logits)


def test_a_run_prepares_from_a_gguf_named_in_the_config(tmp_path):
    """``model = "<file>.gguf"`` in a simulation config: preparation loads it, exports it and
    writes the device directory the clients run."""
    pytest.importorskip("gguf")
    import numpy as np

    from client.runtime import ort_session
    from simulation.models import tiny_qwen2

    path = write_gguf(tiny_qwen2(seed=2, tie_word_embeddings=False), tmp_path / "user.gguf", "qwen2")
    base = load_simulation_config(SMOKE)
    cfg = type(base).model_validate({**base.model_dump(), "model": str(path)})
    prep = prepare(cfg, tmp_path / "run")
    assert (prep.device_dir / "fleet.json").is_file() and sorted(prep.initial) == ["int16", "int8"]
    logits = ort_session(prep.float_onnx).run(["logits"], {"input_ids": prep.evals[:1]})[0]
    assert logits.shape[-1] == 257 and np.isfinite(logits).all()


# ------------------------------------------------------------------------------ refusing early

def test_model_size_without_loading_the_weights(tmp_path):
    import torch

    from simulation.memory import model_size
    from simulation.models import QWEN2_CONFIGS, parameter_count, tiny_llama, tiny_qwen2

    assert model_size("qwen2.5-0.5b-random").params == parameter_count("qwen2.5-0.5b-random") == 494_032_768
    r1 = model_size("r1-distill-qwen-1.5b-random")
    assert (r1.params, r1.vocab, r1.tied) == (1_777_088_000, 151936, False)
    assert set(QWEN2_CONFIGS) == {"qwen2.5-0.5b-random", "qwen2.5-1.5b-random", "r1-distill-qwen-1.5b-random"}
    tiny = tiny_llama()
    assert model_size("tiny-llama").params == sum(p.numel() for p in {id(p): p for p in tiny.parameters()}.values())
    pytest.importorskip("gguf")
    src = tiny_qwen2(seed=1, tie_word_embeddings=False)
    size = model_size(str(write_gguf(src, tmp_path / "m.gguf", "qwen2")))
    assert size.params == sum(p.numel() for p in src.parameters()) and not size.tied and size.vocab == 257
    src.save_pretrained(tmp_path / "hf")
    assert model_size(str(tmp_path / "hf")).params == size.params
    del torch


def test_estimate_refuses_what_cannot_fit_and_says_why():
    from simulation.memory import ModelTooLarge, check_fits, estimate_peak_bytes, model_size

    small, big = model_size("smollm2"), model_size("r1-distill-qwen-1.5b-random")
    a = estimate_peak_bytes(small, batch=8, seq_len=128, client_actors=2)
    b = estimate_peak_bytes(big, batch=8, seq_len=128, client_actors=2)
    assert 0 < a["peak"] < b["peak"] and a["peak"] == max(a["prepare"], a["run"])
    assert estimate_peak_bytes(big, batch=8, seq_len=128, client_actors=1)["run"] < b["run"]
    assert check_fits(small, batch=8, seq_len=128, client_actors=2, memory=24 * 10**9)["peak"] == a["peak"]
    with pytest.raises(ModelTooLarge, match=r"r1-distill-qwen-1.5b-random: 1.78B parameters .* this machine "
                                            r"has 8.0 GB .*Use a smaller model"):
        check_fits(big, batch=8, seq_len=128, client_actors=2, memory=8 * 10**9)


def test_prepare_refuses_a_model_too_large_for_any_machine_before_loading_it(tmp_path):
    """A 70B Llama named by its config.json (no weights exist at all): refused in seconds."""
    import json
    import time

    from simulation.memory import ModelTooLarge

    d = tmp_path / "llama-70b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
        "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
        "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}))
    base = load_simulation_config(SMOKE)
    cfg = type(base).model_validate({**base.model_dump(), "model": str(d)})
    t0 = time.perf_counter()
    with pytest.raises(ModelTooLarge, match=r"70.55B parameters"):
        prepare(cfg, tmp_path / "run")
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "run" / "device").exists()
