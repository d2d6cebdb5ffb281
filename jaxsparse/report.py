"""Run records -> summary, text tables and plots (matplotlib's object API: no global backend state)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from matplotlib.figure import Figure


def summarize(history: Sequence[Mapping], *, keep_curve: Mapping[float, float], device: str, data_source: str,
              config: Mapping) -> dict:
  """The summary.json of a run, from its per-epoch records and its final keep curve."""
  if not history:
    raise ValueError("no epochs recorded")
  last = history[-1]
  best = max(history, key=lambda r: r["test_accuracy"])
  return {
      "test_accuracy": keep_curve.get(1.0, last["test_accuracy"]),
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
  }


def format_summary(summary: Mapping) -> str:
  """Headline and keep-curve table, as printed at the end of a run."""
  lines = [f"test accuracy (dense, final): {summary['test_accuracy']:.4f}   best: "
           f"{summary['best_test_accuracy']:.4f} (epoch {summary['best_epoch']})   cycles: {summary['cycles']}"
           f"   wall: {summary['wall_time_s'] / 60:.1f} min on {summary['device']}",
           "", "| keep | test accuracy |", "|---:|---:|"]
  lines += [f"| {float(k):.2f} | {v:.4f} |" for k, v in summary["keep_curve"].items()]
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
  ax.step(epochs, [r["keep"] for r in history], where="post", label="keep ratio")
  for i, e in enumerate(resets):
    ax.axvline(e, color="tab:red", alpha=0.3, lw=1, label="reset" if i == 0 else None)
  ax.set(xlabel="epoch", ylabel="keep ratio", ylim=(0, 1.05), title="Keep-ratio trajectory")
  ax.legend(loc="lower left")
  paths.append(_save(fig, outdir / "keep.png"))

  fig = Figure(figsize=(7, 3.5))
  ax = fig.subplots()
  ax.plot(epochs, [r["train_accuracy"] for r in history], label="train (at epoch keep)")
  if any(r.get("val_accuracy") is not None for r in history):
    ax.plot(epochs, [r.get("val_accuracy") for r in history], label="val (dense)")
  ax.plot(epochs, [r["test_accuracy"] for r in history], label="test (dense)")
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
  paths.append(_save(fig, outdir / "keep_curve.png"))
  return paths


def _save(fig: Figure, path: Path) -> Path:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path
