"""Evaluation of a trained network: exact accuracy over a split, and its keep curve with effective MACs.

Shared by the training loop (per-epoch tests, the final keep curve) and the experiments that load finished runs.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import data as data_lib
from jaxsparse import macs as macs_lib
from jaxsparse import parallel
from jaxsparse import train as train_lib


def make_eval_fn(mesh):
  """`train.eval_step` jitted for `mesh`: replicated state and keep, batch sharded over `data`."""
  rep, bat = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(train_lib.eval_step, in_shardings=(rep, bat, rep), out_shardings=rep)


def evaluate(eval_fn, state, split, *, keep: float, batch_size: int, mean, std, mesh) -> dict:
  """Exact accuracy and loss over every example of `split` (padded, masked batches), and each site's mean density."""
  rep = parallel.replicated(mesh)
  keep = jax.device_put(jnp.float32(keep), rep)
  batches = data_lib.eval_batches(
    split, batch_size, mean=mean, std=std, process_index=jax.process_index(), process_count=jax.process_count()
  )
  sums = [eval_fn(state, batch, keep) for batch in parallel.prefetch_to_mesh(batches, mesh)]
  totals = jax.device_get(jax.tree.map(lambda *xs: jnp.sum(jnp.stack(xs)), *sums))
  count = float(totals["count"])
  return {
    "accuracy": float(totals["correct"]) / count,
    "loss": float(totals["loss"]) / count,
    "count": int(count),
    "density": {k[len("density/") :]: float(v) / count for k, v in totals.items() if k.startswith("density/")},
  }


def keep_curve(evaluate_at: Callable[[float], dict], model, params_and_state, keeps) -> tuple[dict, float]:
  """({keep: {"accuracy", "density", "macs", "macs_fraction"}}, dense MACs per example) of a trained model, from
  `evaluate_at(keep)` (`evaluate`'s result): the mean achieved density over the sites, the effective MACs per
  example (`jaxsparse.macs.effective_macs`: every conv and the classifier, the stem dense) and their share of dense."""
  layer = macs_lib.layer_macs(model, params_and_state, jnp.zeros((1, 32, 32, 3), jnp.float32))
  dense = float(sum(layer.values()))
  curve = {}
  for k in keeps:
    result = evaluate_at(k)
    effective = macs_lib.effective_macs(layer, result["density"], model.layer_inputs())
    curve[k] = {
      "accuracy": result["accuracy"],
      "density": float(np.mean(list(result["density"].values()))) if result["density"] else 1.0,
      "macs": effective,
      "macs_fraction": effective / dense,
    }
  return curve, dense
