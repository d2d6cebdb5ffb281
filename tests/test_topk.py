"""Tests for jaxsparse.topk: exact per-example global top-k with a traced keep."""

import functools
import os
import subprocess
import sys

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsparse import topk
from jaxsparse.topk import nonzero_fraction, topk_mask, topk_threshold

METHODS = ("radix", "bisect", "sort")
NAN_NEG = np.array(0xFFC00000, np.uint32).view(np.float32)  # x86's default NaN

_thr = jax.jit(topk_threshold, static_argnames=("axes", "score", "method"))
_mask = jax.jit(topk_mask, static_argnames=("axes", "score", "gradient", "method"))


def _f32(v):
  return jnp.float32(v)


def ref_threshold(x, keep, axes=None, score="value"):
  """NumPy reference: sort each example's scores, NaN on top, take the k-th."""
  x = np.asarray(x.astype(jnp.float32) if hasattr(x, "dtype") else x, np.float32)
  axes = tuple(range(1, x.ndim)) if axes is None else tuple(a % x.ndim for a in axes)
  other = tuple(a for a in range(x.ndim) if a not in axes)
  s = np.abs(x) if score == "magnitude" else x
  s = np.transpose(s, other + axes)
  lead = s.shape[: len(other)]
  rows = s.reshape(int(np.prod(lead)), -1)
  n = rows.shape[1]
  keep = np.broadcast_to(
    np.asarray(keep, np.float32).reshape(np.shape(keep) + (1,) * (len(lead) - np.ndim(keep))), lead
  ).reshape(-1)
  k = np.clip(np.ceil(keep * np.float32(n)), 1, n).astype(int)
  nan = np.isnan(rows)  # NaN ranks above +inf
  order = np.lexsort((-np.where(nan, 0, rows), ~nan), axis=1)
  thr = np.take_along_axis(rows, order, axis=1)[np.arange(len(k)), k - 1]
  shape = [1] * x.ndim
  for a in other:
    shape[a] = x.shape[a]
  return thr.reshape(shape), k


def ref_mask(x, thr, score="value"):
  xf = np.asarray(jnp.asarray(x).astype(jnp.float32))
  s = np.abs(xf) if score == "magnitude" else xf
  return np.where((s >= thr) | np.isnan(s), xf, 0.0)


def special_array(rng, shape, dtype=np.float32):
  """Random values with ties, ±0, ±inf and both NaN signs mixed in."""
  x = rng.normal(size=shape).astype(np.float32)
  flat = x.reshape(-1)
  idx = rng.permutation(flat.size)
  specials = [0.0, -0.0, np.inf, -np.inf, np.nan, NAN_NEG, 1.5, 1.5, 1.5, -2.0, -2.0]
  flat[idx[: len(specials)]] = specials
  return jnp.asarray(x).astype(dtype)


# ------------------------------------------------------------ reference agreement


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
  shape=st.just((3, 2, 3, 5)),
  dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
  score=st.sampled_from(["value", "magnitude"]),
  seed=st.integers(0, 2**31 - 1),
  levels=st.sampled_from([0, 3, 50]),
  keep=hnp.arrays(np.float32, 3, elements=st.floats(2**-10, 1.0, width=32)),
)
def test_matches_numpy_reference(shape, dtype, score, seed, levels, keep):
  rng = np.random.default_rng(seed)
  x = special_array(rng, shape, dtype)
  if levels:  # many ties
    x = jnp.round(x * levels) / levels
  keep_B = jnp.asarray(keep[: shape[0]])
  thr = _thr(x, keep_B, score=score)
  ref, k = ref_threshold(x, keep_B, score=score)
  assert thr.dtype == jnp.float32 and thr.shape == ref.shape
  np.testing.assert_array_equal(np.asarray(thr), ref)
  y = _mask(x, keep_B, score=score)
  assert y.dtype == x.dtype and y.shape == x.shape
  np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)), ref_mask(x, ref, score))
  s = np.asarray(x.astype(jnp.float32)).reshape(shape[0], -1)
  s = np.abs(s) if score == "magnitude" else s
  kept = ((s >= ref.reshape(shape[0], 1)) | np.isnan(s)).sum(1)
  assert (kept >= k).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("score", ["value", "magnitude"])
