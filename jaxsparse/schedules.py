"""Keep-ratio schedules: optax-style pure callables ``step -> keep``.

A schedule maps an integer step (a Python int, a traced scalar or an array of steps) to
a float32 keep ratio of the same shape. Schedules are pure, traceable under
``jax.jit``, work elementwise on arrays of steps, and compose with
``optax.join_schedules``. Factories validate their arguments eagerly and raise
``ValueError`` naming the offending value.

"Compression" means the keep ratio falls from 1.0 (dense) to ``min_keep``; the
``shape`` decides how: ``"linear"`` in keep, ``"geometric"`` (constant ratio between
successive steps, linear in log keep) or ``"cosine"`` (half-cosine, slow at both ends).
"""

from __future__ import annotations

import operator
from typing import Callable

import jax
import jax.numpy as jnp

from jaxsparse.topk import check_keep

__all__ = ["Schedule", "SHAPES", "constant", "linear", "geometric", "cosine", "compression", "cyclic", "cycle_index"]

Schedule = Callable[[jax.typing.ArrayLike], jax.Array]
SHAPES = ("geometric", "linear", "cosine")


def keep_number(name: str, value: float) -> float:
  """`value` as a float: a schedule's or controller's keep parameter `name`, which must be a Python number in
  (0, 1] (a ValueError naming `name` otherwise)."""
  if not isinstance(value, (int, float)):
    raise ValueError(f"{name} must be a keep ratio in (0, 1], got {value!r}")
  check_keep(value, name)
  return float(value)


def _check_int(name: str, value: int, minimum: int) -> int:
  try:
    if isinstance(value, bool):
      raise TypeError
    ivalue = operator.index(value)
  except TypeError:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
  if ivalue < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return ivalue


def _check_shape(shape: str) -> str:
  if shape not in SHAPES:
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
  return shape


def _interpolate(shape: str, min_keep: float, t: jax.Array) -> jax.Array:
  """Keep at progress ``t`` in [0, 1]: exactly 1.0 at t <= 0 and exactly min_keep at t >= 1."""
  t = jnp.clip(t, 0.0, 1.0)
  m = jnp.float32(min_keep)
  if shape == "linear":
    keep = 1.0 - (1.0 - m) * t
  elif shape == "geometric":
    keep = jnp.exp(jnp.log(m) * t)
  else:
    keep = m + (1.0 - m) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
  # Pin both ends exactly: float rounding must not leave keep at 0.99999994 or
  # 0.10000001, since callers compare against 1.0 and min_keep.
  keep = jnp.where(t <= 0.0, jnp.float32(1.0), keep)
  return jnp.where(t >= 1.0, m, keep).astype(jnp.float32)


def constant(value: float) -> Schedule:
  """A schedule that returns ``value`` at every step.

  Args:
    value: the keep ratio, in (0, 1].

  Returns:
    A schedule ``step -> keep`` (float32, same shape as ``step``).

  Example:
    >>> constant(0.5)(jnp.arange(3))
    Array([0.5, 0.5, 0.5], dtype=float32)
  """
  value = keep_number("value", value)

  def schedule(step: jax.typing.ArrayLike) -> jax.Array:
    return jnp.full(jnp.shape(step), value, jnp.float32)

  return schedule


def compression(min_keep: float, steps: int, shape: str = "geometric") -> Schedule:
  """Compression from 1.0 at step 0 to ``min_keep`` at step ``steps``, held after.

  Steps before 0 give 1.0.

  Args:
    min_keep: the final keep ratio, in (0, 1].
    steps: number of steps to reach ``min_keep``, >= 1.
    shape: ``"geometric"`` (keep = min_keep ** (step / steps)), ``"linear"``
      (keep = 1 - (1 - min_keep) * step / steps) or ``"cosine"``
      (keep = min_keep + (1 - min_keep) * (1 + cos(pi * step / steps)) / 2).

  Returns:
    A schedule ``step -> keep`` (float32, same shape as ``step``).

  Example:
    >>> compression(0.25, 2, "geometric")(jnp.arange(4))
    Array([1.  , 0.5 , 0.25, 0.25], dtype=float32)
  """
  min_keep = keep_number("min_keep", min_keep)
  steps = _check_int("steps", steps, 1)
  shape = _check_shape(shape)

  def schedule(step: jax.typing.ArrayLike) -> jax.Array:
    t = jnp.asarray(step, jnp.float32) / jnp.float32(steps)
    return _interpolate(shape, min_keep, t)

  return schedule


def linear(min_keep: float, steps: int) -> Schedule:
  """Linear compression: ``compression(min_keep, steps, "linear")``.

  Example:
    >>> linear(0.5, 2)(jnp.arange(4))
    Array([1.  , 0.75, 0.5 , 0.5 ], dtype=float32)
  """
  return compression(min_keep, steps, "linear")


def geometric(min_keep: float, steps: int) -> Schedule:
  """Geometric compression (constant ratio per step): ``compression(min_keep, steps, "geometric")``.

  Example:
    >>> geometric(0.25, 2)(jnp.arange(4))
    Array([1.  , 0.5 , 0.25, 0.25], dtype=float32)
  """
  return compression(min_keep, steps, "geometric")


