"""`sparse_apply`: global top-k on the hidden activations of any Flax model (Linen or NNX), scoped to one call.

For Linen models the masking is installed with `flax.linen.intercept_methods` inside the function that runs the
model, so it lives only in that call (and in the jit trace that contains it): nothing is patched globally and the
model's code is not edited. NNX models go to `jaxsparse.nnx.sparse_apply`. What happens at a site (selection,
input layers, masking, densities) is `jaxsparse.sites.SiteRouter`, shared by both.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx as flax_nnx
from flax.core import scope as flax_scope

from jaxsparse import nnx as jaxsparse_nnx
from jaxsparse.sites import make_router

#: Linen weight layers whose inputs are the default sites (none of them subclasses another).
WEIGHT_LAYERS = (nn.Conv, nn.ConvTranspose, nn.ConvLocal, nn.Dense, nn.DenseGeneral, nn.Einsum)
# Private collection the interceptor sows densities into; never returned to the caller.
_DENSITY = "sparse_apply_density"
_LEAF = "_sparse_apply"

Predicate = Callable[[Any, str], bool]
Selector = Union[type, str, "re.Pattern[str]", Predicate, Sequence[Any]]


def _path(module: nn.Module) -> str:
  return "/".join(str(p) for p in module.path)


def sparse_apply(
  model,
  *args,
  keep,
  where: Selector | None = None,
  position: str = "inputs",
  gradient: str = "masked",
  score: str = "value",
  relative: bool = False,
  return_density: bool = False,
  **kwargs,
):
  """Runs a Flax model with global per-example top-k applied to the selected hidden activations.

  One function for both Flax APIs, called in each API's idiom:

  * Linen: ``sparse_apply(model, variables, *inputs, keep=..., **apply_kwargs)`` is like
    ``model.apply(variables, *inputs, **apply_kwargs)``;
  * NNX: ``sparse_apply(model, *inputs, keep=..., **call_kwargs)`` is like ``model(*inputs, **call_kwargs)``
    (`jaxsparse.nnx.sparse_apply`; the model object is the same after the call, also when it raises).

  Sites. A site is a call of a submodule's `__call__` (never the root module's) selected by
  `where`; on `position="inputs"` its first positional argument (or `inputs=`: the activation) is
  masked before the layer runs, on `position="outputs"` the returned array is masked. `where` is one
  of:

  * None (default, inputs only): every `nn.Conv`, `nn.ConvTranspose`, `nn.ConvLocal`, `nn.Dense`,
    `nn.DenseGeneral` and `nn.Einsum` (`WEIGHT_LAYERS`), except the input layers below;
  * a Module class (matches subclasses too);
  * a glob string on the '/'-joined module path, e.g. ``"block*/conv2"`` (case-sensitive
    `fnmatch`);
  * a compiled regex (`re.compile(...)`), matched with `.search` on the path;
  * a predicate ``(module, path) -> bool``;
  * a tuple or list of the above (their union).

  Input layers. On inputs, a layer is never masked when its input is one of the arrays passed to
  `apply` (`*args`, compared by identity), or is the very array that the first `WEIGHT_LAYERS` call
  (in program order, selected or not) received: masking the data is not activation sparsity. So a
  CNN's stem conv, an MLP's first Dense (also after a reshape), and every layer sharing that first
  input (e.g. the query/key/value projections of a first self-attention layer) are skipped.

  Args:
    model: a `flax.linen.Module` or a `flax.nnx.Module` instance.
    *args: Linen: `variables`, then the positional arguments of `model.apply` (the model inputs). NNX: the
      positional arguments of `model(...)`.
    keep: keep ratio in (0, 1], a Python float or a (traced) float32 scalar; 1.0 is dense.
      Changing a traced keep never recompiles. Or a per-site mapping {site path or glob: keep ratio}
      (`jaxsparse.sites`: the exact path wins, then the most specific glob; sites no key matches stay
      dense; a key matching no selected site is a ValueError).
    where: site selector (see above).
    position: "inputs" or "outputs" ("outputs" needs an explicit `where`).
    gradient: top-k gradient, "masked" or "straight_through".
    score: top-k score, "value" or "magnitude".
    relative: keep is a fraction of each example's active units (score > 0), not of all units.
    return_density: also return the achieved density of every site.
    **kwargs: Linen: passed to `model.apply` (e.g. `train=True`, `mutable=["batch_stats"]`,
      `rngs={"dropout": key}`, `method=...`). NNX: passed to `model(...)`.

  Returns:
    Exactly what `model.apply` returns (`out`, or `(out, state)` with `mutable=`). With
    `return_density=True`: `(that, densities)` where `densities` is `{site_path: float32 scalar}`,
    the mean over the batch of the fraction of nonzero entries of the masked array; a module
    called several times reports the mean over its calls. So with `mutable=` the result is
    `((out, state), densities)`.

  Raises:
    TypeError / ValueError: bad `where`, `position`, `gradient`, `score`, a concrete `keep` out
      of range, or a per-site keep mapping with a bad key or value or a key that matches no site. A
      warning naming the model class is issued when no site matches.

  Example:
    >>> model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(10)])
    >>> x = jnp.ones((4, 32))
    >>> variables = model.init(jax.random.key(0), x)
    >>> y, dens = sparse_apply(model, variables, x, keep=0.25, return_density=True)
    >>> dens
    {'layers_2': Array(0.25, dtype=float32)}
  """
  options = dict(
    keep=keep,
    where=where,
    position=position,
    gradient=gradient,
    score=score,
    relative=relative,
    return_density=return_density,
  )
  if isinstance(model, nn.Module):
    if not args:
      raise TypeError(
        "sparse_apply: a Linen model needs its variables: sparse_apply(model, variables, *inputs, keep=...)"
      )
    return _sparse_apply_linen(model, args[0], args[1:], **options, apply_kwargs=kwargs)
  if isinstance(model, flax_nnx.Module):
    return jaxsparse_nnx.sparse_apply(model, *args, **options, **kwargs)
  what = f"the class {model.__name__} (pass an instance)" if isinstance(model, type) else type(model).__name__
  raise TypeError(f"sparse_apply: model must be a flax.linen.Module or a flax.nnx.Module instance, got {what}")


def _sparse_apply_linen(
  model: nn.Module, variables, args, *, keep, where, position, gradient, score, relative, return_density, apply_kwargs
):
  def record(module, path, density):
    module.sow(_DENSITY, _LEAF, density)

  router = make_router(
    where=where,
    keep=keep,
    position=position,
    gradient=gradient,
    score=score,
    relative=relative,
    model_inputs=args,
    module_type=nn.Module,
    type_name="flax.linen.Module",
    weight_layers=WEIGHT_LAYERS,
    record=record if return_density else None,
  )

  def interceptor(next_fun, call_args, call_kwargs, ctx):
    if ctx.method_name != "__call__" or not ctx.module.path:
      return next_fun(*call_args, **call_kwargs)
    return router.route(ctx.module, _path(ctx.module), next_fun, call_args, call_kwargs)

  mutable = apply_kwargs.pop("mutable", False)
  if return_density:
    apply_kwargs["mutable"] = flax_scope.union_filters(mutable, _DENSITY)
  elif mutable is not False:
    apply_kwargs["mutable"] = mutable
  with nn.intercept_methods(interceptor):
    result = model.apply(variables, *args, **apply_kwargs)
  router.finish(model, where)
  if not return_density:
    return result
  out, state = result
  state = dict(state)
  densities = _flatten_densities(state.pop(_DENSITY, {}))
  return (out if mutable is False else (out, state)), densities


def _flatten_densities(tree: Mapping[str, Any], prefix: str = "") -> dict[str, jax.Array]:
  """{"a": {"b": {_LEAF: (d1, d2)}}} -> {"a/b": mean(d1, d2)}."""
  out = {}
  for key, value in tree.items():
    if key == _LEAF and isinstance(value, tuple):
      out[prefix] = value[0] if len(value) == 1 else jnp.mean(jnp.stack(value))
    else:
      out.update(_flatten_densities(value, f"{prefix}/{key}" if prefix else str(key)))
  return out
