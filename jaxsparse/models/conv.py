"""2-D convolution as a sum of shifted matrix products: a drop-in for ``lax.conv_general_dilated``.

XLA's CPU backend runs convolutions, and above all their gradients, far slower than matrix products: one
3x3, 64-channel conv on a 64x32x32 batch took 2.6 s forward + backward as ``lax.conv_general_dilated`` and
0.72 s as nine shifted ``(B*H*W, C_in) @ (C_in, C_out)`` products on the 2-core development CPU
(docs/performance.md). `shifted_matmul_conv` computes the same convolution that way; pass it to
``flax.linen.Conv(conv_general_dilated=...)``. Parameters are unchanged (HWIO kernels), so checkpoints move
freely between the two implementations; results agree to float rounding (sums are taken in another order).

It covers what WideResNets use — 2-D, NHWC inputs, HWIO kernels, any strides and padding, no dilation, one
feature group — and hands anything else to ``lax.conv_general_dilated`` unchanged.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def _is_trivial(dilation) -> bool:
  return dilation is None or all(d == 1 for d in dilation)


def shifted_matmul_conv(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None, rhs_dilation=None,
                        dimension_numbers=None, feature_group_count: int = 1, batch_group_count: int = 1,
                        precision=None, preferred_element_type=None) -> jax.Array:
  """``lax.conv_general_dilated`` with the same arguments, as one matmul per kernel offset (see module doc).

  Example:
    >>> x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    >>> dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    >>> shifted_matmul_conv(x, w, (2, 2), "SAME", dimension_numbers=dn).shape
    (2, 4, 4, 4)
  """
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) if dimension_numbers is not None \
      else None
  if (lhs.ndim != 4 or dn != _NHWC or not _is_trivial(lhs_dilation) or not _is_trivial(rhs_dilation)
      or feature_group_count != 1 or batch_group_count != 1):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision, preferred_element_type=preferred_element_type)
  kh, kw = rhs.shape[:2]
  sh, sw = window_strides
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), (sh, sw), padding)
  (pt, pb), (pl, pr) = padding
  x = lax.pad(lhs, jnp.zeros((), lhs.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
  ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
  out = None
  for dy in range(kh):
    for dx in range(kw):
      window = lax.slice(x, (0, dy, dx, 0), (x.shape[0], dy + (ho - 1) * sh + 1, dx + (wo - 1) * sw + 1, x.shape[3]),
                         (1, sh, sw, 1))
      term = jnp.einsum("bhwc,cd->bhwd", window, rhs[dy, dx], precision=precision,
                        preferred_element_type=preferred_element_type)
      out = term if out is None else out + term
  return out
