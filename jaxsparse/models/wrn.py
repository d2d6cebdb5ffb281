"""Pre-activation wide ResNet (Zagoruyko & Komodakis) with explicit global top-k sites.

Structure of ``WideResNet(depth, widen)`` with ``n = (depth - 4) // 6`` blocks per group::

  stem        3x3 conv, 16 channels (reads the image; never masked)
  group{g}    g = 0, 1, 2: n basic blocks named ``group{g}_block{b}``, width 16·widen·2^g,
              stride 1, 2, 2 (the stride sits in the first block of a group)
  final       norm + ReLU -> top-k site ``final_act`` -> classifier -> global average pool

Basic block (pre-activation)::

  a1 = topk(relu(norm1(x)))              site ``act1``: feeds conv1 and (by default) the projection shortcut
  h  = conv1(a1)                         3x3, stride s
  a2 = topk(dropout(relu(norm2(h))))     site ``act2``: feeds conv2
  out = conv2(a2) + (shortcut(a1) if the shape changes else x)   1x1 projection, stride s

With ``shortcut="input"`` the projection reads the block's raw input ``x`` instead of ``a1`` (the
author's script, as in the original WRN code's ``convShortcut(x)`` on the un-normalised input).
With ``padding="symmetric"`` every 3x3 conv pads one pixel on each side (PyTorch's ``padding=1``, the
script and the original WRN code) instead of flax's ``"SAME"``, which for the stride-2 conv1 of
group1/group2 pads 0 before and 1 after (a half-pixel shift of the sampling grid; the same for stride 1).

So the model has ``2 * 3 * n + 1`` top-k sites: 25 for WRN-28-4, 13 for WRN-16-2, 7 for WRN-10-1,
named ``group{g}_block{b}/act1``, ``group{g}_block{b}/act2`` and ``final_act``. Each site is the
input of a weight layer: the classifier is applied per position *before* the (linear) average pool,
which equals pool -> dense but makes the pre-pool activation the classifier's input. Hence
``jaxsparse.sparse_apply`` with its default sites on a ``sites=False`` model masks exactly the same
tensors as the built-in sites (it also lists the shortcut conv, fed the same masked ``act1``).

Initialisation: convs use He/kaiming normal with fan_out (the WRN convention) and no bias; the
classifier uses LeCun normal with zero bias; norm scales start at 1 (and RMSNorm biases, with
``norm_bias=True``, at 0). With
``zero_init_residual=True`` (default) the last conv of every residual branch (conv2) starts at zero,
so each block is the identity (plus projection) at step 0 (Goyal et al. 2017; "SkipInit"). This
keeps the un-normalised residual stream from growing with depth at the start of training; it is
meant to help where a pilot saw an RMSNorm WRN-16-2 at SGD lr 0.1 collapse to chance, but it has not
been validated by a training run here and does not replace the lr warm-up.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsparse.models.conv import auto_conv, shifted_matmul_conv, wgrad_matmul_conv
from jaxsparse.sites import (
  DENSITY,
  check_keep_map,
  check_keys_match,
  is_keep_map,
  keep_for_site,
  site_densities,  # noqa: F401  (re-exported: jaxsparse.models.site_densities)
)
from jaxsparse.topk import nonzero_fraction, topk_mask

# The named WideResNets: depth, widen factor.
MODELS = {
  "wrn28_4": (28, 4),  # the paper's backbone
  "wrn16_4": (16, 4),
  "wrn16_2": (16, 2),
  "wrn16_1": (16, 1),
  "wrn10_1": (10, 1),  # tiny: tests and smoke runs
}
NORMS = ("rmsnorm", "batchnorm", "none")
SHORTCUTS = ("activated", "input")  # what the projection shortcut reads
PADDINGS = {"same": "SAME", "symmetric": ((1, 1), (1, 1))}  # padding of the 3x3 convs (differs only at stride 2)
# None: flax's default, lax.conv_general_dilated. Same parameters and function for all four.
CONVS = {"auto": auto_conv, "xla": None, "matmul": shifted_matmul_conv, "wgrad_matmul": wgrad_matmul_conv}


def resolve_conv(name: str) -> str:
  """What conv `name` means on the default backend: "auto" stays "auto" (per layer) on the CPU and is "xla" elsewhere.

  On the CPU, "auto" (``conv.auto_conv``) picks xla or wgrad_matmul for each convolution from its shapes
  (``conv.choose_conv``); on GPU/TPU XLA's own convolutions are kept.
  """
  if name == "auto":
    return "auto" if jax.default_backend() == "cpu" else "xla"
  if name not in CONVS:
    raise ValueError(f"conv must be 'auto' or one of {tuple(CONVS)}, got {name!r}")
  return name


_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class _Norm(nn.Module):
  """Channel normalisation selected by name: RMSNorm (optionally with a bias), BatchNorm or identity. `eps`: None
  is each norm's usual epsilon (1e-6 for RMSNorm, 1e-5 for BatchNorm)."""

  kind: str
  dtype: Any
  param_dtype: Any
  eps: float | None = None
  bias: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    if self.kind == "rmsnorm":
      eps = 1e-6 if self.eps is None else self.eps
      y = nn.RMSNorm(epsilon=eps, dtype=self.dtype, param_dtype=self.param_dtype, name="rms")(x)
      if self.bias:
        y = y + self.param("bias", nn.initializers.zeros, (x.shape[-1],), self.param_dtype).astype(y.dtype)
      return y
    if self.kind == "batchnorm":
      return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5 if self.eps is None else self.eps,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="bn",
      )(x)
    return x


