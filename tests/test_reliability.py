"""Reliability (issue 10): kills and signals lose nothing, bad input fails clearly, same seed same result."""

import errno
import functools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TIMES, TINY_FLAGS, assert_same_final_state, experiment
from jaxsparse import config as config_lib
from jaxsparse import data as data_lib
from jaxsparse import evaluate as evaluate_lib
from jaxsparse import loop

ROOT = Path(__file__).resolve().parents[1]
run_cli = experiment("run")

FLAGS = TINY_FLAGS  # 4 steps per epoch, 2 epochs; with SCHEDULE a reset after epoch 2
SCHEDULE = ["--schedule=cyclic", "--period=2"]


def _argv(cifar_npz, cache, workdir, *extra):
  schedule = [] if any(f.startswith("--schedule") for f in extra) else SCHEDULE
  return [*FLAGS, *schedule, f"--data={cifar_npz}", f"--cache-dir={cache}", f"--workdir={workdir}", *extra]


def _results(workdir: Path):
  """metrics.jsonl and summary.json without wall times and provenance (the process's environment): what must match
  bit for bit."""
  records = [
    {k: v for k, v in json.loads(line).items() if k not in TIMES}
    for line in (workdir / "metrics.jsonl").read_text().splitlines()
  ]
  summary = json.loads((workdir / "summary.json").read_text())
  return records, {k: v for k, v in summary.items() if k not in TIMES + ("provenance",)}


def _tree(directory: Path) -> dict[str, bytes]:
  return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def baseline(cifar_npz, cache, tmp_path_factory):
  """One uninterrupted CLI run: the reference every interrupted run must reproduce."""
  workdir = tmp_path_factory.mktemp("baseline")
  assert run_cli.main(_argv(cifar_npz, cache, workdir)) == 0
  return workdir


def _signal_at_poll(monkeypatch, n: int, signum=signal.SIGTERM):
  """Sends this process a real signal when the run polls its stop request for the n-th time (run.py's run)."""
  polls, original = [], loop.train_and_evaluate

  def poll():
    polls.append(1)
    if len(polls) == n:
      os.kill(os.getpid(), signum)
    return False

  monkeypatch.setattr(loop, "train_and_evaluate", functools.partial(original, should_stop=poll))


# ---- 1, 2: signals and kills -------------------------------------------------------------------------------------


def test_cli_run_writes_its_summary(baseline):
  summary = json.loads((baseline / "summary.json").read_text())
  assert summary["schedule"] == "cyclic" and summary["epochs"] == 2


def test_sigterm_mid_epoch_saves_and_resumes_bitwise(baseline, cifar_npz, cache, tmp_path, monkeypatch, capsys):
  workdir = tmp_path / "run"
  _signal_at_poll(monkeypatch, 8)  # polls: start, steps 1-4, end of epoch 1, steps 5-6
  assert run_cli.main(_argv(cifar_npz, cache, workdir)) == 143
  err = capsys.readouterr().err
  assert f"checkpoint {workdir / 'checkpoints' / '6'} holds step 6 (epoch 2, step 2 of 4)" in err
  assert "run the same command again" in err
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "6"]
  assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 1
  spare = tmp_path / "spare"
  shutil.copytree(workdir, spare)
  monkeypatch.undo()

  assert run_cli.main(_argv(cifar_npz, cache, workdir)) == 0
  assert "resumed from" in capsys.readouterr().out
  assert _results(workdir) == _results(baseline)
  assert_same_final_state(workdir, baseline)

  # The newest checkpoint damaged: the run says so, falls back to step 4, and still ends identical.
  for f in (spare / "checkpoints" / "6" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  assert run_cli.main(_argv(cifar_npz, cache, spare)) == 0
  out = capsys.readouterr().out
  assert "failed to load" in out and "resuming from the older checkpoint" in out
  assert (spare / "checkpoints" / "6.corrupt").is_dir()
  assert _results(spare) == _results(baseline)
  assert_same_final_state(spare, baseline)


def test_sigint_saves_the_current_step_and_exits_130(cifar_npz, cache, tmp_path, monkeypatch, capsys):
  workdir = tmp_path / "run"
  _signal_at_poll(monkeypatch, 3, signal.SIGINT)  # Ctrl-C: polls: start, steps 1-2
  assert run_cli.main(_argv(cifar_npz, cache, workdir)) == 130
  err = capsys.readouterr().err
  assert "SIGINT: saving a checkpoint after the current step (send it again to abort at once)" in err
  assert f"checkpoint {workdir / 'checkpoints' / '2'} holds step 2 (epoch 1, step 2 of 4)" in err
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"] and not (workdir / "metrics.jsonl").exists()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back


def test_a_second_signal_aborts_at_once_and_the_run_resumes(baseline, cifar_npz, cache, tmp_path, monkeypatch, capsys):
  workdir = tmp_path / "run"
  real = evaluate_lib.keep_curve

  def interrupted_twice(*args, **kwargs):  # both signals arrive during the final keep-curve evaluation
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)
    return real(*args, **kwargs)

  monkeypatch.setattr(evaluate_lib, "keep_curve", interrupted_twice)
  assert run_cli.main(_argv(cifar_npz, cache, workdir)) == 130
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1] == f"aborted; the last checkpoint in {workdir}/checkpoints is intact; run the same command to resume"
  assert not (workdir / "summary.json").exists() and sorted(os.listdir(workdir / "checkpoints")) == ["4", "8"]
  monkeypatch.undo()
  assert run_cli.main(_argv(cifar_npz, cache, workdir)) == 0
  assert "resumed from" in capsys.readouterr().out
  assert _results(workdir) == _results(baseline)
  assert_same_final_state(workdir, baseline)


