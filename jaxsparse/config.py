"""Frozen run configurations and named presets (paper, cpu, study, overfit, smoke).

`Config` is the one list of run options, each with its help and allowed values (the choices belong to the modules
that own the concepts). Only `jaxsparse.loop` reads a whole Config; every other module takes keyword arguments.
Values marked "ours" are this project's choices where the paper publishes none (README, "What is ours").
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


def _field(default, help: str, *, choices=None, factory=None, flag: bool = True):
  """A Config field with its documentation: `help` (shown by the command line), `choices` (checked on
  construction) and whether experiments/run.py makes it a flag."""
  meta = {"help": help, "choices": choices, "flag": flag}
  if factory is not None:
    return dataclasses.field(default_factory=factory, metadata=meta)
  return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything one training run depends on, saved as config.json beside the run; experiments/run.py makes one
  flag per field (``train_size`` -> ``--train-size``)."""

  # Data.
  data: str = _field(
    "cifar10",
    "cifar10 (a prepared TFDS cifar10, else the original archive, downloaded once), "
    "tfds:cifar10, a CIFAR-10 image-folder .tar.gz or folder, cifar-10-python.tar.gz or its folder, "
    "or an .npz with x_train, y_train, x_test, y_test",
  )
  cache_dir: str | None = _field(None, "where decoded datasets are cached (None: ~/.cache/jaxsparse)")
  train_size: int | None = _field(None, "stratified subset of the training set (None: all of it minus validation)")
  val_size: int = _field(5000, "validation images held out of the training set, the same for every schedule (ours)")
  augment: str | None = _field(None, "training augmentation (None: none, as in the paper)", choices=(None, "flip_crop"))
  # Model.
  model: str = _field("wrn28_4", "the WideResNet", choices=tuple(MODELS))
  norm: str = _field("rmsnorm", "channel normalisation", choices=NORMS)
  norm_eps: float | None = _field(None, "the norms' epsilon (None: 1e-6 for RMSNorm, 1e-5 for BatchNorm; script 1e-8)")
  norm_bias: bool = _field(False, "RMSNorm with a learned per-channel bias (the author's script)")
  shortcut: str = _field(
    "activated",
    "what a block's 1x1 projection shortcut reads: its masked activation act1 (ours) or its raw input (script)",
    choices=SHORTCUTS,
  )
  zero_init_residual: bool = _field(True, "start every block's second conv at zero (ours; the script does not)")
  padding: str = _field(
    "same",
    "padding of the 3x3 convs: same (flax's SAME: 0 before, 1 after at stride 2) or symmetric (1 on each side: "
    "PyTorch's padding=1, the script)",
    choices=tuple(PADDINGS),
  )
  dropout: float = _field(0.0, "dropout rate between the convs of every block")
  dtype: str = _field("float32", "compute dtype (parameters stay float32)", choices=("float32", "bfloat16"))
  conv: str = _field(
    "auto",
    "convolution implementation (auto: per layer on CPU, xla or wgrad_matmul by shape; xla "
    "elsewhere; docs/performance.md)",
    choices=tuple(CONVS),
  )
  topk_gradient: str = _field(
    "masked", "top-k gradient: masked (through kept units) or straight_through", choices=GRADIENTS
  )
  topk_score: str = _field("value", "top-k score: value or magnitude", choices=SCORES)
  topk_round: str = _field(
    "ceil", "how keep * units rounds to the kept count k (>= 1): ceil (ours) or floor (script)", choices=ROUNDINGS
  )
  topk_keep: str = _field(
    "absolute",
    "absolute: keep is a fraction of all units of a site; relative: of each example's active units (score > 0)",
    choices=("absolute", "relative"),
  )
  # Optimisation (ours: common WRN practice, plus a linear warm-up that RMSNorm WRNs need at lr 0.1).
  epochs: int = _field(200, "training epochs")
  batch_size: int = _field(128, "global batch size (divisible by the device count)")
  learning_rate: float = _field(0.1, "peak learning rate (linear warm-up, then cosine decay to 0)")
  warmup_epochs: int = _field(5, "epochs of linear learning-rate warm-up")
  lr_by_epoch: bool = _field(
    False, "the learning rate changes once per epoch, at its value for the epoch's first step (the script's scheduler)"
  )
  reset_warmup_steps: int = _field(
    0,
    "steps over which the learning rate ramps back up from 0 after each reset to keep 1 (0: off; ours, against the "
    "reset shock: docs/results.md)",
  )
  momentum: float = _field(0.9, "SGD momentum")
  nesterov: bool = _field(True, "Nesterov momentum")
  weight_decay: float = _field(5e-4, "weight decay on conv/dense kernels only, not on norms or biases")
  # Keep-ratio control.
  schedule: str = _field("adaptive_b", "keep-ratio controller", choices=controllers.names())
  controller_options: Mapping[str, Any] = _field(
    None, "the controller's options (the command line has one flag per option)", factory=dict, flag=False
  )
  eval_keeps: tuple[float, ...] = _field(PAPER_KEEPS, "test-time keep ratios of the final keep curve")
  eval_every: int = _field(1, "dense test accuracy every N epochs and at the last (validation: every epoch)")
  log_every_steps: int = _field(
    0, "training loss and accuracy averaged over every N steps of an epoch, in its record (0: a tenth of an epoch)"
  )
  # Several regimes per step (ours; slimmable networks' sandwich rule).
  regimes: int = _field(
    1,
    "keep ratios trained per step: 1 trains the controller's keep; n >= 2 trains keep 1.0, the "
    "controller's keep (the smallest) and n - 2 keeps drawn between, on the mean loss (n passes "
    "per step)",
  )
  distill: bool = _field(False, "with regimes >= 2: the sparse passes learn from the dense pass's predictions")
  # Fine-tuning.
  init_from: str | None = _field(
    None,
    "a finished run's directory: start from its final parameters and model state, with a fresh optimiser, "
    "learning-rate schedule and controller (None: a fresh initialisation)",
  )
  # Bookkeeping.
  seed: int = _field(0, "initialisation, data order and validation split")
  keep_checkpoints: int = _field(2, "latest checkpoints kept, besides the cycle ends of keep_cycles")
  keep_cycles: str = _field(
    "all",
    "checkpoints of cycle ends kept for good: all, none, last:N (the N newest cycles) or every:K (cycles K, 2K, ...)",
  )

  def __post_init__(self):
    for f in dataclasses.fields(self):
      if f.metadata.get("choices") is not None and getattr(self, f.name) not in f.metadata["choices"]:
        _fail(f.name, f"must be one of {list(f.metadata['choices'])}, got {getattr(self, f.name)!r}")
    for name, low in (("epochs", 1), ("batch_size", 1), ("keep_checkpoints", 1), ("eval_every", 1), ("regimes", 1),
                      ("reset_warmup_steps", 0), ("val_size", 0), ("warmup_epochs", 0), ("log_every_steps", 0)):  # fmt: skip
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(name, f"must be an integer >= {low}, got {value!r}")
    for name in ("distill", "norm_bias", "zero_init_residual", "lr_by_epoch", "nesterov"):
      if not isinstance(getattr(self, name), bool):
        _fail(name, f"must be a bool, got {getattr(self, name)!r}")
    if self.norm_eps is not None and (isinstance(self.norm_eps, bool) or not self.norm_eps > 0):
      _fail("norm_eps", f"must be None or > 0, got {self.norm_eps!r}")
    if self.distill and self.regimes < 2:
      _fail("distill", f"needs {{regimes}} >= 2 (a dense pass to learn from), got {self.regimes}")
    if self.train_size is not None and self.train_size < self.batch_size:
      raise OptionError(f"{{train_size}} ({self.train_size}) must be >= {{batch_size}} ({self.batch_size})")
    for name, ok, rule in (
      ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
      ("learning_rate", self.learning_rate > 0, "> 0"),
      ("weight_decay", self.weight_decay >= 0, ">= 0"),
    ):
      if not ok:
        _fail(name, f"must be {rule}, got {getattr(self, name)}")
    if not is_keep(list(self.eval_keeps)):
      _fail("eval_keeps", f"must be keep ratios in (0, 1], got {self.eval_keeps}")
    object.__setattr__(self, "eval_keeps", tuple(float(k) for k in self.eval_keeps))
    object.__setattr__(self, "controller_options", dict(self.controller_options))

  def replace(self, **changes) -> "Config":
    _check_known(changes)
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["eval_keeps"] = list(self.eval_keeps)
    return d

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


