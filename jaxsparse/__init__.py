"""jaxsparse: joint training across multiple activation-sparsity regimes, in JAX/Flax.

Public API:
  topk_mask, topk_threshold, nonzero_fraction   exact per-example global top-k with a traced keep ratio
  sparse_apply                                  top-k on the hidden activations of any Flax model (Linen or NNX)
  TopK                                          an explicit top-k site (Linen layer) for models that place their own
  nnx                                           Flax NNX: nnx.sparse_apply, nnx.TopK (layer), nnx.site_densities
  schedules, controllers                        keep-ratio schedules (step -> keep) and epoch controllers
  models                                        models.WideResNet: the paper's backbone with explicit top-k sites
  Config, preset, train_and_evaluate            whole runs (loaded on first use: they pull in Orbax and the data code)
"""

import importlib

from jaxsparse import controllers, models, nnx, schedules
from jaxsparse.sites import TopK
from jaxsparse.sparse_apply import sparse_apply
from jaxsparse.topk import nonzero_fraction, topk_mask, topk_threshold

__all__ = [
  "topk_mask",
  "topk_threshold",
  "nonzero_fraction",
  "sparse_apply",
  "TopK",
  "nnx",
  "schedules",
  "controllers",
  "models",
  "Config",
  "preset",
  "train_and_evaluate",
]
__version__ = "0.1.0"

_LAZY = {
  "Config": ("jaxsparse.config", "Config"),
  "preset": ("jaxsparse.config", "preset"),
  "train_and_evaluate": ("jaxsparse.loop", "train_and_evaluate"),
}


def __getattr__(name):
  if name in _LAZY:
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)
  raise AttributeError(f"module 'jaxsparse' has no attribute {name!r}")