def cosine(min_keep: float, steps: int) -> Schedule:
  """Half-cosine compression: ``compression(min_keep, steps, "cosine")``.

  Example:
    >>> cosine(0.5, 2)(jnp.arange(4))
    Array([1.  , 0.75, 0.5 , 0.5 ], dtype=float32)
  """
  return compression(min_keep, steps, "cosine")


def _check_cyclic(period: int, warmup: int, cycles: int | None) -> tuple[int, int, int | None]:
  period = _check_int("period", period, 1)
  warmup = _check_int("warmup", warmup, 0)
  if cycles is not None:
    cycles = _check_int("cycles", cycles, 1)
  return period, warmup, cycles


def _cycle_and_position(step, period, warmup):
  s = jnp.asarray(step) - warmup
  return s // period, s % period


def cyclic(
  min_keep: float,
  period: int,
  *,
  shape: str = "geometric",
  warmup: int = 0,
  cycles: int | None = None,
  final_keep: float = 1.0,
) -> Schedule:
  """Progressive compression with periodic reset to dense.

  With ``s = step - warmup``:

  * ``step < warmup``: keep = 1.0 (dense warm-up);
  * otherwise, cycle ``c = s // period`` and position ``i = s % period``: keep falls
    from exactly 1.0 at ``i = 0`` to exactly ``min_keep`` at ``i = period - 1`` (the
    period's last step) along ``shape``, i.e. it is
    ``compression(min_keep, period - 1, shape)(i)``; the next step (``i = 0`` of cycle
    ``c + 1``) resets to 1.0. With ``period == 1`` every step is the last step of its
    period, so keep = ``min_keep`` at every step after the warm-up;
  * ``c >= cycles`` (when ``cycles`` is not None): keep = ``final_keep``.

  Example (``min_keep=0.25, period=3, warmup=2, cycles=2``, geometric)::

    step   0    1    2    3    4     5    6    7     8    9 ...
    keep  1.0  1.0  1.0  0.5  0.25  1.0  0.5  0.25  1.0  1.0 ...   (final_keep=1.0)
    cycle  0    0    0    0    0     1    1    1     2    2  ...   (cycle_index)

  Args:
    min_keep: keep ratio on the last step of each period, in (0, 1].
    period: steps per cycle, >= 1.
    shape: ``"geometric"``, ``"linear"`` or ``"cosine"`` (see ``compression``).
    warmup: dense steps before the first cycle, >= 0.
    cycles: number of cycles, >= 1, or None to cycle forever.
    final_keep: keep ratio held after the last cycle, in (0, 1].

  Returns:
    A schedule ``step -> keep`` (float32, same shape as ``step``).
  """
  min_keep = keep_number("min_keep", min_keep)
  period, warmup, cycles = _check_cyclic(period, warmup, cycles)
  shape = _check_shape(shape)
  final_keep = keep_number("final_keep", final_keep)

  def schedule(step: jax.typing.ArrayLike) -> jax.Array:
    step = jnp.asarray(step)
    c, i = _cycle_and_position(step, period, warmup)
    if period > 1:
      t = i.astype(jnp.float32) / jnp.float32(period - 1)
    else:  # Every step is its period's last step.
      t = jnp.ones(jnp.shape(i), jnp.float32)
    keep = _interpolate(shape, min_keep, t)
    keep = jnp.where(step < warmup, jnp.float32(1.0), keep)
    if cycles is not None:
      keep = jnp.where(c >= cycles, jnp.float32(final_keep), keep)
    return keep.astype(jnp.float32)

  return schedule


def cycle_index(
  period: int, *, warmup: int = 0, cycles: int | None = None
) -> Callable[[jax.typing.ArrayLike], jax.Array]:
  """The companion of ``cyclic``: step -> cycle index (int32), i.e. resets so far.

  The index is 0 during the warm-up and the first cycle, ``c`` in cycle ``c`` and
  ``cycles`` once the last cycle has ended (the jump to ``final_keep`` counts as a
  reset). Use the same ``period``, ``warmup`` and ``cycles`` as the ``cyclic`` schedule.

  Args:
    period: steps per cycle, >= 1.
    warmup: dense steps before the first cycle, >= 0.
    cycles: number of cycles, >= 1, or None.

  Returns:
    A function ``step -> cycle`` (int32, same shape as ``step``).

  Example:
    >>> cycle_index(3, warmup=2, cycles=2)(jnp.arange(10))
    Array([0, 0, 0, 0, 0, 1, 1, 1, 2, 2], dtype=int32)
  """
  period, warmup, cycles = _check_cyclic(period, warmup, cycles)

  def index(step: jax.typing.ArrayLike) -> jax.Array:
    c, _ = _cycle_and_position(step, period, warmup)
    c = jnp.maximum(c, 0)
    if cycles is not None:
      c = jnp.minimum(c, cycles)
    return c.astype(jnp.int32)

  return index
