"""`sparse_apply`: global top-k on the hidden activations of any Linen model, scoped to one call.

The masking is installed with `flax.linen.intercept_methods` inside the function that runs the
model, so it lives only in that call (and in the jit trace that contains it): nothing is patched
globally and the model's code is not edited.
"""
from __future__ import annotations

import fnmatch
import re
import warnings
from typing import Any, Callable, Mapping, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import scope as flax_scope

from jaxsparse.sites import check_keep_map, check_keys_match, is_keep_map, keep_for_site
from jaxsparse.topk import nonzero_fraction, topk_mask

#: Weight layers whose inputs are the default sites (none of them subclasses another).
WEIGHT_LAYERS = (nn.Conv, nn.ConvTranspose, nn.ConvLocal, nn.Dense, nn.DenseGeneral, nn.Einsum)
POSITIONS = ("inputs", "outputs")
_GRADIENTS = ("masked", "straight_through")
_SCORES = ("value", "magnitude")
# Private collection the interceptor sows densities into; never returned to the caller.
_DENSITY = "sparse_apply_density"
_LEAF = "_sparse_apply"

Predicate = Callable[[nn.Module, str], bool]
Selector = Union[type, str, "re.Pattern[str]", Predicate, Sequence[Any]]


def _make_matcher(where: Selector | None) -> Predicate:
  """Turns a `where` selector into a predicate (module, path) -> bool; raises on bad selectors."""
  if where is None:
    return lambda m, _: isinstance(m, WEIGHT_LAYERS)
  if isinstance(where, type):
    if not issubclass(where, nn.Module):
      raise TypeError(f"sparse_apply: where class {where.__name__} is not a flax.linen.Module")
    return lambda m, _: isinstance(m, where)
  if isinstance(where, str):
    return lambda _, p: fnmatch.fnmatchcase(p, where)
  if isinstance(where, re.Pattern):
    return lambda _, p: where.search(p) is not None
  if isinstance(where, (tuple, list)):
    if not where:
      raise ValueError("sparse_apply: where is an empty sequence; it would select no site")
    matchers = [_make_matcher(w) for w in where]
    return lambda m, p: any(f(m, p) for f in matchers)
  if callable(where):
    return lambda m, p: bool(where(m, p))
  raise TypeError(
      "sparse_apply: where must be None, a Module class, a glob string, a compiled regex, a "
      f"predicate (module, path) -> bool, or a tuple/list of these; got {type(where).__name__}")


def _check_keep(keep) -> None:
  """Raises for a concrete keep outside (0, 1]; traced values are checked nowhere (data)."""
  if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(keep)):
    return
  arr = np.asarray(keep, dtype=np.float64)
  if arr.size == 0 or np.isnan(arr).any() or (arr <= 0).any() or (arr > 1).any():
    raise ValueError(f"sparse_apply: keep must be in (0, 1], got {keep!r}")


def _path(module: nn.Module) -> str:
  return "/".join(str(p) for p in module.path)


def sparse_apply(model: nn.Module, variables: Mapping[str, Any], *args, keep,
                 where: Selector | None = None, position: str = "inputs",
                 gradient: str = "masked", score: str = "value", relative: bool = False,
                 return_density: bool = False, **apply_kwargs):
  """Like `model.apply`, with global per-example top-k applied to the selected hidden activations.

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
    model: any `flax.linen.Module`.
    variables: as for `model.apply`.
    *args: positional arguments of `model.apply` (the model inputs).
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
    **apply_kwargs: passed to `model.apply` (e.g. `train=True`, `mutable=["batch_stats"]`,
      `rngs={"dropout": key}`, `method=...`).

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
  if position not in POSITIONS:
    raise ValueError(f"sparse_apply: position must be one of {POSITIONS}, got {position!r}")
  if position == "outputs" and where is None:
    raise ValueError("sparse_apply: position='outputs' needs an explicit `where` (the default "
                     "weight layers would also mask the model's final output)")
  if gradient not in _GRADIENTS:
    raise ValueError(f"sparse_apply: gradient must be one of {_GRADIENTS}, got {gradient!r}")
  if score not in _SCORES:
    raise ValueError(f"sparse_apply: score must be one of {_SCORES}, got {score!r}")
  if is_keep_map(keep):
    check_keep_map(keep, owner="sparse_apply")
    keep = {k: jnp.asarray(v, jnp.float32) for k, v in keep.items()}
  else:
    _check_keep(keep)
    keep = jnp.asarray(keep, jnp.float32)
  matches = _make_matcher(where)
  model_inputs = [a for a in jax.tree.leaves(args) if hasattr(a, "shape")]
  seen = {"first_input": None, "masked": 0, "skipped": 0, "sites": []}

  def mask(module, x):
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      raise TypeError(f"sparse_apply: site {_path(module)!r} ({position}) is not a floating "
                      f"array: {getattr(x, 'dtype', type(x).__name__)}")
    path = _path(module)
    site_keep = keep_for_site(keep, path) if is_keep_map(keep) else keep
    y = topk_mask(x, site_keep, score=score, gradient=gradient, relative=relative)
    seen["masked"] += 1
    seen["sites"].append(path)
    if return_density:
      module.sow(_DENSITY, _LEAF, nonzero_fraction(y))
    return y

  def interceptor(next_fun, call_args, call_kwargs, ctx):
    module = ctx.module
    if ctx.method_name != "__call__" or not module.path:
      return next_fun(*call_args, **call_kwargs)
    if seen["first_input"] is None and isinstance(module, WEIGHT_LAYERS):
      seen["first_input"] = call_args[0] if call_args else call_kwargs.get("inputs")
    if not matches(module, _path(module)):
      return next_fun(*call_args, **call_kwargs)
    if position == "outputs":
      return mask(module, next_fun(*call_args, **call_kwargs))
    if not call_args and "inputs" not in call_kwargs:
      raise TypeError(f"sparse_apply: site {_path(module)!r} got no input to mask (neither a "
                      "positional argument nor `inputs=`)")
    x = call_args[0] if call_args else call_kwargs["inputs"]
    if x is seen["first_input"] or any(x is a for a in model_inputs):
      seen["skipped"] += 1
      return next_fun(*call_args, **call_kwargs)
    if call_args:
      return next_fun(mask(module, x), *call_args[1:], **call_kwargs)
    return next_fun(**{**call_kwargs, "inputs": mask(module, x)})

  mutable = apply_kwargs.pop("mutable", False)
  if return_density:
    apply_kwargs["mutable"] = flax_scope.union_filters(mutable, _DENSITY)
  elif mutable is not False:
    apply_kwargs["mutable"] = mutable
  with nn.intercept_methods(interceptor):
    result = model.apply(variables, *args, **apply_kwargs)
  if is_keep_map(keep):
    check_keys_match(keep, seen["sites"], owner="sparse_apply")
  if not seen["masked"]:
    warnings.warn(
        f"sparse_apply: no site of {type(model).__name__} matched where={where!r} on {position} "
        f"({seen['skipped']} input layer(s) skipped); the output is dense.", stacklevel=2)
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
