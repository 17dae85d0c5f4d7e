"""quant.gptq: GPTQ's rounding from the input's second moment."""

import numpy as np
import pytest

from quant.affine import fake_quant
from quant.gptq import gptq_weight
from quant.spec import weight_spec
from quant.weight_ranges import weight_point

G4 = weight_spec(4, group_size=16)
C8 = weight_spec(8)


def _data(seed=0, out=24, cols=64, tokens=400):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, cols)).astype(np.float32)
    mix = rng.standard_normal((cols, cols)) * 0.3 + np.eye(cols)     # correlated input channels
    x = rng.standard_normal((tokens, cols)) @ mix
    x[:, 3] *= 20.0                                                    # one massive channel
    return w, x, x.T @ x


def _output_error(x, w, q):
    return float(np.sum((x @ (np.asarray(w, np.float64) - q).T) ** 2))


@pytest.mark.parametrize("spec", [G4, C8])
def test_diagonal_second_moment_is_round_to_nearest(spec):
    """Without correlations there is no error to move: every column rounds to its nearest point,
    with the ranges ``weight_point`` gives the unrounded weight."""
    w, x, _ = _data()
    h = np.diag(np.sum(x ** 2, axis=0))
    q, pt = gptq_weight(w, h, spec)
    ref = weight_point(w, spec)
    np.testing.assert_array_equal(pt.scale.reshape(ref.scale.shape), ref.scale)
    np.testing.assert_array_equal(pt.zero_point.reshape(ref.zero_point.shape), ref.zero_point)
    np.testing.assert_array_equal(q, fake_quant(w, ref.scale, ref.zero_point, spec))


@pytest.mark.parametrize("spec", [G4, C8])
def test_output_error_below_round_to_nearest(spec):
    w, x, h = _data(1)
    q, pt = gptq_weight(w, h, spec)
    rtn = weight_point(w, spec)
    near = fake_quant(w, rtn.scale, rtn.zero_point, spec)
    assert _output_error(x, w, q) < 0.8 * _output_error(x, w, near)
    # the weight a device gets lies on its point's grid: rounding it again changes nothing
    np.testing.assert_array_equal(fake_quant(q, pt.scale, pt.zero_point, spec), q)
    assert pt.scale.shape == spec.param_shape(w.shape) and pt.zero_point.dtype == spec.numpy_dtype


def test_unseen_channels_get_zero_weight():
    w, x, h = _data(2)
    h[:, 5] = h[5, :] = 0.0
    q, _ = gptq_weight(w, h, G4)
    assert np.all(q[:, 5] == 0) and np.any(q[:, 4] != 0)


def test_bad_input_is_refused():
    w, _, h = _data(3)
    with pytest.raises(ValueError, match="second moment"):
        gptq_weight(w, h[:-1, :-1], G4)
    with pytest.raises(ValueError, match="whole groups"):
        gptq_weight(w[:, :-8], h[:-8, :-8], G4)
    with pytest.raises(ValueError, match="finite"):
        gptq_weight(w, np.where(np.eye(len(h)) > 0, np.nan, h), G4)
    with pytest.raises(ValueError, match="per-channel"):
        gptq_weight(w, h, weight_spec(8).model_copy(update={"granularity": "per_tensor", "axis": None}))
    with pytest.raises(ValueError, match="positive definite"):
        gptq_weight(w, -np.eye(len(h)) - 1.0, G4, damp=0.0)
