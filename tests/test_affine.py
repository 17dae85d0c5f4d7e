"""The affine math is bit-identical to ONNX's reference QuantizeLinear / DequantizeLinear."""

import zlib

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator
from pydantic import ValidationError

from quant import QuantSpec, dequantize, fake_quant, quantize, range_to_qparams
from quant.affine import qparams_to_range, tensor_range

ONNX_TYPE = {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4,
             (8, True): TensorProto.INT8, (8, False): TensorProto.UINT8,
             (16, True): TensorProto.INT16, (16, False): TensorProto.UINT16}

SPECS = [QuantSpec(bits=b, signed=sg, symmetric=sym, **g)
         for b in (4, 8, 16) for sg in (True, False) for sym in (False, True)
         for g in ({"granularity": "per_tensor"},
                   {"granularity": "per_channel", "axis": 1},
                   {"granularity": "per_group", "axis": 1, "group_size": 4})]


def _reference(x, scale, zp, spec):
    """Run ONNX QuantizeLinear then DequantizeLinear (opset 21) in the reference evaluator."""
    attrs = {}
    if spec.granularity != "per_tensor":
        attrs["axis"] = spec.axis
    if spec.granularity == "per_group":
        attrs["block_size"] = spec.group_size
    t = ONNX_TYPE[(spec.bits, spec.signed)]
    inits = [helper.make_tensor("s", TensorProto.FLOAT, scale.shape, scale.ravel().tolist()),
             helper.make_tensor("z", t, zp.shape, zp.ravel().astype(int).tolist())]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("q", t, x.shape),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    q, y = ReferenceEvaluator(model).run(None, {"x": x})
    return q.astype(np.int64), y


def _params(x, spec, rng):
    lo, hi = tensor_range(x, spec)
    lo = np.minimum(lo, 0) * rng.uniform(0.3, 1.0)  # a clipping range, so saturation is exercised
    hi = np.maximum(hi, 0) * rng.uniform(0.3, 1.0)
    return range_to_qparams(lo, hi, spec)


def _adversarial(spec, rng):
    x = rng.standard_normal((3, 8, 5)).astype(np.float32) * 4
    s, z = _params(x, spec, rng)
    sb = np.broadcast_to(np.asarray(s, np.float32), ()) if s.ndim == 0 else s
    # Exact .5 ties at representable points, far outside the range, denormals, infinities, zeros.
    unit = float(np.min(sb))
    x[0, :4, 0] = np.array([0.5, 1.5, 2.5, -0.5], np.float32) * unit
    x[0, 4:, 1] = [1e30, -1e30, np.inf, -np.inf]
    x[1, :4, 2] = [1e-45, -1e-45, 1e-40, 0.0]
    x[2, :, 3] = 0.0
    return x, s, z


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
@pytest.mark.parametrize("kind", ["random", "adversarial"])
def test_quantize_dequantize_match_onnx_reference(spec, kind):
    rng = np.random.default_rng(zlib.crc32(f"{spec.short()} {kind}".encode()))
    if kind == "random":
        x = (rng.standard_normal((3, 8, 5)) * rng.uniform(0.1, 100)).astype(np.float32)
        s, z = _params(x, spec, rng)
    else:
        x, s, z = _adversarial(spec, rng)
    q_ref, y_ref = _reference(x, np.asarray(s, np.float32), np.asarray(z), spec)
    q = quantize(x, s, z, spec)
    assert q.dtype == spec.numpy_dtype
    # The reference casts x/s to int32 before saturating, which overflows for |x/s| >= 2^31.
    finite = np.abs(x / np.broadcast_to(_expand(s, spec, x.shape), x.shape)) < 2**31
    np.testing.assert_array_equal(q.astype(np.int64)[finite], q_ref[finite])
    assert np.all(q[~finite & (x > 0)] == spec.qmax) and np.all(q[~finite & (x < 0)] == spec.qmin)
    y = dequantize(q, s, z, spec)
    np.testing.assert_array_equal(y[finite], y_ref[finite])
    # torch gives the same integers and the same reals.
    qt = quantize(torch.from_numpy(x), torch.from_numpy(np.asarray(s)), torch.from_numpy(np.asarray(z).astype(np.int32)), spec)
    np.testing.assert_array_equal(qt.numpy(), q.astype(np.int32))
    yt = fake_quant(torch.from_numpy(x), torch.from_numpy(np.asarray(s)), torch.from_numpy(np.asarray(z).astype(np.int32)), spec)
    np.testing.assert_array_equal(yt.numpy(), y)


def _expand(s, spec, shape):
    from quant.affine import broadcast_param
    return broadcast_param(np.asarray(s, np.float32), spec, shape)


def test_ties_round_to_even():
    spec = QuantSpec(bits=8, signed=True)
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5], np.float32)
    np.testing.assert_array_equal(quantize(x, np.float32(1.0), np.int8(0), spec), [0, 2, 2, 0, -2, -2])


@pytest.mark.parametrize("spec", [QuantSpec(bits=8, signed=False), QuantSpec(bits=4, signed=True),
                                  QuantSpec(bits=16, signed=True, symmetric=True)], ids=str)
def test_range_to_qparams_represents_zero_and_covers_range(spec):
    s, z = range_to_qparams(-3.0, 7.0, spec)
    assert quantize(np.float32(0), s, z, spec) == z  # real zero is exact
    lo, hi = qparams_to_range(s, z, spec)
    assert lo <= -3.0 + s and hi >= 7.0 - s


def test_zero_width_range_gets_the_scale_floor():
    from quant.spec import SCALE_FLOOR
    spec = QuantSpec(bits=8, signed=False)
    s, z = range_to_qparams(0.0, 0.0, spec)
    assert float(s) == np.float32(SCALE_FLOOR) and int(z) == 0


def test_symmetric_uint8_zero_point_is_the_middle():
    s, z = range_to_qparams(-1.0, 2.0, QuantSpec(bits=8, signed=False, symmetric=True))
    assert int(z) == 128 and np.isclose(float(s), 2.0 / 127)


@pytest.mark.parametrize("kwargs,field", [
    ({"bits": 3}, "bits"),
    ({"granularity": "per_channel"}, "axis"),
    ({"granularity": "per_group", "axis": 1}, "group_size"),
    ({"granularity": "per_tensor", "axis": 0}, "axis"),
])
def test_invalid_specs_name_the_field(kwargs, field):
    with pytest.raises(ValidationError, match=field):
        QuantSpec(**kwargs)


def test_group_size_must_divide_the_dimension():
    spec = QuantSpec(bits=4, symmetric=True, granularity="per_group", axis=1, group_size=5)
    with pytest.raises(ValueError, match="does not divide"):
        spec.param_shape((4, 12))


@pytest.mark.parametrize("bad", [-1.0, 0.0, float("nan"), float("inf")])
def test_bad_scales_are_rejected(bad):
    with pytest.raises(ValueError, match="scale"):
        quantize(np.ones(3, np.float32), np.float32(bad), np.uint8(0), QuantSpec(bits=8, signed=False))


def test_nan_range_is_rejected():
    with pytest.raises(ValueError, match="finite"):
        range_to_qparams(float("nan"), 1.0, QuantSpec())
