"""QParams files: exact round trip, and clear refusals of corrupt, truncated or foreign files."""

import numpy as np
import pytest

from quant import PointParams, QParams, diff_qparams, load_qparams, save_qparams
from quant.qparams import model_fingerprint
from quant.spec import QuantSpec, activation_spec, weight_spec


def _qparams():
    return QParams(
        points={
            "m.l0.q_proj:input": PointParams(activation_spec(8), np.float32(0.02), np.uint8(130)),
            "m.l0.q_proj:weight": PointParams(weight_spec(8), np.linspace(0.01, 0.02, 6), np.zeros(6)),
            "m.l0.down:weight": PointParams(weight_spec(4, group_size=4), np.full((6, 2), 0.1), np.zeros((6, 2))),
            "m.l0.down:input": PointParams(activation_spec(16), np.float32(0.5), np.int16(0)),
        },
        model=model_fingerprint([("m.l0.q_proj", (6, 8)), ("m.l0.down", (6, 8))]),
        version=3, smoothing={"m.l0.q_proj": np.arange(1, 9, dtype=np.float32)}, meta={"profile": "int8"})


def test_round_trip_is_exact(tmp_path):
    qp = _qparams()
    path = save_qparams(qp, tmp_path / "q.safetensors")
    back = load_qparams(path, expect_model=qp.model)
    assert back.version == 3 and back.meta == {"profile": "int8"} and back.model == qp.model
    assert set(back.points) == set(qp.points)
    for k, p in qp.points.items():
        assert back.points[k].spec == p.spec
        np.testing.assert_array_equal(back.points[k].scale, p.scale)
        assert back.points[k].zero_point.dtype == p.zero_point.dtype
        np.testing.assert_array_equal(back.points[k].zero_point, p.zero_point)
    np.testing.assert_array_equal(back.smoothing["m.l0.q_proj"], qp.smoothing["m.l0.q_proj"])
    assert diff_qparams(qp, back) == []
    assert [p.name for p in tmp_path.iterdir()] == ["q.safetensors"]  # no temp file left


def test_diff_reports_what_changed():
    a = _qparams()
    b = a.with_points({"m.l0.q_proj:input": PointParams(activation_spec(8), np.float32(0.03), np.uint8(128))})
    rows = diff_qparams(a, b)
    assert len(rows) == 1 and rows[0]["key"] == "m.l0.q_proj:input"
    assert rows[0]["scale_rel_change"] == pytest.approx(0.5, rel=1e-6) and rows[0]["zero_point_change"] == 2
    assert a.points["m.l0.q_proj:input"].scale == np.float32(0.02)  # the original is untouched


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    path = save_qparams(_qparams(), tmp_path / "q.safetensors")
    raw = path.read_bytes()
    for name, data in [("trunc", raw[: len(raw) // 2]), ("garbage", b"\x00" * 7), ("flip", b"\xff" * 8 + raw[8:])]:
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(data)
        with pytest.raises(ValueError, match=f"{name}.safetensors"):
            load_qparams(bad)
    with pytest.raises(ValueError, match="cannot read"):
        load_qparams(tmp_path / "missing.safetensors")


def test_file_for_another_model_is_refused(tmp_path):
    path = save_qparams(_qparams(), tmp_path / "q.safetensors")
    with pytest.raises(ValueError, match="for model"):
        load_qparams(path, expect_model="0123456789abcdef")


@pytest.mark.parametrize("point,message", [
    (PointParams(activation_spec(8), np.float32(-1.0), np.uint8(0)), "positive"),
    (PointParams(activation_spec(8), np.float32(np.nan), np.uint8(0)), "positive"),
    (PointParams(weight_spec(8), np.ones(3), np.ones(3)), "symmetric"),
    (PointParams(activation_spec(8), np.ones(2), np.zeros(2)), "scalar"),
])
def test_invalid_points_are_not_written(tmp_path, point, message):
    qp = _qparams().with_points({"m.l0.q_proj:input": point})
    with pytest.raises(ValueError, match=message):
        save_qparams(qp, tmp_path / "q.safetensors")
    assert not any(tmp_path.iterdir())


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = save_qparams(_qparams(), tmp_path / "q.safetensors")
    before = path.read_bytes()
    bad = _qparams().with_points({"x:input": PointParams(QuantSpec(bits=8, signed=False), np.float32(0), np.uint8(0))})
    with pytest.raises(ValueError):
        save_qparams(bad, path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("z", [300, -1, 3.7, float("nan")])
def test_out_of_range_zero_points_are_refused_not_wrapped(z):
    with pytest.raises(ValueError, match="zero_point"):
        PointParams(activation_spec(8), np.float32(0.1), np.asarray(z))