def _site(module: nn.Module, name: str, x, keep, sites: bool, gradient: str, score: str, relative: bool, rounding: str):
  """Top-k site: masks `x`; sows its achieved density only if "density" is mutable (not in init).

  `keep` is the keep ratio, or {site name in `module`: keep ratio} (resolved by `WideResNet`).
  """
  if not sites:
    return x
  keep = keep[name] if is_keep_map(keep) else keep
  y = topk_mask(x, keep, score=score, gradient=gradient, relative=relative, rounding=rounding)
  if module.is_mutable_collection(DENSITY) and not module.is_initializing():
    module.sow(
      DENSITY, name, nonzero_fraction(y), reduce_fn=lambda _, new: new, init_fn=lambda: jnp.zeros((), jnp.float32)
    )
  return y


class BasicBlock(nn.Module):
  """Pre-activation basic block: norm-ReLU-[top-k]-conv3x3, norm-ReLU-[dropout]-[top-k]-conv3x3."""

  features: int
  strides: int
  norm: str
  dropout: float
  sites: bool
  gradient: str
  score: str
  zero_init_residual: bool
  dtype: Any
  param_dtype: Any
  conv: str = "auto"
  relative: bool = False
  shortcut: str = "activated"
  norm_eps: float | None = None
  norm_bias: bool = False
  rounding: str = "ceil"
  padding: str = "same"

  @nn.compact
  def __call__(self, x, keep, train: bool):
    """`keep`: a keep ratio, or {"act1": keep, "act2": keep}."""
    conv = functools.partial(
      nn.Conv,
      use_bias=False,
      kernel_init=_conv_init,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      conv_general_dilated=CONVS[resolve_conv(self.conv)],
    )
    norm = functools.partial(_Norm, self.norm, self.dtype, self.param_dtype, self.norm_eps, self.norm_bias)
    site = functools.partial(
      _site,
      self,
      keep=keep,
      sites=self.sites,
      gradient=self.gradient,
      score=self.score,
      relative=self.relative,
      rounding=self.rounding,
    )
    a1 = site("act1", nn.relu(norm(name="norm1")(x, train)))
    pad = PADDINGS[self.padding]
    h = conv(self.features, (3, 3), self.strides, padding=pad, name="conv1")(a1)
    h = nn.relu(norm(name="norm2")(h, train))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    a2 = site("act2", h)
    last_init = nn.initializers.zeros if self.zero_init_residual else _conv_init
    h = conv(self.features, (3, 3), 1, padding=pad, kernel_init=last_init, name="conv2")(a2)
    if x.shape[-1] != self.features or self.strides != 1:
      x = conv(self.features, (1, 1), self.strides, name="shortcut")(a1 if self.shortcut == "activated" else x)
    return x + h


