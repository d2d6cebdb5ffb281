"""jaxsparse: joint training across multiple activation-sparsity regimes, in JAX/Flax.

Public API:
  topk_mask, topk_threshold, nonzero_fraction   exact per-example global top-k with a traced keep ratio
  sparse_apply                                  top-k on the hidden activations of any Linen model
  schedules, controllers                        keep-ratio schedules (step -> keep) and epoch controllers
  models.WideResNet                             the paper's backbone with explicit top-k sites
  Config, train_and_evaluate                    (from jaxsparse.config / jaxsparse.loop) whole runs
"""
from jaxsparse import controllers, models, schedules
from jaxsparse.sparse_apply import sparse_apply
from jaxsparse.topk import nonzero_fraction, topk_mask, topk_threshold

__all__ = ["topk_mask", "topk_threshold", "nonzero_fraction", "sparse_apply", "schedules", "controllers", "models"]
__version__ = "0.1.0"
