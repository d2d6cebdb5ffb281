import dataclasses
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import assert_plausible_png, plotted_lines
from jaxsparse import plots, report


def _fake_run(root, schedule, seed, final, keeps=(1.0, 0.5), config=None, provenance=None):
  d = root / f"{schedule}_s{seed}"
  d.mkdir()
  if config is not None:
    (d / "config.json").write_text(json.dumps({"schedule": schedule, "seed": seed, **config}))
  history = [
    {
      "epoch": e,
      "step": 10 * e,
      "keep": 1.0 if e % 2 else 0.5,
      "cycle": e // 2,
      "reset_after": e % 2 == 0,
      "train_loss": 0.1 * e,
      "train_accuracy": 0.5,
      "val_accuracy": 0.4,
      "test_accuracy": final - 0.01 * (2 - e),
      "wall_time_s": 60.0 * e,
      "density": {"a/act1": 0.4, "final_act": 0.3},
    }
    for e in (1, 2)
  ]
  (d / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
  summary = report.summarize(
    history,
    keep_curve={k: final * k for k in keeps},
    device="cpu",
    data_source="fake",
    config={"schedule": schedule, "seed": seed, "model": "m"},
  )
  if provenance is not None:
    summary["provenance"] = provenance
  (d / "summary.json").write_text(json.dumps(summary))
  return d


def test_summarize_picks_final_dense_and_best():
  history = [
    {
      "epoch": 1,
      "step": 5,
      "cycle": 0,
      "reset_after": True,
      "train_accuracy": 0.3,
      "test_accuracy": 0.6,
      "wall_time_s": 1.0,
    },
    {
      "epoch": 2,
      "step": 10,
      "cycle": 1,
      "reset_after": False,
      "train_accuracy": 0.4,
      "test_accuracy": 0.5,
      "wall_time_s": 2.0,
    },
  ]
  s = report.summarize(history, keep_curve={1.0: 0.55, 0.3: 0.4}, device="d", data_source="x", config={})
  assert (s["test_accuracy"], s["best_test_accuracy"], s["best_epoch"], s["cycles"]) == (0.55, 0.6, 1, 1)
  assert list(s["keep_curve"]) == ["1.0", "0.3"]
  assert "| 0.30 | 0.4000 |" in report.format_summary(s)


def test_paired_difference_matches_hand_computation():
  d, half, n = report.paired_difference({0: 0.80, 1: 0.82, 2: 0.84}, {0: 0.79, 1: 0.80, 2: 0.80})
  diffs = np.array([0.01, 0.02, 0.04])
  assert n == 3 and d == pytest.approx(diffs.mean())
  assert half == pytest.approx(4.302653 * diffs.std(ddof=1) / math.sqrt(3), rel=1e-5)
  assert math.isnan(report.paired_difference({0: 1.0}, {0: 0.5})[1])


def test_comparison_table_and_figures(tmp_path, figures):
  dirs = [
    _fake_run(tmp_path, s, seed, acc)
    for s, seed, acc in [("dense", 0, 0.80), ("dense", 1, 0.82), ("adaptive_b", 0, 0.83), ("adaptive_b", 1, 0.83)]
  ]
  runs = report.load_runs(dirs)
  # Read once into float keys; the summary.json on disk keeps its string keys.
  assert (runs[0].path, runs[0].label, runs[0].approach) == (str(dirs[0]), "dense", "baseline")
  assert runs[0].keep_curve == {1.0: 0.80, 0.5: 0.40} and runs[0].keep_macs == {}
  assert "keep_curve" not in runs[0].summary and runs[0].summary["test_accuracy"] == 0.80
  assert json.loads((dirs[0] / "summary.json").read_text())["keep_curve"] == {"1.0": 0.80, "0.5": 0.40}
  md = report.comparison_markdown(runs, title="T", baseline="dense")
  assert "| dense | 2 | 0.8100 ± 0.0141 |" in md
  assert "| adaptive_b | 2 | 0.8300 ± 0.0000 |" in md and "+0.0200 ±" in md
  paths = report.plot_comparison(runs, tmp_path / "out")
  assert [p.name for p in paths] == ["accuracy.png", "keep.png", "keep_curve.png", "gap.png"]
  # Each group's mean over seeds: dense (0.80, 0.82) and adaptive_b (0.83, 0.83) end their runs; epoch 1 is 0.01 lower.
  accuracy = plotted_lines(figures["accuracy.png"])
  assert accuracy == {
    "dense (n=2)": ([1, 2], pytest.approx([0.80, 0.81])),
    "adaptive_b (n=2)": ([1, 2], pytest.approx([0.82, 0.83])),
  }
  curve = plotted_lines(figures["keep_curve.png"])
  assert curve == {
    "dense": ([0.5, 1.0], pytest.approx([0.405, 0.81])),
    "adaptive_b": ([0.5, 1.0], pytest.approx([0.415, 0.83])),
  }
  assert_plausible_png(tmp_path / "out" / "keep_curve.png", 9, 4, series_colour=None)
  with pytest.raises(FileNotFoundError, match="not a finished run"):
    report.load_runs([tmp_path / "out"])


def test_variants_of_one_schedule_are_grouped_apart(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  dirs = [
    _fake_run(tmp_path / "a", "dense", 0, 0.80, config={"dropout": 0.0}),
    _fake_run(tmp_path / "b", "dense", 0, 0.78, config={"dropout": 0.3}),
    _fake_run(tmp_path, "cyclic", 0, 0.81, config={"controller_options": {"period": 5, "cycles": 3}}),
  ]
  runs = report.load_runs(dirs)
  assert [r.label for r in runs] == ["dense", "dense+dropout0.3", "cyclic(cycles=3,period=5)"]
  assert [r.approach for r in runs] == ["baseline", "baseline", "joint"]
  md = report.comparison_markdown(runs, title="T", baseline="dense")
  assert "| dense+dropout0.3 | 1 | 0.7800 ± 0.0000 | 0.7800 ± 0.0000 | -0.0200 (n=1) |" in md
  assert "| cyclic(cycles=3,period=5) | 1 | 0.8100" in md
  assert (
    report.run_label(
      {
        "schedule": "adaptive_b",
        "topk_gradient": "straight_through",
        "norm": "rmsnorm",
        "controller_options": {"min_keep": 0.3},
      }
    )
    == "adaptive_b(min_keep=0.3)+topk_gradient=straight_through"
  )
  assert report.run_label({"schedule": "cyclic", "reset_warmup_steps": 13}) == "cyclic+reset_warmup_steps=13"


def test_compare_cli_writes_the_table_and_skips_unfinished_runs_only_with_partial(tmp_path, capsys):
  from conftest import experiment

  compare = experiment("compare")
  dirs = [str(_fake_run(tmp_path, s, seed, acc)) for s, seed, acc in [("dense", 0, 0.80), ("adaptive_b", 0, 0.83)]]
  running = tmp_path / "cyclic_s0"
  running.mkdir()
  assert compare.main([*dirs, str(running), "--out", str(tmp_path / "out")]) == 1
  assert "not a finished run" in capsys.readouterr().err
  assert compare.main([*dirs, str(running), "--out", str(tmp_path / "out"), "--partial"]) == 0
  text = (tmp_path / "out" / "results.md").read_text()
  assert "| adaptive_b | 1 | 0.8300" in text and f"left out: `{running}`" in text
  assert (tmp_path / "out" / "accuracy.png").exists()


def _provenance(
  model="AMD EPYC 9R14 96-Core Processor",
  commit="a63eee8851026053e8f910bead15d82a8c9c0894",
  dirty=False,
  extensions=("avx2", "avx512f", "avx512_bf16"),
  devices=None,
):
  return {
    "cpu": {"model": model, "vector_extensions": list(extensions), "count": 2, "affinity": "0-1", "usable": 2},
    "devices": devices or [{"platform": "cpu", "kind": "cpu", "count": 1}],
    "driver": None,
    "git": {"commit": commit, "dirty": dirty},
  }


def test_one_machine_is_named_under_each_table_without_a_warning(tmp_path):
  dirs = [
    _fake_run(tmp_path, s, seed, acc, provenance=_provenance())
    for s, seed, acc in [("dense", 0, 0.80), ("dense", 1, 0.82), ("adaptive_b", 0, 0.83)]
  ]
  md = report.comparison_markdown(report.load_runs(dirs), title="T")
  line = "Machine: AMD EPYC 9R14 96-Core Processor (AVX-512+bf16), commit a63eee8 (all 3 runs)."
  assert md.count(line) == 2 and "Warning" not in md
  assert "| dense | 0 | 0.8000 | 0.8000 | `" + str(dirs[0]) + "` |\n" in md  # no machine column


def test_runs_without_provenance_are_an_unrecorded_machine(tmp_path):
  dirs = [_fake_run(tmp_path, "dense", seed, 0.8) for seed in (0, 1)]
  md = report.comparison_markdown(report.load_runs(dirs), title="T")
  assert "Machine: unrecorded machine (all 2 runs)." in md and "Warning" not in md


def test_mixed_machines_and_commits_are_warned_about_in_the_table(tmp_path):
  dirs = [
    _fake_run(tmp_path, "dense", 0, 0.80, provenance=_provenance()),
    _fake_run(
      tmp_path, "dense", 1, 0.82, provenance=_provenance(model="Intel(R) Xeon(R) Processor", extensions=("avx2",))
    ),
    _fake_run(tmp_path, "adaptive_b", 0, 0.83, provenance=_provenance(commit="adf61eb" + "0" * 33, dirty=True)),
    _fake_run(tmp_path, "adaptive_b", 1, 0.81),
  ]
  md = report.comparison_markdown(report.load_runs(dirs), title="T")
  warning = next(line for line in md.splitlines() if line.startswith("**Warning"))
  assert md.index(warning) < md.index("| schedule |")  # above the tables, where it is seen first
  assert (
    "2 kinds of hardware (AMD EPYC 9R14 96-Core Processor (AVX-512+bf16); Intel(R) Xeon(R) Processor (AVX2))" in warning
  )
  assert "2 commits (a63eee8, adf61eb+dirty)" in warning and "1 of 4 runs that do not record their machine" in warning
  machines = (
    "Machines: M1 AMD EPYC 9R14 96-Core Processor (AVX-512+bf16), commit a63eee8 (1 run); "
    "M2 AMD EPYC 9R14 96-Core Processor (AVX-512+bf16), commit adf61eb+dirty (1 run); "
    "M3 Intel(R) Xeon(R) Processor (AVX2), commit a63eee8 (1 run); M4 unrecorded machine (1 run)."
  )
  assert md.count(machines) == 2
  assert "| schedule | seed | final | best | run | machine |" in md
  assert f"| dense | 1 | 0.8200 | 0.8200 | `{dirs[1]}` | M3 |" in md
  assert f"| adaptive_b | 1 | 0.8100 | 0.8100 | `{dirs[3]}` | M4 |" in md


def test_only_a_commit_difference_is_warned_about_too(tmp_path):
  runs = report.load_runs(
    [_fake_run(tmp_path, "dense", s, 0.8, provenance=_provenance(commit=c * 40)) for s, c in enumerate("ab")]
  )
  assert "2 commits (aaaaaaa, bbbbbbb)" in report.mixed_machines_warning(runs)
  assert "hardware" not in report.mixed_machines_warning(runs)
  assert report.mixed_machines_warning(runs[:1]) is None


def test_sparsity_stats_count_only_epochs_where_the_keep_cut():
  history = [
    {"keep": 1.0, "density": {"a": 0.45, "b": 0.40}},
    {"keep": 0.7, "density": {"a": 0.45, "b": 0.40}},  # above both natural densities: no cut
    {"keep": 0.42, "density": {"a": 0.4219, "b": 0.40}},  # cuts site a only
    {"keep": 0.1, "density": {"a": 0.1016, "b": 0.1016}},
  ]  # cuts both
  st = report.sparsity_stats(history)
  assert st["keep_below_1"] == 3 and st["bit"] == pytest.approx(1.5)
  assert st["mean_density"] == pytest.approx(np.mean([0.425, 0.425, 0.41095, 0.1016]))
  assert report.sparsity_stats(history, {"topk_keep": "relative"})["bit"] == 3  # every keep < 1 cuts
  assert math.isnan(report.sparsity_stats([{"keep": 0.5}])["mean_density"])


def test_several_baselines_and_method_variants_are_labelled_apart(tmp_path):
  for sub in ("a", "b", "c", "d"):
    (tmp_path / sub).mkdir()
  dirs = [_fake_run(tmp_path / "a", "dense", s, 0.80 + 0.01 * s) for s in (0, 1)]
  dirs += [_fake_run(tmp_path / "b", "dense", s, 0.79 + 0.02 * s, config={"dropout": 0.3}) for s in (0, 1)]
  dirs += [
    _fake_run(
      tmp_path / "c", "constant", s, 0.82, config={"regimes": 3, "distill": True, "controller_options": {"keep": 0.1}}
    )
    for s in (0, 1)
  ]
  dirs += [_fake_run(tmp_path / "d", "adaptive_b", 0, 0.81, config={"topk_keep": "relative"})]
  runs = report.load_runs(dirs)
  assert sorted({r.label for r in runs}) == [
    "adaptive_b+topk_keep=relative",
    "constant(keep=0.1)+regimes=3+distill",
    "dense",
    "dense+dropout0.3",
  ]
  md = report.comparison_markdown(runs, title="T", baseline=["dense", "dense+dropout0.3"])
  assert "| Δ final vs dense | Δ final vs dense+dropout0.3 | sparse epochs (cut) |" in md
  assert "for topk_keep=relative runs keep k is a fraction" in md
  assert "topk_keep=relative runs" not in report.comparison_markdown(runs[:-1], title="T", baseline="dense")
  row = next(line for line in md.splitlines() if line.startswith("| constant(keep=0.1)+regimes=3+distill | 2 |"))
  # vs dense: 0.82 - (0.80, 0.81) = (0.02, 0.01); vs dropout: 0.82 - (0.79, 0.81) = (0.03, 0.01)
  assert "| +0.0150 ± 0.0635 (n=2) | +0.0200 ± 0.1271 (n=2) |" in row
  assert "| 1.0 (" in row  # one of its two fake epochs has keep 0.5
  paths = report.plot_comparison(runs, tmp_path / "out")
  assert (tmp_path / "out" / "gap.png") in paths and (tmp_path / "out" / "gap.png").stat().st_size > 1000


def test_phase_stats_split_the_last_quarter_by_the_keep_just_trained():
  keeps = [1.0, 0.5, 0.2, 1.0, 0.5, 1.0, 0.3, 0.1]  # last quarter: epochs 7 and 8, both sparse
  history = [{"keep": k, "val_accuracy": 0.1 * e} for e, k in enumerate(keeps, 1)]
  quarter = report.phase_stats(history)
  assert math.isnan(quarter["dense"]) and quarter["sparse"] == pytest.approx(0.75)
  assert (quarter["n_dense"], quarter["n_sparse"]) == (0, 2)
  half = report.phase_stats(history, tail=0.5)  # epochs 5-8: 0.5 | 1.0 | 0.3 | 0.1
  assert half["dense"] == pytest.approx(0.6) and half["sparse"] == pytest.approx((0.5 + 0.7 + 0.8) / 3)
  assert (half["n_dense"], half["n_sparse"]) == (1, 3)
  history[5]["val_accuracy"] = None  # an epoch without validation is skipped
  assert report.phase_stats(history, tail=0.5)["n_dense"] == 0
  with pytest.raises(ValueError, match="tail must be in"):
    report.phase_stats(history, tail=0)


def test_the_evaluation_timing_table_lists_only_schedules_that_trained_both_ways(tmp_path):
  dirs = [_fake_run(tmp_path, "dense", 0, 0.80)]
  for seed, (after_dense, after_sparse) in enumerate([(0.50, 0.47), (0.52, 0.48)]):
    d = _fake_run(tmp_path, "cyclic", seed, 0.80)
    keeps = [1.0, 0.5, 1.0, 0.5, 1.0, 0.5, 1.0, 0.5]  # last quarter: epoch 7 dense, epoch 8 sparse
    history = [
      {
        "epoch": e,
        "keep": k,
        "train_loss": 0.3,
        "train_accuracy": 0.9,
        "val_accuracy": after_dense if k == 1.0 else after_sparse,
        "test_accuracy": None,
      }
      for e, k in enumerate(keeps, 1)
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    dirs.append(d)
  md = report.comparison_markdown(report.load_runs(dirs), title="T")
  assert "Evaluation timing" in md
  # differences per run 0.03 and 0.04: mean 0.035, t(0.975, 1) * std / sqrt(2) = 12.706 * 0.00707 / 1.414
  assert "| cyclic | 2 | 0.5100 | 0.4750 | +0.0350 ± 0.0635 | 1.0 / 1.0 | 0 of 2 |" in md
  assert "| dense | " not in md.split("Evaluation timing")[1]


def test_a_group_that_mixes_settings_is_warned_about(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  dirs = [
    _fake_run(tmp_path / "a", "dense", 0, 0.80, config={"epochs": 40, "data": "/x/cifar10.tar.gz", "cache_dir": "/c"}),
    _fake_run(tmp_path / "b", "dense", 1, 0.82, config={"epochs": 80, "data": "/y/cifar10.tar.gz", "cache_dir": None}),
    _fake_run(tmp_path, "adaptive_b", 0, 0.83, config={"epochs": 40, "eval_keeps": [1.0, 0.5]}),
    _fake_run(tmp_path, "adaptive_b", 1, 0.81, config={"epochs": 40, "eval_keeps": [1.0, 0.1]}),
  ]
  runs = report.load_runs(dirs)
  warning = report.mixed_settings_warning(runs)
  assert warning == (
    "**Warning: runs grouped as one variant differ in their settings: `adaptive_b`: eval_keeps ([1.0, 0.5], "
    "[1.0, 0.1]); `dense`: epochs (40, 80). Each row averages them as if they were seeds of one configuration; "
    "compare such runs in separate tables.**"
  )
  md = report.comparison_markdown(runs, title="T")
  assert md.index(warning) < md.index("| schedule |")
  # Seeds, bookkeeping and one data copy at two paths are not settings; a config.json that lacks a field skips it.
  uniform = dataclasses.replace(runs[1], config={**runs[1].config, "epochs": 40})
  lacking = dataclasses.replace(runs[3], config={"schedule": "adaptive_b"})
  assert report.mixed_settings_warning(runs[:1] + [uniform]) is None
  assert report.mixed_settings_warning(runs[2:3] + [lacking]) is None
  assert "Warning" not in report.comparison_markdown(runs[:1], title="T")
  # Fine-tunes of each seed's own dense run are one setting; of another kind of run, another.
  tuned = lambda r, source: dataclasses.replace(r, config={**uniform.config, "init_from": source})  # noqa: E731
  a, b, c = tuned(runs[0], "/m0/dense_s0"), tuned(runs[1], "runs/dense_s1"), tuned(runs[1], "runs/dropout_s1")
  assert report.mixed_settings_warning([a, b]) is None
  assert 'init_from ("dense", "dropout")' in report.mixed_settings_warning([a, c])


def test_fit_stats_average_the_last_quarter_as_trained():
  history = [
    {"keep": k, "train_loss": loss, "train_accuracy": acc, "val_accuracy": val}
    for k, loss, acc, val in [
      (1.0, 2.0, 0.2, 0.2),  # outside the last quarter of 8 epochs
      (1.0, 1.0, 0.4, 0.3),
      (1.0, 0.5, 0.6, 0.35),
      (0.5, 0.4, 0.7, 0.38),
      (0.1, 0.6, 0.6, 0.36),
      (1.0, 0.1, 0.9, 0.40),
      (0.5, 0.2, 0.8, 0.41),
      (1.0, 0.04, 1.0, None),
    ]
  ]
  f = report.fit_stats(history)
  assert f["train_loss"] == pytest.approx(0.12) and f["train_accuracy"] == pytest.approx(0.9)
  assert f["val_accuracy"] == pytest.approx(0.41) and f["gap"] == pytest.approx(0.8 - 0.41)
  assert report.fit_stats(history, tail=0.5)["train_loss"] == pytest.approx((0.6 + 0.1 + 0.2 + 0.04) / 4)
  with pytest.raises(ValueError, match="fit_stats: tail must be in"):
    report.fit_stats(history, tail=0)


def test_the_fit_table_lists_every_schedule(tmp_path):
  dirs = [_fake_run(tmp_path, "dense", 0, 0.80), _fake_run(tmp_path, "adaptive_b", 0, 0.81)]
  md = report.comparison_markdown(report.load_runs(dirs), title="T")
  assert "| schedule | runs | train loss | train acc | val acc | gap (train − val) |" in md
  # Two epochs: the last quarter is the last epoch (loss 0.2, train 0.5, val 0.4).
  assert "| adaptive_b | 1 | 0.2000 | 0.5000 | 0.4000 | +0.1000 |" in md
  assert "| dense | 1 | 0.2000 | 0.5000 | 0.4000 | +0.1000 |" in md


def test_approach_names_the_kind_of_each_run_from_its_config():
  keep = {"schedule": "constant", "controller_options": {"keep": 0.2}}
  kinds = [
    ({"schedule": "dense"}, "baseline"),
    ({"schedule": "dense", "dropout": 0.3}, "baseline"),
    (keep, "per-keep"),
    ({**keep, "regimes": 1, "dropout": 0.3}, "per-keep"),
    ({**keep, "init_from": "runs/dense"}, "fine-tuned"),
    ({**keep, "init_from": None}, "per-keep"),
    ({**keep, "regimes": 3}, "joint"),
    ({**keep, "regimes": 3, "dropout": 0.3}, "joint+dropout"),
    ({"schedule": "adaptive_b", "dropout": 0.3}, "joint+dropout"),
    ({"schedule": "cyclic", "controller_options": {"period": 4}}, "joint"),
  ]
  assert [report.approach(config) for config, _ in kinds] == [kind for _, kind in kinds]


def _priced(d, accuracy_by_keep, macs_by_keep, minutes=10.0):
  summary = json.loads((d / "summary.json").read_text())
  summary["keep_macs"] = {
    str(k): {"accuracy": a, "density": k / 2, "macs": macs_by_keep[k], "macs_fraction": macs_by_keep[k] / 100e6}
    for k, a in accuracy_by_keep.items()
  }
  summary["dense_macs"] = 100e6
  summary["wall_time_s"] = 60 * minutes
  summary["provenance"] = {"cpu": {"usable": 1}}
  (d / "summary.json").write_text(json.dumps(summary))
  return d


def test_frontier_table_prices_each_keep_and_pairs_joint_networks_with_per_keep_ones(tmp_path):
  macs = {1.0: 50e6, 0.1: 8e6}
  keep01 = {"schedule": "constant", "controller_options": {"keep": 0.1}}
  dirs, dense_dirs = [], []
  for seed, (joint, trained, tuned) in enumerate([(0.40, 0.42, 0.39), (0.42, 0.43, 0.40)]):
    dirs.append(
      _priced(_fake_run(tmp_path, "sandwich", seed, 0.5, config={**keep01, "regimes": 3}), {1.0: 0.5, 0.1: joint}, macs)
    )
    dirs.append(
      _priced(
        _fake_run(tmp_path, "keep", seed, 0.5, config=keep01),
        {1.0: 0.45, 0.1: trained},
        macs,
        minutes=20,
      )
    )
    # Fine-tuned from the seed's dense run, as another machine named its directory.
    tuned_config = {**keep01, "init_from": f"/elsewhere/dense_s{seed}"}
    dirs.append(_priced(_fake_run(tmp_path, "tuned", seed, 0.5, config=tuned_config), {1.0: 0.4, 0.1: tuned}, macs, 2))
    # A worse recipe: not the fine-tune priced.
    worse = {**tuned_config, "epochs": 1}
    dense_dirs.append(_priced(_fake_run(tmp_path, "dense", seed, 0.5, config={}), {1.0: 0.45, 0.1: 0.3}, macs, 15))
    dense_dirs.append(_priced(_fake_run(tmp_path, "worse", seed, 0.5, config=worse), {1.0: 0.4, 0.1: 0.2}, macs, 7))
    for d in [*dirs[-3:], *dense_dirs[-2:]] if seed else ():  # seed 1's block ran on another machine, its sandwich 3x
      summary = json.loads((d / "summary.json").read_text())
      summary["provenance"]["cpu"]["model"] = "CPU B"
      summary["wall_time_s"] *= 3 if d == dirs[-3] else 1
      (d / "summary.json").write_text(json.dumps(summary))
  runs, baselines = report.load_runs(dirs), report.load_runs(dense_dirs)
  assert runs[0].keep_macs[0.1] == {"accuracy": 0.40, "density": 0.05, "macs": 8e6, "macs_fraction": 0.08}
  md = report.comparison_markdown(runs, title="T")
  row = "| 0.1 | constant(keep=0.1)+regimes=3 | joint | 2 | 0.4100 ± 0.0141 | 8.0 | 0.080 |"
  assert row in md
  line = next(line for line in md.splitlines() if line.startswith(row))
  # Paired by seed: joint − trained at keep = (−2, −1) points; joint − fine-tuned = (+1, +2).
  assert "| -1.5 [-7.9, +4.9] (n=2) | +1.5 [-4.9, +7.9] (n=2) |" in line
  # Cost per machine: M1 is "CPU B" (sorted first), M2 the one without a model name.
  assert "| constant(keep=0.1)+regimes=3 | 30 | 10 |" in md and "| all per-keep networks together | 20 | 20 |" in md
  # The alternative with fine-tunes: their source and the best recipe (2 min), not every recipe tried (+7).
  assert "| dense + the best fine-tune at each keep | 17 | 17 |" in report.comparison_markdown(
    runs + baselines, title="T"
  )
  alone = report.comparison_markdown(runs[:-1], title="T")  # seed 1's fine-tune missing: none on machine B
  assert "| the best fine-tune at each keep | — | 2 |" in alone
  verdict = "| constant(keep=0.1)+regimes=3 | trained at keep | -1.5 [-7.9, +4.9] (n=2) *open* |"
  assert verdict in md and "| constant(keep=0.1)+regimes=3 | dense + fine-tune | +1.5 [-4.9, +7.9] (n=2) *open* |" in md
  # pareto.png: the joint network's whole curve; per-keep networks and fine-tunes each at its own keep, the best recipe.
  better = [
    dataclasses.replace(r, keep_macs={**r.keep_macs, 0.1: {**r.keep_macs[0.1], "accuracy": 0.5}}) for r in runs[2::3]
  ]
  series = plots.frontier_series({"j": runs[0::3], "k": runs[1::3], "t": runs[2::3], "t2": better})
  assert series.keys() == {"j", plots.PER_KEEP, plots.FINE_TUNED} and series["j"] == plots.macs_curve(runs[0::3])
  assert [(p["keep"], round(p["accuracy"], 4)) for p in series[plots.PER_KEEP]] == [(0.1, 0.425)]
  assert [(p["keep"], p["accuracy"]) for p in series[plots.FINE_TUNED]] == [(0.1, 0.5)]
  paths = report.plot_comparison(runs, tmp_path / "out")
  assert (tmp_path / "out" / "pareto.png") in paths and (tmp_path / "out" / "pareto.png").stat().st_size > 1000
  assert plots.macs_curve(runs[:1])[1] == {
    "keep": 0.1,
    "accuracy": 0.40,
    "density": 0.05,
    "macs": 8e6,
    "macs_fraction": 0.08,
  }


@pytest.mark.parametrize(
  "low, high, verdict",
  [(1.1, 3, "*better*"), (1.0, 3, "*as good*"), (-1.0, 0.5, "*as good*"), (-1.1, 0.5, "*open*"), (-3, -1.1, "*worse*"),
   (-3, -1.0, "*open*")],
)  # fmt: skip
def test_a_verdict_is_decided_only_by_an_interval_clear_of_the_one_point_margin(low, high, verdict):
  assert report._verdict(low, high) == verdict


def test_reset_shocks_compare_the_first_steps_after_each_reset_with_the_cycle():
  def epoch(e, keep, cycle, loss, acc, reset=False, first=None):
    return {
      "epoch": e,
      "keep": keep,
      "cycle": cycle,
      "reset_after": reset,
      "train_loss": loss,
      "train_accuracy": acc,
      "first_steps_loss": loss if first is None else first[0],
      "first_steps_accuracy": acc if first is None else first[1],
    }

  history = [
    epoch(1, 1.0, 0, 2.0, 0.3),
    epoch(2, 0.3, 0, 1.5, 0.5, reset=True),
    epoch(3, 1.0, 1, 2.2, 0.2, first=(2.4, 0.1)),  # the shock: worse than the cycle's first epoch
    epoch(4, 0.3, 1, 1.0, 0.6, reset=True),
    epoch(5, 1.0, 2, 1.1, 0.6, first=(1.3, 0.55)),
  ]
  shocks = report.reset_shocks(history)
  assert [(x["cycle"], x["epoch"], x["keep_before"]) for x in shocks] == [(0, 3, 0.3), (1, 5, 0.3)]
  assert shocks[0]["loss_first_steps"] - shocks[0]["loss_before"] == pytest.approx(0.9)
  assert shocks[0]["cycle_first_loss"] == 2.0 and shocks[1]["cycle_first_loss"] == 2.2
  lines = report._shock_markdown({"adaptive_b": [SimpleNamespace(history=history)]})
  assert "| adaptive_b | 2 | +0.600 | +0.900 (epoch 3, keep before 0.300) | +0.225 | 1 of 2 |" in lines


def test_fine_tune_recipes_are_groups_of_their_own_and_the_best_one_is_the_reference(tmp_path):
  keep01 = {"schedule": "constant", "controller_options": {"keep": 0.1}}
  tuned = {**keep01, "init_from": "runs/dense", "epochs": 5, "warmup_epochs": 1}
  assert report.run_label({**tuned, "learning_rate": 0.01}) == "constant(keep=0.1)+finetuned(epochs=5,lr=0.01,warmup=1)"
  macs, dirs = {1.0: 50e6, 0.1: 8e6}, []
  for seed in (0, 1):
    sandwich = {**keep01, "regimes": 3}
    dirs.append(_priced(_fake_run(tmp_path, "sandwich", seed, 0.5, config=sandwich), {1.0: 0.5, 0.1: 0.40}, macs))
    for name, lr, acc in (("fast", 0.05, 0.30 + 0.01 * seed), ("slow", 0.01, 0.38 + 0.01 * seed)):
      config = {**tuned, "learning_rate": lr}
      dirs.append(_priced(_fake_run(tmp_path, name, seed, 0.5, config=config), {1.0: 0.4, 0.1: acc}, macs, 2))
  md = report.comparison_markdown(report.load_runs(dirs), title="T")
  assert "differ in their settings" not in md  # the two recipes are not averaged as seeds of one group
  line = next(line for line in md.splitlines() if line.startswith("| 0.1 | constant(keep=0.1)+regimes=3 |"))
  assert line.endswith("| — | +1.5 [-4.9, +7.9] (n=2) |")  # against lr 0.01 (0.38, 0.39), the better recipe
  assert "Fine-tune recipe each Δ is taken against: keep 0.1: (epochs=5,lr=0.01,warmup=1)." in md


def test_accuracy_figure_averages_the_epochs_every_run_of_a_group_was_tested_at(tmp_path, figures):
  dirs = [_fake_run(tmp_path, "dense", seed, 0.5 + 0.1 * seed) for seed in (0, 1)]
  lines = (dirs[1] / "metrics.jsonl").read_text().splitlines()
  first = {**json.loads(lines[0]), "test_accuracy": None}  # seed 1 tested only at its last epoch
  (dirs[1] / "metrics.jsonl").write_text(json.dumps(first) + "\n" + lines[1] + "\n")
  report.plot_comparison(report.load_runs(dirs), tmp_path / "out")
  ((x, y),) = plotted_lines(figures["accuracy.png"]).values()
  assert list(x) == [2] and list(y) == pytest.approx([0.55])  # epoch 2 of both seeds: (0.5 + 0.6) / 2
