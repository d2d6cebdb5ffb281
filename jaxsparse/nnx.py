"""Flax NNX: `sparse_apply` on an `nnx.Module`, and `TopK`, an explicit top-k layer for NNX models.

`sparse_apply(model, *inputs, keep=...)` calls ``model(*inputs)`` with the global per-example top-k applied at
the selected layers, like the Linen `jaxsparse.sparse_apply` (same selectors, keep, gradients and densities).

Scoping. For the duration of the call, each layer that may be a site gets a class of its own: a subclass of its
class, made once per (class, path) and cached, whose `__call__` asks the running `sparse_apply` what to do (and
runs the layer unchanged outside one). The original classes are restored in a ``finally``, so after the call,
also one that raised, the model has its own classes, graph and state as before; nothing global is changed, and no
other instance of a layer class is affected. The class is swapped with ``object.__setattr__``, which NNX does not
record in the module graph.

Limitation: densities are collected as the layers run; a site inside the model's own NNX transform (e.g. a
layer stack under `nnx.scan` or `nnx.vmap`) is masked, but its density cannot leave that transform, so pass
`return_density=False` for such models.
"""

from __future__ import annotations

import contextvars
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse.sites import SiteRouter, check_site_args, is_keep_map, make_router, mean_densities
from jaxsparse.topk import nonzero_fraction, topk_mask

#: NNX weight layers whose inputs are the default sites.
WEIGHT_LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.ConvTranspose, nnx.Einsum)

# The router of the `sparse_apply` call running now (None outside one).
_ROUTER: contextvars.ContextVar[SiteRouter | None] = contextvars.ContextVar("jaxsparse_nnx_router", default=None)
_SITE_CLASSES: dict[tuple[type, str], type] = {}


def _site_class(cls: type, path: str) -> type:
  """The cached subclass of `cls` whose `__call__` routes through the running `sparse_apply` as site `path`."""
  key = (cls, path)
  if key not in _SITE_CLASSES:

    def __call__(self, *args, **kwargs):
      router = _ROUTER.get()
      if router is None:
        return cls.__call__(self, *args, **kwargs)
      return router.route(self, path, lambda *a, **k: cls.__call__(self, *a, **k), args, kwargs)

    _SITE_CLASSES[key] = type(
      cls.__name__,
      (cls,),
      {
        "__call__": __call__,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        "_jaxsparse_site": path,
      },
    )
  return _SITE_CLASSES[key]


