"""jaxsparse: joint training across multiple activation-sparsity regimes, in JAX/Flax."""
from jaxsparse.topk import topk_mask, topk_threshold, nonzero_fraction

__all__ = ["topk_mask", "topk_threshold", "nonzero_fraction"]
__version__ = "0.1.0"