class WideResNet(nn.Module):
  """Pre-activation WRN-depth-widen for 32x32 images, with global top-k at every hidden site.

  Attributes:
    depth: total depth; (depth - 4) must be divisible by 6.
    widen: width multiplier k (group widths 16k, 32k, 64k).
    num_classes: classifier outputs.
    norm: "rmsnorm" (default, as in the paper), "batchnorm" (needs mutable "batch_stats" when
      training) or "none".
    dropout: dropout rate between the two convs of a block (rng stream "dropout").
    sites: True inserts the top-k sites (see the module docstring); False builds the plain model
      with no top-k code at all.
    gradient: top-k gradient mode, "masked" or "straight_through".
    score: top-k score, "value" or "magnitude".
    relative: keep is a fraction of each example's active units (score > 0) at every site, not of all units
      (`jaxsparse.topk_mask`).
    zero_init_residual: start every block's conv2 at zero (see the module docstring).
    shortcut: what the projection shortcut reads: "activated" (default: the block's masked ``act1``) or
      "input" (the block's raw input, as the author's script).
    norm_eps: the norms' epsilon; None: 1e-6 for RMSNorm, 1e-5 for BatchNorm (the script: 1e-8).
    norm_bias: RMSNorm with a learned per-channel bias after the scale (the script's RMSNorm2d).
    rounding: how ``keep * n`` becomes the kept count: "ceil" (default) or "floor" (the script's
      ``max(1, int(keep * n))``); see `jaxsparse.topk_mask`.
    padding: padding of the 3x3 convs: "same" (default, flax's "SAME") or "symmetric" (one pixel each side,
      PyTorch's ``padding=1``, the script); they differ only in the stride-2 convs (see the module docstring).
    dtype: compute dtype (e.g. jnp.bfloat16); logits are always float32.
    param_dtype: parameter dtype.
    conv: "xla" (``lax.conv_general_dilated``), "matmul" (``conv.shifted_matmul_conv``: the same
      convolution and parameters as shifted matmuls), "wgrad_matmul" (``conv.wgrad_matmul_conv``:
      XLA's forward and input gradient, kernel gradient as matmuls) or "auto" (default: on the CPU each
      convolution takes xla or wgrad_matmul by its shapes, ``conv.choose_conv``; xla elsewhere).

  Example:
    >>> model = WRN10_1()
    >>> x = jnp.zeros((2, 32, 32, 3))
    >>> variables = model.init(jax.random.key(0), x)
    >>> logits, state = model.apply(variables, x, keep=0.3, mutable=["density"])
    >>> logits.shape, len(site_densities(state["density"]))
    ((2, 10), 7)
  """

  depth: int = 28
  widen: int = 4
  num_classes: int = 10
  norm: str = "rmsnorm"
  dropout: float = 0.0
  sites: bool = True
  gradient: str = "masked"
  score: str = "value"
  zero_init_residual: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  conv: str = "auto"
  relative: bool = False
  shortcut: str = "activated"
  norm_eps: float | None = None
  norm_bias: bool = False
  rounding: str = "ceil"
  padding: str = "same"

  def site_names(self) -> list[str]:
    """The names of the top-k sites, in program order (also the keys of `site_densities`)."""
    n = (self.depth - 4) // 6
    return [f"group{g}_block{b}/act{i}" for g in range(3) for b in range(n) for i in (1, 2)] + ["final_act"]

  def layer_inputs(self) -> dict[str, str | None]:
    """{weight layer path: the site whose output it reads, None for the image} for every conv and the classifier
    (`jaxsparse.macs.effective_macs`: conv1 and the shortcut read ``act1``, conv2 reads ``act2``; with
    ``shortcut="input"`` the shortcut reads the block's input, which no site masks, so it counts dense)."""
    n = (self.depth - 4) // 6
    out: dict[str, str | None] = {"stem": None}
    for g in range(3):
      for b in range(n):
        block = f"group{g}_block{b}"
        out.update({f"{block}/conv1": f"{block}/act1", f"{block}/conv2": f"{block}/act2"})
        if b == 0 and (g > 0 or self.widen != 1):  # the projection shortcut: where the shape changes
          out[f"{block}/shortcut"] = f"{block}/act1" if self.shortcut == "activated" else None
    out["classifier"] = "final_act"
    return out

  def _site_keeps(self, keep):
    """{block name: {"act1": keep, "act2": keep}, "final_act": keep} from a per-site mapping (validated)."""
    check_keep_map(keep, owner="WideResNet")
    names = self.site_names()
    check_keys_match(keep, names, owner="WideResNet")
    out: dict[str, Any] = {}
    for name in names:
      value = jnp.asarray(keep_for_site(keep, name), jnp.float32)
      block, _, site = name.rpartition("/")
      if block:
        out.setdefault(block, {})[site] = value
      else:
        out[site] = value
    return out

  @nn.compact
  def __call__(self, x_BxHxWxC, keep=1.0, train: bool = False):
    """Logits (float32, (B, num_classes)) at keep ratio `keep`.

    `keep`: a traced float32 scalar (or per-example vector), 1.0 = dense; or a per-site mapping
    {site name or glob: keep ratio} (`jaxsparse.sites`; unmatched sites stay dense).
    """
    if (self.depth - 4) % 6 or self.depth < 10:
      raise ValueError(f"WRN depth must be 6n + 4 with n >= 1, got {self.depth}")
    if self.norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
    if self.shortcut not in SHORTCUTS:
      raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {self.shortcut!r}")
    if self.padding not in PADDINGS:
      raise ValueError(f"padding must be one of {tuple(PADDINGS)}, got {self.padding!r}")
    if self.norm_eps is not None and not self.norm_eps > 0:
      raise ValueError(f"norm_eps must be None or > 0, got {self.norm_eps!r}")
    per_site = self._site_keeps(keep) if is_keep_map(keep) else None
    conv = CONVS[resolve_conv(self.conv)]
    n = (self.depth - 4) // 6
    x = nn.Conv(
      16,
      (3, 3),
      use_bias=False,
      kernel_init=_conv_init,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      conv_general_dilated=conv,
      name="stem",
    )(x_BxHxWxC)
    for g, stride in enumerate((1, 2, 2)):
      for b in range(n):
        x = BasicBlock(
          16 * self.widen * 2**g,
          stride if b == 0 else 1,
          self.norm,
          self.dropout,
          self.sites,
          self.gradient,
          self.score,
          self.zero_init_residual,
          self.dtype,
          self.param_dtype,
          self.conv,
          self.relative,
          self.shortcut,
          self.norm_eps,
          self.norm_bias,
          self.rounding,
          self.padding,
          name=f"group{g}_block{b}",
        )(x, per_site[f"group{g}_block{b}"] if per_site else keep, train)
    final_norm = _Norm(self.norm, self.dtype, self.param_dtype, self.norm_eps, self.norm_bias, name="final_norm")
    x = nn.relu(final_norm(x, train))
    x = _site(
      self, "final_act", x, per_site or keep, self.sites, self.gradient, self.score, self.relative, self.rounding
    )
    logits_BxHxWxK = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="classifier")(x)
    return jnp.mean(logits_BxHxWxK.astype(jnp.float32), axis=(1, 2))


WRN28_4 = functools.partial(WideResNet, depth=28, widen=4)
WRN16_2 = functools.partial(WideResNet, depth=16, widen=2)
WRN10_1 = functools.partial(WideResNet, depth=10, widen=1)
