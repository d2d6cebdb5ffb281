"""experiments/gpu_check.py at toy sizes on the CPU, so the GPU check is known to work before a GPU is lent
(slow: it compiles and times real train steps and two one-epoch runs)."""

import json

import pytest

from conftest import ROOT, experiment

gpu_check = experiment("gpu_check")


@pytest.mark.slow
def test_gpu_check_runs_every_part_at_tiny_sizes_and_writes_its_report(tmp_path):
  test = "tests/test_macs.py::test_dense_macs_of_a_tiny_cnn_by_hand"
  assert gpu_check.main(["--tiny", "--out", str(tmp_path), "--tests", test]) == 0
  report = json.loads((tmp_path / "report.json").read_text())
  assert report["errors"] == {} and report["device"].endswith("(cpu)")
  assert report["tests"]["returncode"] == 0 and "1 passed" in report["tests"]["result"]
  assert {"keep0.3", "keep1.0", "plain"} <= set(report["bench"]["step"]["times"])
  assert all(r["lax_top_k_ms"] > 0 and r["threshold_radix_ms"] > 0 for r in report["bench"]["topk"]["shapes"])
  # XLA's FLOPs per image: a forward is ~2 FLOPs per MAC (WRN-10-1: 12.5 M MACs), a train step ~3 forwards.
  cost = report["cost"]
  assert 2 * 12.5e6 <= cost["eval_flops_per_image"] <= 2.6 * 12.6e6
  assert 2.5 * cost["eval_flops_per_image"] <= cost["train_step_flops_per_image"] <= 4 * cost["eval_flops_per_image"]
  assert set(report["epochs"]) == {"dense", "keep0.3"} and report["epochs"]["keep0.3"]["keep"] == pytest.approx(0.3)
  assert report["paper_projection"]["paper_table_hours"] > 0
  assert (tmp_path / "report.md").read_text().startswith("# GPU check on 1 x cpu (cpu)")


def test_core_tests_exist():
  assert all((ROOT / path).is_file() for path in gpu_check.CORE_TESTS)