def test_every_method_equals_reference(dtype, score):
  x = special_array(np.random.default_rng(1), (6, 300), dtype)  # 300: padded blocks
  keep = _f32([1e-3, 0.01, 0.3, 0.5, 0.97, 1.0])
  ref, _ = ref_threshold(x, keep, score=score)
  for method in METHODS:
    thr = _thr(x, keep, score=score, method=method)
    np.testing.assert_array_equal(np.asarray(thr), ref, err_msg=method)


def test_float16_and_many_row_chunks(monkeypatch):
  monkeypatch.setattr(topk, "_CHUNK_UNITS", 700)  # 7 rows of 300 -> 7 chunks of 1 row
  x = special_array(np.random.default_rng(7), (7, 300), np.float16)
  keep = _f32([0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
  ref, _ = ref_threshold(x, keep)
  np.testing.assert_array_equal(jax.jit(topk_threshold)(x, keep), ref)
  y = jax.jit(topk_mask)(x, keep)
  assert y.dtype == jnp.float16
  np.testing.assert_array_equal(y.astype(jnp.float32), ref_mask(x, ref))


def test_distinct_scores_keep_exactly_k():
  x = jnp.asarray(np.random.default_rng(0).permutation(4 * 8 * 8 * 3).reshape(4, 8, 8, 3) - 100.0)
  for keep in (0.01, 0.3, 0.7, 1.0):
    y = _mask((x + 0.5).astype(jnp.float32), _f32(keep))  # no zeros among the inputs
    k = np.clip(np.ceil(np.float32(keep) * np.float32(192)), 1, 192)
    np.testing.assert_array_equal(np.count_nonzero(np.asarray(y).reshape(4, -1), 1), k)


# ------------------------------------------------------------ hand-written cases


@pytest.mark.parametrize("method", METHODS)
def test_ties_at_threshold_are_all_kept(method):
  x = jnp.array([[3.0, 1.0, 3.0, 2.0], [-1.0, -1.0, -1.0, -1.0]])  # ties; all equal
  np.testing.assert_array_equal(_thr(x, _f32(0.25), method=method), [[3], [-1]])
  np.testing.assert_array_equal(_mask(x, _f32(0.25), method=method), [[3, 0, 3, 0], [-1] * 4])
  np.testing.assert_array_equal(_mask(x, _f32(0.75), method=method), [[3, 0, 3, 2], [-1] * 4])


@pytest.mark.parametrize("method", METHODS)
def test_negative(method):
  x = jnp.array([[-5.0, -1.0, -3.0, -2.0], [-1e-30, -1e30, 1e-30, 0.0]])
  np.testing.assert_array_equal(_thr(x, _f32(0.5), method=method), [[-2.0], [0.0]])
  np.testing.assert_array_equal(_mask(x, _f32(0.5), method=method), [[0, -1, 0, -2], [0, 0, x[1, 2], 0]])


@pytest.mark.parametrize("method", METHODS)
def test_infinities_and_signed_zeros(method):
  x = jnp.array([[-np.inf, np.inf, 1.0, -1.0], [0.0, -0.0, -1.0, -np.inf]])
  np.testing.assert_array_equal(_thr(x, _f32(0.25), method=method), [[np.inf], [0.0]])
  np.testing.assert_array_equal(_thr(x, _f32(1.0), method=method), [[-np.inf], [-np.inf]])
  # +0 and -0 tie, so both survive whichever is the k-th.
  y = np.asarray(_mask(x, _f32(0.25), method=method))
  np.testing.assert_array_equal(y, [[0, np.inf, 0, 0], [0, 0, 0, 0]])
  assert np.signbit(y[1, 1]) and not np.signbit(y[1, 0])
  assert not np.signbit(_thr(-x, _f32(0.5), method=method)[1, 0])  # zero threshold is +0.0
  # A dropped -inf becomes 0, also under the straight-through estimator.
  y = _mask(x, _f32(0.5), gradient="straight_through", method=method)
  np.testing.assert_array_equal(y, [[0, np.inf, 1, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("nan", [np.nan, NAN_NEG])
def test_nan_ranks_above_inf_and_is_kept(method, nan):
  x = jnp.array([[1.0, nan, np.inf, 2.0], [nan, nan, 0.0, 1.0]])
  thr = np.asarray(_thr(x, _f32(0.25), method=method))
  assert np.isnan(thr).all()  # k <= number of NaNs -> threshold NaN
  y = np.asarray(_mask(x, _f32(0.25), method=method))
  np.testing.assert_array_equal(np.isnan(y), np.isnan(np.asarray(x)))
  assert (y[~np.isnan(y)] == 0).all()  # only the NaNs survive
  np.testing.assert_array_equal(_thr(x, _f32(0.5), method=method), [[np.inf], [np.nan]])
  y = np.asarray(_mask(x, _f32(0.75), method=method))
  np.testing.assert_array_equal(y, [[0, np.nan, np.inf, 2], [np.nan, np.nan, 0, 1]])


def test_magnitude_score():
  x = jnp.array([[-4.0, 1.0, 3.0, -2.0], [-0.0, np.nan, -np.inf, 1.0]])
  np.testing.assert_array_equal(_thr(x, _f32(0.5), score="magnitude"), [[3.0], [np.inf]])
  np.testing.assert_array_equal(_mask(x, _f32(0.5), score="magnitude"), [[-4, 0, 3, 0], [0, np.nan, -np.inf, 0]])


def test_bfloat16_keeps_dtype_and_selects_exactly():
  x = jnp.array([[1.0, 1.0078125, 1.015625, -3.0]] * 2, jnp.bfloat16)  # adjacent values
  y = _mask(x, _f32(0.5))
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(y.astype(jnp.float32), [[0, 1.0078125, 1.015625, 0]] * 2)
  np.testing.assert_array_equal(_thr(x, _f32(0.75)), [[1.0]] * 2)


# ------------------------------------------------------------ keep handling


def test_per_example_keep_vector():
  x = jnp.tile(jnp.arange(1.0, 5.0), (2, 1))
  y = _mask(x, _f32([0.25, 1.0]))
  np.testing.assert_array_equal(y, [[0, 0, 0, 4], [1, 2, 3, 4]])
  np.testing.assert_array_equal(_thr(x, _f32([0.5, 1.0])), [[3], [1]])


def test_keep_vector_with_non_default_axes():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 3, 4, 5)), jnp.float32)
  keep = _f32([0.3, 0.8])
  thr = _thr(x, keep, axes=(1, 2))  # per example and channel
  ref, _ = ref_threshold(x, keep, axes=(1, 2))
  assert thr.shape == (2, 1, 1, 5)
  np.testing.assert_array_equal(thr, ref)
  with pytest.raises(ValueError, match="leading kept axes"):
    topk_threshold(x, _f32([0.3, 0.8, 0.5]))


@pytest.mark.parametrize("axes", [(1, 2), -1, (0,), (0, 1, 2, 3), (3, 1)])
def test_axes(axes):
  x = special_array(np.random.default_rng(2), (2, 3, 4, 5))
  thr = _thr(x, _f32(0.3), axes=axes)
  ref, _ = ref_threshold(x, 0.3, axes=(axes,) if isinstance(axes, int) else axes)
  np.testing.assert_array_equal(thr, ref)
  np.testing.assert_array_equal(_mask(x, _f32(0.3), axes=axes), ref_mask(x, ref))


def test_traced_keep_is_clipped():
  x = jnp.arange(1.0, 9.0).reshape(2, 4)
  np.testing.assert_array_equal(_mask(x, _f32(0.0)), [[0, 0, 0, 4], [0, 0, 0, 8]])  # k >= 1
  np.testing.assert_array_equal(_mask(x, _f32(-3.0)), [[0, 0, 0, 4], [0, 0, 0, 8]])
  np.testing.assert_array_equal(_mask(x, _f32(2.0)), x)
  np.testing.assert_array_equal(_mask(x, _f32(np.nan)), x)  # NaN keep -> keep all
  np.testing.assert_array_equal(_thr(x, _f32(np.nan)), [[1.0], [5.0]])


@pytest.mark.parametrize("keep", [0.0, -0.5, 1.5, float("nan"), np.array([0.5, 0.0])])
def test_concrete_invalid_keep_raises(keep):
  x = jnp.ones((2, 4))
  with pytest.raises(ValueError, match="keep must be a keep ratio in"):
    topk_mask(x, keep)
  with pytest.raises(ValueError, match="keep must be a keep ratio in"):
    topk_threshold(x, keep)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"score": "abs"}, "score must be one of"),
    ({"gradient": "ste"}, "gradient must be one of"),
    ({"method": "heap"}, "method must be one of"),
    ({"axes": 4}, "axes must be"),
    ({"axes": (1, -2)}, "must not repeat"),
    ({"axes": "1"}, "axes must be"),
  ],
)
def test_bad_options_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    topk_mask(jnp.ones((2, 3, 4)), 0.5, **kwargs)


