import json
import math

import numpy as np
import pytest

from jaxsparse import report


def _fake_run(root, schedule, seed, final, keeps=(1.0, 0.5), config=None):
  d = root / f"{schedule}_s{seed}"
  d.mkdir()
  if config is not None:
    (d / "config.json").write_text(json.dumps({"schedule": schedule, "seed": seed, **config}))
  history = [{"epoch": e, "step": 10 * e, "keep": 1.0 if e % 2 else 0.5, "cycle": e // 2,
              "reset_after": e % 2 == 0, "train_accuracy": 0.5, "val_accuracy": 0.4,
              "test_accuracy": final - 0.01 * (2 - e), "wall_time_s": 60.0 * e,
              "density": {"a/act1": 0.4, "final_act": 0.3}} for e in (1, 2)]
  (d / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
  summary = report.summarize(history, keep_curve={k: final * k for k in keeps}, device="cpu",
                             data_source="fake", config={"schedule": schedule, "seed": seed, "model": "m"})
  (d / "summary.json").write_text(json.dumps(summary))
  return d


def test_summarize_picks_final_dense_and_best():
  history = [{"epoch": 1, "step": 5, "cycle": 0, "reset_after": True, "train_accuracy": 0.3,
              "test_accuracy": 0.6, "wall_time_s": 1.0},
             {"epoch": 2, "step": 10, "cycle": 1, "reset_after": False, "train_accuracy": 0.4,
              "test_accuracy": 0.5, "wall_time_s": 2.0}]
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


def test_comparison_table_and_figures(tmp_path):
  dirs = [_fake_run(tmp_path, s, seed, acc) for s, seed, acc in
          [("dense", 0, 0.80), ("dense", 1, 0.82), ("adaptive_b", 0, 0.83), ("adaptive_b", 1, 0.83)]]
  runs = report.load_runs(dirs)
  md = report.comparison_markdown(runs, title="T", baseline="dense")
  assert "| dense | 2 | 0.8100 ± 0.0141 |" in md
  assert "| adaptive_b | 2 | 0.8300 ± 0.0000 |" in md and "+0.0200 ±" in md
  paths = report.plot_comparison(runs, tmp_path / "out")
  assert all(p.exists() and p.stat().st_size > 1000 for p in paths)
  with pytest.raises(FileNotFoundError, match="not a finished run"):
    report.load_runs([tmp_path / "out"])


def test_variants_of_one_schedule_are_grouped_apart(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  dirs = [_fake_run(tmp_path / "a", "dense", 0, 0.80, config={"dropout": 0.0}),
          _fake_run(tmp_path / "b", "dense", 0, 0.78, config={"dropout": 0.3}),
          _fake_run(tmp_path, "cyclic", 0, 0.81, config={"controller_options": {"period": 5, "cycles": 3}})]
  runs = report.load_runs(dirs)
  assert [r["label"] for r in runs] == ["dense", "dense+dropout0.3", "cyclic(cycles=3,period=5)"]
  md = report.comparison_markdown(runs, title="T", baseline="dense")
  assert "| dense+dropout0.3 | 1 | 0.7800 ± 0.0000 | 0.7800 ± 0.0000 | -0.0200 (n=1) |" in md
  assert "| cyclic(cycles=3,period=5) | 1 | 0.8100" in md
  assert report.run_label({"schedule": "adaptive_b", "topk_gradient": "straight_through", "norm": "rmsnorm",
                           "controller_options": {"min_keep": 0.3}}) == \
      "adaptive_b(min_keep=0.3)+topk_gradient=straight_through"


def test_compare_cli_writes_the_table_and_skips_unfinished_runs_only_with_partial(tmp_path, capsys):
  import sys
  from pathlib import Path
  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
  import compare
  dirs = [str(_fake_run(tmp_path, s, seed, acc)) for s, seed, acc in [("dense", 0, 0.80), ("adaptive_b", 0, 0.83)]]
  running = tmp_path / "cyclic_s0"
  running.mkdir()
  assert compare.main([*dirs, str(running), "--out", str(tmp_path / "out")]) == 1
  assert "not a finished run" in capsys.readouterr().err
  assert compare.main([*dirs, str(running), "--out", str(tmp_path / "out"), "--partial"]) == 0
  text = (tmp_path / "out" / "results.md").read_text()
  assert "| adaptive_b | 1 | 0.8300" in text and f"left out: `{running}`" in text
  assert (tmp_path / "out" / "accuracy.png").exists()
