"""Exact per-example global top-k over activations, with a traced keep ratio.

Provisional baseline implementation (32-step radix bisection on an order-preserving
uint32 key). See the module owner for the optimised version and full tests.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

_SCORES = ("value", "magnitude")
_GRADIENTS = ("masked", "straight_through")


def _check_keep(keep):
  """Raise for a concrete invalid keep; traced values pass (they are clipped later)."""
  if isinstance(keep, jax.core.Tracer):
    return
  try:
    import numpy as np
    arr = np.asarray(keep, dtype=np.float64)
  except Exception:  # not array-like
    raise TypeError(f"keep must be a float or array, got {type(keep).__name__}")
  if np.isnan(arr).any() or (arr <= 0).any() or (arr > 1).any():
    raise ValueError(f"keep must be in (0, 1], got {keep!r}")


def _ordered_u32(x):
  b = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  return jnp.where((b >> 31) == 1, ~b, b | jnp.uint32(0x80000000))


def _from_ordered_u32(u):
  b = jnp.where((u >> 31) == 1, u & jnp.uint32(0x7FFFFFFF), ~u)
  return lax.bitcast_convert_type(b, jnp.float32)


def _kth_largest(s_BxN, k_B):
  u = _ordered_u32(s_BxN)

  def body(i, res):
    cand = res | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
    cnt = jnp.sum(u >= cand[:, None], axis=1, dtype=jnp.int32)
    return jnp.where(cnt >= k_B, cand, res)

  res = lax.fori_loop(0, 32, body, jnp.zeros(s_BxN.shape[:1], jnp.uint32))
  return _from_ordered_u32(res)


def _reduce_axes(x, axes):
  if axes is None:
    return tuple(range(1, x.ndim))
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return tuple(sorted(a % x.ndim for a in axes))


def topk_threshold(x, keep, *, axes: Sequence[int] | None = None, score: str = "value"):
  """Per-example threshold: the k-th largest score over `axes` (default: all non-batch axes).

  Returns float32 thresholds shaped like x with the reduced axes kept as size 1.
  """
  if score not in _SCORES:
    raise ValueError(f"score must be one of {_SCORES}, got {score!r}")
  _check_keep(keep)
  axes = _reduce_axes(x, axes)
  s = x.astype(jnp.float32)
  if score == "magnitude":
    s = jnp.abs(s)
  other = tuple(a for a in range(x.ndim) if a not in axes)
  s_perm = jnp.transpose(s, other + axes)
  lead = s_perm.shape[: len(other)]
  n = math.prod(s_perm.shape[len(other):])
  s_BxN = s_perm.reshape((-1, n))
  keep = jnp.clip(jnp.asarray(keep, jnp.float32), 0.0, 1.0)
  keep_B = jnp.broadcast_to(keep.reshape(keep.shape + (1,) * (len(lead) - keep.ndim)), lead).reshape(-1) if keep.ndim else jnp.broadcast_to(keep, s_BxN.shape[:1])
  k_B = jnp.clip(jnp.ceil(keep_B * n).astype(jnp.int32), 1, n)
  thr = _kth_largest(s_BxN, k_B)
  out_shape = [1] * x.ndim
  for a in other:
    out_shape[a] = x.shape[a]
  return thr.reshape(out_shape)


def topk_mask(x, keep, *, axes=None, score: str = "value", gradient: str = "masked"):
  """Zero all but the top-k scores per example; keep >= 1 is the identity."""
  if gradient not in _GRADIENTS:
    raise ValueError(f"gradient must be one of {_GRADIENTS}, got {gradient!r}")
  _check_keep(keep)
  keep = jnp.asarray(keep, jnp.float32)

  def sparse(x):
    thr = topk_threshold(x, keep, axes=axes, score=score)
    s = jnp.abs(x) if score == "magnitude" else x
    mask = (s.astype(jnp.float32) >= thr)
    if gradient == "masked":
      return jnp.where(mask, x, jnp.zeros_like(x))
    y = jnp.where(mask, x, jnp.zeros_like(x))
    return x + lax.stop_gradient(y - x)

  return lax.cond(jnp.all(keep >= 1.0), lambda x: x, sparse, x)


def nonzero_fraction(y, axes=None):
  """Achieved density: fraction of nonzero entries, averaged over the batch."""
  return jnp.mean((y != 0).astype(jnp.float32))
