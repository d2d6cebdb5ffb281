"""The benchmark script runs end to end and emits its three ratios (slow: it times real train steps)."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_bench_emits_the_three_ratios():
  out = subprocess.run(
    [
      sys.executable,
      str(ROOT / "experiments" / "bench.py"),
      "--model=wrn10_1",
      "--batch-size=16",
      "--repeats=2",
      "--sections=step,conv",
      "--other-convs=xla",
    ],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads(out.stdout)
  assert result["sparse_over_dense"] > 0 and result["keep1_over_plain"] > 0 and result["controller_over_none"] > 0
  assert "jax_over_torch" in result
  assert result["step"]["conv_auto_over_xla"]["keep1.0"]["median"] > 0  # the main step runs conv="auto"
  assert "matmul_keep1.0" not in result["step"]["times"] and "xla_keep1.0" in result["step"]["times"]
  rows = result["conv"]["shapes"]
  assert [r["shape"][1:] for r in rows] == [[32, 32, 16], [16, 16, 32], [8, 8, 64]]
  assert all(r["wgrad_matmul_fwd_bwd_ms"] > 0 and r["xla_kernel_grad_ms"] > 0 for r in rows)
