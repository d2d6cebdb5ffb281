"""Run records -> summary.json, markdown tables and figures (`jaxsparse.plots`), for one run and for runs compared."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

from jaxsparse import plots
from jaxsparse.config import Config
from jaxsparse.provenance import UNRECORDED, commit_label, hardware_label, machine_label


def summarize(
  history: Sequence[Mapping],
  *,
  keep_curve: Mapping[float, float],
  device: str,
  data_source: str,
  config: Mapping,
  keep_macs: Mapping[float, Mapping] | None = None,
  dense_macs: float | None = None,
  **facts,
) -> dict:
  """The summary.json of a run, from its per-epoch records and its final keep curve (with, where measured, each
  keep's mean achieved density and effective MACs per example: `jaxsparse.evaluate.keep_curve`); `facts` (e.g.
  provenance, conv) are added as they are."""
  if not history:
    raise ValueError("no epochs recorded")
  last = history[-1]
  tested = [r for r in history if r.get("test_accuracy") is not None]  # see Config.eval_every
  if not tested:
    raise ValueError("no epoch has a test accuracy")
  best = max(tested, key=lambda r: r["test_accuracy"])
  return {
    "test_accuracy": keep_curve.get(1.0, tested[-1]["test_accuracy"]),
    "best_test_accuracy": best["test_accuracy"],
    "best_epoch": best["epoch"],
    "keep_curve": {str(k): v for k, v in sorted(keep_curve.items(), reverse=True)},
    "cycles": int(last["cycle"]) + int(last.get("resets", last.get("reset_after", False))),
    "epochs": int(last["epoch"]),
    "steps": int(last["step"]),
    "final_train_accuracy": last["train_accuracy"],
    "final_val_accuracy": last.get("val_accuracy"),
    "wall_time_s": last["wall_time_s"],
    "device": device,
    "data_source": data_source,
    "schedule": config.get("schedule"),
    "seed": config.get("seed"),
    "model": config.get("model"),
    **({"keep_macs": {str(k): dict(v) for k, v in sorted(keep_macs.items(), reverse=True)}} if keep_macs else {}),
    **({"dense_macs": dense_macs} if dense_macs is not None else {}),
    **facts,
  }


def format_summary(summary: Mapping) -> str:
  """Headline and keep-curve table, as printed at the end of a run."""
  s = summary
  head = (
    f"test accuracy (dense, final): {s['test_accuracy']:.4f}   best: {s['best_test_accuracy']:.4f} (epoch "
    f"{s['best_epoch']})   cycles: {s['cycles']}   wall: {s['wall_time_s'] / 60:.1f} min on {s['device']}"
  )
  if s.get("keep_macs"):
    header = "| keep | test accuracy | mean density | effective MMACs per image | of dense ({:.1f}) |".format(
      s["dense_macs"] / 1e6
    )
    rows = [
      f"| {float(k):.2f} | {v['accuracy']:.4f} | {v['density']:.3f} | {v['macs'] / 1e6:.1f} | {v['macs_fraction']:.3f} |"
      for k, v in s["keep_macs"].items()
    ]
  else:
    header, rows = "| keep | test accuracy |", [f"| {float(k):.2f} | {v:.4f} |" for k, v in s["keep_curve"].items()]
  return "\n".join([head, "", header, "|" + "---:|" * (header.count("|") - 1), *rows])


@dataclasses.dataclass(frozen=True)
class Run:
  """A finished run as `load_runs` reads it once: its config.json (``{"schedule": ...}`` without one), summary.json
  (but the keep curve and its price, float-keyed here; `keep_macs` is empty when unmeasured) and metrics.jsonl."""

  path: str
  config: dict
  summary: dict
  history: list[dict]
  label: str  # `run_label`: its group in comparisons
  approach: str  # `approach`
  keep_curve: dict[float, float]  # {keep: dense test accuracy}
  keep_macs: dict[float, dict]  # {keep: {accuracy, density, macs, macs_fraction}}


def load_runs(paths) -> list[Run]:
  """Finished run directories as `Run`s; FileNotFoundError for others."""
  runs, floats = [], lambda d: {float(k): v for k, v in d.items()}
  for p in map(Path, paths):
    summary_path, metrics_path, config_path = p / "summary.json", p / "metrics.jsonl", p / "config.json"
    if not summary_path.exists() or not metrics_path.exists():
      raise FileNotFoundError(f"{p} is not a finished run (no summary.json / metrics.jsonl)")
    history = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    summary = json.loads(summary_path.read_text())
    config = json.loads(config_path.read_text()) if config_path.exists() else {"schedule": summary["schedule"]}
    curve, macs = summary.pop("keep_curve"), summary.pop("keep_macs", {})
    runs.append(Run(str(p), config, summary, history, run_label(config), approach(config), floats(curve), floats(macs)))
  if not runs:
    raise ValueError("no runs given")
  return runs


# Config fields that make a variant of a schedule when they differ from their default (seeds never do).
_VARIANT_FIELDS = ("dropout", "norm", "topk_gradient", "topk_score", "topk_keep", "regimes", "distill", "augment",
                   "reset_warmup_steps")  # fmt: skip
# Config fields in which the seeds of one variant may differ: the seed, and bookkeeping that changes no result.
_FREE_FIELDS = ("seed", "cache_dir", "keep_checkpoints")


def run_label(config: Mapping) -> str:
  """A run's group in comparisons: the schedule, its options and any non-default model/data choice, e.g.
  ``dense+dropout0.3``, ``cyclic(cycles=3,period=5)`` or ``adaptive_b+topk_gradient=straight_through``; seeds of
  the same variant share it. A fine-tune (``init_from``) names its recipe, so that recipes are not averaged as
  seeds: ``constant(keep=0.1)+finetuned(epochs=5,lr=0.01,warmup=1)``.

  >>> run_label({"schedule": "dense", "dropout": 0.3})
  'dense+dropout0.3'
  """
  options = config.get("controller_options") or {}
  label = config["schedule"] + (f"({','.join(f'{k}={v}' for k, v in sorted(options.items()))})" if options else "")
  defaults = Config()
  for name in _VARIANT_FIELDS:
    value = config.get(name, getattr(defaults, name))
    if value != getattr(defaults, name):
      label += f"+dropout{value:g}" if name == "dropout" else "+distill" if name == "distill" else f"+{name}={value}"
  return label + (f"+finetuned{_recipe(config)}" if config.get("init_from") else "")


def _recipe(config: Mapping) -> str:
  """A fine-tune's recipe as its `run_label` names it, e.g. ``(epochs=5,lr=0.01,warmup=1)``."""
  e, lr, w = (config.get(f, getattr(Config(), f)) for f in ("epochs", "learning_rate", "warmup_epochs"))
  return f"(epochs={e},lr={lr:g},warmup={w})"


