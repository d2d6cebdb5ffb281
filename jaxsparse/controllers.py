"""Keep-ratio controllers: pure, jit-able ``(init, update)`` pairs, epoch-level or step-level.

An epoch-level controller decides the keep ratio of the next epoch from the metrics of the
epoch just finished. ``init()`` gives the state for epoch 0; ``update(state, metrics)``
consumes the metrics of the epoch trained at ``state.keep`` and returns the state whose
``keep`` is used for the next epoch. A step-level controller (``tighten_relax``, the rule of
the author's published script) also has ``step(state, accuracy, step)``, which the train
step calls after every optimiser step with that batch's training accuracy, so the keep can
change inside an epoch. The state is a pytree of float32/int32 scalars (the same structure
for every controller), so it can live in the train state, be checkpointed, and be updated
under ``jax.jit`` with traced metrics: rules use ``jnp.where`` only.

Registry: ``get(name, **options)``, ``names()``, ``options(name)``. The rules of
``adaptive_a`` and ``adaptive_b`` are this project's reading of the paper's "Strategy 1"
and "Strategy 2" (the paper does not publish them); they are written out exactly below.
``tighten_relax`` is the controller of the author's script (README, "What is the paper's").

Example:
  >>> ctrl = get("adaptive_a", gamma=0.5)
  >>> state = ctrl.init()
  >>> state = jax.jit(ctrl.update)(state, EpochMetrics(0.4, 1.7, float("nan")))
  >>> float(state.keep)
  0.5
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxsparse import schedules
from jaxsparse.errors import OptionError

__all__ = [
  "EpochMetrics",
  "ControllerState",
  "Controller",
  "dense",
  "constant",
  "cyclic",
  "adaptive_a",
  "adaptive_b",
  "tighten_relax",
  "get",
  "names",
  "options",
]


class EpochMetrics(NamedTuple):
  """Metrics of the epoch just finished (float32 scalars or Python floats).

  Attributes:
    train_accuracy: mean training accuracy over the epoch, measured at that epoch's keep.
    train_loss: mean training loss over the epoch.
    val_accuracy: dense (keep = 1.0) accuracy on the held-out validation split after the
      epoch; NaN when there is no validation split.
  """

  train_accuracy: Any
  train_loss: Any
  val_accuracy: Any


class ControllerState(NamedTuple):
  """Controller state; every field is a scalar jax array.

  Attributes:
    keep: float32, the keep ratio to use for the next epoch (step-level: the next step).
    cycle: int32, number of resets to dense so far (0 in the first cycle; tighten_relax:
      relaxes that raised the keep).
    epoch: int32, number of epochs seen by ``update``.
    ref: float32, reference accuracy of the current cycle (adaptive_a: train accuracy of
      its dense epoch; adaptive_b: best dense validation accuracy; tighten_relax: the best
      EMA of the batch accuracy ever seen); NaN when unused or not yet seen.
    prev: float32, adaptive_b: validation accuracy after the previous epoch; tighten_relax:
      the EMA of the batch training accuracy; else NaN.
    gamma: float32, compression factor of the next compression step (adaptive_b adapts it).
    holds: int32, adaptive_a: consecutive epochs held at the current keep; tighten_relax:
      decisions left in the cooldown after a relax.
  """

  keep: jax.Array
  cycle: jax.Array
  epoch: jax.Array
  ref: jax.Array
  prev: jax.Array
  gamma: jax.Array
  holds: jax.Array


class Controller(NamedTuple):
  """A keep-ratio controller.

  Attributes:
    init: ``() -> ControllerState``, the state before epoch 0.
    update: ``(state, EpochMetrics) -> state``, pure and jit-able.
    needs_validation: whether ``update`` reads ``val_accuracy`` (the loop must then hold
      out a validation split).
    step: None for an epoch-level controller; else ``(state, accuracy, step) -> state``,
      pure and jit-able, called by the train step after optimiser step number ``step``
      (int32, 0 for the first) with that batch's training accuracy (float32, measured at
      ``state.keep``); its ``keep`` is the next step's.
  """

  init: Callable[[], ControllerState]
  update: Callable[[ControllerState, EpochMetrics], ControllerState]
  needs_validation: bool = False
  step: Callable[[ControllerState, jax.Array, jax.Array], ControllerState] | None = None


def _f32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _i32(x) -> jax.Array:
  return jnp.asarray(x, jnp.int32)


def _state(keep=1.0, cycle=0, epoch=0, ref=jnp.nan, prev=jnp.nan, gamma=1.0, holds=0):
  """Builds a state with canonical dtypes (also casts traced values)."""
  return ControllerState(
    keep=_f32(keep),
    cycle=_i32(cycle),
    epoch=_i32(epoch),
    ref=_f32(ref),
    prev=_f32(prev),
    gamma=_f32(gamma),
    holds=_i32(holds),
  )


def _next_epoch(state: ControllerState, metrics: EpochMetrics) -> ControllerState:
  """The update of controllers that ignore metrics and keep their keep ratio."""
  del metrics
  return state._replace(epoch=state.epoch + 1)


def _check_range(name: str, value, low: float, high: float, low_open: bool, high_open: bool):
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  if ok:
    ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
  if not ok:
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    raise OptionError(f"{{controller_options.{name}}} must be a number in {interval}, got {value!r}")
  return float(value)


def _check_count(name: str, value, low: int = 0) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise OptionError(f"{{controller_options.{name}}} must be an integer >= {low}, got {value!r}")
  return value


def dense() -> Controller:
  """Keep 1.0 forever (the dense baseline).

  Example:
    >>> float(dense().init().keep)
    1.0
  """
  return Controller(init=_state, update=_next_epoch)


def constant(*, keep: float = 0.5) -> Controller:
  """A fixed keep ratio at every epoch.

  Args:
    keep: the keep ratio, in (0, 1].

  Example:
    >>> float(constant(keep=0.25).init().keep)
    0.25
  """
  keep = schedules.keep_number("keep", keep)

  return Controller(init=lambda: _state(keep=keep), update=_next_epoch)


def cyclic(
  *,
  min_keep: float = 0.1,
  period: int = 10,
  shape: str = "geometric",
  warmup: int = 0,
  cycles: int | None = None,
  final_keep: float = 1.0,
) -> Controller:
  """The fixed cyclic schedule, in epochs: keep(e) = ``schedules.cyclic(...)(e)``.

  ``cycle`` is ``schedules.cycle_index(...)(e)``. With the defaults the keep ratio of the
  epochs of each 10-epoch cycle is 1.0, 0.774, 0.599, 0.464, 0.359, 0.278, 0.215, 0.167,
  0.129, 0.1, then 1.0 again.

  Args:
    min_keep: keep on the last epoch of each period, in (0, 1].
    period: epochs per cycle, >= 1.
    shape: ``"geometric"``, ``"linear"`` or ``"cosine"``.
    warmup: dense epochs before the first cycle, >= 0.
    cycles: number of cycles, or None (forever).
    final_keep: keep after the last cycle, in (0, 1].

  Example:
    >>> ctrl = cyclic(min_keep=0.25, period=3)
    >>> float(ctrl.update(ctrl.init(), EpochMetrics(0., 0., 0.)).keep)
    0.5
  """
  keep_at = schedules.cyclic(min_keep, period, shape=shape, warmup=warmup, cycles=cycles, final_keep=final_keep)
  cycle_at = schedules.cycle_index(period, warmup=warmup, cycles=cycles)

  def at(epoch) -> ControllerState:
    return _state(keep=keep_at(epoch), cycle=cycle_at(epoch), epoch=epoch)

  def update(state: ControllerState, metrics: EpochMetrics) -> ControllerState:
    del metrics
    return at(state.epoch + 1)

  return Controller(init=lambda: at(0), update=update)


def adaptive_a(*, min_keep: float = 0.1, gamma: float = 0.7, tol: float = 0.02, patience: int = 3) -> Controller:
  """Strategy 1 (our rule): recovery-gated compression.

  A cycle starts with a dense epoch (keep = 1.0) whose train accuracy becomes the cycle's
  reference ``ref``. After each epoch, with ``acc`` its train accuracy (at its keep)::

    if keep == 1:                       # the dense epoch opening a cycle
      ref <- acc; go <- True
    else:
      go <- acc >= (1 - tol) * ref  or  holds >= patience
    if go:                              # compress or reset
      holds <- 0
      if keep <= min_keep: keep <- 1; cycle <- cycle + 1       # reset
      else:                keep <- max(keep * gamma, min_keep)  # compress
    else:
      holds <- holds + 1                # hold: train again at the same keep

  So each keep (min_keep included) is trained for 1 to ``patience + 1`` epochs, until
  the train accuracy recovers to within a fraction ``tol`` of the dense reference.
  With the defaults and fast recovery a cycle is 8 epochs: keep 1.0, 0.7, 0.49, 0.343,
  0.240, 0.168, 0.118, 0.1; at most 1 + 7 * 4 = 29 epochs. A NaN accuracy counts as not
  recovered.

  Args:
    min_keep: smallest keep ratio, in (0, 1).
    gamma: compression factor per step, in (0, 1).
    tol: relative tolerance on train accuracy, in [0, 1).
    patience: maximum consecutive holds at one keep, >= 0 (0: never hold).

  Example:
    >>> ctrl = adaptive_a(gamma=0.5)
    >>> s = ctrl.update(ctrl.init(), EpochMetrics(0.80, 0.6, float("nan")))  # dense
    >>> s = ctrl.update(s, EpochMetrics(0.70, 0.9, float("nan")))  # 0.70 < 0.98 * 0.80
    >>> float(s.keep), int(s.holds)
    (0.5, 1)
  """
  min_keep = _check_range("min_keep", min_keep, 0.0, 1.0, True, True)
  gamma = _check_range("gamma", gamma, 0.0, 1.0, True, True)
  tol = _check_range("tol", tol, 0.0, 1.0, False, True)
  patience = _check_count("patience", patience)

  def init() -> ControllerState:
    return _state(gamma=gamma)

  def update(state: ControllerState, metrics: EpochMetrics) -> ControllerState:
    acc = _f32(metrics.train_accuracy)
    is_dense = state.keep >= 1.0
    ref = jnp.where(is_dense, acc, state.ref)
    recovered = acc >= (1.0 - tol) * ref
    go = is_dense | recovered | (state.holds >= patience)
    reset = go & (state.keep <= min_keep)
    compressed = jnp.maximum(state.keep * state.gamma, _f32(min_keep))
    keep = jnp.where(reset, _f32(1.0), jnp.where(go, compressed, state.keep))
    cycle = state.cycle + reset.astype(jnp.int32)
    holds = jnp.where(go, 0, state.holds + 1)
    return _state(keep=keep, cycle=cycle, epoch=state.epoch + 1, ref=ref, gamma=state.gamma, holds=holds)

  return Controller(init=init, update=update)


def adaptive_b(
  *,
  min_keep: float = 0.1,
  gamma: float = 0.7,
  tol: float = 0.01,
  grow: float = 1.25,
  shrink: float = 0.8,
  gamma_min: float = 0.3,
  gamma_max: float = 0.9,
) -> Controller:
  """Strategy 2 (our rule): generalization-gated compression with an adaptive step.

  Reads only ``val_accuracy``: the dense (keep = 1.0) accuracy on the held-out validation
  split (never the test split). A cycle starts with a dense epoch; ``best`` is the best
  validation accuracy seen in the cycle, ``prev`` the one after the previous epoch. After
  each epoch, with ``v`` its validation accuracy::

    if keep == 1:                       # the dense epoch opening a cycle
      best <- v; prev <- v
      keep <- max(gamma, min_keep)      # first compression of the cycle
    else:                               # the epoch after a compression step
      best <- max(best, v)
      gamma <- clip(gamma ** (grow if v >= prev else shrink), gamma_min, gamma_max)
      if v >= best - tol and keep > min_keep:
        keep <- max(keep * gamma, min_keep)     # compress
      else:
        keep <- 1; cycle <- cycle + 1           # reset
      prev <- v

  ``tol`` is absolute (accuracy units). A compression step that held or improved the
  validation accuracy makes the next one more aggressive (``grow`` > 1 lowers gamma); one
  that hurt makes it gentler (``shrink`` < 1 raises gamma). With ``shrink = 1 / grow`` one
  good and one bad step cancel out. ``gamma`` carries over across cycles. With the
  defaults and a validation accuracy that rises every epoch, keep goes 1.0, 0.7, 0.448,
  0.257, 0.128, 0.1, 1.0 (gamma 0.7, 0.64, 0.57, 0.50, 0.42, 0.34; bounded below by 0.3).
  A NaN validation accuracy counts as a drop (reset), so a validation split is required.

  Args:
    min_keep: smallest keep ratio, in (0, 1).
    gamma: initial compression factor, in [gamma_min, gamma_max].
    tol: absolute tolerance below the cycle's best validation accuracy, in [0, 1).
    grow: exponent applied to gamma after a good step, >= 1.
    shrink: exponent applied to gamma after a bad step, in (0, 1].
    gamma_min: lower bound of gamma (most aggressive), in (0, 1).
    gamma_max: upper bound of gamma (gentlest), in [gamma_min, 1).

  Example:
    >>> ctrl = adaptive_b()
    >>> s = ctrl.update(ctrl.init(), EpochMetrics(0.5, 1.4, 0.60))  # dense: best 0.60
    >>> s = ctrl.update(s, EpochMetrics(0.5, 1.4, 0.62))  # improved: gamma 0.7 ** 1.25
    >>> round(float(s.keep), 3), round(float(s.gamma), 3)
    (0.448, 0.64)
  """
  min_keep = _check_range("min_keep", min_keep, 0.0, 1.0, True, True)
  gamma_min = _check_range("gamma_min", gamma_min, 0.0, 1.0, True, True)
  gamma_max = _check_range("gamma_max", gamma_max, gamma_min, 1.0, False, True)
  gamma = _check_range("gamma", gamma, gamma_min, gamma_max, False, False)
  tol = _check_range("tol", tol, 0.0, 1.0, False, True)
  grow = _check_range("grow", grow, 1.0, float("inf"), False, True)
  shrink = _check_range("shrink", shrink, 0.0, 1.0, True, False)

  def init() -> ControllerState:
    return _state(gamma=gamma)

  def update(state: ControllerState, metrics: EpochMetrics) -> ControllerState:
    v = _f32(metrics.val_accuracy)
    is_dense = state.keep >= 1.0
    # fmax ignores a NaN best (start of run), so one value never poisons the cycle.
    best = jnp.where(is_dense, v, jnp.fmax(state.ref, v))
    exponent = jnp.where(v >= state.prev, _f32(grow), _f32(shrink))
    adapted = jnp.clip(state.gamma**exponent, gamma_min, gamma_max)
    new_gamma = jnp.where(is_dense, state.gamma, adapted)
    within = is_dense | (v >= best - tol)
    reset = ~within | (state.keep <= min_keep)
    keep = jnp.where(reset, _f32(1.0), jnp.maximum(state.keep * new_gamma, _f32(min_keep)))
    cycle = state.cycle + reset.astype(jnp.int32)
    return _state(keep=keep, cycle=cycle, epoch=state.epoch + 1, ref=best, prev=v, gamma=new_gamma)

  return Controller(init=init, update=update, needs_validation=True)


def tighten_relax(
  *,
  interval: int = 128,
  tighten: float = 0.018,
  tol: float = 0.12,
  beta: float = 0.5,
  cooldown: int = 3,
  relax_step: float = 1.0,
  relax_gain: float = 1.5,
  max_scale: float = 5.0,
  max_jump: float = 1.0,
  min_keep: float = 0.0,
  max_keep: float = 1.0,
  init_keep: float = 1.0,
) -> Controller:
  """The author's script's rule (its ``AdaptiveKeepRatioController``): tighten every few steps, relax on a drop.

  Step-level: after every optimiser step, with ``a`` that batch's training accuracy (at the
  step's keep) and ``t`` the number of steps taken so far (1 after the first)::

    ema <- a if t == 1 else beta * ema + (1 - beta) * a
    best <- ema if t == 1 else max(best, ema)     # never reset
    if t % interval == 0:                        # a decision
      drop <- best - ema
      if drop > tol:                             # relax (also during a cooldown)
        scale <- min(1 + relax_gain * (drop - tol) / max(tol, 1e-8), max_scale)
        keep <- min(max_keep, keep + min(relax_step * scale, max_jump if max_jump > 0 else inf))
        cooldown_left <- cooldown
      elif cooldown_left > 0:
        cooldown_left <- cooldown_left - 1
      else:                                      # tighten
        keep <- max(min_keep, keep * (1 - tighten))

  With the script's values (the defaults) every relax returns to dense (relax_step and
  max_jump 1.0), the next 3 decisions hold, and each other decision shrinks keep by 1.8%: from
  dense to 0.1 in 127 decisions. ``interval`` 128 is ~3 decisions per epoch at batch 128 on
  50,000 images; scale it with the steps per epoch to keep that rate on shorter epochs.
  ``cycle`` counts the relaxes that raised the keep; ``update`` (epoch end) only counts
  epochs. The keep is float32 (the script's is a Python float), so after n tightenings it
  differs from the script's by ~n float32 roundings (docs/results.md, parity).

  Args:
    interval: steps per decision, >= 1 (the script's ``tighten_every_n_batches``).
    tighten: fraction of keep removed per tightening, in [0, 1).
    tol: largest tolerated drop of the EMA below its best, in [0, 1).
    beta: EMA factor of the previous EMA, in [0, 1).
    cooldown: decisions held after a relax, >= 0.
    relax_step: keep added by a relax at scale 1, > 0.
    relax_gain: growth of the relax's scale with the drop beyond ``tol``, >= 0.
    max_scale: cap of the relax's scale, >= 1.
    max_jump: cap of one relax's increase, >= 0 (0: no cap).
    min_keep: smallest keep, in [0, max_keep] (0: the top-k still keeps one unit).
    max_keep: largest keep, in (0, 1].
    init_keep: keep of the first step, in [min_keep, max_keep].

  Example:
    >>> ctrl = tighten_relax(interval=2)
    >>> s = ctrl.step(ctrl.init(), 0.5, 0)   # first batch: EMA = best = 0.5
    >>> s = ctrl.step(s, 0.5, 1)             # a decision, no drop: tighten
    >>> round(float(s.keep), 3)
    0.982
  """
  interval = _check_count("interval", interval, 1)
  tighten = _check_range("tighten", tighten, 0.0, 1.0, False, True)
  tol = _check_range("tol", tol, 0.0, 1.0, False, True)
  beta = _check_range("beta", beta, 0.0, 1.0, False, True)
  cooldown = _check_count("cooldown", cooldown)
  relax_step = _check_range("relax_step", relax_step, 0.0, float("inf"), True, True)
  relax_gain = _check_range("relax_gain", relax_gain, 0.0, float("inf"), False, True)
  max_scale = _check_range("max_scale", max_scale, 1.0, float("inf"), False, True)
  max_jump = _check_range("max_jump", max_jump, 0.0, float("inf"), False, True)
  max_keep = _check_range("max_keep", max_keep, 0.0, 1.0, True, False)
  min_keep = _check_range("min_keep", min_keep, 0.0, max_keep, False, False)
  init_keep = _check_range("init_keep", init_keep, min_keep, max_keep, False, False)

  def init() -> ControllerState:
    return _state(keep=init_keep)

  def step(state: ControllerState, accuracy, step) -> ControllerState:
    acc = _f32(accuracy)
    first = jnp.isnan(state.prev)
    ema = jnp.where(first, acc, beta * state.prev + (1.0 - beta) * acc)
    best = jnp.where(first, ema, jnp.maximum(state.ref, ema))
    decide = (_i32(step) + 1) % interval == 0
    drop = best - ema
    relax = decide & (drop > tol)
    scale = jnp.minimum(1.0 + relax_gain * (drop - tol) / max(tol, 1e-8), max_scale)
    delta = relax_step * scale
    if max_jump > 0:
      delta = jnp.minimum(delta, max_jump)
    relaxed = jnp.minimum(_f32(max_keep), state.keep + delta)
    hold = decide & ~relax & (state.holds > 0)
    tightened = jnp.maximum(_f32(min_keep), state.keep * _f32(1.0 - tighten))
    keep = jnp.where(relax, relaxed, jnp.where(decide & ~hold, tightened, state.keep))
    holds = jnp.where(relax, cooldown, jnp.where(hold, state.holds - 1, state.holds))
    cycle = state.cycle + (relax & (relaxed > state.keep)).astype(jnp.int32)
    return state._replace(keep=_f32(keep), cycle=cycle, ref=_f32(best), prev=_f32(ema), holds=_i32(holds))

  return Controller(init=init, update=_next_epoch, step=step)


_REGISTRY: dict[str, Callable[..., Controller]] = {
  "dense": dense,
  "constant": constant,
  "cyclic": cyclic,
  "adaptive_a": adaptive_a,
  "adaptive_b": adaptive_b,
  "tighten_relax": tighten_relax,
}


def names() -> tuple[str, ...]:
  """Names accepted by ``get``.

  Example:
    >>> names()
    ('dense', 'constant', 'cyclic', 'adaptive_a', 'adaptive_b', 'tighten_relax')
  """
  return tuple(_REGISTRY)


def _factory(name: str) -> Callable[..., Controller]:
  if name not in _REGISTRY:
    raise ValueError(f"unknown controller {name!r}; known: {', '.join(names())}")
  return _REGISTRY[name]


def options(name: str) -> dict[str, Any]:
  """The options of controller ``name`` and their defaults.

  Example:
    >>> options("constant")
    {'keep': 0.5}
  """
  params = inspect.signature(_factory(name)).parameters.values()
  return {p.name: p.default for p in params}


def get(name: str, **kwargs: Any) -> Controller:
  """Builds controller ``name`` with keyword options (see ``options(name)``).

  Raises:
    ValueError: unknown name; OptionError (a ValueError) naming an option that does not apply or its bad value.

  Example:
    >>> ctrl = get("cyclic", period=5)
    >>> float(ctrl.init().keep)
    1.0
  """
  factory = _factory(name)
  unknown = sorted(set(kwargs) - set(options(name)))
  if unknown:
    known = ", ".join(f"{{controller_options.{o}}}" for o in options(name)) or "none"
    raise OptionError(
      f"{{controller_options.{unknown[0]}}} does not apply to {{schedule}} {name!r}; its options: {known}"
    )
  try:
    return factory(**kwargs)
  except OptionError:
    raise
  except ValueError as e:  # a schedule's own check names the option plainly: name it as the controller option
    option, _, problem = str(e).partition(" ")
    if option not in kwargs:
      raise
    raise OptionError(f"{{controller_options.{option}}} {problem}") from None
