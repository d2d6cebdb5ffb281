"""Train state, optimiser, and the pure train / eval steps (jitted by the loop, not here)."""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

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
    controller: keep-ratio controller state; `controller.keep` is the keep ratio of the current epoch.
    rng: uint32 PRNG key; per-step keys are `fold_in(rng, step)`.
  """
  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any
  controller: Any
  rng: jax.Array
  apply_fn: Callable = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)


def decay_mask(params):
  """True for conv / dense kernels (ndim > 1): weight decay skips norm scales and biases."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def lr_schedule(peak: float, *, total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
  """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
  if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
    raise ValueError(f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, got {total_steps}, "
                     f"{warmup_steps}")
  return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
                                            decay_steps=max(total_steps, warmup_steps + 1))


def make_optimizer(learning_rate: optax.ScalarOrSchedule, *, momentum: float = 0.9, nesterov: bool = True,
                   weight_decay: float = 5e-4) -> optax.GradientTransformation:
  """SGD with Nesterov momentum and coupled L2 weight decay on kernels only.

  Coupled decay (added to the gradient before momentum) matches PyTorch's `SGD(weight_decay=...)`, the usual WRN
  recipe.
  """
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=decay_mask),
      optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))


def create_train_state(rng: jax.Array, model: nn.Module, tx: optax.GradientTransformation,
                       controller: controllers_lib.Controller, *, image_shape=(32, 32, 3)) -> TrainState:
  """Initialises parameters, optimiser and controller state. `rng` is a uint32 PRNG key."""
  init_rng, train_rng = jax.random.split(rng)
  variables = model.init(init_rng, jnp.zeros((1, *image_shape), jnp.float32), keep=jnp.float32(1.0),
                         train=False)
  variables = flax.core.unfreeze(variables)
  params = variables.pop("params")
  variables.pop(DENSITY, None)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
                    opt_state=tx.init(params), controller=controller.init(), rng=train_rng,
                    apply_fn=model.apply, tx=tx)


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def train_step(state: TrainState, batch: dict, keep: jax.Array) -> tuple[TrainState, dict]:
  """One SGD step at keep ratio `keep` (a traced float32 scalar: one compilation serves every regime).

  Args:
    state: the train state.
    batch: {"image": float32 (B, H, W, C), "label": int32 (B,)}.
    keep: float32 scalar keep ratio; 1.0 is dense.

  Returns:
    (new_state, metrics) with metrics {"loss", "accuracy", "density/<site>"...}: float32 scalars of this batch.
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  mutable = [DENSITY, *state.model_state.keys()]

  def loss_fn(params):
    logits, new_vars = state.apply_fn(
        {"params": params, **state.model_state}, batch["image"], keep=keep, train=True,
        mutable=mutable, rngs={"dropout": dropout_rng})
    loss = jnp.mean(cross_entropy(logits, batch["label"]))
    return loss, (logits, new_vars)

  (loss, (logits, new_vars)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_vars = flax.core.unfreeze(new_vars)
  densities = site_densities(new_vars.pop(DENSITY, {}))
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
  metrics.update({f"density/{k}": v for k, v in densities.items()})
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            model_state={k: new_vars[k] for k in state.model_state})
  return new_state, metrics


def eval_step(state: TrainState, batch: dict, keep: jax.Array) -> dict:
  """Sums over the real (mask = 1) examples of one padded batch, at keep ratio `keep`.

  Returns:
    {"correct", "loss", "count"}: float32 sums; accuracy = correct / count over all batches.
  """
  logits = state.apply_fn({"params": state.params, **state.model_state}, batch["image"], keep=keep,
                          train=False)
  mask = batch["mask"]
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  return {"correct": jnp.sum(correct * mask), "loss": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
          "count": jnp.sum(mask)}
