"""Frozen run configurations and named presets (paper, cpu, study, overfit, script, smoke).

`Config` is the one list of run options, each with its help, allowed values and check (the choices belong to the
modules that own the concepts); only `jaxsparse.loop` reads a whole Config. "ours" marks this project's choices
where the paper publishes none (README, "What is ours").
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

from jaxsparse import controllers
from jaxsparse.errors import OptionError
from jaxsparse.models.wrn import CONVS, MODELS, NORMS, PADDINGS, SHORTCUTS
from jaxsparse.topk import GRADIENTS, ROUNDINGS, SCORES, is_keep

PAPER_KEEPS = (1.0, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05)
KEEP_BASES = ("absolute", "relative")


def _field(default, help: str, *, choices=None, rule=None, flag: bool = True):
  """A Config field with its `help` (the command line's), `choices` or `rule` ((check, what a value must be)),
  checked on construction, and whether experiments/run.py makes it a flag. A callable default is a factory."""
  if choices is not None:
    rule = (lambda v: v in choices, f"one of {list(choices)}")
  elif isinstance(default, bool):
    rule = (lambda v: isinstance(v, bool), "a bool")
  meta = {"help": help, "choices": choices, "rule": rule, "flag": flag}
  if callable(default):
    return dataclasses.field(default_factory=default, metadata=meta)
  return dataclasses.field(default=default, metadata=meta)


def _int(low: int):
  return (lambda v: type(v) is int and v >= low, f"an integer >= {low}")


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything one training run depends on, saved as config.json beside the run; experiments/run.py makes one
  flag per field (``train_size`` -> ``--train-size``)."""

  # Data.
  data: str = _field(
    "cifar10",
    "cifar10 (a prepared TFDS cifar10, else the original archive, downloaded once), tfds:cifar10, a CIFAR-10 "
    "image-folder .tar.gz or folder, cifar-10-python.tar.gz or its folder, or an .npz with x_train, y_train, ...",
  )
  cache_dir: str | None = _field(None, "where decoded datasets are cached (None: ~/.cache/jaxsparse)")
  train_size: int | None = _field(None, "stratified subset of the training set (None: all of it minus validation)")
  val_size: int = _field(5000, "validation images held out of the training set (ours)", rule=_int(0))
  augment: str | None = _field(None, "training augmentation (None: none, as in the paper)", choices=(None, "flip_crop"))
  # Model.
  model: str = _field("wrn28_4", "the WideResNet", choices=tuple(MODELS))
  norm: str = _field("rmsnorm", "channel normalisation", choices=NORMS)
  norm_eps: float | None = _field(
    None,
    "norms' epsilon (None: 1e-6 RMSNorm, 1e-5 BatchNorm; script 1e-8)",
    rule=(lambda v: v is None or (not isinstance(v, bool) and v > 0), "None or > 0"),
  )
  norm_bias: bool = _field(False, "RMSNorm with a learned per-channel bias (the author's script)")
  shortcut: str = _field("activated", "projection shortcuts read act1 (ours) or the input (script)", choices=SHORTCUTS)
  zero_init_residual: bool = _field(True, "start every block's second conv at zero (ours; the script does not)")
  padding: str = _field(
    "same", "3x3 conv padding: same (flax's SAME) or symmetric (PyTorch's padding=1, the script)", choices=PADDINGS
  )
  dropout: float = _field(0.0, "dropout between each block's convs", rule=(lambda v: 0 <= v < 1, "in [0, 1)"))
  dtype: str = _field("float32", "compute dtype (parameters stay float32)", choices=("float32", "bfloat16"))
  conv: str = _field("auto", "convolution (auto: per layer shape on CPU; docs/performance.md)", choices=tuple(CONVS))
  topk_gradient: str = _field("masked", "top-k gradient: through kept units, or straight through", choices=GRADIENTS)
  topk_score: str = _field("value", "top-k score: value or magnitude", choices=SCORES)
  topk_round: str = _field("ceil", "keep * units rounds to k >= 1 by ceil (ours) or floor (script)", choices=ROUNDINGS)
  topk_keep: str = _field("absolute", "keep: of all units, or of each example's active ones", choices=KEEP_BASES)
  # Optimisation (ours: common WRN practice, plus a linear warm-up that RMSNorm WRNs need at lr 0.1).
  epochs: int = _field(200, "training epochs", rule=_int(1))
  batch_size: int = _field(128, "global batch size (divisible by the device count)", rule=_int(1))
  learning_rate: float = _field(0.1, "peak learning rate (warm-up, then cosine to 0)", rule=(lambda v: v > 0, "> 0"))
  warmup_epochs: int = _field(5, "epochs of linear learning-rate warm-up", rule=_int(0))
  lr_by_epoch: bool = _field(False, "the learning rate held through each epoch at its first step's (the script's)")
  reset_warmup_steps: int = _field(
    0, "steps of learning-rate ramp from 0 after each reset to keep 1 (0: off; ours: docs/results.md)", rule=_int(0)
  )
  momentum: float = _field(0.9, "SGD momentum")
  nesterov: bool = _field(True, "Nesterov momentum")
  weight_decay: float = _field(5e-4, "weight decay on kernels only", rule=(lambda v: v >= 0, ">= 0"))
  # Keep-ratio control.
  schedule: str = _field("adaptive_b", "keep-ratio controller", choices=controllers.names())
  controller_options: Mapping[str, Any] = _field(dict, "the controller's options (a flag per option)", flag=False)
  eval_keeps: tuple[float, ...] = _field(
    PAPER_KEEPS, "test-time keeps of the final keep curve", rule=(lambda v: is_keep(list(v)), "keep ratios in (0, 1]")
  )
  eval_every: int = _field(1, "dense test accuracy every N epochs and at the last", rule=_int(1))
  log_every_steps: int = _field(0, "train metrics averaged per N steps (0: a tenth of an epoch)", rule=_int(0))
  # Several regimes per step (ours; slimmable networks' sandwich rule).
  regimes: int = _field(
    1,
    "keeps trained per step: 1 trains the controller's keep; n >= 2 trains 1.0, the controller's keep and n - 2 "
    "drawn between, on the mean loss (n passes per step)",
    rule=_int(1),
  )
  distill: bool = _field(False, "with regimes >= 2: the sparse passes learn from the dense pass's predictions")
  init_from: str | None = _field(
    None, "a finished run's directory to start from (its final parameters; fresh optimiser and controller)"
  )
  # Bookkeeping.
  seed: int = _field(0, "initialisation, data order and validation split")
  keep_checkpoints: int = _field(2, "latest checkpoints kept, besides the cycle ends of keep_cycles", rule=_int(1))
  keep_cycles: str = _field("all", "cycle-end checkpoints kept: all, none, last:N (newest N) or every:K (K, 2K, ...)")

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value, rule = getattr(self, f.name), f.metadata["rule"]
      if rule is not None and not rule[0](value):
        raise OptionError(f"{{{f.name}}} must be {rule[1]}, got {value!r}")
    if self.distill and self.regimes < 2:
      raise OptionError(f"{{distill}} needs {{regimes}} >= 2 (a dense pass to learn from), got {self.regimes}")
    if self.train_size is not None and self.train_size < self.batch_size:
      raise OptionError(f"{{train_size}} ({self.train_size}) must be >= {{batch_size}} ({self.batch_size})")
    object.__setattr__(self, "eval_keeps", tuple(float(k) for k in self.eval_keeps))
    object.__setattr__(self, "controller_options", dict(self.controller_options))

  def replace(self, **changes) -> "Config":
    _check_known(changes)
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "eval_keeps": list(self.eval_keeps)}

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Config":
    _check_known(d)
    return cls(**d)