# ------------------------------------------------------------ identity, gradients, tracing


@pytest.mark.parametrize("keep", [1.0, [1.0, 1.0, 3.0]])
def test_keep_one_is_bitwise_identity(keep):
  x = special_array(np.random.default_rng(4), (3, 4, 4, 2))
  for gradient in ("masked", "straight_through"):
    y = _mask(x, _f32(keep), gradient=gradient)
    np.testing.assert_array_equal(np.asarray(y).view(np.uint32), np.asarray(x).view(np.uint32))


def test_keep_one_skips_selection_with_cond():
  jaxpr = jax.make_jaxpr(topk_mask)(jnp.ones((2, 8)), _f32(1.0))
  assert any(e.primitive.name == "cond" for e in jaxpr.jaxpr.eqns)


def test_masked_gradient_flows_only_through_kept_units():
  x = jnp.array([[3.0, 1.0, 3.0, 2.0], [0.5, -1.0, 4.0, 2.0]])
  w = jnp.arange(8.0).reshape(2, 4) + 1.0
  g = jax.grad(lambda x: jnp.sum(topk_mask(x, _f32(0.25)) * w))(x)
  np.testing.assert_array_equal(g, [[1, 0, 3, 0], [0, 0, 7, 0]])
  g = jax.grad(lambda x: jnp.sum(topk_mask(x, _f32(1.0)) * w))(x)
  np.testing.assert_array_equal(g, w)