def test_should_stop_api_raises_interrupted_with_checkpoint(cifar_npz, cache, tmp_path):
  config = run_cli.config_from_args(run_cli.parse_args(_argv(cifar_npz, cache, tmp_path)))
  with pytest.raises(loop.Interrupted) as info:
    loop.train_and_evaluate(config, tmp_path, progress=False, should_stop=lambda: True)
  assert info.value.checkpoint is None and "before the first checkpoint" in str(info.value)
  assert not (tmp_path / "metrics.jsonl").exists()


def _env(jit_cache: Path) -> dict:
  # A persistent compilation cache keeps each restarted process from recompiling the same train step.
  return dict(
    os.environ,
    PYTHONPATH=str(ROOT),
    JAX_PLATFORMS="cpu",
    JAX_COMPILATION_CACHE_DIR=str(jit_cache),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )


def _run_until_killed(argv, env, *, after_s: float | None, checkpoints: Path) -> int | None:
  """Starts the CLI and SIGKILLs it `after_s` seconds in, or (after_s=None) as soon as a checkpoint write is in
  flight. Returns the exit code if the run finished first, else None."""
  proc = subprocess.Popen(
    [sys.executable, str(ROOT / "experiments" / "run.py"), *argv],
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
  )
  deadline = time.time() + (after_s if after_s is not None else 300)
  while proc.poll() is None and time.time() < deadline:
    if after_s is None and checkpoints.is_dir() and any(n.endswith("-tmp") for n in os.listdir(checkpoints)):
      break
    time.sleep(0.001 if after_s is None else 0.05)
  if proc.poll() is not None:
    stderr = proc.stderr.read().decode()
    assert proc.returncode == 0, stderr
    return proc.returncode
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  proc.stderr.close()
  return None


def _kill_and_resume(baseline, cifar_npz, cache, tmp_path, kills: list[float | None], *extra, want: int = 1):
  """Starts the run with each kill time in turn until `want` kills landed, then lets it finish."""
  workdir = tmp_path / "run"
  argv, env = _argv(cifar_npz, cache, workdir, *extra), _env(tmp_path / "jit_cache")
  killed = 0
  for after_s in kills:
    if _run_until_killed(argv, env, after_s=after_s, checkpoints=workdir / "checkpoints") is None:
      killed += 1
    if killed == want:
      break
  done = subprocess.run(
    [sys.executable, str(ROOT / "experiments" / "run.py"), *argv], env=env, capture_output=True, text=True
  )
  assert done.returncode == 0, done.stderr
  assert not any(n.endswith("-tmp") for n in os.listdir(workdir / "checkpoints"))
  assert _results(workdir) == _results(baseline)
  assert_same_final_state(workdir, baseline)
  return killed


