"""Run records -> summary, text tables and plots (matplotlib's object API: no global backend state)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator
from scipy import stats

from jaxsparse.config import Config


def summarize(
  history: Sequence[Mapping],
  *,
  keep_curve: Mapping[float, float],
  device: str,
  data_source: str,
  config: Mapping,
  keep_macs: Mapping[float, Mapping] | None = None,
  dense_macs: float | None = None,
) -> dict:
  """The summary.json of a run, from its per-epoch records and its final keep curve (with, where measured, each
  keep's mean achieved density and effective MACs per example: `jaxsparse.loop.keep_curve`)."""
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
    "cycles": int(last["cycle"]) + int(last.get("reset_after", False)),
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
  }


def format_summary(summary: Mapping) -> str:
  """Headline and keep-curve table, as printed at the end of a run."""
  lines = [
    f"test accuracy (dense, final): {summary['test_accuracy']:.4f}   best: "
    f"{summary['best_test_accuracy']:.4f} (epoch {summary['best_epoch']})   cycles: {summary['cycles']}"
    f"   wall: {summary['wall_time_s'] / 60:.1f} min on {summary['device']}",
    "",
  ]
  macs = summary.get("keep_macs")
  if not macs:
    lines += ["| keep | test accuracy |", "|---:|---:|"]
    lines += [f"| {float(k):.2f} | {v:.4f} |" for k, v in summary["keep_curve"].items()]
    return "\n".join(lines)
  lines += [
    f"| keep | test accuracy | mean density | effective MMACs per image | of dense ({summary['dense_macs'] / 1e6:.1f}) |",
    "|---:|---:|---:|---:|---:|",
  ]
  lines += [
    f"| {float(k):.2f} | {v['accuracy']:.4f} | {v['density']:.3f} | {v['macs'] / 1e6:.1f} | {v['macs_fraction']:.3f} |"
    for k, v in macs.items()
  ]
  return "\n".join(lines)


def plot_run(history: Sequence[Mapping], keep_curve: Mapping[float, float], outdir: str | Path) -> list[Path]:
  """Writes keep.png (keep trajectory, resets marked), accuracy.png and keep_curve.png into `outdir`."""
  outdir = Path(outdir)
  outdir.mkdir(parents=True, exist_ok=True)
  epochs = [r["epoch"] for r in history]
  resets = [r["epoch"] for r in history if r.get("reset_after")]
  paths = []

  fig = Figure(figsize=(7, 3))
  ax = fig.subplots()
  # Epoch e trains at its keep from boundary e-1 to e; resets sit on the boundary after their epoch.
  keeps = [r["keep"] for r in history]
  ax.step([e - 1 for e in epochs] + [epochs[-1]], keeps + keeps[-1:], where="post", label="keep ratio")
  for i, e in enumerate(resets):
    ax.axvline(e, color="tab:red", alpha=0.3, lw=1, label="reset" if i == 0 else None)
  ax.set(xlabel="epochs completed", ylabel="keep ratio", ylim=(0, 1.05), title="Keep-ratio trajectory")
  ax.legend(loc="lower left")
  paths.append(_save(fig, outdir / "keep.png"))

  fig = Figure(figsize=(7, 3.5))
  ax = fig.subplots()
  ax.plot(epochs, [r["train_accuracy"] for r in history], label="train (at epoch keep)")
  if any(r.get("val_accuracy") is not None for r in history):
    ax.plot(epochs, [r.get("val_accuracy") for r in history], label="val (dense)")
  tested = [r for r in history if r.get("test_accuracy") is not None]
  ax.plot(
    [r["epoch"] for r in tested],
    [r["test_accuracy"] for r in tested],
    marker="." if len(tested) < len(history) else None,
    label="test (dense)",
  )
  for e in resets:
    ax.axvline(e, color="tab:red", alpha=0.2, lw=1)
  ax.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
  ax.legend(loc="lower right")
  paths.append(_save(fig, outdir / "accuracy.png"))

  fig = Figure(figsize=(5, 3.5))
  ax = fig.subplots()
  keeps = sorted(keep_curve)
  ax.plot(keeps, [keep_curve[k] for k in keeps], marker="o")
  ax.set(xscale="log", xlabel="test-time keep ratio", ylabel="test accuracy", title="Keep curve")
  _plain_log_ticks(ax, keeps)
  paths.append(_save(fig, outdir / "keep_curve.png"))
  return paths


def _plain_log_ticks(ax, keeps) -> None:
  """Ticks at the keeps themselves, labelled like 0.05 (not 5×10⁻², which needs mathtext and its fonts)."""
  ax.xaxis.set_major_locator(FixedLocator(list(keeps)))
  ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
  ax.xaxis.set_minor_locator(NullLocator())


def _save(fig: Figure, path: Path) -> Path:
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight" keeps a legend placed outside the axes
  return path


_COLORS = colormaps["tab20"].colors
# Line style per kind of approach: baselines solid black/grey, joint training solid, a network per keep dashed,
# fine-tuned dotted; with dropout, joint and per-keep runs are dash-dotted.
_APPROACH_STYLE = {"baseline": "-", "joint": "-", "per-keep": "--", "fine-tuned": ":", "joint+dropout": "-."}