def test_straight_through_gradient_is_identity():
  x = jnp.array([[3.0, 1.0, 3.0, 2.0], [0.5, -np.inf, 4.0, 2.0]])
  w = jnp.arange(8.0).reshape(2, 4) + 1.0
  f = lambda x, keep: jnp.sum(topk_mask(x, keep, gradient="straight_through") * w)
  for keep in (0.25, 1.0):
    np.testing.assert_array_equal(jax.grad(f)(x, _f32(keep)), w)
  np.testing.assert_array_equal(
    jax.jvp(lambda x: topk_mask(x, _f32(0.25), gradient="straight_through"), (x,), (jnp.ones_like(x),))[1],
    jnp.ones_like(x),
  )


def test_one_compilation_serves_every_keep():
  x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 6, 6, 3)), jnp.float32)
  step = jax.jit(lambda x, keep: jax.value_and_grad(lambda x: jnp.sum(topk_mask(x, keep) ** 2))(x))
  step(x, _f32(0.5))
  vec = jax.jit(lambda x, keep: topk_mask(x, keep))
  vec(x, _f32([0.5] * 4))
  with jax.no_tracing():
    for keep in (0.01, 0.3, 0.99, 1.0):
      step(x, _f32(keep))
      vec(x, _f32([keep, 1.0, 0.2, keep]))
    with pytest.raises(RuntimeError, match="no_tracing"):
      step(x, 0.5)  # weak-typed Python float: a different cache key


