"""Models past protobuf's 2 GB limit (issue 19): ONNX external data, forced on tiny models with a
size threshold of 0, must give the same model, the same sessions and the same device runtime as
the one-file path, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import quant.onnxfile as onnxfile
from client.runtime import DeviceRuntime, FloatCapture, ort_session, save_device_bundle
from quant.export import export_float_onnx
from quant.instrument import QuantConfig, fingerprint, get_qparams, quantize_, set_mode, set_qparams
from quant.onnxfile import data_file, link_onnx, load_onnx, onnx_files, save_onnx
from quant.calibrate import CalibratorConfig
from quant.ptq import calibrate_activations
from quant.qdq import export_qdq
from quant.qparams import QParams
from simulation.models import tiny_qwen2

IDS = np.random.default_rng(0).integers(0, 257, (2, 12)).astype(np.int64)


@pytest.fixture(scope="module")
def model():
    return tiny_qwen2(seed=3)  # q/k/v biases, tied lm_head


@pytest.fixture(scope="module")
def float_pair(model, tmp_path_factory):
    """The float graph written as one file and with every tensor in external data."""
    d = tmp_path_factory.mktemp("float")
    one = export_float_onnx(model, d / "one" / "float.onnx")
    ext = export_float_onnx(model, d / "ext" / "float.onnx", external_threshold=0)
    return one, ext


@pytest.fixture(scope="module")
def unoptimized(model, tmp_path_factory):
    """The float graph as a model past 1 GB gets it: external data, no exporter optimizer."""
    return export_float_onnx(model, tmp_path_factory.mktemp("large") / "float.onnx", external_threshold=0,
                             optimize=False)


@pytest.fixture(scope="module")
def qparams(model):
    m = tiny_qwen2(seed=3)
    quantize_(m, QuantConfig())
    set_mode(m, "float", "activations")
    ids = torch.as_tensor(IDS)
    points = calibrate_activations(m, [ids[:1], ids[1:]], 64, CalibratorConfig(method="minmax"))
    set_qparams(m, QParams(points, model=fingerprint(m)))
    return get_qparams(m)


def test_external_float_graph_loads_equal_to_the_one_file_graph(float_pair):
    one, ext = float_pair
    assert onnx_files(one) == [one]
    assert onnx_files(ext) == [ext, data_file(ext)]
    assert ext.stat().st_size < one.stat().st_size and data_file(ext).stat().st_size > 100_000
    assert load_onnx(ext).SerializeToString() == load_onnx(one).SerializeToString()
    # the data file's offsets are page aligned, so ONNX Runtime may map it
    skeleton = load_onnx(ext, load_external_data=False)
    offsets = [int(e.value) for t in skeleton.graph.initializer for e in t.external_data if e.key == "offset"]
    assert offsets and all(o % onnxfile.ALIGN == 0 for o in offsets)


def test_save_leaves_the_model_in_memory_as_it_was(float_pair, tmp_path):
    mp = load_onnx(float_pair[0])
    before = mp.SerializeToString()
    save_onnx(mp, tmp_path / "m.onnx", external_threshold=0)
    assert mp.SerializeToString() == before
    # a smaller write of the same name goes back to one file and removes the stale data file
    save_onnx(mp, tmp_path / "m.onnx")
    assert not data_file(tmp_path / "m.onnx").exists()
    assert load_onnx(tmp_path / "m.onnx").SerializeToString() == before
    save_onnx(mp, tmp_path / "d.onnx", external_threshold=0)
    assert mp.SerializeToString() == before and load_onnx(tmp_path / "d.onnx").SerializeToString() == before


def test_sessions_on_external_data_equal_the_one_file_session_bit_for_bit(float_pair, monkeypatch):
    one, ext = float_pair
    want = ort_session(one).run(["logits"], {"input_ids": IDS})[0]
    for model, kw in ((ext, {}),                                                  # a path
                      (load_onnx(ext, load_external_data=False), {"external_dir": ext.parent}),
                      (load_onnx(ext), {})):                                      # in memory
        got = ort_session(model, **kw).run(["logits"], {"input_ids": IDS})[0]
        assert np.array_equal(got, want)
    # a model in memory too large for one protobuf message goes through a file with external data
    monkeypatch.setattr(onnxfile, "EXTERNAL_THRESHOLD", 0)
    got = ort_session(load_onnx(one)).run(["logits"], {"input_ids": IDS})[0]
    assert np.array_equal(got, want)


def test_a_graph_without_its_data_needs_the_directory(float_pair):
    with pytest.raises(ValueError, match="external_dir"):
        ort_session(load_onnx(float_pair[1], load_external_data=False))


def test_linked_model_loads_and_runs_and_a_missing_data_file_is_named(float_pair, tmp_path):
    dst = link_onnx(float_pair[1], tmp_path / "float.onnx")
    assert data_file(dst).stat().st_nlink == 2  # hard links (onnx's own loader refuses these)
    assert load_onnx(dst).SerializeToString() == load_onnx(float_pair[0]).SerializeToString()
    run = lambda m: ort_session(m).run(["logits"], {"input_ids": IDS})[0]  # noqa: E731
    assert np.array_equal(run(dst), run(float_pair[0]))
    data_file(dst).unlink()
    with pytest.raises(FileNotFoundError, match="float.onnx.data: external data of tensor .* is missing"):
        load_onnx(dst)
    (tmp_path / "junk.onnx").write_bytes(b"\x07not a model")
    with pytest.raises(ValueError, match="junk.onnx: not a readable ONNX model"):
        load_onnx(tmp_path / "junk.onnx")


def test_capture_on_external_float_graph_equals_one_file(float_pair, qparams):
    one, ext = float_pair
    keys = sorted(k for k in qparams.points if not k.endswith(":weight"))[:6]
    a = FloatCapture(one).run(IDS, keys)
    b = FloatCapture(ext).run(IDS, keys)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in keys)


def test_qdq_model_and_device_runtime_with_external_data(model, qparams, float_pair, tmp_path):
    one, ext = float_pair
    export_qdq(model, qparams, tmp_path / "one" / "model.onnx", float_onnx=one)
    export_qdq(model, qparams, tmp_path / "ext" / "model.onnx", float_onnx=ext, external_threshold=0)
    assert data_file(tmp_path / "ext" / "model.onnx").is_file()
    assert not data_file(tmp_path / "one" / "model.onnx").exists()
    assert load_onnx(tmp_path / "ext" / "model.onnx").SerializeToString() == \
        load_onnx(tmp_path / "one" / "model.onnx").SerializeToString()

    runtimes = []
    for name, fl in (("a", one), ("b", ext)):
        save_device_bundle(model, qparams, tmp_path / name / "model.onnx", float_onnx=fl)
        runtimes.append(DeviceRuntime(tmp_path / name / "model.onnx", float_onnx=fl))
    a, b = runtimes
    assert np.array_equal(a.logits(IDS), b.logits(IDS))
    key = next(k for k in qparams.points if k.endswith(":input"))
    p = qparams.points[key]
    moved = QParams({key: type(p)(p.spec, p.scale * 1.5, p.zero_point)}, qparams.model, 1)
    for rt in runtimes:
        assert rt.patch(moved)["changed"] > 0
    assert np.array_equal(a.logits(IDS), b.logits(IDS))


def test_the_large_model_export_path_gives_the_same_models_bit_for_bit(model, qparams, float_pair, unoptimized,
                                                                       tmp_path):
    """Without the exporter's optimizer (its weight copies peak at 5x the weights) the float graph
    has more nodes and the same logits, captures and integer model, bit for bit."""
    one, _ = float_pair
    assert len(load_onnx(unoptimized).graph.node) > len(load_onnx(one).graph.node)
    run = lambda m: ort_session(m).run(["logits"], {"input_ids": IDS})[0]  # noqa: E731
    assert np.array_equal(run(unoptimized), run(one))
    keys = sorted(k for k in qparams.points if not k.endswith(":weight"))
    a, b = FloatCapture(one).run(IDS, keys), FloatCapture(unoptimized).run(IDS, keys)
    assert all(np.array_equal(a[k], b[k]) for k in keys)
    rts = []
    for name, fl in (("a", one), ("b", unoptimized)):
        save_device_bundle(model, qparams, tmp_path / name / "model.onnx", float_onnx=fl)
        rts.append(DeviceRuntime(tmp_path / name / "model.onnx", float_onnx=fl))
    assert np.array_equal(rts[0].logits(IDS), rts[1].logits(IDS))
