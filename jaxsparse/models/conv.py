"""2-D convolution as a sum of shifted matrix products: a drop-in for ``lax.conv_general_dilated``.

XLA's CPU backend runs convolutions, and above all their gradients, far slower than matrix products: one
3x3, 64-channel conv on a 64x32x32 batch took 2.6 s forward + backward as ``lax.conv_general_dilated`` and
0.72 s as nine shifted ``(B*H*W, C_in) @ (C_in, C_out)`` products on the 2-core development CPU
(docs/performance.md). `shifted_matmul_conv` computes the same convolution that way; pass it to
``flax.linen.Conv(conv_general_dilated=...)``. Parameters are unchanged (HWIO kernels), so checkpoints move
freely between the two implementations; results agree to float rounding (sums are taken in another order).

`wgrad_matmul_conv` keeps XLA's own convolution for the forward pass and the input gradient (both fast on
CPU: 0.19 s each for that conv) and computes only the kernel gradient, the slow part (2.55 s), as nine
matrix products: 0.38 s (docs/performance.md).

Both cover what WideResNets use — 2-D, NHWC inputs, HWIO kernels, any strides and padding, no dilation,
one feature group — and hand anything else to ``lax.conv_general_dilated`` unchanged.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def _is_trivial(dilation) -> bool:
  return dilation is None or all(d == 1 for d in dilation)


def _is_ours(lhs, rhs, dimension_numbers, lhs_dilation, rhs_dilation, feature_group_count, batch_group_count) -> bool:
  """Whether this module handles the conv: 2-D NHWC/HWIO, no dilation, one group (else lax does, unchanged)."""
  if dimension_numbers is None or lhs.ndim != 4:
    return False
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  return (
    dn == _NHWC
    and _is_trivial(lhs_dilation)
    and _is_trivial(rhs_dilation)
    and feature_group_count == 1
    and batch_group_count == 1
  )


def _explicit_padding(lhs, rhs, strides, padding) -> tuple[tuple[int, int], ...]:
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def _padded(x, padding):
  (pt, pb), (pl, pr) = padding
  return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))


def _window(x, dy: int, dx: int, out_hw, strides):
  """The input pixels that kernel offset (dy, dx) meets, one per output pixel: (B, *out_hw, C)."""
  (ho, wo), (sh, sw) = out_hw, strides
  return lax.slice(
    x, (0, dy, dx, 0), (x.shape[0], dy + (ho - 1) * sh + 1, dx + (wo - 1) * sw + 1, x.shape[3]), (1, sh, sw, 1)
  )


def shifted_matmul_conv(
  lhs,
  rhs,
  window_strides: Sequence[int],
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision=None,
  preferred_element_type=None,
) -> jax.Array:
  """``lax.conv_general_dilated`` with the same arguments, as one matmul per kernel offset (see module doc).

  Example:
    >>> x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    >>> dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    >>> shifted_matmul_conv(x, w, (2, 2), "SAME", dimension_numbers=dn).shape
    (2, 4, 4, 4)
  """
  if not _is_ours(lhs, rhs, dimension_numbers, lhs_dilation, rhs_dilation, feature_group_count, batch_group_count):
    return lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count,
      precision=precision,
      preferred_element_type=preferred_element_type,
    )
  kh, kw = rhs.shape[:2]
  strides = tuple(window_strides)
  x = _padded(lhs, _explicit_padding(lhs, rhs, strides, padding))
  out_hw = _out_hw(x.shape, rhs.shape, strides)
  out = None
  for dy in range(kh):
    for dx in range(kw):
      term = jnp.einsum(
        "bhwc,cd->bhwd",
        _window(x, dy, dx, out_hw, strides),
        rhs[dy, dx],
        precision=precision,
        preferred_element_type=preferred_element_type,
      )
      out = term if out is None else out + term
  return out


def _out_hw(padded_shape, kernel_shape, strides) -> tuple[int, int]:
  return tuple((padded_shape[i + 1] - kernel_shape[i]) // strides[i] + 1 for i in range(2))


# Above this ratio of padded to output pixels the flat kernel gradient wastes more work than its
# contiguous slices save (docs/performance.md, "Measurements behind code choices").
_FLAT_WASTE = 1.3


def kernel_gradient(x, g, kernel_hw, strides, padding, precision=None):
  """d(conv)/d(kernel) for cotangent ``g``: one (C_in, C_out) matmul per kernel offset.

  For stride 1 the padded input is flattened to rows of pixels, so every offset's input is a
  contiguous block of rows (offset dy*W_padded + dx) and ``g`` is zero-padded onto the same grid;
  rows that straddle two image rows or images meet those zeros. Otherwise each offset's strided
  window is sliced out as in `shifted_matmul_conv`.
  """
  xp = _padded(x, padding)
  b, hp, wp, c = xp.shape
  kh, kw = kernel_hw
  ho, wo = g.shape[1:3]
  if tuple(strides) == (1, 1) and hp * wp <= _FLAT_WASTE * ho * wo:
    n = b * hp * wp
    xf = jnp.pad(xp.reshape(n, c), ((0, (kh - 1) * wp + kw - 1), (0, 0)))
    gf = jnp.pad(g, ((0, 0), (0, hp - ho), (0, wp - wo), (0, 0))).reshape(n, g.shape[3])
    blocks = [lax.slice_in_dim(xf, dy * wp + dx, dy * wp + dx + n) for dy in range(kh) for dx in range(kw)]
    terms = [jnp.einsum("nc,nd->cd", blk, gf, precision=precision) for blk in blocks]
  else:
    terms = [
      jnp.einsum("bhwc,bhwd->cd", _window(xp, dy, dx, (ho, wo), strides), g, precision=precision)
      for dy in range(kh)
      for dx in range(kw)
    ]
  return jnp.stack(terms).reshape(kh, kw, c, g.shape[3])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _wgrad_conv(lhs, rhs, strides, padding, precision):
  return lax.conv_general_dilated(lhs, rhs, strides, padding, dimension_numbers=_NHWC, precision=precision)


def _wgrad_conv_fwd(lhs, rhs, strides, padding, precision):
  return _wgrad_conv(lhs, rhs, strides, padding, precision), (lhs, rhs)


def _wgrad_conv_bwd(strides, padding, precision, residuals, g):
  lhs, rhs = residuals
  _, input_vjp = jax.vjp(
    lambda x: lax.conv_general_dilated(x, rhs, strides, padding, dimension_numbers=_NHWC, precision=precision), lhs
  )
  (dlhs,) = input_vjp(g)
  drhs = kernel_gradient(lhs, g, rhs.shape[:2], strides, padding, precision)
  return dlhs, drhs.astype(rhs.dtype)


_wgrad_conv.defvjp(_wgrad_conv_fwd, _wgrad_conv_bwd)


def wgrad_matmul_conv(
  lhs,
  rhs,
  window_strides: Sequence[int],
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision=None,
  preferred_element_type=None,
) -> jax.Array:
  """``lax.conv_general_dilated`` whose kernel gradient is `kernel_gradient` (see module doc).

  Forward values and the input gradient are XLA's own, bit for bit.

  Example:
    >>> x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    >>> dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    >>> jax.grad(lambda w: wgrad_matmul_conv(x, w, (1, 1), "SAME", dimension_numbers=dn).sum())(w).shape
    (3, 3, 3, 4)
  """
  if preferred_element_type is not None or not _is_ours(
    lhs, rhs, dimension_numbers, lhs_dilation, rhs_dilation, feature_group_count, batch_group_count
  ):
    return lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count,
      precision=precision,
      preferred_element_type=preferred_element_type,
    )
  strides = tuple(int(s) for s in window_strides)
  return _wgrad_conv(lhs, rhs, strides, _explicit_padding(lhs, rhs, strides, padding), precision)


# conv="auto" on the CPU: wgrad_matmul for convs whose kernel gradient is a large enough matmul (see choose_conv).
_AUTO_MIN_PIXELS = 16 * 16  # output pixels per image (Ho * Wo)
_AUTO_MIN_CHANNEL_PRODUCT = 128 * 128  # C_in * C_out of a 3x3 (or larger) kernel


def choose_conv(lhs_shape, rhs_shape, strides, *, backend: str) -> str:
  """The implementation ``conv="auto"`` uses for one NHWC/HWIO convolution: "wgrad_matmul" or "xla".

  Args:
    lhs_shape: input shape (B, H, W, C_in).
    rhs_shape: kernel shape (KH, KW, C_in, C_out).
    strides: window strides (SH, SW).
    backend: jax backend name ("cpu", "gpu", "tpu").

  Returns:
    "xla" on every backend but the CPU. On the CPU, "wgrad_matmul" for 1x1 kernels and for larger kernels with at
    least ``_AUTO_MIN_PIXELS`` output pixels per image and ``C_in * C_out >= _AUTO_MIN_CHANNEL_PRODUCT``, else "xla".
  """
  if backend != "cpu":
    return "xla"
  kh, kw, cin, cout = rhs_shape
  if kh * kw == 1:
    return "wgrad_matmul"
  pixels = -(-lhs_shape[1] // strides[0]) * -(-lhs_shape[2] // strides[1])
  if pixels >= _AUTO_MIN_PIXELS and cin * cout >= _AUTO_MIN_CHANNEL_PRODUCT:
    return "wgrad_matmul"
  return "xla"


def auto_conv(
  lhs,
  rhs,
  window_strides: Sequence[int],
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision=None,
  preferred_element_type=None,
) -> jax.Array:
  """``lax.conv_general_dilated`` with the same arguments, computed by the implementation `choose_conv` picks for
  this convolution's shapes on the default backend (``conv="auto"``).

  Example:
    >>> x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((1, 1, 3, 4))
    >>> dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    >>> auto_conv(x, w, (1, 1), "SAME", dimension_numbers=dn).shape
    (2, 8, 8, 4)
  """
  kw = dict(
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dimension_numbers,
    feature_group_count=feature_group_count,
    batch_group_count=batch_group_count,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
  if (
    _is_ours(lhs, rhs, dimension_numbers, lhs_dilation, rhs_dilation, feature_group_count, batch_group_count)
    and choose_conv(lhs.shape, rhs.shape, tuple(window_strides), backend=jax.default_backend()) == "wgrad_matmul"
  ):
    return wgrad_matmul_conv(lhs, rhs, window_strides, padding, **kw)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kw)
