"""The LiteRT (TFLite) export: the .tflite that quant.tflite writes computes in the LiteRT
interpreter what the ONNX Runtime integer model computes for the same QParams, carries the fleet's
scales and zero points in its tensors' quantization fields, and can be patched by name.

Needs the fedquant[litert] extra (ai-edge-litert, litert-torch): skipped without it. Tiny
random-init models (tests/test_export.py's, with biases and non-trivial norms) and random
SmoothQuant factors; each model is converted once per module (litert-torch: a few seconds).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("ai_edge_litert", reason="the LiteRT interpreter is in the optional fedquant[litert] extra "
                                           "(pip install -e '.[litert]', README 'LiteRT')")
pytest.importorskip("litert_torch", reason="the LiteRT converter is in the optional fedquant[litert] extra "
                                         "(pip install -e '.[litert]', README 'LiteRT')")

from client.litert_runtime import LiteRTRuntime  # noqa: E402
from client.runtime import ort_session  # noqa: E402
from quant.export import export_float_onnx, float_linears  # noqa: E402
from quant.metrics import nll_sum_and_count  # noqa: E402
from quant.qdq import export_qdq  # noqa: E402
from quant.qparams import PointParams, QParams  # noqa: E402
from quant.tflite import convert_float, patch_points, quantize_points, stored_weights  # noqa: E402
from tests.test_export import batch, minmax_qparams, tiny  # noqa: E402

SEQ = 16


def _tensors(path) -> dict:
    from ai_edge_litert.tools import flatbuffer_utils

    m = flatbuffer_utils.read_model(str(path))
    g = m.subgraphs[0]
    return {(t.name.decode() if isinstance(t.name, bytes) else t.name): (t, m.buffers[t.buffer]) for t in g.tensors}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def converted(request, tmp_path_factory):
    """(model, smoothed QParams, the ORT QDQ model's path, the float device .tflite, weights)."""
    d = tmp_path_factory.mktemp(f"litert-{request.param}")
    model = tiny(request.param)
    rng = np.random.default_rng(0)
    smoothing = {p: rng.uniform(0.5, 2.0, w.shape[1]).astype(np.float32)
                 for p, (w, _) in float_linears(model).items()}
    qp = minmax_qparams(model, batch(seed=2, shape=(4, SEQ)))
    qp = QParams(qp.points, smoothing=smoothing)
    export_float_onnx(model, d / "float.onnx")
    export_qdq(model, qp, d / "qdq.onnx", float_onnx=d / "float.onnx")
    weights = convert_float(model, qp, d / "device.float.tflite", batch=1, seq_len=SEQ)
    return model, qp, d / "qdq.onnx", d / "device.float.tflite", weights, d


def _ort(path, ids):
    return ort_session(path).run(["logits"], {"input_ids": ids.astype(np.int64)})[0]


def test_qdq_tflite_computes_what_ort_integer_model_computes(converted):
    model, qp, qdq, dev, weights, d = converted
    carried = quantize_points(dev, weights, qp, d / "fedquant.tflite")
    assert set(carried) == set(qp.points)
    ids = batch(seed=3, shape=(1, SEQ)).numpy()
    ref = _ort(qdq, ids)
    for xnnpack in (True, False):       # the XNNPACK delegate and TFLite's builtin kernels
        got = LiteRTRuntime(d / "fedquant.tflite", xnnpack=xnnpack).logits(ids)
        assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()
        assert nll_sum_and_count(got, ids)[0] == pytest.approx(nll_sum_and_count(ref, ids)[0], rel=1e-5)
    # the float device model differs from the QDQ one: the points do something
    assert np.abs(LiteRTRuntime(dev).logits(ids) - ref).max() > 1e-3
    # int8 weights and embedding rows replace the float ones in the file (the tied embedding
    # reads lm_head's int8 rows: one copy)
    assert (d / "fedquant.tflite").stat().st_size < 0.5 * dev.stat().st_size
    assert "lm_head:weight.embedding" in carried["lm_head:weight"]
    float_emb = d / "float-embedding.tflite"
    quantize_points(dev, weights, qp, float_emb, embedding="float")
    np.testing.assert_allclose(LiteRTRuntime(float_emb).logits(ids), ref, atol=1e-4 * np.abs(ref).max())


def test_points_carry_the_fleets_scales_and_zero_points(converted):
    model, qp, qdq, dev, weights, d = converted
    quantize_points(dev, weights, qp, d / "fields.tflite")
    tensors = _tensors(d / "fields.tflite")
    from ai_edge_litert import schema_py_generated as schema

    for key, p in qp.points.items():
        t, buf = tensors[key]
        np.testing.assert_array_equal(np.asarray(t.quantization.scale, np.float32),
                                      np.asarray(p.scale, np.float32).reshape(-1))
        np.testing.assert_array_equal(np.asarray(t.quantization.zeroPoint), np.asarray(p.zero_point).reshape(-1))
        if key.endswith(":input"):      # the int8 profile's uint8 activations stay uint8
            assert t.type == schema.TensorType.UINT8
        else:
            assert t.type == schema.TensorType.INT8 and t.quantization.quantizedDimension == 0
            assert np.asarray(buf.data).size == weights[key.rsplit(":", 1)[0]].size


def test_integer_fc_kernels_need_an_output_scale_and_then_stay_close(converted):
    model, qp, qdq, dev, weights, d = converted
    with pytest.raises(ValueError, match="output_ranges"):
        quantize_points(dev, weights, qp, d / "int.tflite", integer=True)
    from bench.litert import fc_output_ranges

    ranges = fc_output_ranges(model, qp, batch(seed=2, shape=(4, SEQ)).numpy())
    quantize_points(dev, weights, qp, d / "int.tflite", integer=True, output_ranges=ranges)
    ids = batch(seed=3, shape=(1, SEQ)).numpy()
    ref = nll_sum_and_count(_ort(qdq, ids), ids)[0]
    got = nll_sum_and_count(LiteRTRuntime(d / "int.tflite").logits(ids), ids)[0]
    assert got == pytest.approx(ref, rel=0.02)
    t, _ = _tensors(d / "int.tflite")["model.layers.0.mlp.up_proj:input"]
    from ai_edge_litert import schema_py_generated as schema

    p = qp.points["model.layers.0.mlp.up_proj:input"]
    assert t.type == schema.TensorType.INT8 and t.quantization.zeroPoint == [int(p.zero_point) - 128]


def _release(qp: QParams) -> QParams:
    """New scales and zero points for two Linears (q_proj has a bias in Qwen2)."""
    points = {}
    for path in ("model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"):
        pin, pw = qp.points[f"{path}:input"], qp.points[f"{path}:weight"]
        points[f"{path}:input"] = PointParams(pin.spec, np.float32(pin.scale) * 1.5, np.asarray(pin.zero_point) - 3)
        points[f"{path}:weight"] = PointParams(pw.spec, np.asarray(pw.scale, np.float32) * 1.1, pw.zero_point)
    return QParams(points)


@pytest.mark.parametrize("integer", [False, True], ids=["qdq", "int8-fc"])
def test_patching_a_release_equals_exporting_it(converted, integer):
    model, qp, qdq, dev, weights, d = converted
    kw = {}
    if integer:
        from bench.litert import fc_output_ranges

        kw = dict(integer=True, output_ranges=fc_output_ranges(model, qp, batch(seed=2, shape=(4, SEQ)).numpy()))
    quantize_points(dev, weights, qp, d / "held.tflite", **kw)
    release = _release(qp)
    biases = {p: b for p, (_, b) in float_linears(model).items() if b is not None}
    patched = patch_points((d / "held.tflite").read_bytes(), release, weights, biases)
    quantize_points(dev, weights, qp.with_points(release.points), d / "fresh.tflite", **kw)
    ids = batch(seed=4, shape=(1, SEQ)).numpy()
    a, b = LiteRTRuntime(patched).logits(ids), LiteRTRuntime(d / "fresh.tflite").logits(ids)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, LiteRTRuntime(d / "held.tflite").logits(ids))
    if biases:      # Qwen2: a bias left stale is refused, not silently kept
        with pytest.raises(KeyError, match="stale bias"):
            patch_points((d / "held.tflite").read_bytes(), release, weights)
    if not integer:     # the tied embedding's int8 rows move with lm_head's weight, as in ORT
        lm = qp.points["lm_head:weight"]
        head = release.with_points({"lm_head:weight": PointParams(lm.spec, np.asarray(lm.scale, np.float32) * 0.9,
                                                                  lm.zero_point)})
        got = LiteRTRuntime(patch_points((d / "held.tflite").read_bytes(), head, weights, biases)).logits(ids)
        export_qdq(model, qp.with_points(head.points), d / "head.onnx", float_onnx=d / "float.onnx")
        ref = _ort(d / "head.onnx", ids)
        assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()
    pin = qp.points["lm_head:input"]
    with pytest.raises(KeyError, match="no tensor named"):
        patch_points(patched, QParams({"model.nope:input": pin}), weights)
    with pytest.raises(ValueError, match="smoothing"):
        patch_points(patched, QParams({}, smoothing={"lm_head": np.ones(64, np.float32)}), weights)


