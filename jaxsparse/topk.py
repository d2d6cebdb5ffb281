"""Exact per-example global top-k over activations, with a traced keep ratio.

Semantics (all methods agree bit for bit on the threshold's value):

* Per example (by default: per index of axis 0), the units over ``axes`` (default:
  every non-batch axis, e.g. H x W x C of a feature map) are ranked by their score,
  ``x`` (``score="value"``) or ``|x|`` (``score="magnitude"``).
* ``k = clip(ceil(float32(keep) * float32(n)), 1, n)`` where ``n`` is the number of
  reduced units; the threshold is the k-th largest score. With ``rounding="floor"``,
  ``k = clip(floor(...), 1, n)`` (``max(1, int(keep * n))``, the author's script).
* Relative keep (``relative=True``): ``k = clip(ceil(float32(keep) * float32(n_active)), 1, n)``,
  a fraction of the example's *active* units: those whose score is > 0 (``x > 0`` for
  ``score="value"``, ``x != 0`` for ``score="magnitude"``; a NaN counts as active, since it
  is always kept). So every keep < 1 drops units even where most activations are
  already zero (post-ReLU), and a row with no active unit (e.g. all zeros) keeps itself
  (k = 1 and its largest score ties with all the others).
* Ties at the threshold are all kept: the kept set is ``{score >= threshold}``, so
  the kept count is >= k, and == k when the scores are distinct. ``-0.0`` and
  ``+0.0`` compare equal, so they tie.
* NaN policy: a NaN score ranks above ``+inf``. NaNs are always kept (and so
  propagate, which makes a diverging run fail loudly). The threshold itself is NaN
  only when a row holds at least k NaNs; then only the NaNs are kept.
* ``keep`` is data: a float32 scalar or a per-example vector, traced, so one
  compilation serves every value. Concrete values must lie in (0, 1]; traced
  values are clipped into that range (``keep <= 0`` keeps one unit, a NaN keep
  keeps everything).
* ``keep >= 1`` (for every example) skips the selection with ``lax.cond`` and
  returns ``x`` unchanged (bit for bit); only a select that fuses with the
  neighbouring ops remains. Under ``jax.vmap`` a ``cond`` with a batched predicate
  becomes a ``select`` and both branches run, so pass the per-example vector
  instead of vmapping over this function.

Methods. Scores are mapped to unsigned integer keys whose order is the float
order (16-bit keys for bfloat16/float16, 31/15-bit keys for magnitudes), and the
k-th largest key is found exactly:

* ``"radix"`` (``"auto"``): 3 bits per pass. One fused pass counts, per row,
  the keys at or above 7 candidate prefixes at once, by summing a one-hot
  ``1 << (8 * digit)`` into two packed uint32 accumulators over blocks of 128
  units. 11 passes for float32, 6 for bfloat16, 5 for bfloat16 magnitudes.
* ``"bisect"``: the classic 1 bit per pass radix bisection (32 passes for float32).
* ``"sort"``: a full sort; slow, kept as the reference for tests.

Every method runs over chunks of rows (``lax.map``, ~2 MiB of keys each) so the
passes hit cache and the full key array is never written. The mask compares keys,
not floats, which is also exact for the ties above. docs/performance.md has the
measured cost of each method (``experiments/bench.py --sections=topk``).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SCORES = ("value", "magnitude")  # how units are ranked
GRADIENTS = ("masked", "straight_through")  # what the gradient of the mask is
ROUNDINGS = ("ceil", "floor")  # how keep * n becomes the kept count k
_METHODS = ("auto", "radix", "bisect", "sort")
_BLOCK = 128  # units per packed accumulator: each 8-bit field counts <= 128.
_DIGIT_BITS = 3  # bits resolved per radix pass (7 candidates per pass).
_CHUNK_UNITS = 1 << 19  # units per chunk of rows: 2 MiB of keys stay in cache.


def check_choice(name: str, value, allowed) -> None:
  """Raises ValueError naming `name` when `value` is not one of `allowed`."""
  if value not in allowed:
    raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def concrete_keep(keep) -> np.ndarray | None:
  """A concrete keep as a float64 array; None for a traced keep. Raises TypeError when it is not numeric."""
  if isinstance(keep, jax.core.Tracer):
    return None
  try:
    return np.asarray(keep, dtype=np.float64)
  except (TypeError, ValueError):
    raise TypeError(f"keep must be a float or float array, got {keep!r}") from None


def is_keep(keep) -> bool:
  """The one keep-range check: whether a concrete keep (a number or an array of them, not a bool or a string) is
  numeric, non-empty and has every value in (0, 1] (NaN does not)."""
  try:
    arr = np.asarray(keep, dtype=np.float64)
  except (TypeError, ValueError):
    return False
  return not isinstance(keep, (bool, str, bytes)) and arr.size > 0 and bool(np.all((arr > 0) & (arr <= 1)))


def check_keep(keep, name: str = "keep") -> None:
  """Raises ValueError naming `name` unless `keep` is traced (data: clipped where used) or `is_keep`."""
  if not isinstance(keep, jax.core.Tracer) and not is_keep(keep):
    raise ValueError(f"{name} must be a keep ratio in (0, 1], got {keep!r}")


def _check_relative(relative) -> None:
  if not isinstance(relative, (bool, np.bool_)):
    raise TypeError(f"relative must be a bool, got {relative!r}")


def _check_keep_shape(keep, shape: tuple[int, ...], axes: tuple[int, ...]) -> None:
  lead = tuple(d for a, d in enumerate(shape) if a not in axes)
  keep_shape = jnp.shape(keep)
  if len(keep_shape) > len(lead) or keep_shape != lead[: len(keep_shape)]:
    raise ValueError(f"keep must be a scalar or shaped like the leading kept axes {lead}, got shape {keep_shape}")


def _reduce_axes(ndim: int, axes) -> tuple[int, ...]:
  if axes is None:
    return tuple(range(1, ndim))
  axes = (axes,) if isinstance(axes, (int, np.integer)) else tuple(axes)
  if not all(isinstance(a, (int, np.integer)) and -ndim <= a < ndim for a in axes):
    raise ValueError(f"axes must be None, an int or a sequence of ints in [-{ndim}, {ndim}), got {axes!r}")
  norm = tuple(sorted(int(a) % ndim for a in axes))
  if len(set(norm)) != len(norm):
    raise ValueError(f"axes must not repeat an axis, got {axes!r}")
  return norm


# ----------------------------------------------------------------------------- keys


def _key_layout(dtype) -> tuple[int, type, int]:
  """(bit width, unsigned dtype, bit pattern of +inf) of a float dtype."""
  width = 16 if jnp.dtype(dtype).itemsize == 2 else 32
  udtype = np.uint16 if width == 16 else np.uint32
  return width, udtype, int(np.array(np.inf, dtype).view(udtype))


def _keys(x, magnitude: bool, dtype=None):
  """Maps floats to uint32 keys whose order is the score order; returns (keys, nbits).

  ``x`` is a float array, or the unsigned bit patterns of ``dtype`` floats.
  Integer ops only (bfloat16 float ops are slow on CPU). -0 maps to +0's key and
  every NaN to one key above +inf's, so comparing keys gives the documented ties.
  """
  width, udtype, inf = _key_layout(dtype or x.dtype)
  sign = 1 << (width - 1)
  bits = x if dtype else lax.bitcast_convert_type(x, udtype)
  bits = bits.astype(jnp.uint32)
  mag = bits & jnp.uint32(sign - 1)
  if magnitude:  # non-negative floats are ordered like their bits
    return jnp.minimum(mag, jnp.uint32(inf + 1)), width - 1
  top = jnp.uint32(2**width - 1)
  key = jnp.where(bits > jnp.uint32(sign), top - bits, mag + jnp.uint32(sign))
  return jnp.where(mag > jnp.uint32(inf), top, key), width


def _decode(key, dtype, magnitude: bool):
  """Inverse of _keys (canonical +0 and NaN), as float32."""
  width, udtype, _ = _key_layout(dtype)
  if not magnitude:
    sign, top = jnp.uint32(1 << (width - 1)), jnp.uint32(2**width - 1)
    key = jnp.where(key >= sign, key - sign, top - key)
  return lax.bitcast_convert_type(key.astype(udtype), dtype).astype(jnp.float32)


def _kth_sort(u_RxN, k_R, nbits: int):
  del nbits
  s = jnp.sort(u_RxN, axis=1)
  return jnp.take_along_axis(s, (u_RxN.shape[1] - k_R)[:, None], axis=1)[:, 0]


def _kth_bisect(u_RxN, k_R, nbits: int):
  def body(i, res):
    cand = res | (jnp.uint32(1) << (nbits - 1 - i).astype(jnp.uint32))
    cnt = jnp.sum(u_RxN >= cand[:, None], axis=1, dtype=jnp.int32)
    return jnp.where(cnt >= k_R, cand, res)

  return lax.fori_loop(0, nbits, body, jnp.zeros(u_RxN.shape[:1], jnp.uint32))


def _kth_radix(u_RxN, k_R, nbits: int):
  """k-th largest key, _DIGIT_BITS bits per pass (see module docstring)."""
  rows, n = u_RxN.shape
  pad = -n % _BLOCK
  # Key 0 padding never reaches a candidate (candidates have a nonzero digit).
  u = jnp.pad(u_RxN, ((0, 0), (0, pad))).reshape(rows, -1, _BLOCK)
  n_cand = 2**_DIGIT_BITS - 1

  def body(i, res):
    shift = jnp.maximum(nbits - _DIGIT_BITS * (i + 1), 0).astype(jnp.uint32)
    width = jnp.minimum(nbits - _DIGIT_BITS * i, _DIGIT_BITS).astype(jnp.uint32)
    r = res[:, None, None]
    # digit in [0, 2**width): keys below the known prefix count as 0, keys above
    # its range as the top digit, so count(key >= res | j << shift) = #(digit >= j).
    top = (jnp.uint32(1) << width) - 1
    digit = jnp.where(u < r, jnp.uint32(0), jnp.minimum((u - r) >> shift, top))
    # One-hot into 8-bit fields: digits 1-4 -> acc_lo, 5-7 -> acc_hi. XLA shifts
    # by >= 32 (including wrapped negative amounts) give 0, which drops the rest.
    one_hot_lo = jnp.uint32(1) << (jnp.uint32(8) * (digit - 1))
    one_hot_hi = jnp.uint32(1) << (jnp.uint32(8) * (digit - 5))
    # A two-operand (variadic) reduce compiles to a faster CPU loop than two
    # separate sums (docs/performance.md, "Measurements behind code choices").
    acc_lo, acc_hi = lax.reduce(
      (one_hot_lo, one_hot_hi), (jnp.uint32(0), jnp.uint32(0)), lambda a, b: (a[0] + b[0], a[1] + b[1]), (2,)
    )
    fields = [(acc_lo >> (8 * j)) & 255 for j in range(4)]
    fields += [(acc_hi >> (8 * j)) & 255 for j in range(n_cand - 4)]
    at_least, best = jnp.zeros_like(k_R), jnp.zeros_like(res)
    for field in fields[::-1]:  # at_least = #(digit >= j), j = 7 .. 1
      at_least = at_least + jnp.sum(field, axis=1, dtype=jnp.int32)
      best = best + (at_least >= k_R).astype(jnp.uint32)
    return res | (best << shift)

  n_pass = -(-nbits // _DIGIT_BITS)
  return lax.fori_loop(0, n_pass, body, jnp.zeros((rows,), jnp.uint32))


_KTH = {"radix": _kth_radix, "bisect": _kth_bisect, "sort": _kth_sort}


# ----------------------------------------------------------------------------- rows


def _to_rows(x, axes: tuple[int, ...]):
  """(..) -> (R, N) with the reduced axes last; returns rows, kept shape, kept axes."""
  other = tuple(a for a in range(x.ndim) if a not in axes)
  perm = other + axes
  x_perm = x if perm == tuple(range(x.ndim)) else jnp.transpose(x, perm)
  lead = x_perm.shape[: len(other)]
  n = math.prod(x_perm.shape[len(other) :])
  return x_perm.reshape((math.prod(lead), n)), lead, other


def _rows_keep(keep, lead: tuple[int, ...]):
  """Per-row float32 keep (NaN -> 1) from a scalar or leading-aligned keep."""
  keep = jnp.asarray(keep, jnp.float32)
  keep = jnp.where(jnp.isnan(keep), 1.0, keep)
  keep = keep.reshape(keep.shape + (1,) * (len(lead) - keep.ndim))
  return jnp.broadcast_to(keep, lead).reshape(-1)


def _rows_k(keep_R, n_R, n: int, rounding: str = "ceil"):
  """Per-row k = clip(ceil(keep * n_R), 1, n) (floor with `rounding` "floor"); n_R is n, or the active count."""
  to_int = jnp.floor if rounding == "floor" else jnp.ceil
  return jnp.clip(to_int(keep_R * jnp.asarray(n_R, jnp.float32)), 1, n).astype(jnp.int32)


def _zero_key(magnitude: bool, nbits: int) -> int:
  """The key of +0.0: keys above it are the active (score > 0, or NaN) units."""
  return 0 if magnitude else 1 << (nbits - 1)


def _chunk_rows(rows: int, n: int) -> int:
  """Rows per chunk: the largest divisor of rows with <= _CHUNK_UNITS units.

  Only on CPU: an accelerator wants all rows in flight at once (not measured).
  """
  if jax.default_backend() != "cpu":
    return rows
  target = max(1, _CHUNK_UNITS // max(n, 1))
  return max(c for c in range(1, min(rows, target) + 1) if rows % c == 0)


def _explicitly_sharded(x) -> bool:
  """Whether x's type carries a device sharding (jax.sharding.AxisType.Explicit)."""
  try:
    return any(p is not None for p in jax.typeof(x).sharding.spec)
  except AttributeError:
    return False