def test_sigkill_during_checkpoint_write_then_resume_bitwise(baseline, cifar_npz, cache, tmp_path):
  assert _kill_and_resume(baseline, cifar_npz, cache, tmp_path, [None]) == 1


@pytest.mark.slow
def test_ten_sigkills_at_random_moments_then_resume_bitwise(cifar_npz, cache, tmp_path):
  # 10 epochs, so that the run outlives ten kills: each start gets 1.5-7 s (about 5 go to imports and the restore).
  assert run_cli.main(_argv(cifar_npz, cache, tmp_path / "baseline", "--epochs=10")) == 0
  rng = random.Random(10)
  kills = [None if i % 3 == 0 else rng.uniform(1.5, 7.0) for i in range(25)]
  assert _kill_and_resume(tmp_path / "baseline", cifar_npz, cache, tmp_path, kills, "--epochs=10", want=10) == 10


def test_truncated_metrics_line_is_dropped_on_resume(baseline, cifar_npz, cache, tmp_path, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(baseline, workdir)
  shutil.rmtree(workdir / "checkpoints" / "8")  # as if killed before the epoch-2 checkpoint committed
  text = (workdir / "metrics.jsonl").read_text()
  (workdir / "metrics.jsonl").write_text(text[: len(text) - 40])  # and while appending its metrics line
  assert run_cli.main(_argv(cifar_npz, cache, workdir)) == 0
  assert "dropped an unreadable line" in capsys.readouterr().out
  assert _results(workdir) == _results(baseline)


# ---- 3: bad input ------------------------------------------------------------------------------------------------

# (flags, exit code, what the one-line error must say). None of these writes anything.
BAD_FLAGS = {
  "keep_above_1": (["--schedule=constant", "--keep=1.5"], 2, "--keep must be a keep ratio in (0, 1], got 1.5"),
  "keep_nan": (["--schedule=constant", "--keep=nan"], 2, "--keep must be a keep ratio in (0, 1], got nan"),
  "eval_keep_0": (["--eval-keeps=1,0"], 2, "--eval-keeps must be keep ratios in (0, 1]"),
  "eval_keep_nan": (["--eval-keeps=nan"], 2, "--eval-keeps must be keep ratios in (0, 1]"),
  "min_keep_nan": (["--min-keep=nan"], 2, "--min-keep must be a keep ratio in (0, 1], got nan"),
  "option_of_other_schedule": (
    ["--schedule=dense", "--gamma=0.5"],
    2,
    "--gamma does not apply to --schedule 'dense'; its options: none",
  ),
  "adaptive_b_without_val": (
    ["--schedule=adaptive_b", "--val-size=0"],
    2,
    "schedule 'adaptive_b' needs a validation split: set --val-size > 0",
  ),
  "train_smaller_than_batch": (["--train-size=16"], 2, "--train-size (16) must be >= --batch-size (32)"),
  "zero_epochs": (["--epochs=0"], 2, "--epochs must be an integer >= 1, got 0"),
  "bad_shape": (["--shape=zigzag"], 2, "--shape must be one of"),
  "zero_regimes": (["--regimes=0"], 2, "--regimes must be an integer >= 1, got 0"),
  "distill_one_regime": (["--distill"], 2, "--distill needs --regimes >= 2"),
  "sandwich_on_dense": (["--schedule=dense", "--regimes=3"], 2, "schedule 'dense' keeps 1.0"),
  "keep_cycles": (["--keep-cycles=last:0"], 2, "--keep-cycles must be 'all', 'none', 'last:N' or 'every:K'"),
  "reset_warmup": (["--reset-warmup-steps=-1"], 2, "--reset-warmup-steps must be an integer >= 0, got -1"),
  "init_from_missing": (["--init-from=missing"], 2, "--init-from: missing is not a run directory (no config.json)"),
}


@pytest.mark.parametrize("flags,code,message", BAD_FLAGS.values(), ids=BAD_FLAGS.keys())
def test_bad_flags_fail_with_one_clear_line(flags, code, message, cifar_npz, cache, tmp_path, capsys):
  assert run_cli.main(_argv(cifar_npz, cache, tmp_path / "run", *flags)) == code
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err and message in err, err
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags", [["--schedule=bogus"], ["--bogus-option=1"]], ids=["schedule", "option"])
def test_unknown_schedule_or_option_is_a_usage_error(flags, capsys):
  with pytest.raises(SystemExit) as info:
    run_cli.main([*FLAGS, *flags])
  assert info.value.code == 2
  err = capsys.readouterr().err
  assert "invalid choice: 'bogus'" in err or "unrecognized arguments: --bogus-option=1" in err


def test_bad_data_sources(cache, tmp_path, capsys):
  corrupt = tmp_path / "corrupt.npz"
  corrupt.write_bytes(b"PK\x03\x04 this is not a zip archive")
  # The same workdir each time: a run that stopped before its first checkpoint does not block a corrected one.
  for source, message in [
    (tmp_path / "missing.npz", f"data source {tmp_path / 'missing.npz'} does not exist; expected an image-folder tree"),
    (corrupt, f"{corrupt}: corrupted or unreadable .npz (File is not a zip file)"),
  ]:
    argv = [*FLAGS, f"--data={source}", f"--cache-dir={cache}", f"--workdir={tmp_path / 'run'}"]
    assert run_cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err, err


def test_config_mismatch_refused_and_nothing_changed(baseline, cifar_npz, cache, capsys):
  before = _tree(baseline)
  assert run_cli.main(_argv(cifar_npz, cache, baseline, "--seed=1")) == 1
  err = capsys.readouterr().err
  assert "holds a run with a different config (seed: 0 -> 1); pass --fresh" in err
  assert _tree(baseline) == before


def test_fresh_deletes_only_the_runs_outputs_and_starts_over(baseline, cifar_npz, cache, tmp_path, capsys):
  workdir, neighbour = tmp_path / "run", tmp_path / "other_run"
  shutil.copytree(baseline, workdir)
  shutil.copytree(baseline, neighbour)
  (workdir / "notes.txt").write_text("mine")
  # A finished run of another seed: without --fresh this directory is refused; with it, it is trained anew.
  config = json.loads((workdir / "config.json").read_text())
  (workdir / "config.json").write_text(json.dumps({**config, "seed": 1}))
  assert run_cli.main(_argv(cifar_npz, cache, workdir)) == 1
  assert "holds a run with a different config (seed: 1 -> 0); pass --fresh" in capsys.readouterr().err
  before = _tree(neighbour)
  assert run_cli.main(_argv(cifar_npz, cache, workdir, "--fresh")) == 0
  assert "resumed from" not in capsys.readouterr().out
  assert _results(workdir) == _results(baseline)  # trained from step 0 again
  assert len((workdir / "provenance.jsonl").read_text().splitlines()) == 1  # the old start is gone with the run
  assert json.loads((workdir / "config.json").read_text())["seed"] == 0
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "8"]
  assert (workdir / "notes.txt").read_text() == "mine" and _tree(neighbour) == before  # nothing else is touched


