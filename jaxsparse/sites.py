"""Top-k sites shared by `WideResNet`, `sparse_apply` and hand-placed layers: the explicit `TopK` layer, the
"density" collection it sows into, and per-site keep ratios (a mapping from site name or glob to a keep ratio).

Per-site keep. Wherever a model takes `keep`, it may also take a mapping ``{pattern: keep}`` whose keys are site
names (e.g. ``"group2_block0/act1"``) or `fnmatch` globs over them (``"group2_*"``, ``"*/act2"``, ``"*"``) and
whose values are keep ratios in (0, 1] (float32 scalars, traced or not: a dict of scalars is a pytree, so changing
the values never recompiles). A site takes the value of the key naming it exactly; otherwise of the matching glob
with the most literal (non-wildcard) characters (so ``"*"`` is a default that any longer glob overrides); two
different globs of equal rank matching one site are an error. A site no key matches stays dense (keep 1.0). A key
that matches no site is an error naming it.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsparse.topk import GRADIENTS, SCORES, check_choice, check_keep, nonzero_fraction, topk_mask

DENSITY = "density"  # the Flax collection of achieved densities, one float32 scalar per top-k site
_WILDCARDS = "*?["


def is_keep_map(keep) -> bool:
  """Whether `keep` is a per-site mapping (rather than a scalar or per-example keep)."""
  return isinstance(keep, Mapping)


def check_keep_map(keep: Mapping[str, Any], *, owner: str) -> None:
  """Raises ValueError naming the key for an empty mapping, a non-string key, or a concrete value outside (0, 1]."""
  if not keep:
    raise ValueError(f"{owner}: keep mapping is empty; pass a keep ratio or {{site name or glob: keep}}")
  for key, value in keep.items():
    if not isinstance(key, str) or not key:
      raise ValueError(f"{owner}: keep mapping keys must be site names or globs (non-empty strings), got {key!r}")
    check_keep(value, f"{owner}: keep[{key!r}]")


def _literal_chars(pattern: str) -> int:
  return sum(c not in _WILDCARDS for c in pattern)


def keep_for_site(keep: Mapping[str, Any], name: str, default=1.0):
  """The keep ratio of site `name` under a per-site mapping (see the module docstring); `default` if none matches.

  Example:
    >>> keep_for_site({"*": 0.5, "group2_*": 0.2}, "group2_block0/act1")
    0.2
  """
  if name in keep:
    return keep[name]
  globs = [k for k in keep if fnmatch.fnmatchcase(name, k)]
  if not globs:
    return default
  best = max(_literal_chars(g) for g in globs)
  top = sorted(g for g in globs if _literal_chars(g) == best)
  if len(top) > 1:
    raise ValueError(
      f"keep: site {name!r} matches several keep keys of equal rank {top}; name the site exactly "
      "or make one glob more specific"
    )
  return keep[top[0]]


def check_keys_match(keep: Mapping[str, Any], names: Iterable[str], *, owner: str) -> None:
  """Raises ValueError naming the first key of `keep` that matches none of the site `names`."""
  names = list(names)
  for key in keep:
    if not any(key == n or fnmatch.fnmatchcase(n, key) for n in names):
      shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
      raise ValueError(f"{owner}: keep key {key!r} matches no top-k site; the sites are: {shown}")


class TopK(nn.Module):
  """An explicit top-k site: exact per-example global top-k of its input (`jaxsparse.topk_mask`).

  For models that place their sites themselves. The keep ratio is a call argument (traced: one compilation serves
  every keep; 1.0 returns the input unchanged). When the "density" collection is mutable (and not during `init`),
  the achieved density (fraction of nonzero outputs) is sown as ``density`` in this module's scope, which
  `jaxsparse.models.site_densities` reports under the module's path.

  Attributes:
    score: "value" or "magnitude".
    gradient: "masked" or "straight_through".
    relative: keep is a fraction of each example's active units (see `jaxsparse.topk_mask`).
    axes: the axes ranked together; None: all but the first.

  Example:
    >>> class MLP(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, keep=1.0):
    ...     return nn.Dense(10)(TopK(name="hidden")(nn.relu(nn.Dense(64)(x)), keep))
    >>> model = MLP()
    >>> variables = model.init(jax.random.key(0), jnp.ones((4, 32)))
    >>> y, state = model.apply(variables, jnp.ones((4, 32)), keep=0.25, mutable=["density"])
    >>> site_densities(state["density"])   # {'hidden': Array(0.25, dtype=float32)} for distinct activations
  """

  score: str = "value"
  gradient: str = "masked"
  relative: bool = False
  axes: Any = None

  @nn.compact
  def __call__(self, x, keep=1.0):
    """`x` masked at keep ratio `keep` (a float32 scalar or per-example vector; not a per-site mapping)."""
    if is_keep_map(keep):
      raise TypeError(
        f"TopK {'/'.join(map(str, self.path)) or '(root)'}: keep must be a keep ratio, not a mapping; "
        "per-site mappings belong to the model that owns the sites"
      )
    y = topk_mask(x, keep, axes=self.axes, score=self.score, gradient=self.gradient, relative=self.relative)
    if self.is_mutable_collection(DENSITY) and not self.is_initializing():
      self.sow(
        DENSITY,
        "density",
        nonzero_fraction(y),
        reduce_fn=lambda _, new: new,
        init_fn=lambda: jnp.zeros((), jnp.float32),
      )
    return y


def site_densities(collection: Mapping[str, Any]) -> dict[str, jax.Array]:
  """Flattens a "density" collection to {"group0_block0/act1": density, ..., "final_act": ...}.

  A `TopK` layer's entry (``{"hidden": {"density": d}}``) is reported under the layer's path (``"hidden"``).

  Args:
    collection: ``state["density"]`` from ``model.apply(..., mutable=["density"])``.

  Returns:
    A flat dict from '/'-joined site name to the scalar achieved density (mean over the batch of the
    fraction of nonzero entries).

  Example:
    >>> site_densities({"group0_block0": {"act1": 0.3}, "final_act": 0.3, "head": {"density": 0.5}})
    {'group0_block0/act1': 0.3, 'final_act': 0.3, 'head': 0.5}
  """
  return _flatten(collection, "")


def _flatten(collection: Mapping[str, Any], prefix: str) -> dict[str, jax.Array]:
  out = {}
  for key, value in collection.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      out.update(_flatten(value, path))
    else:
      out[prefix if key == "density" and prefix else path] = value
  return out


# ---------------------------------------------------------------------------------------------------------------
# Site selection and interception shared by the Linen and NNX `sparse_apply` (jaxsparse.sparse_apply, jaxsparse.nnx).

POSITIONS = ("inputs", "outputs")

Predicate = Callable[[Any, str], bool]


def make_matcher(
  where, *, module_type: type, type_name: str, default: tuple[type, ...], owner: str = "sparse_apply"
) -> Predicate:
  """Turns a `where` selector into a predicate (module, path) -> bool; raises on bad selectors.

  `where` is None (the `default` layer classes), a `module_type` subclass (`type_name` in errors), a glob on the '/'-joined path, a
  compiled regex (searched in the path), a predicate (module, path) -> bool, or a tuple/list of these (union).
  """
  if where is None:
    return lambda m, _: isinstance(m, default)
  if isinstance(where, type):
    if not issubclass(where, module_type):
      raise TypeError(f"{owner}: where class {where.__name__} is not a {type_name}")
    return lambda m, _: isinstance(m, where)
  if isinstance(where, str):
    return lambda _, p: fnmatch.fnmatchcase(p, where)
  if isinstance(where, re.Pattern):
    return lambda _, p: where.search(p) is not None
  if isinstance(where, (tuple, list)):
    if not where:
      raise ValueError(f"{owner}: where is an empty sequence; it would select no site")
    matchers = [
      make_matcher(w, module_type=module_type, type_name=type_name, default=default, owner=owner) for w in where
    ]
    return lambda m, p: any(f(m, p) for f in matchers)
  if callable(where):
    return lambda m, p: bool(where(m, p))
  raise TypeError(
    f"{owner}: where must be None, a Module class, a glob string, a compiled regex, a predicate "
    f"(module, path) -> bool, or a tuple/list of these; got {type(where).__name__}"
  )


def check_site_args(*, where, position: str, gradient: str, score: str, owner: str = "sparse_apply") -> None:
  """Raises ValueError naming the argument for a bad `position`, `gradient` or `score`."""
  if position not in POSITIONS:
    raise ValueError(f"{owner}: position must be one of {POSITIONS}, got {position!r}")
  if position == "outputs" and where is None:
    raise ValueError(
      f"{owner}: position='outputs' needs an explicit `where` (the default weight layers would also "
      "mask the model's final output)"
    )
  check_choice(f"{owner}: gradient", gradient, GRADIENTS)
  check_choice(f"{owner}: score", score, SCORES)


def as_keep(keep, *, owner: str = "sparse_apply"):
  """Checks a keep ratio or per-site mapping (concrete values in (0, 1]) and returns it as float32 array(s)."""
  if is_keep_map(keep):
    check_keep_map(keep, owner=owner)
    return {k: jnp.asarray(v, jnp.float32) for k, v in keep.items()}
  check_keep(keep, f"{owner}: keep")
  return jnp.asarray(keep, jnp.float32)


class SiteRouter:
  """What happens at each intercepted layer call of one `sparse_apply` call (Linen and NNX alike).

  `route(module, path, call, args, kwargs)` runs `call(*args, **kwargs)` (the layer's own `__call__`) with the
  site's input or output masked when `matches(module, path)`, except input layers: on inputs, a layer whose input
  is one of `model_inputs` (by identity) or the very array the first `weight_layers` call received is skipped.
  Each masked array's density goes to `record(module, path, density)` when `record` is given.
  """

  def __init__(
    self,
    *,
    keep,
    matches: Predicate,
    weight_layers: tuple[type, ...],
    model_inputs,
    position: str,
    score: str,
    gradient: str,
    relative: bool,
    record=None,
    owner: str = "sparse_apply",
  ):
    self.keep, self.matches, self.weight_layers = keep, matches, weight_layers
    self.model_inputs = [a for a in jax.tree.leaves(model_inputs) if hasattr(a, "shape")]
    self.position, self.score, self.gradient, self.relative = position, score, gradient, relative
    self.record, self.owner = record, owner
    self.first_input = None
    self.sites: list[str] = []  # masked site paths, in call order (with repeats)
    self.skipped = 0

  def _mask(self, module, path: str, x):
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      raise TypeError(
        f"{self.owner}: site {path!r} ({self.position}) is not a floating array: "
        f"{getattr(x, 'dtype', type(x).__name__)}"
      )
    keep = keep_for_site(self.keep, path) if is_keep_map(self.keep) else self.keep
    y = topk_mask(x, keep, score=self.score, gradient=self.gradient, relative=self.relative)
    self.sites.append(path)
    if self.record is not None:
      self.record(module, path, nonzero_fraction(y))
    return y

  def route(self, module, path: str, call, args, kwargs):
    if self.first_input is None and isinstance(module, self.weight_layers):
      self.first_input = args[0] if args else kwargs.get("inputs")
    if not self.matches(module, path):
      return call(*args, **kwargs)
    if self.position == "outputs":
      return self._mask(module, path, call(*args, **kwargs))
    if not args and "inputs" not in kwargs:
      raise TypeError(f"{self.owner}: site {path!r} got no input to mask (neither a positional argument nor `inputs=`)")
    x = args[0] if args else kwargs["inputs"]
    if x is self.first_input or any(x is a for a in self.model_inputs):
      self.skipped += 1
      return call(*args, **kwargs)
    if args:
      return call(self._mask(module, path, x), *args[1:], **kwargs)
    return call(**{**kwargs, "inputs": self._mask(module, path, x)})

  def finish(self, model, where) -> None:
    """After the call: a per-site keep key that matched no site is an error; no masked site is a warning."""
    if is_keep_map(self.keep):
      check_keys_match(self.keep, self.sites, owner=self.owner)
    if not self.sites:
      warnings.warn(
        f"{self.owner}: no site of {type(model).__name__} matched where={where!r} on {self.position} "
        f"({self.skipped} input layer(s) skipped); the output is dense.",
        stacklevel=3,
      )


def make_router(
  *,
  where,
  keep,
  position: str,
  gradient: str,
  score: str,
  relative: bool,
  model_inputs,
  module_type: type,
  type_name: str,
  weight_layers: tuple[type, ...],
  record=None,
) -> SiteRouter:
  """Checks the options of one `sparse_apply` call and builds its `SiteRouter` (Linen and NNX alike)."""
  check_site_args(where=where, position=position, gradient=gradient, score=score)
  return SiteRouter(
    keep=as_keep(keep),
    matches=make_matcher(where, module_type=module_type, type_name=type_name, default=weight_layers),
    weight_layers=weight_layers,
    model_inputs=model_inputs,
    position=position,
    score=score,
    gradient=gradient,
    relative=relative,
    record=record,
  )


def mean_densities(densities: Mapping[str, list]) -> dict[str, jax.Array]:
  """{path: [d1, d2, ...]} (one per call of the site) -> {path: mean density}."""
  return {p: d[0] if len(d) == 1 else jnp.mean(jnp.stack(d)) for p, d in densities.items()}