def approach(config: Mapping) -> str:
  """The kind of approach a run (its saved config) is: fine-tuned (started from another run), baseline (the dense
  schedule, with or without dropout), per-keep (a constant keep, one regime per step), joint+dropout or joint (a keep
  schedule or several regimes per step).

  >>> approach({"schedule": "constant", "regimes": 3, "dropout": 0.3})
  'joint+dropout'
  """
  if config.get("init_from"):
    return "fine-tuned"
  if config["schedule"] == "dense":
    return "baseline"
  if config["schedule"] == "constant" and config.get("regimes", Config().regimes) <= 1:
    return "per-keep"
  return "joint+dropout" if config.get("dropout", Config().dropout) > 0 else "joint"


def _by_schedule(runs: Sequence[Run]) -> dict[str, list[Run]]:
  groups: dict[str, list[Run]] = {}
  for r in sorted(runs, key=lambda r: (r.label, r.summary["seed"])):
    groups.setdefault(r.label, []).append(r)
  return groups


def mean_std(values) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  a = np.asarray(values, np.float64)
  return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def mean_interval(values, confidence: float = 0.95) -> tuple[float, float, int]:
  """Mean of `values`, the half-width of its t-interval (nan for fewer than two values) and their count."""
  d = np.asarray(values, np.float64)
  if d.size < 2:
    return float(d.mean()) if d.size else math.nan, math.nan, int(d.size)
  half = stats.t.ppf(0.5 + confidence / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
  return float(d.mean()), float(half), int(d.size)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], confidence: float = 0.95):
  """`mean_interval` of a[seed] - b[seed] over the seeds both have."""
  return mean_interval([a[s] - b[s] for s in sorted(set(a) & set(b))], confidence)


