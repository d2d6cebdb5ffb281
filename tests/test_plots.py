"""plots: the figures of one run and of groups of runs show their data; comparison series are told apart."""

import pytest

from conftest import assert_plausible_png, plotted_lines, vertical_lines
from jaxsparse import plots


def test_plot_run_draws_the_history_and_the_keep_curve(tmp_path, figures):
  history = [
    {"epoch": e, "keep": k, "reset_after": e == 2, "train_accuracy": 0.1 * e, "val_accuracy": 0.1 * e - 0.05}
    | ({"test_accuracy": 0.1 * e - 0.08} if e % 2 == 0 else {})
    for e, k in enumerate([1.0, 0.3, 1.0, 0.5], 1)
  ]
  paths = plots.plot_run(history, {1.0: 0.3, 0.3: 0.25, 0.05: 0.1}, tmp_path / "plots")
  assert [p.name for p in paths] == ["keep.png", "accuracy.png", "keep_curve.png"]
  assert list(figures) == ["keep.png", "accuracy.png", "keep_curve.png"]

  # Keep: epoch e trains from boundary e-1 to e (a step plot, the last value repeated); the reset after epoch 2.
  keep = figures["keep.png"]
  assert plotted_lines(keep)["keep ratio"] == ([0, 1, 2, 3, 4], [1.0, 0.3, 1.0, 0.5, 0.5])
  assert vertical_lines(keep) == [2]
  accuracy = plotted_lines(figures["accuracy.png"])
  assert accuracy["train (at epoch keep)"] == ([1, 2, 3, 4], pytest.approx([0.1, 0.2, 0.3, 0.4]))
  assert accuracy["val (dense)"] == ([1, 2, 3, 4], pytest.approx([0.05, 0.15, 0.25, 0.35]))
  assert accuracy["test (dense)"] == ([2, 4], pytest.approx([0.12, 0.32]))  # tested epochs only
  assert vertical_lines(figures["accuracy.png"]) == [2]
  (curve,) = plotted_lines(figures["keep_curve.png"]).values()
  assert curve == ([0.05, 0.3, 1.0], [0.1, 0.25, 0.3])  # sorted by keep
  assert figures["keep_curve.png"].axes[0].get_xscale() == "log"

  for path, size in zip(paths, [(7, 3), (7, 3.5), (5, 3.5)]):
    assert_plausible_png(path, *size)


def test_comparison_series_have_distinct_colours_and_a_line_style_per_approach():
  assert len({plots.series_style(i, "joint")["color"] for i in range(20)}) == 20
  assert plots.series_style(0, "baseline") == {"color": "black", "ls": "-"}
  assert plots.series_style(1, "baseline", dropout=0.3) == {"color": "dimgray", "ls": "--"}
  assert plots.series_style(2, "per-keep", dropout=0.3)["ls"] == "--"
  assert plots.series_style(3, "fine-tuned")["ls"] == ":"
  assert plots.series_style(4, "joint+dropout", dropout=0.3)["ls"] == "-."


def test_epoch_axes_get_whole_number_ticks(tmp_path):
  from matplotlib.figure import Figure

  from jaxsparse.plots import _save

  fig = Figure()
  epochs, keep = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
  for ax, label in ((epochs, "epochs completed"), (keep, "keep")):
    ax.plot([1, 2, 3], [0.2, 0.5, 0.4])
    ax.set_xlabel(label)
  _save(fig, tmp_path / "f.png")
  ticks = [t for t in epochs.get_xticks() if 1 <= t <= 3]
  assert ticks == [1, 2, 3]
  assert any(t != int(t) for t in keep.get_xticks())  # other axes keep matplotlib's default ticks
