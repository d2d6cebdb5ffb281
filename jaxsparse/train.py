"""Train state, optimiser, and the pure train / eval steps (jitted by the loop, not here)."""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax import lax

from jaxsparse import controllers as controllers_lib
from jaxsparse.models import site_densities
from jaxsparse.models.wrn import DENSITY  # the collection of achieved densities, one scalar per top-k site


class TrainState(struct.PyTreeNode):
  """All state that changes during training, in one pytree (checkpointed whole).

  Attributes:
    step: int32 scalar, optimiser steps taken.
    params: model parameters.
    model_state: non-parameter collections the model updates while training (e.g. batch_stats); {} if none.
    opt_state: optax state.
    controller: keep-ratio controller state; `controller.keep` is the keep ratio of the current step.
    reset_step: int32 scalar, the step at which the current keep-ratio cycle began (`with_controller`).
    rng: uint32 PRNG key; per-step keys are `fold_in(rng, step)`.
  """

  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any
  controller: Any
  reset_step: jax.Array
  rng: jax.Array
  apply_fn: Callable = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  def with_controller(self, controller) -> "TrainState":
    """This state with the controller state `controller`; a reset (its cycle grew) starts a cycle at this step."""
    reset = controller.cycle > self.controller.cycle
    return self.replace(controller=controller, reset_step=jnp.where(reset, self.step, self.reset_step))


def decay_mask(params):
  """True for conv / dense kernels (ndim > 1): weight decay skips norm scales and biases."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def lr_schedule(peak: float, *, total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
  """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
  if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
    raise ValueError(f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, got {total_steps}, {warmup_steps}")
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0, peak_value=peak, warmup_steps=warmup_steps, decay_steps=max(total_steps, warmup_steps + 1)
  )


def make_optimizer(
  learning_rate: optax.ScalarOrSchedule, *, momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 5e-4
) -> optax.GradientTransformation:
  """SGD with Nesterov momentum and coupled L2 weight decay on kernels only.

  Coupled decay (added to the gradient before momentum) matches PyTorch's `SGD(weight_decay=...)`, the usual WRN
  recipe.
  """
  return optax.chain(
    optax.add_decayed_weights(weight_decay, mask=decay_mask),
    optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
  )


def create_train_state(
  rng: jax.Array,
  model: nn.Module,
  tx: optax.GradientTransformation,
  controller: controllers_lib.Controller,
  *,
  image_shape=(32, 32, 3),
) -> TrainState:
  """Initialises parameters, optimiser and controller state. `rng` is a uint32 PRNG key."""
  init_rng, train_rng = jax.random.split(rng)
  variables = model.init(init_rng, jnp.zeros((1, *image_shape), jnp.float32), keep=jnp.float32(1.0), train=False)
  variables = flax.core.unfreeze(variables)
  params = variables.pop("params")
  variables.pop(DENSITY, None)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    model_state=variables,
    opt_state=tx.init(params),
    controller=controller.init(),
    reset_step=jnp.zeros((), jnp.int32),
    rng=train_rng,
    apply_fn=model.apply,
    tx=tx,
  )


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def regime_keeps(rng: jax.Array, min_keep, regimes: int, *, max_keep=1.0) -> jax.Array:
  """The keeps of one multi-regime ("sandwich") step: ``[1.0, min_keep, u_1, ..., u_{regimes-2}]``.

  The largest regime is always dense and the smallest is ``min_keep``; the ``regimes - 2`` others are drawn
  uniformly from ``[min_keep, max_keep)`` with `rng` (slimmable networks' sandwich rule).

  Args:
    rng: PRNG key of this step.
    min_keep: the smallest keep, a (traced) float32 scalar in (0, 1].
    regimes: number of keeps, a Python int >= 2.
    max_keep: upper end of the random keeps, in [min_keep, 1].

  Returns:
    float32 (regimes,) array.

  Example:
    >>> regime_keeps(jax.random.PRNGKey(0), 0.25, 4).shape
    (4,)
  """
  if isinstance(regimes, bool) or not isinstance(regimes, int) or regimes < 2:
    raise ValueError(f"regimes must be an integer >= 2 for a multi-regime step, got {regimes!r}")
  for name, value in (("min_keep", min_keep), ("max_keep", max_keep)):
    if not isinstance(value, jax.core.Tracer) and not 0.0 < float(value) <= 1.0:
      raise ValueError(f"{name} must be in (0, 1], got {value!r}")
  if not any(isinstance(v, jax.core.Tracer) for v in (min_keep, max_keep)) and float(min_keep) > float(max_keep):
    raise ValueError(f"min_keep ({float(min_keep)}) must be <= max_keep ({float(max_keep)})")
  min_keep, max_keep = jnp.float32(min_keep), jnp.float32(max_keep)
  u = jax.random.uniform(rng, (regimes - 2,), jnp.float32, minval=min_keep, maxval=max_keep)
  return jnp.concatenate([jnp.ones((1,), jnp.float32), min_keep[None], u])