def _means(records: Sequence[Mapping]) -> dict[str, float]:
  """Each field's mean over `records` (dicts with the same fields)."""
  return {k: float(np.mean([x[k] for x in records])) for k in records[0]}


def _mean_or_nan(values) -> float:
  return float(np.mean(values)) if len(values) else math.nan


def sparsity_stats(history: Sequence[Mapping], config: Mapping | None = None) -> dict[str, float]:
  """How sparse a run really trained, from its per-epoch records: ``keep_below_1``, the epochs at a keep < 1; ``bit``,
  those epochs weighted by the share of top-k sites whose achieved density reached the keep (>= 0.98 keep; above a
  site's natural density the mask removes nothing there; with ``topk_keep="relative"`` every site counts); and
  ``mean_density``, the achieved density over sites and epochs (nan when not recorded)."""
  relative = (config or {}).get("topk_keep") == "relative"
  below = bit = 0.0
  densities = []
  for r in history:
    sites = list((r.get("density") or {}).values())
    densities += [float(np.mean(sites))] if sites else []
    if r["keep"] < 1.0:
      below += 1
      bit += 1.0 if relative else float(np.mean([d >= 0.98 * r["keep"] for d in sites])) if sites else 0.0
  return {"keep_below_1": below, "bit": bit, "mean_density": _mean_or_nan(densities)}


def _tail(history: Sequence[Mapping], tail: float, caller: str) -> Sequence[Mapping]:
  """The last ``tail`` fraction of a run's epoch records (at least one)."""
  if not 0 < tail <= 1:
    raise ValueError(f"{caller}: tail must be in (0, 1], got {tail}")
  return history[len(history) - max(1, round(tail * len(history))) :]


def fit_stats(history: Sequence[Mapping], tail: float = 0.25) -> dict[str, float]:
  """How closely a run fits its training set and how well it generalises: the means over its last ``tail`` of epochs
  of ``train_loss`` and ``train_accuracy`` as trained (at each epoch's keep, dropout active), of the dense
  ``val_accuracy`` (nan when no epoch has one) and of ``gap``, train - validation accuracy where an epoch has both."""
  records = _tail(history, tail, "fit_stats")
  val = [r for r in records if r.get("val_accuracy") is not None]
  return {
    "train_loss": _mean_or_nan([r["train_loss"] for r in records]),
    "train_accuracy": _mean_or_nan([r["train_accuracy"] for r in records]),
    "val_accuracy": _mean_or_nan([r["val_accuracy"] for r in val]),
    "gap": _mean_or_nan([r["train_accuracy"] - r["val_accuracy"] for r in val]),
  }


def phase_stats(history: Sequence[Mapping], tail: float = 0.25) -> dict[str, float]:
  """Dense validation accuracy over a run's last ``tail`` of epochs, split by the keep of the epoch just trained:
  ``dense`` and ``sparse``, the means after epochs at keep 1 and at keep < 1 (nan where there are none), and their
  counts ``n_dense`` and ``n_sparse``; epochs without a validation pass are skipped."""
  records = [r for r in _tail(history, tail, "phase_stats") if r.get("val_accuracy") is not None]
  dense = [r["val_accuracy"] for r in records if r["keep"] >= 1.0]
  sparse = [r["val_accuracy"] for r in records if r["keep"] < 1.0]
  return {"dense": _mean_or_nan(dense), "sparse": _mean_or_nan(sparse), "n_dense": len(dense), "n_sparse": len(sparse)}