def approach(label: str) -> str:
  """The kind of approach a comparison group is: baseline (dense, dropout), per-keep (a constant keep), fine-tuned
  (started from another run), joint (a keep schedule or several regimes per step), or joint+dropout.

  >>> approach("constant(keep=0.1)+regimes=3+dropout0.3")
  'joint+dropout'
  """
  if "+finetuned" in label:
    return "fine-tuned"
  if label.startswith("dense"):
    return "baseline"
  if label.startswith("constant") and "+regimes=" not in label:
    return "per-keep"
  return "joint+dropout" if "+dropout" in label else "joint"


def _series_style(i: int, label: str = "") -> dict:
  """Colour and line style of the i-th series of a comparison plot: twenty distinct colours (tab20, in an order
  that takes the strong shades first), black and grey for the baselines, the line style by `approach`."""
  kind = approach(label) if label else "joint"
  if kind == "baseline":
    return {"color": "dimgray" if "+dropout" in label else "black", "ls": "--" if "+dropout" in label else "-"}
  return {"color": _COLORS[(2 * i) % 20 + (2 * i // 20) % 2], "ls": _APPROACH_STYLE[kind]}


def _legend_outside(ax) -> None:
  """A legend to the right of the axes, where it cannot cover the curves of a many-schedule comparison."""
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


# ---------------------------------------------------------------------------------------------------------------
# Many runs: schedule x seed.


def load_runs(paths) -> list[dict]:
  """Reads run directories into dicts {path, summary, history}; raises for a directory that is not a run."""
  runs = []
  for p in map(Path, paths):
    summary_path, metrics_path = p / "summary.json", p / "metrics.jsonl"
    if not summary_path.exists() or not metrics_path.exists():
      raise FileNotFoundError(f"{p} is not a finished run (no summary.json / metrics.jsonl)")
    history = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    summary = json.loads(summary_path.read_text())
    config_path = p / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {"schedule": summary["schedule"]}
    runs.append({"path": str(p), "summary": summary, "history": history, "label": run_label(config), "config": config})
  if not runs:
    raise ValueError("no runs given")
  return runs


# Config fields that make a variant of a schedule when they differ from their default (seeds never do).
_VARIANT_FIELDS = ("dropout", "norm", "topk_gradient", "topk_score", "topk_keep", "regimes", "distill", "augment")


def run_label(config: Mapping) -> str:
  """A run's group in comparisons: the schedule, its options and any non-default model/data choice, e.g.
  ``dense+dropout0.3``, ``cyclic(cycles=3,period=5)`` or ``adaptive_b+topk_gradient=straight_through``; seeds of
  the same variant share it.

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
  return label + ("+finetuned" if config.get("init_from") else "")


def _by_schedule(runs) -> dict[str, list[dict]]:
  groups: dict[str, list[dict]] = {}
  label = lambda r: r.get("label") or r["summary"]["schedule"]  # noqa: E731
  for r in sorted(runs, key=lambda r: (label(r), r["summary"]["seed"])):
    groups.setdefault(label(r), []).append(r)
  return groups


def mean_std(values) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  a = np.asarray(values, np.float64)
  return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def sparsity_stats(history: Sequence[Mapping], config: Mapping | None = None) -> dict[str, float]:
  """How sparse a run really trained, from its per-epoch records.

  Returns:
    ``keep_below_1``: epochs trained at a keep < 1; ``bit``: those epochs weighted by the fraction of top-k sites
    whose achieved density reached the keep (>= 0.98 keep): at a keep above a site's natural density the mask
    removes nothing there, so such epochs trained like dense ones (with ``topk_keep="relative"`` every keep < 1
    bites, so every site counts); ``mean_density``: achieved density averaged over sites and epochs (nan when not
    recorded).
  """
  relative = (config or {}).get("topk_keep") == "relative"
  below = bit = 0.0
  densities = []
  for r in history:
    sites = list((r.get("density") or {}).values())
    if sites:
      densities.append(float(np.mean(sites)))
    if r["keep"] < 1.0:
      below += 1
      if relative:
        bit += 1.0
      elif sites:
        bit += float(np.mean([d >= 0.98 * r["keep"] for d in sites]))
  return {"keep_below_1": below, "bit": bit, "mean_density": _mean_or_nan(densities)}


def _mean_or_nan(values) -> float:
  return float(np.mean(values)) if len(values) else math.nan


def _tail(history: Sequence[Mapping], tail: float, caller: str) -> Sequence[Mapping]:
  """The last ``tail`` fraction of a run's epoch records (at least one)."""
  if not 0 < tail <= 1:
    raise ValueError(f"{caller}: tail must be in (0, 1], got {tail}")
  return history[len(history) - max(1, round(tail * len(history))) :]


def fit_stats(history: Sequence[Mapping], tail: float = 0.25) -> dict[str, float]:
  """How closely a run fits its training set and how well it generalises over its last ``tail`` of epochs.

  Returns the means over those epochs of ``train_loss`` and ``train_accuracy`` (measured as the run trained: at
  each epoch's keep, with dropout active), of the dense ``val_accuracy`` (nan when no epoch has one) and ``gap``,
  the mean of train - validation accuracy over the epochs that have both.
  """
  records = _tail(history, tail, "fit_stats")
  val = [r for r in records if r.get("val_accuracy") is not None]
  return {
    "train_loss": _mean_or_nan([r["train_loss"] for r in records]),
    "train_accuracy": _mean_or_nan([r["train_accuracy"] for r in records]),
    "val_accuracy": _mean_or_nan([r["val_accuracy"] for r in val]),
    "gap": _mean_or_nan([r["train_accuracy"] - r["val_accuracy"] for r in val]),
  }


def phase_stats(history: Sequence[Mapping], tail: float = 0.25) -> dict[str, float]:
  """Dense validation accuracy over a run's last ``tail`` of epochs, split by the keep of the epoch just trained.

  Every epoch ends with a dense (keep = 1) validation pass. This separates the passes that follow a dense epoch
  (keep 1) from those that follow a sparse one (keep < 1), which shows how much a dense evaluation depends on
  where in its keep cycle it falls. Returns ``dense`` and ``sparse`` (mean accuracies, nan when there are no such
  epochs) and ``n_dense``, ``n_sparse``; epochs without a validation pass are skipped.
  """
  records = [r for r in _tail(history, tail, "phase_stats") if r.get("val_accuracy") is not None]
  dense = [r["val_accuracy"] for r in records if r["keep"] >= 1.0]
  sparse = [r["val_accuracy"] for r in records if r["keep"] < 1.0]
  return {"dense": _mean_or_nan(dense), "sparse": _mean_or_nan(sparse), "n_dense": len(dense), "n_sparse": len(sparse)}


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], confidence: float = 0.95):
  """Mean of a[seed] - b[seed] over shared seeds and the half-width of its t-interval (nan for n < 2)."""
  seeds = sorted(set(a) & set(b))
  if not seeds:
    return math.nan, math.nan, 0
  return mean_interval([a[s] - b[s] for s in seeds], confidence)


def mean_interval(values, confidence: float = 0.95):
  """Mean of ``values``, the half-width of its t-interval (nan for fewer than two values) and their count."""
  d = np.asarray(values, np.float64)
  if d.size == 0:
    return math.nan, math.nan, 0
  if d.size < 2:
    return float(d.mean()), math.nan, 1
  half = stats.t.ppf(0.5 + confidence / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
  return float(d.mean()), float(half), int(d.size)


UNRECORDED = "unrecorded machine"


def hardware_label(provenance: Mapping | None) -> str:
  """The hardware of a run's provenance in a few words: the CPU model and its widest vector units, and the
  accelerators when there are any, e.g. ``AMD EPYC 9R14 (AVX-512+bf16)`` or ``2 x NVIDIA H100 on AMD EPYC 9R14
  (AVX-512+bf16)``; "unrecorded machine" without provenance."""
  if not provenance:
    return UNRECORDED
  cpu = provenance.get("cpu") if isinstance(provenance.get("cpu"), Mapping) else {}
  vector = _vector_units(cpu.get("vector_extensions"))
  label = str(cpu.get("model", "unknown")) + (f" ({vector})" if vector else "")
  devices = provenance.get("devices")
  accelerators = [d for d in devices if d.get("platform") != "cpu"] if isinstance(devices, list) else []
  if accelerators:
    label = ", ".join(f"{d.get('count', '?')} x {d.get('kind', 'unknown')}" for d in accelerators) + " on " + label
  return label


def _vector_units(extensions) -> str:
  """The widest vector units among a CPU's extensions, e.g. "AVX-512+bf16+AMX", "AVX2", "SVE"; "" if unknown."""
  if not isinstance(extensions, list):
    return ""
  have = set(extensions)
  if "avx512f" in have:
    units = "AVX-512" + "".join(f"+{x}" for x in ("bf16", "fp16") if f"avx512_{x}" in have)
  else:
    units = next(
      (
        name
        for flag, name in (("avx2", "AVX2"), ("avx", "AVX"), ("sve2", "SVE2"), ("sve", "SVE"), ("asimd", "NEON"))
        if flag in have
      ),
      "",
    )
  return units + ("+AMX" if any(x.startswith("amx") for x in have) else "")


def commit_label(provenance: Mapping | None) -> str:
  """The short git commit of a run's provenance, ``+dirty`` when the tree had uncommitted changes; "unknown" when
  not recorded."""
  git = (provenance or {}).get("git")
  commit = git.get("commit") if isinstance(git, Mapping) else None
  if not isinstance(commit, str) or commit == "unknown":
    return "unknown"
  return commit[:7] + ("+dirty" if git.get("dirty") is True else "")


def machine_label(summary: Mapping) -> str:
  """Where a run was made, from its summary's provenance: hardware and commit, e.g. ``AMD EPYC 9R14 (AVX-512+bf16),
  commit a63eee8``; "unrecorded machine" for a run that did not record it."""
  provenance = summary.get("provenance")
  if not provenance:
    return UNRECORDED
  return f"{hardware_label(provenance)}, commit {commit_label(provenance)}"


def machines_markdown(runs) -> tuple[dict[str, str], list[str]]:
  """({run path: machine tag like "M1"}, the markdown lines naming each machine and how many runs it made, and a
  warning when the runs mix hardware or commits)."""
  labels = {r["path"]: machine_label(r["summary"]) for r in runs}
  machines = list(dict.fromkeys(sorted(labels.values(), key=lambda m: (m == UNRECORDED, m))))
  tags = {m: f"M{i + 1}" for i, m in enumerate(machines)}
  counts = {m: sum(v == m for v in labels.values()) for m in machines}
  runs_of = lambda m: f"{counts[m]} run" + ("s" if counts[m] != 1 else "")  # noqa: E731
  if len(machines) == 1:
    lines = [f"Machine: {machines[0]} ({'all ' if counts[machines[0]] > 1 else ''}{runs_of(machines[0])})."]
  else:
    lines = ["Machines: " + "; ".join(f"{tags[m]} {m} ({runs_of(m)})" for m in machines) + "."]
  return {path: tags[m] for path, m in labels.items()}, lines


def mixed_machines_warning(runs) -> str | None:
  """A one-line markdown warning when `runs` come from different hardware or commits, or some did not record
  theirs; None when every run records the same hardware and commit."""
  provenances = [r["summary"].get("provenance") for r in runs]
  hardware = {hardware_label(p) for p in provenances if p}
  commits = {commit_label(p) for p in provenances if p}
  unrecorded = sum(not p for p in provenances)
  problems = [f"{len(hardware)} kinds of hardware ({'; '.join(sorted(hardware))})"] if len(hardware) > 1 else []
  problems += [f"{len(commits)} commits ({', '.join(sorted(commits))})"] if len(commits) > 1 else []
  problems += (
    [f"{unrecorded} of {len(runs)} runs that do not record their machine"] if 0 < unrecorded < len(runs) else []
  )
  if not problems:
    return None
  return (
    f"**Warning: these runs mix {' and '.join(problems)}. Results move between machines and commits even at "
    f"the same seed, so a difference between rows may be the machine's, not the schedule's.**"
  )


# Config fields in which the seeds of one variant may differ: the seed itself, and bookkeeping that does not change
# what a run computes.
_FREE_FIELDS = ("seed", "cache_dir", "keep_checkpoints")


def mixed_settings_warning(runs) -> str | None:
  """A one-line markdown warning naming each group (see `run_label`) whose runs differ in a Config field other
  than the seed, e.g. ``dense: epochs (40, 80)``: `comparison_markdown` would average them as seeds of one variant.
  Data paths are compared by file name (one copy at two paths is the same data); fields that a run's config.json
  lacks are skipped. None when every group is uniform."""
  problems = []
  for label, rs in _by_schedule(runs).items():
    configs = [r.get("config") or {} for r in rs]
    fields = sorted(set.intersection(*(set(c) for c in configs)) - set(_FREE_FIELDS))
    for name in fields:
      canon = lambda v: Path(v).name if name == "data" and isinstance(v, str) else v  # noqa: E731
      values = list(dict.fromkeys(json.dumps(canon(c[name]), sort_keys=True) for c in configs))
      if len(values) > 1:
        problems.append(f"`{label}`: {name} ({', '.join(values)})")
  if not problems:
    return None
  return (
    f"**Warning: runs grouped as one variant differ in their settings: {'; '.join(problems)}. Each row averages "
    f"them as if they were seeds of one configuration; compare such runs in separate tables.**"
  )


def seeds_needed(
  sd_diff: float, *, delta: float, confidence: float = 0.95, power: float | None = None, max_n: int = 100_000
) -> int:
  """The smallest number n >= 2 of paired seeds that resolves a difference `delta`, given the standard deviation
  `sd_diff` of the per-seed paired differences (same units).

  power=None: the `confidence` t-interval of the mean paired difference is at most `delta` wide on each side,
  t_{(1+confidence)/2, n-1} * sd_diff / sqrt(n) <= delta (an observed difference of `delta` is just significant).
  power=p: a two-sided paired t-test at level 1 - confidence detects a true difference `delta` with probability
  >= p (noncentral t with noncentrality delta / (sd_diff / sqrt(n))).

  >>> seeds_needed(0.02, delta=0.01), seeds_needed(0.02, delta=0.01, power=0.8)
  (18, 34)
  """
  if not (sd_diff >= 0 and delta > 0 and 0 < confidence < 1 and (power is None or 0 < power < 1)):
    raise ValueError(
      f"need sd_diff >= 0, delta > 0 and confidence, power in (0, 1); got sd_diff={sd_diff}, "
      f"delta={delta}, confidence={confidence}, power={power}"
    )
  for n in range(2, max_n + 1):
    t = stats.t.ppf(0.5 + confidence / 2, n - 1)
    if sd_diff == 0 or (power is None and t * sd_diff / math.sqrt(n) <= delta):
      return n
    nc = delta / (sd_diff / math.sqrt(n))
    if power is not None and stats.nct.sf(t, n - 1, nc) + stats.nct.cdf(-t, n - 1, nc) >= power:
      return n
  raise ValueError(f"more than {max_n} seeds needed for delta={delta} at sd_diff={sd_diff}")


def _relative_keep_note(runs) -> str:
  """A sentence for tables whose keep columns mix keep modes; empty when no run uses relative keep."""
  if not any((r.get("config") or {}).get("topk_keep") == "relative" for r in runs):
    return ""
  return (
    " Keep columns: test accuracy at that keep in each run's own keep mode, so for topk_keep=relative runs keep k "
    "is a fraction of each example's active units, a lower density than absolute keep k."
  )


def comparison_markdown(runs, *, title: str, baseline: str | Sequence[str] = "dense", figures=()) -> str:
  """One markdown table: per schedule mean ± std of final and best dense test accuracy, difference to each
  baseline group (`baseline`: one label or several; paired by seed, 95% t-interval), epochs spent sparse (see
  `sparsity_stats`), keep curve means, cycles, wall time; then per-seed rows, the fit over the last quarter (see
  `fit_stats`) and the evaluation timing (see `phase_stats`).
  Each table is followed by the machine(s) its runs were made on (see `machine_label`); warnings above the tables
  say when the runs mix hardware or commits (see `mixed_machines_warning`) or when one group mixes settings (see
  `mixed_settings_warning`)."""
  groups = _by_schedule(runs)
  baselines = [baseline] if isinstance(baseline, str) else list(baseline)
  keeps = sorted({float(k) for r in runs for k in r["summary"]["keep_curve"]}, reverse=True)
  final = {s: {r["summary"]["seed"]: r["summary"]["test_accuracy"] for r in rs} for s, rs in groups.items()}
  tags, machine_lines = machines_markdown(runs)
  warnings = [w for w in (mixed_settings_warning(runs), mixed_machines_warning(runs)) if w]
  lines = (
    [f"# {title}", ""]
    + [line for w in warnings for line in (w, "")]
    + [
      "Dense (keep = 1) test accuracy at the end of training; mean ± std over seeds. "
      f"Δ vs {' / '.join(baselines)}: mean paired difference over shared seeds ± the 95% t-interval "
      "half-width. Sparse epochs: epochs at keep < 1, and those weighted by the share of top-k sites the keep "
      "actually cut (achieved density reached the keep); mean density: achieved, over sites and epochs."
      + _relative_keep_note(runs),
      "",
      "| schedule | seeds | final test acc | best test acc | "
      + " | ".join(f"Δ final vs {b}" for b in baselines)
      + " | sparse epochs (cut) | mean density | cycles | "
      + " | ".join(f"keep {k:g}" for k in keeps)
      + " | wall (min) |",
      "|---|---:|---:|---:|" + "---:|" * len(baselines) + "---:|---:|---:|" + "---:|" * len(keeps) + "---:|",
    ]
  )
  for s, rs in groups.items():
    fm, fs = mean_std([r["summary"]["test_accuracy"] for r in rs])
    bm, bs = mean_std([r["summary"]["best_test_accuracy"] for r in rs])
    deltas = []
    for b in baselines:
      if s == b or b not in final:
        deltas.append("—")
        continue
      d, half, n = paired_difference(final[s], final[b])
      deltas.append(f"{d:+.4f} ± {half:.4f} (n={n})" if n > 1 else f"{d:+.4f} (n={n})")
    sparse = [sparsity_stats(r["history"], r.get("config")) for r in rs]
    below, bit, density = (mean_std([x[k] for x in sparse])[0] for k in ("keep_below_1", "bit", "mean_density"))
    curve = [mean_std([r["summary"]["keep_curve"].get(str(k), math.nan) for r in rs])[0] for k in keeps]
    cycles = mean_std([r["summary"]["cycles"] for r in rs])[0]
    wall = mean_std([r["summary"]["wall_time_s"] / 60 for r in rs])[0]
    lines.append(
      f"| {s} | {len(rs)} | {fm:.4f} ± {fs:.4f} | {bm:.4f} ± {bs:.4f} | "
      + " | ".join(deltas)
      + f" | {below:.1f} ({bit:.1f}) | {density:.3f} | {cycles:.1f} | "
      + " | ".join(f"{c:.4f}" for c in curve)
      + f" | {wall:.1f} |"
    )
  lines += [""] + machine_lines
  mixed = len(set(tags.values())) > 1  # then each per-seed row names its machine
  lines += [
    "",
    "Per seed (final / best dense test accuracy):",
    "",
    "| schedule | seed | final | best | run |" + (" machine |" if mixed else ""),
    "|---|---:|---:|---:|---|" + ("---|" if mixed else ""),
  ]
  for s, rs in groups.items():
    for r in rs:
      lines.append(
        f"| {s} | {r['summary']['seed']} | {r['summary']['test_accuracy']:.4f} | "
        f"{r['summary']['best_test_accuracy']:.4f} | `{r['path']}` |" + (f" {tags[r['path']]} |" if mixed else "")
      )
  lines += [""] + machine_lines
  lines += _frontier_markdown(groups)
  lines += _shock_markdown(groups)
  lines += _fit_markdown(groups)
  lines += _phase_markdown(groups)
  if figures:
    lines += [""] + [f"![{f}]({f})" for f in figures]
  return "\n".join(lines) + "\n"


def _frontier_markdown(groups) -> list[str]:
  """Per test-time keep: each group's accuracy (mean ± std) and effective MACs, and each joint group's paired
  difference (95% t-interval) to the network trained at that keep and to the dense network fine-tuned at it."""
  priced = {s: rs for s, rs in groups.items() if all(r["summary"].get("keep_macs") for r in rs)}
  if not priced:
    return []
  keeps = sorted({k for rs in priced.values() for r in rs for k in r["summary"]["keep_macs"]}, key=float, reverse=True)

  def at(rs, k):
    return {r["summary"]["seed"]: r["summary"]["keep_macs"][k] for r in rs if k in r["summary"]["keep_macs"]}

  def delta(s, other, k):
    if other not in priced or s == other:
      return "—"
    acc = [{seed: v["accuracy"] for seed, v in at(priced[x], k).items()} for x in (s, other)]
    d, half, n = paired_difference(*acc)
    if n < 2:
      return "—" if not n else f"{100 * d:+.1f} (n=1)"
    return f"{100 * d:+.1f} [{100 * (d - half):+.1f}, {100 * (d + half):+.1f}] (n={n})"

  lines = [
    "",
    "Keep curve with its price: per test-time keep, test accuracy (mean ± std over seeds) and effective MACs per "
    "image (dense MACs times each layer's input density, `jaxsparse.macs`), and for each joint network the paired "
    "difference in points (95% t-interval) to the network trained at that constant keep and to the dense network "
    "fine-tuned at it.",
    "",
    "| test keep | group | approach | runs | accuracy | MMACs | of dense | Δ vs trained at keep | Δ vs fine-tuned |",
    "|---:|---|---|---:|---:|---:|---:|---:|---:|",
  ]
  for k in keeps:
    trained, tuned = f"constant(keep={float(k):g})", f"constant(keep={float(k):g})+finetuned"
    for s, rs in priced.items():
      values = list(at(rs, k).values())
      if not values:
        continue
      m, sd = mean_std([v["accuracy"] for v in values])
      joint = approach(s).startswith("joint")
      lines.append(
        f"| {float(k):g} | {s} | {approach(s)} | {len(values)} | {m:.4f} ± {sd:.4f} | "
        f"{np.mean([v['macs'] for v in values]) / 1e6:.1f} | {np.mean([v['macs_fraction'] for v in values]):.3f} | "
        f"{delta(s, trained, k) if joint else '—'} | {delta(s, tuned, k) if joint else '—'} |"
      )
  cost = {s: core_minutes(rs) for s, rs in priced.items()}
  kinds = {kind: sum(c for s, c in cost.items() if approach(s) == kind) for kind in ("per-keep", "fine-tuned")}
  lines += [
    "",
    "Training cost, core-minutes per run (mean over seeds; wall time x the cores the run could use): "
    + ", ".join(f"{s} {c:.0f}" for s, c in cost.items())
    + f". All per-keep networks together: {kinds['per-keep']:.0f}; all fine-tunes together: {kinds['fine-tuned']:.0f}"
    + (f" (+ dense {cost['dense']:.0f})." if "dense" in cost else "."),
  ]
  return lines


def core_minutes(rs) -> float:
  """Mean over the runs `rs` of wall minutes times the CPU cores each could use (its provenance; 1 if unknown)."""
  return float(
    np.mean(
      [
        r["summary"]["wall_time_s"] / 60 * ((r["summary"].get("provenance") or {}).get("cpu", {}).get("usable") or 1)
        for r in rs
      ]
    )
  )


def reset_shocks(history: Sequence[Mapping]) -> list[dict]:
  """One record per reset of a run (an epoch with ``reset_after``, followed by another): the cycle that ended, the
  keep and training loss / accuracy of its last epoch, the loss / accuracy of the first steps after the reset
  ("first_steps_*" of the next epoch) and of that whole epoch, and the loss of the cycle's first epoch (the goal: a
  reset should not undo the cycle)."""
  shocks = []
  for before, after in zip(history, history[1:]):
    if not before.get("reset_after") or "first_steps_loss" not in after:
      continue
    first = next(r for r in history if r["cycle"] == before["cycle"])
    shocks.append(
      {
        "cycle": before["cycle"],
        "epoch": after["epoch"],
        "keep_before": before["keep"],
        "loss_before": before["train_loss"],
        "accuracy_before": before["train_accuracy"],
        "loss_first_steps": after["first_steps_loss"],
        "accuracy_first_steps": after["first_steps_accuracy"],
        "loss_after": after["train_loss"],
        "cycle_first_loss": first["train_loss"],
      }
    )
  return shocks


def _shock_markdown(groups) -> list[str]:
  """The `reset_shocks` table: per group, over every reset of every run."""
  rows = []
  for s, rs in groups.items():
    shocks = [x for r in rs for x in reset_shocks(r["history"])]
    if not shocks:
      continue
    jump = [x["loss_first_steps"] - x["loss_before"] for x in shocks]
    drop = [x["accuracy_before"] - x["accuracy_first_steps"] for x in shocks]
    undone = sum(x["loss_after"] > x["cycle_first_loss"] for x in shocks)
    worst = max(shocks, key=lambda x: x["loss_first_steps"] - x["loss_before"])
    rows.append(
      f"| {s} | {len(shocks)} | {np.mean(jump):+.3f} | {max(jump):+.3f} (epoch {worst['epoch']}, keep before "
      f"{worst['keep_before']:.3f}) | {np.mean(drop):+.3f} | {undone} of {len(shocks)} |"
    )
  if not rows:
    return []
  return [
    "",
    "Reset shock: at every reset (keep back to 1 after a cycle), the training loss of the first tenth of the next "
    "epoch's steps minus that of the cycle's last epoch (as trained), the drop in training accuracy, and the resets "
    "after which the whole next epoch's loss was above the loss of the cycle's first epoch (the cycle undone).",
    "",
    "| schedule | resets | loss jump, mean | loss jump, largest | accuracy drop, mean | next epoch above the cycle's first |",
    "|---|---:|---:|---:|---:|---:|",
    *rows,
  ]


def _fit_markdown(groups) -> list[str]:
  """The `fit_stats` table: per group, mean over runs of training fit and dense validation accuracy, last quarter."""
  rows = []
  for s, rs in groups.items():
    fits = [fit_stats(r["history"]) for r in rs]
    m = {k: float(np.mean([f[k] for f in fits])) for k in ("train_loss", "train_accuracy", "val_accuracy", "gap")}
    rows.append(
      f"| {s} | {len(rs)} | {m['train_loss']:.4f} | {m['train_accuracy']:.4f} | {m['val_accuracy']:.4f} | "
      f"{m['gap']:+.4f} |"
    )
  return [
    "",
    "Fit over the last quarter of the epochs (mean over epochs, then over runs): training loss and accuracy as "
    "trained (at each epoch's keep, dropout active), dense validation accuracy after each epoch, and the gap "
    "between them. A regulariser that works holds the training fit back and raises validation accuracy.",
    "",
    "| schedule | runs | train loss | train acc | val acc | gap (train − val) |",
    "|---|---:|---:|---:|---:|---:|",
    *rows,
  ]


def _phase_markdown(groups) -> list[str]:
  """The `phase_stats` table for the groups whose runs trained both dense and sparse epochs in their last quarter."""
  rows = []
  for s, rs in groups.items():
    phases = [phase_stats(r["history"]) for r in rs]
    both = [p for p in phases if p["n_dense"] and p["n_sparse"]]
    if not both:
      continue
    diff = [p["dense"] - p["sparse"] for p in both]
    d, half, n = mean_interval(diff)
    last_dense = sum(r["history"][-1]["keep"] >= 1.0 for r in rs)
    rows.append(
      f"| {s} | {n} | {np.mean([p['dense'] for p in both]):.4f} | {np.mean([p['sparse'] for p in both]):.4f} | "
      + (f"{d:+.4f} ± {half:.4f}" if n > 1 else f"{d:+.4f}")
      + f" | {np.mean([p['n_dense'] for p in both]):.1f} / {np.mean([p['n_sparse'] for p in both]):.1f} | "
      f"{last_dense} of {len(rs)} |"
    )
  if not rows:
    return []
  return [
    "",
    "Evaluation timing: dense validation accuracy over the last quarter of the epochs, after epochs trained dense "
    "(keep 1) vs after epochs trained sparse (keep < 1); mean over runs that had both, the difference per run "
    "± its 95% t-interval half-width. The last column counts the runs whose final epoch (the one the headline "
    "test accuracy follows) trained dense.",
    "",
    "| schedule | runs | val after dense epochs | val after sparse epochs | difference | epochs per run "
    "(dense / sparse) | final epoch dense |",
    "|---|---:|---:|---:|---:|---:|---:|",
    *rows,
  ]


def plot_comparison(runs, outdir: str | Path) -> list[Path]:
  """accuracy.png (dense test accuracy vs epoch, mean over seeds per schedule), keep.png (first seed's keep
  trajectory per schedule, with the achieved density when recorded), keep_curve.png (mean test accuracy vs test-time
  keep), gap.png (generalisation gap: train − validation accuracy every epoch, train − test at tested epochs)."""
  outdir = Path(outdir)
  outdir.mkdir(parents=True, exist_ok=True)
  groups = _by_schedule(runs)
  paths = []

  fig = Figure(figsize=(10, 4))
  ax = fig.subplots()
  for i, (s, rs) in enumerate(groups.items()):
    n = min(len(r["history"]) for r in rs)
    epochs = [h["epoch"] for h in rs[0]["history"][:n] if h.get("test_accuracy") is not None]
    acc = np.mean([[h["test_accuracy"] for h in r["history"][:n] if h["epoch"] in epochs] for r in rs], axis=0)
    ax.plot(epochs, acc, label=f"{s} (n={len(rs)})", **_series_style(i, s))
  ax.set(xlabel="epoch", ylabel="dense test accuracy", title="Test accuracy (mean over seeds)")
  _legend_outside(ax)
  paths.append(_save(fig, outdir / "accuracy.png"))

  fig = Figure(figsize=(7, 1.2 + 1.0 * len(groups)))
  axes = np.atleast_1d(fig.subplots(len(groups), 1, sharex=True))
  for ax, (s, rs) in zip(axes, groups.items()):
    h = rs[0]["history"]
    keeps = [r["keep"] for r in h]
    ax.step([r["epoch"] - 1 for r in h] + [h[-1]["epoch"]], keeps + keeps[-1:], where="post", label="keep ratio")
    if all(r.get("density") for r in h):  # what the epoch really kept: ties at zero make high keeps no-ops
      density = [float(np.mean(list(r["density"].values()))) for r in h]
      ax.step(
        [r["epoch"] - 1 for r in h] + [h[-1]["epoch"]],
        density + density[-1:],
        where="post",
        ls="--",
        color="tab:orange",
        label="achieved density (mean over sites)",
      )
    ax.set(ylabel="keep", ylim=(0, 1.05))
    ax.set_title(s, fontsize=9, loc="left")
  axes[0].legend(fontsize=7, loc="upper right")
  axes[-1].set_xlabel("epochs completed")
  paths.append(_save(fig, outdir / "keep.png"))

  fig = Figure(figsize=(9, 4))
  ax = fig.subplots()
  for i, (s, rs) in enumerate(groups.items()):
    keeps = sorted({float(k) for r in rs for k in r["summary"]["keep_curve"]})
    acc = [mean_std([r["summary"]["keep_curve"][str(k)] for r in rs])[0] for k in keeps]
    ax.plot(keeps, acc, marker="o", label=s, **_series_style(i, s))
  ax.set(xscale="log", xlabel="test-time keep ratio", ylabel="test accuracy", title="Keep curve (mean over seeds)")
  _plain_log_ticks(ax, sorted({float(k) for r in runs for k in r["summary"]["keep_curve"]}))
  _legend_outside(ax)
  paths.append(_save(fig, outdir / "keep_curve.png"))

  fig = Figure(figsize=(15, 4))
  ax1, ax2 = fig.subplots(1, 2, sharey=True)
  for i, (s, rs) in enumerate(groups.items()):
    style = _series_style(i, s)
    n = min(len(r["history"]) for r in rs)
    if all(r["history"][e].get("val_accuracy") is not None for r in rs for e in range(n)):
      gap = np.mean([[h["train_accuracy"] - h["val_accuracy"] for h in r["history"][:n]] for r in rs], axis=0)
      ax1.plot([h["epoch"] for h in rs[0]["history"][:n]], gap, label=f"{s} (n={len(rs)})", **style)
    tested = [e for e in range(n) if all(r["history"][e].get("test_accuracy") is not None for r in rs)]
    gap = np.mean(
      [[r["history"][e]["train_accuracy"] - r["history"][e]["test_accuracy"] for e in tested] for r in rs], axis=0
    )
    ax2.plot([rs[0]["history"][e]["epoch"] for e in tested], gap, marker="o", label=s, **style)
  ax1.set(
    xlabel="epoch",
    ylabel="train accuracy − held-out accuracy",
    title="Generalisation gap: train − validation (every epoch)",
  )
  ax2.set(xlabel="epoch", title="train − dense test (tested epochs)")
  _legend_outside(ax2)
  paths.append(_save(fig, outdir / "gap.png"))

  priced = {s: rs for s, rs in groups.items() if all(r["summary"].get("keep_macs") for r in rs)}
  if priced:
    fig = Figure(figsize=(9, 4.5))
    ax = fig.subplots()
    for i, (s, rs) in enumerate(groups.items()):
      if s in priced:
        points = macs_curve(rs)
        ax.plot(
          [p["macs"] / 1e6 for p in points], [p["accuracy"] for p in points], marker="o", label=s, **_series_style(i, s)
        )
    ax.set(
      xscale="log",
      xlabel="effective MMACs per image (log)",
      ylabel="test accuracy",
      title="Accuracy against compute: each point a test-time keep (mean over seeds)",
    )
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    paths.append(_save(fig, outdir / "pareto.png"))
  return paths


def macs_curve(rs) -> list[dict]:
  """Per test-time keep shared by the runs `rs` (highest first): mean accuracy, density, effective MACs and MACs
  fraction over the runs (their summaries' "keep_macs")."""
  keeps = set.intersection(*(set(r["summary"]["keep_macs"]) for r in rs))
  return [
    {
      "keep": float(k),
      **{f: float(np.mean([r["summary"]["keep_macs"][k][f] for r in rs])) for f in _MACS_FIELDS},
    }
    for k in sorted(keeps, key=float, reverse=True)
  ]


_MACS_FIELDS = ("accuracy", "density", "macs", "macs_fraction")