def train_step(
  state: TrainState,
  batch: dict,
  keep: jax.Array,
  *,
  regimes: int = 1,
  distill: bool = False,
  reset_warmup: int = 0,
  controller_step: Callable | None = None,
) -> tuple[TrainState, dict]:
  """One SGD step at keep ratio `keep` (a traced float32 scalar: one compilation serves every regime).

  With ``regimes >= 2`` the step trains several keep ratios at once (the "sandwich rule" of slimmable networks):
  one forward/backward pass per keep of `regime_keeps` (dense, `keep` as the smallest, and ``regimes - 2``
  keeps drawn uniformly from [keep, 1) with this step's RNG), and the update follows the mean of their losses (so
  the gradient's scale, hence the learning rate, matches a one-regime step). With `distill` the sparse passes
  learn from the dense pass's predicted distribution (in-place distillation: soft targets under stop_gradient)
  instead of the labels; the dense pass always learns from the labels. Model state (e.g. batch_stats) is taken
  from the dense pass. `regimes` and `distill` are Python values fixed at trace time: ``regimes=1`` traces
  exactly the one-regime step.

  Args:
    state: the train state.
    batch: {"image": float32 (B, H, W, C), "label": int32 (B,)}.
    keep: float32 scalar keep ratio; 1.0 is dense. The smallest keep when ``regimes >= 2``.
    regimes: keep ratios trained per step (1: just `keep`).
    distill: in-place distillation from the dense pass (needs ``regimes >= 2``).
    reset_warmup: a Python int; > 0 scales the update by ``clip((step - state.reset_step + 1) / reset_warmup, 0, 1)``
      after the first reset (``state.controller.cycle > 0``): the learning rate ramps back up over the first
      `reset_warmup` steps of each cycle that a reset began (0: off, the plain step).
    controller_step: a step-level controller's ``step`` (`jaxsparse.controllers.Controller.step`), or None: the new
      state's controller is ``controller_step(state.controller, accuracy, state.step)``, so its keep can change
      from one step to the next inside this one compiled step.

  Returns:
    (new_state, metrics) with metrics {"loss", "accuracy", "density/<site>"...}: float32 scalars of this batch.
    With ``regimes >= 2``: "loss" is the mean loss that was optimised, "accuracy" and the densities are those of
    the pass at `keep` (the controller's keep), and "dense_loss" / "dense_accuracy" those of the dense pass.
  """
  if isinstance(regimes, bool) or not isinstance(regimes, int) or regimes < 1:
    raise ValueError(f"regimes must be an integer >= 1, got {regimes!r}")
  if distill and regimes < 2:
    raise ValueError(f"distill needs regimes >= 2 (a dense pass to learn from), got regimes={regimes}")
  if reset_warmup < 0:
    raise ValueError(f"reset_warmup must be >= 0, got {reset_warmup}")
  scale = None
  if reset_warmup:
    ramp = jnp.clip((state.step - state.reset_step + 1).astype(jnp.float32) / reset_warmup, 0.0, 1.0)
    scale = jnp.where(state.controller.cycle > 0, ramp, 1.0)
  if regimes > 1:
    new_state, metrics = _multi_regime_step(state, batch, keep, regimes, distill, scale)
  else:
    new_state, metrics = _one_regime_step(state, batch, keep, scale)
  if controller_step is not None:
    new_state = new_state.with_controller(controller_step(state.controller, metrics["accuracy"], state.step))
  return new_state, metrics