def _first_steps(record: Mapping, key: str) -> float | None:
  """The mean `key` ("loss" or "accuracy") over an epoch's first logged window of steps (``train_windows``; records
  made before it have "first_steps_<key>"), None when neither was recorded."""
  windows = record.get("train_windows", {}).get(key)
  return windows[0] if windows else record.get(f"first_steps_{key}")


def reset_shocks(history: Sequence[Mapping]) -> list[dict]:
  """One record per reset of a run (an epoch with ``reset_after``, then another): the cycle that ended, the keep and
  training loss / accuracy of its last epoch, those of the next epoch's first logged steps (`_first_steps`) and the
  loss of that whole epoch, and the loss of the cycle's first epoch (which a reset should not undo)."""
  resets = [
    (b, a) for b, a in zip(history, history[1:]) if b.get("reset_after") and _first_steps(a, "loss") is not None
  ]
  return [
    {
      "cycle": before["cycle"],
      "epoch": after["epoch"],
      "keep_before": before["keep"],
      "loss_before": before["train_loss"],
      "accuracy_before": before["train_accuracy"],
      "loss_first_steps": _first_steps(after, "loss"),
      "accuracy_first_steps": _first_steps(after, "accuracy"),
      "loss_after": after["train_loss"],
      "cycle_first_loss": next(r for r in history if r["cycle"] == before["cycle"])["train_loss"],
    }
    for before, after in resets
  ]


def machines_markdown(runs) -> tuple[dict[str, str], list[str]]:
  """({run path: machine tag like "M1"}, the markdown line naming each `machine_label` and how many runs it made)."""
  labels = {r.path: machine_label(r.summary.get("provenance")) for r in runs}
  machines = list(dict.fromkeys(sorted(labels.values(), key=lambda m: (m == UNRECORDED, m))))
  tags = {m: f"M{i + 1}" for i, m in enumerate(machines)}
  counts = {m: sum(v == m for v in labels.values()) for m in machines}
  runs_of = lambda m: f"{counts[m]} run" + ("s" if counts[m] != 1 else "")
  if len(machines) == 1:
    lines = [f"Machine: {machines[0]} ({'all ' if counts[machines[0]] > 1 else ''}{runs_of(machines[0])})."]
  else:
    lines = ["Machines: " + "; ".join(f"{tags[m]} {m} ({runs_of(m)})" for m in machines) + "."]
  return {path: tags[m] for path, m in labels.items()}, lines


def mixed_machines_warning(runs) -> str | None:
  """A one-line markdown warning when `runs` come from different hardware or commits, or some did not record
  theirs; None when every run records the same hardware and commit."""
  provenances = [r.summary.get("provenance") for r in runs]
  hardware = {hardware_label(p) for p in provenances if p}
  commits = {commit_label(p) for p in provenances if p}
  unrecorded = sum(not p for p in provenances)
  problems = [f"{len(hardware)} kinds of hardware ({'; '.join(sorted(hardware))})"] if len(hardware) > 1 else []
  problems += [f"{len(commits)} commits ({', '.join(sorted(commits))})"] if len(commits) > 1 else []
  if 0 < unrecorded < len(runs):
    problems.append(f"{unrecorded} of {len(runs)} runs that do not record their machine")
  if not problems:
    return None
  return (
    f"**Warning: these runs mix {' and '.join(problems)}. Results move between machines and commits even at "
    f"the same seed, so a difference between rows may be the machine's, not the schedule's.**"
  )