def test_assert_max_traces_with_chex():
  chex.clear_trace_counter()
  f = jax.jit(chex.assert_max_traces(lambda x, k: topk_mask(x, k, method="radix"), n=1))
  x = jnp.ones((2, 3, 3, 2))
  for keep in (0.1, 0.6, 1.0):
    f(x, _f32(keep))


def test_vmap_matches_batched_call():
  x = special_array(np.random.default_rng(6), (3, 4, 5))
  keep = _f32([0.2, 1.0, 0.6])
  # method='sort' only to keep this test's compile short; all methods agree.
  per_example = jax.vmap(lambda xi, ki: topk_mask(xi[None], ki, method="sort")[0])(x, keep)
  np.testing.assert_array_equal(per_example, _mask(x, keep))


def test_nonzero_fraction():
  y = jnp.array([[1.0, 0.0, -0.0, 2.0], [np.nan, 0.0, 0.0, 0.0]])
  assert nonzero_fraction(y).dtype == jnp.float32
  np.testing.assert_allclose(nonzero_fraction(y), 3 / 8)
  np.testing.assert_allclose(nonzero_fraction(y, axes=1), [0.5, 0.25])


_SHARDED_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from jaxsparse import topk
topk._CHUNK_UNITS = 8 * 256  # several chunks of 8 rows
x_np = np.random.default_rng(0).normal(size=(64, 4, 4, 16)).astype(np.float32)
ref = np.asarray(jax.jit(topk.topk_mask)(x_np, jnp.float32(0.3)))
for axis_type in (AxisType.Explicit, AxisType.Auto):
  mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
  x = jax.device_put(x_np, NamedSharding(mesh, P("data")))
  f = jax.jit(topk.topk_mask)
  assert "all-gather" not in f.lower(x, jnp.float32(0.3)).compile().as_text()
  np.testing.assert_array_equal(np.asarray(f(x, jnp.float32(0.3))), ref)