def _one_regime_step(state: TrainState, batch: dict, keep: jax.Array, scale):
  """`train_step` with one regime: one pass at `keep`."""
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  mutable = [DENSITY, *state.model_state.keys()]

  def loss_fn(params):
    logits, new_vars = state.apply_fn(
      {"params": params, **state.model_state},
      batch["image"],
      keep=keep,
      train=True,
      mutable=mutable,
      rngs={"dropout": dropout_rng},
    )
    loss = jnp.mean(cross_entropy(logits, batch["label"]))
    return loss, (logits, new_vars)

  (loss, (logits, new_vars)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_vars = flax.core.unfreeze(new_vars)
  densities = site_densities(new_vars.pop(DENSITY, {}))
  metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
  return _apply_grads(state, grads, new_vars, metrics, densities, scale)


def _apply_grads(state: TrainState, grads, new_vars, metrics: dict, densities: dict, scale=None):
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  if scale is not None:  # SGD applies the learning rate last: scaling the update scales the learning rate
    updates = jax.tree.map(lambda u: u * scale, updates)
  params = optax.apply_updates(state.params, updates)
  metrics.update({f"density/{k}": v for k, v in densities.items()})
  new_state = state.replace(
    step=state.step + 1, params=params, opt_state=opt_state, model_state={k: new_vars[k] for k in state.model_state}
  )
  return new_state, metrics


def _multi_regime_step(state: TrainState, batch: dict, keep: jax.Array, regimes: int, distill: bool, scale):
  """`train_step` with regimes >= 2: one pass per keep of `regime_keeps`, mean loss."""
  step_rng = jax.random.fold_in(state.rng, state.step)
  keeps_rng, *dropout_rngs = jax.random.split(step_rng, regimes + 1)
  keeps = regime_keeps(keeps_rng, keep, regimes)
  mutable = [DENSITY, *state.model_state.keys()]

  def loss_fn(params):
    def run(i):
      return state.apply_fn(
        {"params": params, **state.model_state},
        batch["image"],
        keep=keeps[i],
        train=True,
        mutable=mutable,
        rngs={"dropout": dropout_rngs[i]},
      )

    dense_logits, dense_vars = run(0)
    dense_loss = jnp.mean(cross_entropy(dense_logits, batch["label"]))
    targets = jax.nn.softmax(lax.stop_gradient(dense_logits.astype(jnp.float32))) if distill else None
    losses, small = [dense_loss], None
    for i in range(1, regimes):
      logits, new_vars = run(i)
      if distill:
        losses.append(jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)))
      else:
        losses.append(jnp.mean(cross_entropy(logits, batch["label"])))
      if i == 1:  # the pass at `keep`: its accuracy and densities are the step's
        small = (logits, new_vars[DENSITY] if DENSITY in new_vars else {})
    return jnp.mean(jnp.stack(losses)), (dense_logits, dense_loss, dense_vars, small)

  (loss, (dense_logits, dense_loss, dense_vars, (logits, density))), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    state.params
  )
  new_vars = flax.core.unfreeze(dense_vars)
  new_vars.pop(DENSITY, None)
  accuracy = lambda lg: jnp.mean(jnp.argmax(lg, -1) == batch["label"])  # noqa: E731
  metrics = {
    "loss": loss,
    "accuracy": accuracy(logits),
    "dense_loss": dense_loss,
    "dense_accuracy": accuracy(dense_logits),
  }
  return _apply_grads(state, grads, new_vars, metrics, site_densities(density), scale)


def eval_step(state: TrainState, batch: dict, keep: jax.Array) -> dict:
  """Sums over the real (mask = 1) examples of one padded batch, at keep ratio `keep`.

  Returns:
    {"correct", "loss", "count", "density/<site>"...}: float32 sums; accuracy = correct / count over all batches.
    A site's density sum is its batch's achieved density times the batch's count, so that summed over batches and
    divided by the total count it is the mean achieved density (padding examples, copies of real ones, are counted
    in the last batch's density).
  """
  logits, new_vars = state.apply_fn(
    {"params": state.params, **state.model_state}, batch["image"], keep=keep, train=False, mutable=[DENSITY]
  )
  mask = batch["mask"]
  count = jnp.sum(mask)
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  densities = site_densities(flax.core.unfreeze(new_vars).get(DENSITY, {}))
  return {
    "correct": jnp.sum(correct * mask),
    "loss": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
    "count": count,
    **{f"density/{k}": d * count for k, d in densities.items()},
  }