def test_bad_input_is_refused_with_the_reason(converted, tmp_path):
    model, qp, qdq, dev, weights, d = converted
    with pytest.raises(ValueError, match="name no Linear"):
        quantize_points(dev, weights, qp.with_points({"model.nope:input": qp.points["lm_head:input"]}),
                        tmp_path / "x.tflite")
    other = stored_weights(model, None)     # unsmoothed weights are not what this model stores
    with pytest.raises(ValueError, match="matches 0 FULLY_CONNECTED"):
        quantize_points(dev, other, qp, tmp_path / "x.tflite")
    rt = LiteRTRuntime(dev)
    with pytest.raises(ValueError, match="takes"):
        rt.logits(np.zeros((2, SEQ), np.int32))


def test_evaluate_pads_the_last_batch_and_scores_real_rows_only(converted, tmp_path):
    model, qp, qdq, dev, weights, d = converted
    two = tmp_path / "two.tflite"
    convert_float(model, None, two, batch=2, seq_len=SEQ)
    ids = batch(seed=5, shape=(3, SEQ)).numpy()
    nll, count = LiteRTRuntime(two).evaluate(ids)
    with torch.no_grad():
        ref = nll_sum_and_count(model(input_ids=torch.from_numpy(ids), use_cache=False).logits, ids)
    assert count == ref[1] == 3 * (SEQ - 1)
    assert nll == pytest.approx(ref[0], rel=1e-5)