def _threshold_keys(x, keep, axes, score: str, method: str, relative: bool = False, rounding: str = "ceil"):
  """k-th largest key per row, shaped like x with the reduced axes of size 1."""
  x_RxN, lead, other = _to_rows(lax.stop_gradient(x), axes)
  rows, n = x_RxN.shape
  keep_R = _rows_keep(keep, lead)
  magnitude = score == "magnitude"
  kth = _KTH["radix" if method == "auto" else method]

  dtype = x.dtype
  if dtype.itemsize == 2:  # slicing u16 in the loop is faster than bf16 (docs/performance.md)
    x_RxN = lax.bitcast_convert_type(x_RxN, _key_layout(dtype)[1])

  def chunk(args):
    x_CxN, keep_C = args
    keys, nbits = _keys(x_CxN, magnitude, dtype if dtype.itemsize == 2 else None)
    # Relative keep counts the active units in the same cache-resident chunk (one extra pass).
    n_C = jnp.sum(keys > jnp.uint32(_zero_key(magnitude, nbits)), axis=1, dtype=jnp.int32) if relative else n
    return kth(keys, _rows_k(keep_C, n_C, n, rounding), nbits)

  # The passes run chunk by chunk so each chunk's keys stay in cache (faster on
  # the CPU than whole-array passes: docs/performance.md), and the full key
  # array is never written to memory. Chunk j holds rows j, j + n_chunks, ... so
  # a batch sharded over devices stays sharded (no loop over a sharded axis).
  c = _chunk_rows(rows, n)
  n_chunks = rows // c
  if n_chunks == 1 or _explicitly_sharded(x_RxN):
    kth_R = chunk((x_RxN, keep_R))
  else:
    x_CxJxN, keep_CxJ = x_RxN.reshape(c, n_chunks, n), keep_R.reshape(c, n_chunks)

    def body(j, out_CxJ):
      args = (
        lax.dynamic_index_in_dim(x_CxJxN, j, 1, keepdims=False),
        lax.dynamic_index_in_dim(keep_CxJ, j, 1, keepdims=False),
      )
      return lax.dynamic_update_index_in_dim(out_CxJ, chunk(args)[:, None], j, 1)

    kth_R = lax.fori_loop(0, n_chunks, body, jnp.zeros((c, n_chunks), jnp.uint32))
    kth_R = kth_R.reshape(rows)
  out_shape = [1] * x.ndim
  for a in other:
    out_shape[a] = x.shape[a]
  return kth_R.reshape(out_shape)