def test_unreadable_config_json_is_refused_and_kept(cifar_npz, cache, tmp_path, capsys):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text('{"seed": ')  # e.g. cut short by a full disk
  assert run_cli.main(_argv(cifar_npz, cache, workdir)) == 1
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith(f"error: {workdir / 'config.json'} is unreadable (Expecting value: line 1 column 10 ")
  assert err.endswith("; pass --fresh to start over, or choose another --workdir"), err
  assert sorted(os.listdir(workdir)) == ["config.json"] and (workdir / "config.json").read_text() == '{"seed": '


def test_checkpoints_of_another_model_are_refused_and_kept(baseline, cifar_npz, cache, tmp_path, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(baseline / "checkpoints", workdir / "checkpoints")  # no config.json to tell whose they are
  before = _tree(workdir / "checkpoints")
  assert run_cli.main(_argv(cifar_npz, cache, workdir, "--model=wrn16_1")) == 1
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err == (
    f"error: no checkpoint in {workdir / 'checkpoints'} fits this config's model; pass --fresh to start over, "
    "or choose another --workdir"
  )
  assert _tree(workdir / "checkpoints") == before  # nothing renamed as corrupt, nothing deleted


def test_unwritable_workdir(cifar_npz, cache, tmp_path, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  assert run_cli.main(_argv(cifar_npz, cache, blocker / "run")) == 1
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith(f"error: cannot write the run directory {blocker / 'run'}: Not a directory; ")
  assert "choose a writable --workdir" in err


def test_disk_full_mid_run_stops_clearly_and_damages_nothing(baseline, cifar_npz, cache, tmp_path, monkeypatch, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(baseline, workdir)
  shutil.rmtree(workdir / "checkpoints" / "8")  # back to the end of epoch 1
  (workdir / "summary.json").unlink()
  (workdir / "metrics.jsonl").write_text((workdir / "metrics.jsonl").read_text().splitlines()[0] + "\n")
  before = _tree(workdir)

  open_file = Path.open

  def disk_full(path, mode="r", *args, **kwargs):  # the disk fills after the restart's provenance line
    if path.name == "metrics.jsonl" and mode == "a":
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return open_file(path, mode, *args, **kwargs)

  monkeypatch.setattr(Path, "open", disk_full)
  assert run_cli.main(_argv(cifar_npz, cache, workdir)) == 1
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err == (
    f"error: cannot write {workdir / 'metrics.jsonl'}: No space left on device; free disk space or "
    f"choose a writable --workdir (checkpoints saved before are intact; run the same command again "
    f"to resume)"
  )
  assert {k: v for k, v in _tree(workdir).items() if k.startswith("checkpoints/4/")} == {
    k: v for k, v in before.items() if k.startswith("checkpoints/4/")
  }
  assert (workdir / "metrics.jsonl").read_bytes() == before["metrics.jsonl"]


# ---- 4, 5: determinism and numerics ------------------------------------------------------------------------------


def test_same_seed_same_metrics_other_seed_differs(baseline, cifar_npz, cache, tmp_path):
  config = run_cli.config_from_args(run_cli.parse_args(_argv(cifar_npz, cache, tmp_path)))
  loop.train_and_evaluate(config, tmp_path / "s0", progress=False)
  assert _results(tmp_path / "s0") == _results(baseline)
  loop.train_and_evaluate(config.replace(seed=1), tmp_path / "s1", progress=False)
  ours, theirs = _results(tmp_path / "s1")[0], _results(baseline)[0]
  assert [r["train_loss"] for r in ours] != [r["train_loss"] for r in theirs]


def test_nan_loss_names_the_step_and_the_last_good_checkpoint(cifar_npz, cache, tmp_path, monkeypatch):
  real = data_lib.train_batches

  def poisoned(*args, epoch, **kw):  # the second epoch's data turns into NaN
    for batch in real(*args, epoch=epoch, **kw):
      yield {**batch, "image": batch["image"] * np.nan} if epoch == 1 else batch

  monkeypatch.setattr(data_lib, "train_batches", poisoned)
  config = run_cli.config_from_args(run_cli.parse_args(_argv(cifar_npz, cache, tmp_path)))
  with pytest.raises(FloatingPointError) as info:
    loop.train_and_evaluate(config, tmp_path, progress=False)
  assert re.search("non-finite training loss .* at step", str(info.value))
  assert str(info.value).startswith(
    "non-finite training loss (nan) at step 5 (epoch 2, step 1 of 4); stopping. "
    f"the last good checkpoint is {tmp_path / 'checkpoints' / '4'};"
  )


@pytest.mark.slow
def test_bfloat16_trains_as_well_as_float32(cifar_npz, cache, tmp_path):
  config = config_lib.preset(
    "smoke",
    data=str(cifar_npz),
    cache_dir=str(cache),
    schedule="cyclic",
    controller_options={"period": 3},
    epochs=6,
    eval_keeps=(1.0,),
  )
  results = {}
  for dtype in ("float32", "bfloat16"):
    loop.train_and_evaluate(config.replace(dtype=dtype), tmp_path / dtype, progress=False)
    results[dtype] = _results(tmp_path / dtype)[0][-1]
  f32, bf16 = results["float32"], results["bfloat16"]
  assert bf16["train_loss"] == pytest.approx(f32["train_loss"], abs=0.15)
  assert bf16["train_accuracy"] == pytest.approx(f32["train_accuracy"], abs=0.08)
  assert f32["train_loss"] < 2.2  # both actually learned something
