"""Frozen run configurations and named presets (paper, cpu, study, overfit, smoke).

The config stops at one boundary: only `jaxsparse.loop.train_and_evaluate` reads a whole `Config`; every other
module takes explicit keyword arguments. Values marked "ours" are this project's choices, since the paper does
not publish them (see README, "What is ours").
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

# depth, widen of the named WideResNet variants.
MODELS = {
  "wrn28_4": (28, 4),  # the paper's backbone
  "wrn16_4": (16, 4),
  "wrn16_2": (16, 2),
  "wrn16_1": (16, 1),
  "wrn10_1": (10, 1),  # tiny: tests and smoke runs
}
NORMS = ("rmsnorm", "batchnorm", "none")
DTYPES = ("float32", "bfloat16")
CONVS = ("auto", "xla", "matmul", "wgrad_matmul")  # jaxsparse.models.wrn.resolve_conv
GRADIENTS = ("masked", "straight_through")
SCORES = ("value", "magnitude")
TOPK_KEEPS = ("absolute", "relative")  # keep as a fraction of all units, or of each example's active units
AUGMENTS = (None, "flip_crop")
PAPER_KEEPS = (1.0, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05)


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything one training run depends on. Saved as config.json beside the run."""

  # Data.
  data: str = "cifar10"  # prepared TFDS cifar10, else the original archive, downloaded once
  cache_dir: str | None = None  # None: the data module's default (~/.cache/jaxsparse)
  train_size: int | None = None  # None: the whole training set (minus validation)
  val_size: int = 5000  # held out from train, same split for every schedule (ours)
  augment: str | None = None  # the paper trains without augmentation
  # Model.
  model: str = "wrn28_4"
  norm: str = "rmsnorm"
  dropout: float = 0.0
  dtype: str = "float32"  # compute dtype; parameters stay float32
  conv: str = "auto"  # per layer on CPU (xla or wgrad_matmul by shape), xla elsewhere
  topk_gradient: str = "masked"
  topk_score: str = "value"
  topk_keep: str = "absolute"  # "relative": keep is a fraction of each example's active (score > 0) units
  # Optimisation (ours: common WRN practice, plus a linear warm-up that RMSNorm WRNs need at lr 0.1).
  epochs: int = 200
  batch_size: int = 128
  learning_rate: float = 0.1
  warmup_epochs: int = 5
  momentum: float = 0.9
  nesterov: bool = True
  weight_decay: float = 5e-4  # on conv/dense kernels only, not on norms or biases
  # Keep-ratio control.
  schedule: str = "adaptive_b"
  controller_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  eval_keeps: tuple[float, ...] = PAPER_KEEPS
  eval_every: int = 1  # dense test accuracy every N epochs and at the last (validation: every epoch)
  # Several regimes per step (ours; slimmable networks' sandwich rule): 1 trains the controller's keep only;
  # n >= 2 trains keep 1.0, the controller's keep (the smallest) and n - 2 keeps drawn from [that keep, 1) in
  # every step, on the mean loss: n forward/backward passes per step.
  regimes: int = 1
  distill: bool = False  # with regimes >= 2: sparse passes learn from the dense pass's predictions
  # Bookkeeping.
  seed: int = 0
  keep_checkpoints: int = 2  # latest epochs kept, besides one checkpoint per reset cycle

  def __post_init__(self):
    _check_choice("model", self.model, tuple(MODELS))
    _check_choice("norm", self.norm, NORMS)
    _check_choice("dtype", self.dtype, DTYPES)
    _check_choice("conv", self.conv, CONVS)
    _check_choice("topk_gradient", self.topk_gradient, GRADIENTS)
    _check_choice("topk_score", self.topk_score, SCORES)
    _check_choice("topk_keep", self.topk_keep, TOPK_KEEPS)
    _check_choice("augment", self.augment, AUGMENTS)
    for name in ("epochs", "batch_size", "keep_checkpoints", "eval_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if isinstance(self.regimes, bool) or not isinstance(self.regimes, int) or self.regimes < 1:
      raise ValueError(f"regimes must be an integer >= 1, got {self.regimes!r}")
    if not isinstance(self.distill, bool):
      raise ValueError(f"distill must be a bool, got {self.distill!r}")
    if self.distill and self.regimes < 2:
      raise ValueError(f"distill needs regimes >= 2 (a dense pass to learn from), got regimes={self.regimes}")
    if self.train_size is not None and self.train_size < self.batch_size:
      raise ValueError(f"train_size ({self.train_size}) must be >= batch_size ({self.batch_size})")
    if self.val_size < 0 or self.warmup_epochs < 0:
      raise ValueError(f"val_size and warmup_epochs must be >= 0, got {self.val_size}, {self.warmup_epochs}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
    if not self.learning_rate > 0 or self.weight_decay < 0:
      raise ValueError(f"need learning_rate > 0 and weight_decay >= 0, got {self.learning_rate}, {self.weight_decay}")
    bad = [k for k in self.eval_keeps if not 0.0 < k <= 1.0]
    if bad or not self.eval_keeps:
      raise ValueError(f"eval_keeps must be a non-empty list of values in (0, 1], got {self.eval_keeps}")
    object.__setattr__(self, "eval_keeps", tuple(float(k) for k in self.eval_keeps))
    object.__setattr__(self, "controller_options", dict(self.controller_options))

  def replace(self, **changes) -> "Config":
    unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
    if unknown:
      raise ValueError(f"unknown config fields: {sorted(unknown)}")
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["eval_keeps"] = list(self.eval_keeps)
    return d

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Config":
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown config fields: {sorted(unknown)}")
    d = dict(d)
    if "eval_keeps" in d:
      d["eval_keeps"] = tuple(d["eval_keeps"])
    return cls(**d)


def _check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


# Named presets. Each is the full Config; flags override fields one by one.
PRESETS: dict[str, Config] = {
  # The paper's setting: WRN-28-4, RMSNorm, CIFAR-10 without augmentation, 200 epochs (ours).
  "paper": Config(),
  # Fits a 2-core CPU in under 20 minutes: a small WRN on a stratified 5k-image subset, where training
  # without augmentation overfits within the run.
  # Dense test accuracy every 5 epochs (and at the last): 10k test images cost ~0.6 of a 5k-image training epoch.
  "cpu": Config(model="wrn16_1", train_size=5000, val_size=1000, epochs=20, warmup_epochs=1, eval_every=5),
  # The CPU study (docs/results.md): 15 runs (5 variants x 3 seeds) in ~1.5 h on 2 cores, two runs at a time.
  # 4k training images without augmentation, 12 epochs of 63 steps; batch 64 for twice the updates per epoch.
  # Dense test accuracy at epochs 4, 8 and 12 (the controllers read validation accuracy, every epoch).
  "study": Config(
    model="wrn16_1",
    train_size=4000,
    val_size=1000,
    epochs=12,
    warmup_epochs=1,
    batch_size=64,
    learning_rate=0.05,
    eval_keeps=(1.0, 0.5, 0.3, 0.2, 0.1, 0.05),
    eval_every=4,
  ),
  # A CPU proxy of the paper's regime (a model that memorises its training set), chosen by a measured pilot
  # (docs/results.md, "Evidence study"): the study recipe with a WRN-16-2 on 2k images for 40 epochs. Dense
  # training reaches train accuracy 1.0 by epoch 27 and its test accuracy is flat from there; ~20 min per run on
  # one core of the 2-core Xeon. Dense test accuracy every 5 epochs (validation: every epoch).
  "overfit": Config(
    model="wrn16_2",
    train_size=2000,
    val_size=1000,
    epochs=40,
    warmup_epochs=1,
    batch_size=64,
    learning_rate=0.05,
    eval_keeps=(1.0, 0.5, 0.3, 0.2, 0.1),
    eval_every=5,
  ),
  # Seconds: plumbing checks (tests, CI, notebooks).
  "smoke": Config(
    model="wrn10_1",
    train_size=256,
    val_size=128,
    epochs=3,
    batch_size=64,
    warmup_epochs=1,
    learning_rate=0.05,
    eval_keeps=(1.0, 0.3),
  ),
}


def preset(name: str, **overrides) -> Config:
  """Returns the named preset with `overrides` applied (validated)."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)