def _as_supported_float(x):
  x = jnp.asarray(x)
  if x.dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    return x
  return x.astype(jnp.float32)


def topk_threshold(
  x,
  keep,
  *,
  axes: int | Sequence[int] | None = None,
  score: str = "value",
  method: str = "auto",
  relative: bool = False,
  rounding: str = "ceil",
) -> jax.Array:
  """Per-example threshold: the k-th largest score over ``axes``.

  Args:
    x: activations, float32, bfloat16 or float16 (anything else is cast to
      float32 first).
    keep: keep ratio in (0, 1]; a float32 scalar, or an array shaped like the
      leading non-reduced axes (e.g. ``(B,)``) for a per-example ratio. May be
      traced; traced values are clipped to (0, 1].
    axes: the axes ranked together; default all axes but the first.
    score: ``"value"`` ranks ``x``, ``"magnitude"`` ranks ``|x|``.
    method: ``"auto"`` (= ``"radix"``), ``"radix"``, ``"bisect"`` or ``"sort"``;
      all are exact and agree.
    relative: ``keep`` is a fraction of the example's active units (score > 0, see
      the module docstring) instead of all ``n`` units.
    rounding: ``"ceil"`` or ``"floor"``: how ``keep * n`` is rounded to ``k``.

  Returns:
    float32 thresholds shaped like ``x`` with the reduced axes kept as size 1,
    so ``score >= thr`` broadcasts: the k-th largest score, where
    ``k = clip(ceil(keep * n), 1, n)`` (``n_active`` for ``n`` in the product when
    ``relative``; a zero threshold is always +0.0).

  Example:
    >>> topk_threshold(jnp.array([[3., 1., 3., 2.]]), jnp.float32(0.5))
    Array([[3.]], dtype=float32)
  """
  check_choice("score", score, SCORES)
  check_choice("method", method, _METHODS)
  check_keep(keep)
  x = _as_supported_float(x)
  axes = _reduce_axes(x.ndim, axes)
  _check_keep_shape(keep, x.shape, axes)
  _check_relative(relative)
  check_choice("rounding", rounding, ROUNDINGS)
  thr_key = _threshold_keys(x, keep, axes, score, method, relative, rounding)
  return _decode(thr_key, x.dtype, score == "magnitude")