def mixed_settings_warning(runs) -> str | None:
  """A one-line markdown warning naming each group (`run_label`) whose runs differ in a Config field other than the
  seed, e.g. ``dense: epochs (40, 80)``, comparing data paths by file name, fine-tunes' sources by name less a
  ``_s<seed>`` suffix (each seed's own run: ``dense_s0``, ``dense_s1``), and skipping fields a config.json lacks;
  None when every group is uniform."""
  problems = []
  for label, rs in _by_schedule(runs).items():
    configs = [r.config for r in rs]
    for name in sorted(set.intersection(*map(set, configs)) - set(_FREE_FIELDS)):
      canon = lambda v: Path(v).name if name == "data" and isinstance(v, str) else v
      if name == "init_from":
        canon = lambda v: v and re.sub(r"_s\d+$", "", Path(v).name)
      values = list(dict.fromkeys(json.dumps(canon(c[name]), sort_keys=True) for c in configs))
      if len(values) > 1:
        problems.append(f"`{label}`: {name} ({', '.join(values)})")
  if not problems:
    return None
  return (
    f"**Warning: runs grouped as one variant differ in their settings: {'; '.join(problems)}. Each row averages "
    f"them as if they were seeds of one configuration; compare such runs in separate tables.**"
  )


def plot_comparison(runs, outdir: str | Path) -> list[Path]:
  """The figures of `runs` compared (`jaxsparse.plots.plot_groups`): one series per group, styled by `approach`."""
  return plots.plot_groups(_by_schedule(runs), outdir)


def _table(intro: str, header: str, rows: Sequence[str], align: str = "") -> list[str]:
  """A markdown table after its introduction, nothing without rows; by default the first column left-aligned."""
  align = align or "|---|" + "---:|" * (header.count("|") - 2)
  return ["", intro, "", header, align, *rows] if rows else []


def _mean_std(values) -> str:
  return "{:.4f} ± {:.4f}".format(*mean_std(values))


def _interval(d: float, half: float, n: int, count: bool = False) -> str:
  return f"{d:+.4f}" + (f" ± {half:.4f}" if n > 1 else "") + (f" (n={n})" if count else "")


def comparison_markdown(runs, *, title: str, baseline: str | Sequence[str] = "dense", figures=()) -> str:
  """The markdown page comparing `runs`: per group, mean ± std of final and best dense test accuracy, the paired
  difference to each `baseline` group (one label or several), `sparsity_stats`, keep curve, cycles and wall time;
  then per-seed rows, the keep curve with its price, `reset_shocks`, `fit_stats` and `phase_stats` tables, the
  machines under the first two tables, and warnings above them when runs mix machines or a group mixes settings."""
  groups = _by_schedule(runs)
  baselines = [baseline] if isinstance(baseline, str) else list(baseline)
  keeps = sorted({k for r in runs for k in r.keep_curve}, reverse=True)
  final = {s: {r.summary["seed"]: r.summary["test_accuracy"] for r in rs} for s, rs in groups.items()}
  tags, machine_lines = machines_markdown(runs)
  mixed = len(set(tags.values())) > 1  # then each per-seed row names its machine
  rows, per_seed = [], []
  for s, rs in groups.items():
    deltas = [
      "—" if s == b or b not in final else _interval(*paired_difference(final[s], final[b]), count=True)
      for b in baselines
    ]
    sparse = _means([sparsity_stats(r.history, r.config) for r in rs])
    curve = [np.mean([r.keep_curve.get(k, math.nan) for r in rs]) for k in keeps]
    rows.append(
      f"| {s} | {len(rs)} | {_mean_std([r.summary['test_accuracy'] for r in rs])} | "
      f"{_mean_std([r.summary['best_test_accuracy'] for r in rs])} | "
      + "".join(f"{d} | " for d in deltas)
      + f"{sparse['keep_below_1']:.1f} ({sparse['bit']:.1f}) | {sparse['mean_density']:.3f} | "
      f"{np.mean([r.summary['cycles'] for r in rs]):.1f} | "
      + "".join(f"{c:.4f} | " for c in curve)
      + f"{np.mean([r.summary['wall_time_s'] / 60 for r in rs]):.1f} |"
    )
    per_seed += [
      f"| {s} | {r.summary['seed']} | {r.summary['test_accuracy']:.4f} | "
      f"{r.summary['best_test_accuracy']:.4f} | `{r.path}` |" + (f" {tags[r.path]} |" if mixed else "")
      for r in rs
    ]
  intro = (
    "Dense (keep = 1) test accuracy at the end of training; mean ± std over seeds. "
    f"Δ vs {' / '.join(baselines)}: mean paired difference over shared seeds ± the 95% t-interval "
    "half-width. Sparse epochs: epochs at keep < 1, and those weighted by the share of top-k sites the keep "
    "actually cut (achieved density reached the keep); mean density: achieved, over sites and epochs."
  )
  if any(r.config.get("topk_keep") == "relative" for r in runs):
    intro += (
      " Keep columns: test accuracy at that keep in each run's own keep mode, so for topk_keep=relative runs keep k "
      "is a fraction of each example's active units, a lower density than absolute keep k."
    )
  header = (
    "| schedule | seeds | final test acc | best test acc | "
    + "".join(f"Δ final vs {b} | " for b in baselines)
    + "sparse epochs (cut) | mean density | cycles | "
    + "".join(f"keep {k:g} | " for k in keeps)
    + "wall (min) |"
  )
  warnings = [w for w in (mixed_settings_warning(runs), mixed_machines_warning(runs)) if w]
  lines = [f"# {title}"] + [line for w in warnings for line in ("", w)] + _table(intro, header, rows)
  lines += ["", *machine_lines]
  lines += _table(
    "Per seed (final / best dense test accuracy):",
    "| schedule | seed | final | best | run |" + (" machine |" if mixed else ""),
    per_seed,
    "|---|---:|---:|---:|---|" + ("---|" if mixed else ""),
  )
  lines += ["", *machine_lines]
  lines += _frontier_markdown(groups, tags) + _shock_markdown(groups) + _fit_markdown(groups) + _phase_markdown(groups)
  if figures:
    lines += [""] + [f"![{f}]({f})" for f in figures]
  return "\n".join(lines) + "\n"


