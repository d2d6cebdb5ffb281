"""Effective MACs: the forward multiply-accumulates of a model's weight layers when their inputs are sparse.

A layer's dense MACs per example come from its kernel and output shapes: ``prod(kernel.shape[:-1])`` times the
number of output entries per example (a 3x3 conv from C_in to C_out channels on an H_out x W_out map:
``9 * C_in * C_out * H_out * W_out``; a Dense from D_in to D_out applied at P positions: ``D_in * D_out * P``).
Its effective MACs are its dense MACs times the density of its input (nonzero inputs times their fan-out, the
count NeuroBench calls "Eff_MACs"). Only Linen ``nn.Conv`` / ``nn.Dense`` and NNX ``nnx.Conv`` / ``nnx.Linear``
calls are counted (their subclasses too): norms, activations, pooling, additions and other layer types are not.

Which site's density is a layer's input density is what the model knows, not this module:

* `jaxsparse.models.WideResNet` says it exactly (``WideResNet.layer_inputs()``: conv1 and the shortcut read
  ``act1``, conv2 reads ``act2``, the classifier reads ``final_act``; the stem reads the image and counts dense).
* `sparse_apply` with ``position="inputs"`` (the default) masks the inputs of the layers it names, so a density
  reported under a layer's path is that layer's input density (the default ``inputs=None`` below).
* Elsewhere it cannot be known from the densities alone (a `TopK` layer's or ``position="outputs"`` site's output
  may pass through other code before a weight layer reads it): say it with ``inputs={layer path: site path}``;
  a layer with no known input density counts dense, so the count is an upper bound there.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse import nnx as jaxsparse_nnx

#: The layers whose MACs are counted.
LINEN_LAYERS = (nn.Conv, nn.Dense)
NNX_LAYERS = (nnx.Conv, nnx.Linear)


def _count(kernel_shape, out) -> int:
  """Dense MACs per example of one call: ``prod(kernel.shape[:-1])`` x output entries per example."""
  return math.prod(kernel_shape[:-1]) * math.prod(out.shape[1:])


def layer_macs(model, *args, **kwargs) -> dict[str, int]:
  """Dense forward MACs per example of every Conv / Dense (Linear) call of one run of `model`, by module path.

  Called like `sparse_apply`: ``layer_macs(linen_model, variables, *inputs, **apply_kwargs)`` (traced with
  `jax.eval_shape`: nothing is computed) or ``layer_macs(nnx_model, *inputs, **call_kwargs)`` (runs the model
  once: pass one example). Inputs carry a leading batch axis. A layer called several times sums its calls.

  Example:
    >>> model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(10)])
    >>> x = jnp.ones((1, 32))
    >>> layer_macs(model, model.init(jax.random.key(0), x), x)
    {'layers_0': 2048, 'layers_2': 640}
  """
  macs: dict[str, int] = {}

  def add(path: str, kernel_shape, out) -> None:
    macs[path] = macs.get(path, 0) + _count(kernel_shape, out)

  if isinstance(model, nn.Module):
    if not args:
      raise TypeError("layer_macs: a Linen model needs its variables: layer_macs(model, variables, *inputs)")

    def interceptor(next_fun, call_args, call_kwargs, ctx):
      out = next_fun(*call_args, **call_kwargs)
      if ctx.method_name == "__call__" and isinstance(ctx.module, LINEN_LAYERS):
        add("/".join(map(str, ctx.module.path)), ctx.module.get_variable("params", "kernel").shape, out)
      return out

    def run(variables, *inputs):
      with nn.intercept_methods(interceptor):
        return model.apply(variables, *inputs, **kwargs)

    jax.eval_shape(run, *args)
    return macs
  if isinstance(model, nnx.Module):
    jaxsparse_nnx.call_routed(model, _NNXCounter(add), args, kwargs)
    return macs
  raise TypeError(f"layer_macs: model must be a flax.linen.Module or a flax.nnx.Module instance, got {model!r}")


class _NNXCounter:
  """A router for `jaxsparse.nnx.call_routed` that runs every layer unchanged and counts the NNX weight layers."""

  def __init__(self, add):
    self.add = add

  def matches(self, module, path) -> bool:
    return False

  def route(self, module, path, call, args, kwargs):
    out = call(*args, **kwargs)
    if isinstance(module, NNX_LAYERS):
      self.add(path, module.kernel[...].shape, out)
    return out


def effective_macs(
  macs: Mapping[str, int], densities: Mapping[str, Any], inputs: Mapping[str, str | None] | None = None
) -> float:
  """Effective MACs per example: each layer's dense MACs times the density of its input.

  Args:
    macs: {layer path: dense MACs per example} (`layer_macs`).
    densities: {site path: achieved density} (e.g. `jaxsparse.models.site_densities`, or `sparse_apply`'s
      ``return_density``).
    inputs: {layer path: the site whose output the layer reads, or None for a dense input}; None means each
      layer reads the site of its own path (`sparse_apply` on inputs). A layer whose site is unknown or has no
      density counts dense.

  Returns:
    A Python float; equals ``sum(macs.values())`` when every density is 1.
  """
  total = 0.0
  for layer, count in macs.items():
    site = layer if inputs is None else inputs.get(layer)
    density = densities.get(site, 1.0) if site is not None else 1.0
    total += count * float(jnp.asarray(density))
  return total