@jax.custom_jvp
def _straight_through(x, y):
  """Returns y, with the derivative of the identity in x."""
  del x
  return y


@_straight_through.defjvp
def _straight_through_jvp(primals, tangents):
  return primals[1], tangents[0]


def topk_mask(
  x,
  keep,
  *,
  axes: int | Sequence[int] | None = None,
  score: str = "value",
  gradient: str = "masked",
  method: str = "auto",
  relative: bool = False,
  rounding: str = "ceil",
) -> jax.Array:
  """Zeroes all but the top-k scores per example (ties at the threshold kept).

  Args:
    x: activations (see ``topk_threshold``).
    keep: keep ratio, scalar or per-example, may be traced. ``keep >= 1`` for
      every example skips the selection (``lax.cond``) and returns ``x`` unchanged.
    axes: the axes ranked together; default all axes but the first.
    score: ``"value"`` or ``"magnitude"``.
    gradient: ``"masked"``: the gradient flows only through kept units (the mask
      is a constant); ``"straight_through"``: the gradient is the identity's.
    method: selection method, see ``topk_threshold``.
    relative: ``keep`` is a fraction of each example's active units (score > 0)
      rather than of all units; see ``topk_threshold``. Costs one counting pass,
      only when the selection runs (never at ``keep >= 1``).
    rounding: ``"ceil"`` (default) or ``"floor"`` (the author's script): how
      ``keep * n`` is rounded to the kept count ``k`` (always >= 1).

  Returns:
    Array of x's shape and dtype, zero where dropped.

  Example:
    >>> topk_mask(jnp.array([[3., 1., 3., 2.]]), jnp.float32(0.25))
    Array([[3., 0., 3., 0.]], dtype=float32)
  """
  check_choice("gradient", gradient, GRADIENTS)
  check_choice("score", score, SCORES)
  check_choice("method", method, _METHODS)
  check_keep(keep)
  x = jnp.asarray(x)
  axes = _reduce_axes(x.ndim, axes)
  _check_keep_shape(keep, x.shape, axes)
  _check_relative(relative)
  check_choice("rounding", rounding, ROUNDINGS)
  keep = jnp.asarray(keep, jnp.float32)
  xf = lax.stop_gradient(_as_supported_float(x))
  thr_shape = tuple(1 if a in axes else d for a, d in enumerate(x.shape))
  # Only the (tiny) per-row threshold sits inside the cond; the select stays outside so it fuses with the
  # ops around it and, under autodiff, the cond carries no activation-sized residuals. Key 0 is below
  # every key, so the skipped branch keeps every unit and the select returns x bit for bit.
  thr_key = lax.cond(
    jnp.all(keep >= 1.0),
    lambda xf: jnp.zeros(thr_shape, jnp.uint32),
    lambda xf: _threshold_keys(xf, keep, axes, score, method, relative, rounding),
    xf,
  )
  keys, _ = _keys(xf, score == "magnitude")
  y = jnp.where(keys >= thr_key, x, jnp.zeros_like(x))
  return _straight_through(x, y) if gradient == "straight_through" else y


def nonzero_fraction(y, axes: int | Sequence[int] | None = None) -> jax.Array:
  """Achieved density: the fraction of nonzero entries.

  Args:
    y: any array (e.g. the output of ``topk_mask``).
    axes: axes to average over; default all (one float32 scalar).

  Returns:
    float32 fraction of entries of ``y`` that are nonzero (NaN counts as nonzero).

  Example:
    >>> nonzero_fraction(jnp.array([[3., 0., 3., 0.]]))
    Array(0.5, dtype=float32)
  """
  return jnp.mean((y != 0).astype(jnp.float32), axis=axes)