print("ok")
"""


@pytest.mark.slow
def test_batch_sharded_over_8_cpu_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


# ------------------------------------------------------------ relative keep


def ref_relative(x, keep, score="value"):
  """NumPy reference of relative keep over all non-batch axes: k = clip(ceil(keep * n_active), 1, n)."""
  xf = np.asarray(jnp.asarray(x).astype(jnp.float32)).reshape(x.shape[0], -1)
  s = np.abs(xf) if score == "magnitude" else xf
  n = s.shape[1]
  active = ((s > 0) | np.isnan(s)).sum(1)
  k = np.clip(np.ceil(np.broadcast_to(np.float32(keep), (len(s),)) * active.astype(np.float32)), 1, n).astype(int)
  nan = np.isnan(s)
  order = np.lexsort((-np.where(nan, 0, s), ~nan), axis=1)
  thr = np.take_along_axis(s, order, axis=1)[np.arange(len(k)), k - 1]
  y = np.where((s >= thr[:, None]) | nan, xf, 0.0)
  return y.reshape(x.shape), k


_mask_rel = jax.jit(functools.partial(topk_mask, relative=True), static_argnames=("score", "method"))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("score", ["value", "magnitude"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_relative_keep_matches_numpy_reference(method, score, dtype):
  rng = np.random.default_rng(11)
  x = rng.normal(size=(6, 5, 40)).astype(np.float32)
  x[0] = np.maximum(x[0], 0)  # post-ReLU: about half zeros
  x[1] = np.round(np.maximum(x[1], 0) * 2) / 2  # ties among the active units
  x[2] = 0.0  # all zero: keeps itself
  x[3] = -np.abs(x[3])  # nothing active by value; all by magnitude
  x[4, :, :30] = 0.0  # few active units
  x[5, 0, 0] = np.nan  # NaN counts as active and is kept
  x = jnp.asarray(x).astype(dtype)
  for keep in ([0.5] * 6, [0.01, 0.3, 0.7, 0.2, 0.999, 0.4]):
    keep = _f32(keep)
    y = _mask_rel(x, keep, score=score, method=method)
    ref, k = ref_relative(x, keep, score)
    np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)), ref)
  assert (np.asarray(y[2]) == 0).all() and k[2] == 1


def test_relative_keep_is_a_fraction_of_the_active_units_exactly():
  x = jnp.asarray(np.concatenate([np.arange(1.0, 11.0), np.zeros(10), -np.arange(1.0, 11.0)])[None], jnp.float32)
  # 10 active of 30 units: keep 0.3 keeps the 3 largest (absolute keep 0.3 would keep 9 and 0 ties: all zeros).
  np.testing.assert_array_equal(np.nonzero(np.asarray(topk_mask(x, _f32(0.3), relative=True)))[1], [7, 8, 9])
  # magnitude: 20 active units (x != 0), keep 0.3 -> 6 units: +-10, +-9, +-8.
  y = topk_mask(x, _f32(0.3), relative=True, score="magnitude")
  np.testing.assert_array_equal(np.sort(np.asarray(y)[np.asarray(y) != 0]), [-10, -9, -8, 8, 9, 10])
  thr = topk_threshold(x, _f32(0.3), relative=True)
  np.testing.assert_array_equal(thr, [[8.0]])


def test_relative_keep_one_is_identity_and_compiles_once():
  x = special_array(np.random.default_rng(12), (3, 4, 4, 2))
  y = _mask_rel(x, _f32(1.0))
  np.testing.assert_array_equal(np.asarray(y).view(np.uint32), np.asarray(x).view(np.uint32))
  step = jax.jit(lambda x, keep: jax.value_and_grad(lambda x: jnp.sum(topk_mask(x, keep, relative=True) ** 2))(x))
  step(x, _f32(0.5))
  with jax.no_tracing():
    for keep in (0.01, 0.3, 1.0, 0.99):
      step(x, _f32(keep))


def test_relative_must_be_a_bool():
  with pytest.raises(TypeError, match="relative must be a bool, got 'yes'"):
    topk_mask(jnp.ones((2, 3)), 0.5, relative="yes")


def test_relative_adds_no_work_outside_the_selection():
  """The active count sits inside the keep < 1 branch of the cond: the ops outside it are the same."""

  def outside(relative):
    jaxpr = jax.make_jaxpr(lambda x, k: topk_mask(x, k, relative=relative))(jnp.ones((2, 8)), _f32(1.0))
    return [e.primitive.name for e in jaxpr.jaxpr.eqns]

  assert outside(True) == outside(False) and "cond" in outside(True)


@pytest.mark.parametrize("keep", [0.5, 1, 1.0, np.float32(0.05), [0.1, 1.0], np.array([[0.3]])])
def test_is_keep_accepts_ratios_in_the_half_open_unit_interval(keep):
  assert topk.is_keep(keep)
  topk.check_keep(keep)


@pytest.mark.parametrize("keep", [0, 0.0, -0.1, 1.5, float("nan"), True, "0.5", [], [0.5, 0.0], None, {"a": 0.5}])
def test_is_keep_rejects_everything_else_and_check_keep_names_it(keep):
  assert not topk.is_keep(keep)
  with pytest.raises(ValueError, match=r"^min_keep must be a keep ratio in \(0, 1\], got "):
    topk.check_keep(keep, "min_keep")


@pytest.mark.parametrize("method", ["radix", "bisect", "sort"])
def test_floor_rounding_keeps_int_of_keep_times_n_and_at_least_one(method):
  x = jnp.arange(1.0, 11.0)[None]  # distinct scores: exactly k kept
  for keep, ceil_k, floor_k in ((0.25, 3, 2), (0.5, 5, 5), (0.05, 1, 1), (0.19, 2, 1), (1e-6, 1, 1)):
    for rounding, k in (("ceil", ceil_k), ("floor", floor_k)):
      kept = topk_mask(x, jnp.float32(keep), method=method, rounding=rounding)
      np.testing.assert_array_equal(
        np.nonzero(np.asarray(kept))[1], np.arange(10 - k, 10), err_msg=f"{keep} {rounding}"
      )
  with pytest.raises(ValueError, match="rounding must be one of"):
    topk_mask(x, 0.5, rounding="round")