def _path(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def sparse_apply(
  model: nnx.Module,
  *args,
  keep,
  where=None,
  position: str = "inputs",
  gradient: str = "masked",
  score: str = "value",
  relative: bool = False,
  return_density: bool = False,
  **kwargs,
):
  """Like ``model(*args, **kwargs)``, with global per-example top-k applied to the selected hidden activations.

  Sites are the submodules (never `model` itself) selected by `where`, named by their '/'-joined attribute path
  (``"blocks/0/linear1"``, as in `nnx.iter_modules`); `where` is None (the default: every `nnx.Linear`,
  `nnx.LinearGeneral`, `nnx.Conv`, `nnx.ConvTranspose` and `nnx.Einsum`, `WEIGHT_LAYERS`), an `nnx.Module`
  class, a glob on the path, a compiled regex, a predicate ``(module, path) -> bool``, or a tuple of these. On
  inputs, layers reading the model's input (an array of `args`, or the very array the first weight layer
  received) are never masked. `keep`, `position`, `gradient`, `score`, `relative` and `return_density` are as for
  the Linen `jaxsparse.sparse_apply`: `keep` is traced data (one `nnx.jit` compilation serves every keep), a
  per-example vector, or a per-site mapping ``{path or glob: keep}``.

  Works inside `nnx.jit`, `nnx.grad` / `nnx.value_and_grad` and an `nnx.Optimizer` step, with the model in train
  or eval mode (`model.train()` / `model.eval()`): the layers run their own code on the masked arrays. Nesting
  `sparse_apply` calls is an error.

  Returns:
    What ``model(*args, **kwargs)`` returns; with `return_density=True`, ``(that, densities)`` where
    `densities` is ``{site path: float32 scalar}``, the mean over the batch (and over the site's calls) of the
    fraction of nonzero entries of the masked array.

  Example:
    >>> model = nnx.Sequential(nnx.Linear(32, 64, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(64, 10, rngs=nnx.Rngs(1)))
    >>> y, dens = sparse_apply(model, jnp.ones((4, 32)), keep=0.25, return_density=True)
    >>> dens
    {'layers/2': Array(0.25, dtype=float32)}
  """
  if not isinstance(model, nnx.Module):
    what = f"the class {model.__name__} (pass an instance)" if isinstance(model, type) else type(model).__name__
    raise TypeError(f"jaxsparse.nnx.sparse_apply: model must be a flax.nnx.Module instance, got {what}")
  if _ROUTER.get() is not None:
    raise RuntimeError("sparse_apply: calls cannot be nested (a model run by sparse_apply called sparse_apply)")
  densities: dict[str, list] = {}

  def record(module, path, density):
    densities.setdefault(path, []).append(density)

  router = make_router(
    where=where,
    keep=keep,
    position=position,
    gradient=gradient,
    score=score,
    relative=relative,
    model_inputs=args,
    module_type=nnx.Module,
    type_name="flax.nnx.Module",
    weight_layers=WEIGHT_LAYERS,
    record=record if return_density else None,
  )
  out = call_routed(model, router, args, kwargs)
  router.finish(model, where)
  return (out, mean_densities(densities)) if return_density else out


def call_routed(model: nnx.Module, router, args, kwargs):
  """``model(*args, **kwargs)`` with every weight layer, and every submodule that ``router.matches(module, path)``,
  calling ``router.route(module, path, call, args, kwargs)`` instead of running itself (`SiteRouter.route`'s
  protocol); the model's classes are restored afterwards, also when the call raises."""
  swapped = []
  for path, module in nnx.iter_modules(model):
    name = _path(path)
    if path and (isinstance(module, WEIGHT_LAYERS) or router.matches(module, name)):
      swapped.append((module, type(module), name))
  token = _ROUTER.set(router)
  try:
    for module, cls, name in swapped:
      object.__setattr__(module, "__class__", _site_class(cls, name))
    return model(*args, **kwargs)
  finally:
    for module, cls, _ in swapped:
      object.__setattr__(module, "__class__", cls)
    _ROUTER.reset(token)


class Density(nnx.Variable):
  """The achieved density of a `TopK` layer's last call: fraction of nonzero outputs (mean over the batch)."""


class TopK(nnx.Module):
  """An explicit top-k site for NNX models: exact per-example global top-k of its input (`jaxsparse.topk_mask`).

  The keep ratio is a call argument (traced: one compilation serves every keep; 1.0 returns the input unchanged).
  Each call stores the achieved density in ``self.density`` (a `Density` variable, never a parameter);
  `site_densities(model)` collects them by path.

  Args:
    score: "value" or "magnitude".
    gradient: "masked" or "straight_through".
    relative: keep is a fraction of each example's active units (see `jaxsparse.topk_mask`).
    axes: the axes ranked together; None: all but the first.

  Example:
    >>> class MLP(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.hidden, self.out, self.topk = nnx.Linear(32, 64, rngs=rngs), nnx.Linear(64, 10, rngs=rngs), TopK()
    ...   def __call__(self, x, keep=1.0):
    ...     return self.out(self.topk(nnx.relu(self.hidden(x)), keep))
    >>> model = MLP(nnx.Rngs(0))
    >>> y = model(jnp.ones((4, 32)), keep=0.25)
    >>> site_densities(model)   # {'topk': Array(0.25, dtype=float32)} for distinct activations
  """

  def __init__(self, *, score: str = "value", gradient: str = "masked", relative: bool = False, axes: Any = None):
    check_site_args(where="TopK", position="inputs", gradient=gradient, score=score, owner="TopK")
    if not isinstance(relative, bool):
      raise TypeError(f"TopK: relative must be a bool, got {relative!r}")
    self.score, self.gradient, self.relative = score, gradient, relative
    self.axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
    self.density = Density(jnp.ones((), jnp.float32))

  def __call__(self, x, keep=1.0):
    """`x` masked at keep ratio `keep` (a float32 scalar or per-example vector; not a per-site mapping)."""
    if is_keep_map(keep):
      raise TypeError(
        "TopK: keep must be a keep ratio, not a mapping; per-site mappings belong to jaxsparse.nnx.sparse_apply"
      )
    y = topk_mask(x, keep, axes=self.axes, score=self.score, gradient=self.gradient, relative=self.relative)
    self.density[...] = nonzero_fraction(y)
    return y


def site_densities(model: nnx.Module) -> dict[str, jax.Array]:
  """{path: density} of every `TopK` layer in `model` (as of its last call), e.g. ``{"blocks/0/topk": 0.3}``."""
  return {_path(path): m.density[...] for path, m in nnx.iter_modules(model) if isinstance(m, TopK)}