def _frontier_markdown(groups, tags: dict[str, str]) -> list[str]:
  """Per test-time keep, each group's accuracy and effective MACs, and each joint group's paired differences to the
  networks trained and fine-tuned at that keep; then what training each group cost on each machine (`tags`: run
  path -> machine, from `machines_markdown`)."""
  priced = {s: rs for s, rs in groups.items() if all(r.keep_macs for r in rs)}
  if not priced:
    return []
  keeps = sorted({k for rs in priced.values() for r in rs for k in r.keep_macs}, reverse=True)
  kind = {s: rs[0].approach for s, rs in priced.items()}
  tuned_from = {
    s: run_label({**rs[0].config, "init_from": None}) for s, rs in priced.items() if kind[s] == "fine-tuned"
  }

  def at(s, k):
    return {r.summary["seed"]: r.keep_macs[k] for r in priced[s] if k in r.keep_macs}

  verdicts: dict[tuple[str, str], dict[float, str]] = {}  # (joint group, reference) -> {keep: cell}

  def delta(s, other, k, reference):
    if other not in priced or s == other or not kind[s].startswith("joint"):
      return "—"
    d, half, n = paired_difference(*({seed: v["accuracy"] for seed, v in at(x, k).items()} for x in (s, other)))
    if n < 2:
      return "—" if not n else f"{100 * d:+.1f} (n=1)"
    cell = f"{100 * d:+.1f} [{100 * (d - half):+.1f}, {100 * (d + half):+.1f}] (n={n})"
    verdicts.setdefault((s, reference), {})[k] = f"{cell} {_verdict(100 * (d - half), 100 * (d + half))}"
    return cell

  rows, references, chosen = [], [], {}  # chosen: the best fine-tune recipe per keep, as a set in insertion order
  for k in keeps:
    trained = f"constant(keep={k:g})"
    recipes = [s for s, base in tuned_from.items() if base == trained]
    # The fine-tune recipe with the best mean accuracy at keep k: the hardest reference.
    mean_at = lambda s: np.mean([v["accuracy"] for v in at(s, k).values()])
    tuned = max((s for s in recipes if at(s, k)), key=mean_at, default=None)
    if tuned is not None:
      chosen[tuned] = None
      if len(recipes) > 1:
        references.append(f"keep {k:g}: {_recipe(priced[tuned][0].config)}")
    for s in priced:
      values = list(at(s, k).values())
      if values:
        m = _means(values)
        rows.append(
          f"| {k:g} | {s} | {kind[s]} | {len(values)} | {_mean_std([v['accuracy'] for v in values])} | "
          f"{m['macs'] / 1e6:.1f} | {m['macs_fraction']:.3f} | {delta(s, trained, k, 'trained at keep')} | "
          f"{delta(s, tuned, k, 'dense + fine-tune')} |"
        )
  verdict_keeps = sorted({k for cells in verdicts.values() for k in cells}, reverse=True)
  usable = lambda r: (r.summary.get("provenance") or {}).get("cpu", {}).get("usable") or 1
  machines = sorted(set(tags.values()), key=lambda m: int(m[1:]))

  def minutes(rs, m):  # mean core-minutes of the runs on machine m, None if none ran there
    on_m = [r.summary["wall_time_s"] / 60 * usable(r) for r in rs if tags[r.path] == m]
    return np.mean(on_m) if on_m else None

  cost = {s: {m: minutes(rs, m) for m in machines} for s, rs in priced.items()}
  cell = lambda c: " — |" if c is None else f" {c:.0f} |"
  cost_rows = [f"| {s} |" + "".join(cell(c[m]) for m in machines) for s, c in cost.items()]
  # What each alternative to one joint network costs: the per-keep networks, or the network the fine-tunes start
  # from plus the best fine-tune at each keep; a sum only where the machine ran every group in it.
  sources = {Path(r.config["init_from"]).name for s in chosen for r in priced[s]}
  source = [s for s, rs in priced.items() if any(Path(r.path).name in sources for r in rs)]
  alternatives = {
    "all per-keep networks together": [s for s in priced if kind[s] == "per-keep"],
    " + ".join([*source, "the best fine-tune at each keep"]): [*source, *chosen],
  }
  for name, group in alternatives.items():
    total = lambda m: None if any(cost[s][m] is None for s in group) else sum(cost[s][m] for s in group)
    if group:
      cost_rows.append(f"| {name} |" + "".join(cell(total(m)) for m in machines))
  return (
    _table(
      "Keep curve with its price: per test-time keep, test accuracy (mean ± std over seeds) and effective MACs per "
      "image (dense MACs times each layer's input density, `jaxsparse.macs`), and for each joint network the paired "
      "difference in points (95% t-interval) to the network trained at that constant keep and to the dense network "
      "fine-tuned at it (the fine-tune recipe with the best mean accuracy at that keep, where there are several).",
      "| test keep | group | approach | runs | accuracy | MMACs | of dense | Δ vs trained at keep | Δ vs fine-tuned |",
      rows,
      "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    )
    + (["", "Fine-tune recipe each Δ is taken against: " + "; ".join(references) + "."] if references else [])
    + _table(
      "Verdict: is one jointly trained network at least as good as the network trained for each keep, or as the "
      "dense network fine-tuned at it? Δ in points with its 95% interval over paired seeds: *better* (the interval "
      "is above +1), *as good* (above −1: at most 1 point worse), *worse* (below −1), *open* (the interval "
      "straddles −1: more blocks decide).",
      "| joint network | against |" + "".join(f" keep {k:g} |" for k in verdict_keeps),
      [
        f"| {s} | {reference} |" + "".join(f" {cells.get(k, '—')} |" for k in verdict_keeps)
        for (s, reference), cells in verdicts.items()
      ],
      "|---|---|" + "---|" * len(verdict_keeps),
    )
    + _table(
      "Training cost in core-minutes per run (wall time x the cores the run could use), mean over the seeds each "
      "machine ran (machines as named above; wall times beside other work are indicative):",
      "| group |" + "".join(f" {m} |" for m in machines),
      cost_rows,
    )
  )


def _verdict(low: float, high: float, margin: float = 1.0) -> str:
  """What a paired difference's interval [low, high] (points) decides against a margin of `margin` points."""
  if low > margin:
    return "*better*"
  return "*as good*" if low >= -margin else "*worse*" if high < -margin else "*open*"


def _shock_markdown(groups) -> list[str]:
  """The `reset_shocks` table: per group, over every reset of every run."""
  rows = []
  for s, rs in groups.items():
    shocks = [x for r in rs for x in reset_shocks(r.history)]
    if shocks:
      jump = [x["loss_first_steps"] - x["loss_before"] for x in shocks]
      worst = shocks[int(np.argmax(jump))]
      drop = np.mean([x["accuracy_before"] - x["accuracy_first_steps"] for x in shocks])
      rows.append(
        f"| {s} | {len(shocks)} | {np.mean(jump):+.3f} | {max(jump):+.3f} (epoch {worst['epoch']}, keep before "
        f"{worst['keep_before']:.3f}) | {drop:+.3f} | "
        f"{sum(x['loss_after'] > x['cycle_first_loss'] for x in shocks)} of {len(shocks)} |"
      )
  return _table(
    "Reset shock: at every reset (keep back to 1 after a cycle), the training loss of the first tenth of the next "
    "epoch's steps minus that of the cycle's last epoch (as trained), the drop in training accuracy, and the resets "
    "after which the whole next epoch's loss was above the loss of the cycle's first epoch (the cycle undone).",
    "| schedule | resets | loss jump, mean | loss jump, largest | accuracy drop, mean | next epoch above the cycle's first |",
    rows,
  )


def _fit_markdown(groups) -> list[str]:
  """The `fit_stats` table: per group, mean over runs of training fit and dense validation accuracy, last quarter."""
  fits = {s: _means([fit_stats(r.history) for r in rs]) for s, rs in groups.items()}
  rows = [
    f"| {s} | {len(groups[s])} | {m['train_loss']:.4f} | {m['train_accuracy']:.4f} | {m['val_accuracy']:.4f} | "
    f"{m['gap']:+.4f} |"
    for s, m in fits.items()
  ]
  return _table(
    "Fit over the last quarter of the epochs (mean over epochs, then over runs): training loss and accuracy as "
    "trained (at each epoch's keep, dropout active), dense validation accuracy after each epoch, and the gap "
    "between them. A regulariser that works holds the training fit back and raises validation accuracy.",
    "| schedule | runs | train loss | train acc | val acc | gap (train − val) |",
    rows,
  )


def _phase_markdown(groups) -> list[str]:
  """The `phase_stats` table for the groups whose runs trained both dense and sparse epochs in their last quarter."""
  rows = []
  for s, rs in groups.items():
    both = [p for p in (phase_stats(r.history) for r in rs) if p["n_dense"] and p["n_sparse"]]
    if both:
      d, half, n = mean_interval([p["dense"] - p["sparse"] for p in both])
      m = _means(both)
      rows.append(
        f"| {s} | {n} | {m['dense']:.4f} | {m['sparse']:.4f} | {_interval(d, half, n)} | {m['n_dense']:.1f} / "
        f"{m['n_sparse']:.1f} | {sum(r.history[-1]['keep'] >= 1.0 for r in rs)} of {len(rs)} |"
      )
  return _table(
    "Evaluation timing: dense validation accuracy over the last quarter of the epochs, after epochs trained dense "
    "(keep 1) vs after epochs trained sparse (keep < 1); mean over runs that had both, the difference per run "
    "± its 95% t-interval half-width. The last column counts the runs whose final epoch (the one the headline "
    "test accuracy follows) trained dense.",
    "| schedule | runs | val after dense epochs | val after sparse epochs | difference | epochs per run "
    "(dense / sparse) | final epoch dense |",
    rows,
  )
