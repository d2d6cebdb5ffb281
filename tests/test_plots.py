"""plots: the figures of one run and of groups of runs are written; comparison series are told apart."""

from jaxsparse import plots


def test_plot_run_writes_its_three_figures(tmp_path):
  history = [
    {"epoch": e, "keep": k, "reset_after": e == 2, "train_accuracy": 0.1 * e, "val_accuracy": 0.1 * e - 0.05}
    | ({"test_accuracy": 0.1 * e - 0.08} if e % 2 == 0 else {})
    for e, k in enumerate([1.0, 0.3, 1.0, 0.5], 1)
  ]
  paths = plots.plot_run(history, {1.0: 0.3, 0.3: 0.25, 0.05: 0.1}, tmp_path / "plots")
  assert [p.name for p in paths] == ["keep.png", "accuracy.png", "keep_curve.png"]
  assert all(p.stat().st_size > 1000 for p in paths)


def test_comparison_series_have_distinct_colours_and_a_line_style_per_approach():
  assert len({plots.series_style(i, "joint", "adaptive_b")["color"] for i in range(20)}) == 20
  assert plots.series_style(0, "baseline", "dense") == {"color": "black", "ls": "-"}
  assert plots.series_style(1, "baseline", "dense+dropout0.3") == {"color": "dimgray", "ls": "--"}
  assert plots.series_style(2, "per-keep", "constant(keep=0.1)")["ls"] == "--"
  assert plots.series_style(3, "fine-tuned", "constant(keep=0.1)+finetuned")["ls"] == ":"
  assert plots.series_style(4, "joint+dropout", "adaptive_b+dropout0.3")["ls"] == "-."


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