def test_cli_exports_a_tflite_that_runs(tmp_path):
    from typer.testing import CliRunner

    from quant.instrument import get_qparams, quantize_
    from quant.qparams import save_qparams
    from simulation.cli import app
    from simulation.models import tiny_llama

    m = tiny_llama()
    quantize_(m)    # min-max weights; activations not calibrated: weight points only
    save_qparams(get_qparams(m), tmp_path / "q.safetensors")
    result = CliRunner().invoke(app, ["export", "--format", "tflite", "--model", "tiny-llama", "--seq-len", "8",
                                      "--qparams", str(tmp_path / "q.safetensors"), "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert {"model.tflite", "model.float.tflite", "model.weights.npz"} <= {p.name for p in (tmp_path / "b").iterdir()}
    logits = LiteRTRuntime(tmp_path / "b" / "model.tflite").logits(np.zeros((1, 8), np.int32))
    assert logits.shape == (1, 8, 257) and np.all(np.isfinite(logits))


def test_litert_device_statistics_merge_with_ort_devices_and_evaluation_patches(converted, tmp_path):
    """One fleet, two runtimes: a LiteRT phone's statistics job (float .tflite, Linear inputs
    exposed, divided by the held smoothing) gives the ORT phone's statistics at the same keys, up
    to the two float runtimes' rounding, and merges with them; its evaluation patches a release
    into the .tflite and scores what the ORT phone scores."""
    from client.jobs import evaluate, statistics
    from client.litert_runtime import LiteRTDevice
    from client.runtime import DeviceRuntime, save_device_bundle
    from quant.ptq import grids_for
    from quant.stats import merge
    from quant.wire import Instruction

    model, qp, qdq, dev, weights, d = converted
    plain = tmp_path / "float.tflite"
    convert_float(model, None, plain, batch=2, seq_len=SEQ)
    quantize_points(dev, weights, qp, tmp_path / "model.tflite")
    linears = float_linears(model)
    phone = LiteRTDevice(tmp_path / "model.tflite", plain, qp, linears)
    save_device_bundle(model, qp, tmp_path / "ort" / "model.onnx", float_onnx=d / "float.onnx")
    ort_phone = DeviceRuntime(tmp_path / "ort" / "model.onnx")
    data = batch(seed=6, shape=(5, SEQ)).numpy()
    keys = phone.activation_keys()
    acts = ort_phone.float_activations(data, keys)
    grids = grids_for({k: (float(x.min()) * 1.1, float(x.max()) * 1.1) for k, x in acts.items()}, bins=256)
    absmax = {k: int(linears[k.rsplit(":", 1)[0]][0].shape[1]) for k in keys[:3]}
    ins = Instruction(round=1, job="stats", qparams=qp, grids=grids, absmax=absmax)
    mine, met = statistics(phone, ins, data, batch_size=3)
    theirs, _ = statistics(ort_phone, ins, data, batch_size=3)
    assert set(mine.stats) == set(theirs.stats) == set(keys) and met["num-examples"] == 5
    for k in keys:
        a, b = mine.stats[k], theirs.stats[k]
        assert a.n == b.n and a.grid == b.grid
        assert np.abs(np.cumsum(a.counts - b.counts)).max() <= 3, k   # a few values one bin over
        assert a.min == pytest.approx(b.min, rel=1e-5, abs=1e-6) and a.max == pytest.approx(b.max, rel=1e-5, abs=1e-6)
        assert merge(a, b).n == a.n + b.n
    for k in absmax:
        np.testing.assert_allclose(mine.absmax[k], theirs.absmax[k], rtol=1e-5, atol=1e-6)
    release = _release(qp).with_points({}, version=int(qp.version) + 1)
    got = evaluate(phone, Instruction(round=2, job="eval", qparams=release), data[:2])
    want = evaluate(ort_phone, Instruction(round=2, job="eval", qparams=release), data[:2])
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-4)
    assert got["version"] == want["version"] == int(qp.version) + 1


@pytest.mark.bench
def test_bench_quick_rows_and_table(tmp_path, monkeypatch):
    """bench/litert.py in quick mode (the smoke config's tiny model, min-max QParams): every row,
    the LiteRT export of the QParams at the ORT integer model's perplexity, and the README table."""
    from bench import litert

    monkeypatch.setenv("FEDQUANT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "litert.json"
    r = litert.main(["--quick", "--out", str(out), "--latency-runs", "1"])
    recipes = [row["recipe"] for row in r["rows"]]
    assert recipes[:4] == ["ONNX Runtime integer (fedquant QParams)", "torch fake-quant (fedquant QParams)",
                           "LiteRT float", "LiteRT fedquant QParams (QDQ form)"] and len(recipes) == 10
    assert abs(r["litert_vs_ort_pct"]) < 0.01 and abs(r["litert_builtin_vs_ort_pct"]) < 0.01
    assert all(np.isfinite(row["perplexity"]) and row["perplexity"] > 1 for row in r["rows"])
    own = [row for row in r["rows"] if row["recipe"].startswith("LiteRT own calibration (")]
    assert all(row["fixed_output_scales"] for row in own)      # int8 SOFTMAX/LOGISTIC: 1/256, -128
    table = litert.markdown_table(json.loads(out.read_text()))
    assert table.startswith("| runtime |") and table.count("\n| ") == len(recipes)


def test_untied_embedding_gets_its_own_int8_rows(tmp_path):
    """An untied embedding (not lm_head's weight) becomes its own per-row int8 table, as in the
    ONNX model, and the LiteRT logits still equal ORT's integer model's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=False)).eval()
    qp = minmax_qparams(model, batch(seed=2, shape=(4, SEQ)))
    export_float_onnx(model, tmp_path / "float.onnx")
    export_qdq(model, qp, tmp_path / "qdq.onnx", float_onnx=tmp_path / "float.onnx")
    weights = convert_float(model, qp, tmp_path / "dev.tflite", batch=1, seq_len=SEQ)
    carried = quantize_points(tmp_path / "dev.tflite", weights, qp, tmp_path / "q.tflite")
    assert "lm_head:weight.embedding" not in carried["lm_head:weight"]
    t, buf = _tensors(tmp_path / "q.tflite")["embedding.weight"]
    assert np.asarray(buf.data).size == 256 * 64 and len(t.quantization.scale) == 256
    ids = batch(seed=3, shape=(1, SEQ)).numpy()
    ref = _ort(tmp_path / "qdq.onnx", ids)
    got = LiteRTRuntime(tmp_path / "q.tflite").logits(ids)
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()
