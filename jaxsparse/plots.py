"""Figures of one run and of groups of runs, as PNG files (matplotlib's object API: no global backend state)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullLocator

_COLORS = colormaps["tab20"].colors
# Line style per kind of approach (`jaxsparse.report.approach`): joint training solid, a network per keep dashed,
# fine-tuned dotted; with dropout, joint and per-keep runs are dash-dotted. Baselines are black or grey.
_APPROACH_STYLE = {"joint": "-", "per-keep": "--", "fine-tuned": ":", "joint+dropout": "-."}


def plot_run(history: Sequence[Mapping], keep_curve: Mapping[float, float], outdir: str | Path) -> list[Path]:
  """Writes keep.png (keep trajectory, resets marked), accuracy.png and keep_curve.png into `outdir`."""
  outdir = Path(outdir)
  outdir.mkdir(parents=True, exist_ok=True)
  epochs = [r["epoch"] for r in history]
  resets = [r["epoch"] for r in history if r.get("reset_after")]
  paths = []

  fig, ax = _axes(7, 3)
  _step(ax, history, [r["keep"] for r in history], label="keep ratio")
  for i, e in enumerate(resets):
    ax.axvline(e, color="tab:red", alpha=0.3, lw=1, label="reset" if i == 0 else None)
  ax.set(xlabel="epochs completed", ylabel="keep ratio", ylim=(0, 1.05), title="Keep-ratio trajectory")
  ax.legend(loc="lower left")
  paths.append(_save(fig, outdir / "keep.png"))

  fig, ax = _axes(7, 3.5)
  ax.plot(epochs, [r["train_accuracy"] for r in history], label="train (at epoch keep)")
  if any(r.get("val_accuracy") is not None for r in history):
    ax.plot(epochs, [r.get("val_accuracy") for r in history], label="val (dense)")
  tested = [r for r in history if r.get("test_accuracy") is not None]
  marker = "." if len(tested) < len(history) else None
  ax.plot([r["epoch"] for r in tested], [r["test_accuracy"] for r in tested], marker=marker, label="test (dense)")
  for e in resets:
    ax.axvline(e, color="tab:red", alpha=0.2, lw=1)
  ax.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
  ax.legend(loc="lower right")
  paths.append(_save(fig, outdir / "accuracy.png"))

  fig, ax = _axes(5, 3.5)
  keeps = sorted(keep_curve)
  ax.plot(keeps, [keep_curve[k] for k in keeps], marker="o")
  _keep_axis(ax, keeps, "Keep curve")
  paths.append(_save(fig, outdir / "keep_curve.png"))
  return paths


def plot_groups(groups: Mapping[str, Sequence], outdir: str | Path) -> list[Path]:
  """Writes the figures of groups of runs ({label: `jaxsparse.report.Run`s}), one series per group styled by its kind
  of approach (`series_style`), into `outdir`: accuracy.png (dense test accuracy vs epoch, mean over runs), keep.png
  (the first run's keep trajectory, with the achieved density when recorded), keep_curve.png (mean test accuracy vs
  test-time keep), gap.png (train − validation accuracy every epoch, train − test at tested epochs) and, when every
  run of a group records its effective MACs, pareto.png."""
  outdir = Path(outdir)
  outdir.mkdir(parents=True, exist_ok=True)
  styles = {
    s: series_style(i, rs[0].approach, rs[0].config.get("dropout", 0.0)) for i, (s, rs) in enumerate(groups.items())
  }
  paths = []

  fig, ax = _axes(10, 4)
  for s, rs in groups.items():  # the epochs every run of the group was tested at (cadences and records may differ)
    tested = [{h["epoch"]: h["test_accuracy"] for h in r.history if h.get("test_accuracy") is not None} for r in rs]
    epochs = sorted(set.intersection(*(set(t) for t in tested)))
    acc = [np.mean([t[e] for t in tested]) for e in epochs]
    ax.plot(epochs, acc, label=f"{s} (n={len(rs)})", **styles[s])
  ax.set(xlabel="epoch", ylabel="dense test accuracy", title="Test accuracy (mean over seeds)")
  _legend_outside(ax)
  paths.append(_save(fig, outdir / "accuracy.png"))

  fig, axes = _axes(7, 1.2 + 1.0 * len(groups), len(groups), 1, sharex=True)
  axes = np.atleast_1d(axes)
  for ax, (s, rs) in zip(axes, groups.items()):
    h = rs[0].history
    _step(ax, h, [r["keep"] for r in h], label="keep ratio")
    if all(r.get("density") for r in h):  # what the epoch really kept: ties at zero make high keeps no-ops
      density = [float(np.mean(list(r["density"].values()))) for r in h]
      _step(ax, h, density, ls="--", color="tab:orange", label="achieved density (mean over sites)")
    ax.set(ylabel="keep", ylim=(0, 1.05))
    ax.set_title(s, fontsize=9, loc="left")
  axes[0].legend(fontsize=7, loc="upper right")
  axes[-1].set_xlabel("epochs completed")
  paths.append(_save(fig, outdir / "keep.png"))

  fig, ax = _axes(9, 4)
  for s, rs in groups.items():
    keeps = sorted({k for r in rs for k in r.keep_curve})
    acc = [np.mean([r.keep_curve[k] for r in rs]) for k in keeps]
    ax.plot(keeps, acc, marker="o", label=s, **styles[s])
  all_keeps = {k for rs in groups.values() for r in rs for k in r.keep_curve}
  _keep_axis(ax, sorted(all_keeps), "Keep curve (mean over seeds)")
  _legend_outside(ax)
  paths.append(_save(fig, outdir / "keep_curve.png"))

  fig, (ax1, ax2) = _axes(15, 4, 1, 2, sharey=True)
  for s, rs in groups.items():
    n = min(len(r.history) for r in rs)
    if all(r.history[e].get("val_accuracy") is not None for r in rs for e in range(n)):
      gap = np.mean([[h["train_accuracy"] - h["val_accuracy"] for h in r.history[:n]] for r in rs], axis=0)
      ax1.plot([h["epoch"] for h in rs[0].history[:n]], gap, label=f"{s} (n={len(rs)})", **styles[s])
    tested = [e for e in range(n) if all(r.history[e].get("test_accuracy") is not None for r in rs)]
    gap = np.mean(
      [[r.history[e]["train_accuracy"] - r.history[e]["test_accuracy"] for e in tested] for r in rs], axis=0
    )
    ax2.plot([rs[0].history[e]["epoch"] for e in tested], gap, marker="o", label=s, **styles[s])
  ax1.set(xlabel="epoch", ylabel="train accuracy − held-out accuracy")
  ax1.set_title("Generalisation gap: train − validation (every epoch)")
  ax2.set(xlabel="epoch", title="train − dense test (tested epochs)")
  _legend_outside(ax2)
  paths.append(_save(fig, outdir / "gap.png"))

  series = frontier_series({s: rs for s, rs in groups.items() if all(r.keep_macs for r in rs)})
  if series:
    fig, ax = _axes(9, 4.5)
    for s, points in series.items():
      style = styles.get(s) or _COMPOSITE_STYLE[s]
      ax.plot([p["macs"] / 1e6 for p in points], [p["accuracy"] for p in points], marker="o", label=s, **style)
    _plain_log_x(ax, LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.set(xlabel="effective MMACs per image (log)", ylabel="test accuracy")
    ax.set_title("Accuracy against compute: each point a test-time keep (mean over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    paths.append(_save(fig, outdir / "pareto.png"))
  return paths


PER_KEEP, FINE_TUNED = (
  "a network trained per keep, at its keep",
  "dense + fine-tune per keep (best recipe), at its keep",
)
_COMPOSITE_STYLE = {PER_KEEP: {"color": "tab:red", "ls": "--"}, FINE_TUNED: {"color": "tab:purple", "ls": ":"}}


def frontier_series(groups: Mapping[str, Sequence]) -> dict[str, list[dict]]:
  """The series of pareto.png from groups of priced runs ({label: `jaxsparse.report.Run`s}), as `macs_curve`
  points: each joint or baseline group's whole curve, and two composites, `PER_KEEP` (each per-keep network at the
  keep it was trained at) and `FINE_TUNED` (at each keep, the fine-tune recipe with the best mean accuracy there)."""
  series, own = {}, {PER_KEEP: {}, FINE_TUNED: {}}
  for s, rs in groups.items():
    points, kind = macs_curve(rs), rs[0].approach
    if kind not in ("per-keep", "fine-tuned"):
      series[s] = points
      continue
    best, keep = own[PER_KEEP if kind == "per-keep" else FINE_TUNED], rs[0].config["controller_options"]["keep"]
    for p in points:
      if p["keep"] == keep and p["accuracy"] > best.get(keep, {"accuracy": -1.0})["accuracy"]:
        best[keep] = p
  series.update({name: [p for _, p in sorted(best.items(), reverse=True)] for name, best in own.items() if best})
  return series


def macs_curve(rs: Sequence) -> list[dict]:
  """Per test-time keep that all runs `rs` (`jaxsparse.report.Run`s) priced (highest first): the keep and the means
  over the runs of its `keep_macs` fields (accuracy, density, effective MACs and MACs fraction)."""
  keeps = sorted(set.intersection(*(set(r.keep_macs) for r in rs)), reverse=True)
  at = lambda k: [r.keep_macs[k] for r in rs]
  return [{"keep": k, **{f: float(np.mean([x[f] for x in at(k)])) for f in at(k)[0]}} for k in keeps]


def series_style(i: int, kind: str, dropout: float = 0.0) -> dict:
  """Colour and line style of the i-th series of a comparison plot, whose group is of the `kind` of approach and
  trains with `dropout`: twenty distinct colours (tab20, strong shades first), black for the dense baseline and grey
  for it with dropout, the line style by kind."""
  if kind == "baseline":
    return {"color": "dimgray", "ls": "--"} if dropout > 0 else {"color": "black", "ls": "-"}
  return {"color": _COLORS[(2 * i) % 20 + (2 * i // 20) % 2], "ls": _APPROACH_STYLE[kind]}


def _axes(width: float, height: float, *grid, **kwargs):
  fig = Figure(figsize=(width, height))
  return fig, fig.subplots(*grid, **kwargs)


def _step(ax, history: Sequence[Mapping], values: Sequence[float], **kwargs) -> None:
  """`values` per epoch as steps: epoch e trains from boundary e-1 to e (a reset sits on the boundary after it)."""
  edges = [r["epoch"] - 1 for r in history] + [history[-1]["epoch"]]
  ax.step(edges, list(values) + [values[-1]], where="post", **kwargs)


def _plain_log_x(ax, locator) -> None:
  """A log x axis with ticks labelled like 0.05 (not 5×10⁻², which needs mathtext and its fonts)."""
  ax.set_xscale("log")
  ax.xaxis.set_major_locator(locator)
  ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
  ax.xaxis.set_minor_locator(NullLocator())


def _keep_axis(ax, keeps: Sequence[float], title: str) -> None:
  _plain_log_x(ax, FixedLocator(list(keeps)))
  ax.set(xlabel="test-time keep ratio", ylabel="test accuracy", title=title)


def _legend_outside(ax) -> None:
  """A legend to the right of the axes, where it cannot cover the curves of a many-group comparison."""
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _save(fig: Figure, path: Path) -> Path:
  """Writes `fig`; epoch axes get whole-number ticks (a 3-epoch run is not ticked at 1.25, 1.5, ...)."""
  for ax in fig.axes:
    if "epoch" in ax.get_xlabel():
      ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight" keeps a legend placed outside the axes
  return path