def _fail(field: str, problem: str):
  raise OptionError(f"{{{field}}} {problem}")


# Named presets. Each is the full Config; flags override fields one by one.
PRESETS: dict[str, Config] = {
  # The paper's setting: WRN-28-4, RMSNorm, CIFAR-10 without augmentation, 200 epochs (ours).
  "paper": Config(),
  # The README's CPU run: a small WRN on a stratified 5k-image subset (timings: docs/performance.md).
  # Its 13-step reset warm-up removes the reset shock (docs/results.md, "Reset shock").
  "cpu": Config(
    model="wrn16_1", train_size=5000, val_size=1000, epochs=20, warmup_epochs=1, eval_every=5, reset_warmup_steps=13
  ),
  # The first CPU study's recipe (docs/results.md): 4k images, batch 64, 12 epochs.
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
  # A CPU proxy of the paper's regime, a model that memorises its training set (docs/results.md, "Evidence
  # study"): the study recipe with a WRN-16-2 on 2k images for 40 epochs.
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
  # The author's published script as it stands (README, "What is the paper's and what is ours"): its controller,
  # model details and recipe: 500 epochs on all 50,000 images, no warm-up, no weight decay, the learning rate
  # stepped per epoch, the test set every epoch. Its fp16 autocast becomes bfloat16 compute here.
  "script": Config(
    schedule="tighten_relax",
    norm_eps=1e-8,
    norm_bias=True,
    shortcut="input",
    zero_init_residual=False,
    padding="symmetric",
    topk_round="floor",
    val_size=0,
    dtype="bfloat16",
    epochs=500,
    warmup_epochs=0,
    lr_by_epoch=True,
    weight_decay=0.0,
    seed=3407,
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