def _check_known(fields) -> None:
  unknown = set(fields) - {f.name for f in dataclasses.fields(Config)}
  if unknown:
    raise ValueError(f"unknown config fields: {sorted(unknown)}")


# Named presets, each a full Config; flags override fields one by one.
PRESETS: dict[str, Config] = {}
# The paper's setting: WRN-28-4, RMSNorm, CIFAR-10 without augmentation, 200 epochs (ours).
PRESETS["paper"] = Config()
# The README's CPU run: WRN-16-1 on a stratified 5k-image subset, with the 13-step reset warm-up (docs/results.md).
PRESETS["cpu"] = Config(
  model="wrn16_1", train_size=5000, val_size=1000, epochs=20, warmup_epochs=1, eval_every=5, reset_warmup_steps=13
)
# The first CPU study's recipe (docs/results.md): 4k images, batch 64, 12 epochs.
PRESETS["study"] = Config(
  model="wrn16_1", train_size=4000, val_size=1000, epochs=12, warmup_epochs=1, batch_size=64, learning_rate=0.05,
  eval_keeps=(1.0, 0.5, 0.3, 0.2, 0.1, 0.05), eval_every=4,
)  # fmt: skip
# A CPU proxy of the paper's regime, a model that memorises its training set (docs/results.md, "Evidence study").
PRESETS["overfit"] = PRESETS["study"].replace(
  model="wrn16_2", train_size=2000, epochs=40, eval_keeps=(1.0, 0.5, 0.3, 0.2, 0.1), eval_every=5
)
# The author's published script (README, "What is the paper's and what is ours"): its controller, model details
# and recipe (500 epochs on all 50,000 images, no warm-up or weight decay, per-epoch lr); fp16 becomes bfloat16.
PRESETS["script"] = Config(
  schedule="tighten_relax", norm_eps=1e-8, norm_bias=True, shortcut="input", zero_init_residual=False,
  padding="symmetric", topk_round="floor", val_size=0, dtype="bfloat16", epochs=500, warmup_epochs=0,
  lr_by_epoch=True, weight_decay=0.0, seed=3407,
)  # fmt: skip
# Seconds: plumbing checks (tests, CI, notebooks).
PRESETS["smoke"] = Config(
  model="wrn10_1", train_size=256, val_size=128, epochs=3, batch_size=64, warmup_epochs=1, learning_rate=0.05,
  eval_keeps=(1.0, 0.3),
)  # fmt: skip


def preset(name: str, **overrides) -> Config:
  """Returns the named preset with `overrides` applied (validated)."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)
