"""experiments/study.py (planning, resume, bad flags) and experiments/jpeg_shift.py (matching, end to end)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import experiment, tiny_config
from jaxsparse.loop import load_trained, train_and_evaluate

jpeg_shift = experiment("jpeg_shift")
reset_probe = experiment("reset_probe")
study = experiment("study")


def test_plan_is_seed_major_with_one_workdir_per_run(tmp_path):
  jobs = study.plan(["dense", "dropout"], [0, 1], tmp_path)
  assert [name for name, _, _ in jobs] == ["dense_s0", "dropout_s0", "dense_s1", "dropout_s1"]
  name, workdir, flags = jobs[1]
  assert workdir == tmp_path / "dropout_s0"
  assert flags == ["--schedule=dense", "--dropout=0.3", "--seed=0"]


def test_variant_flags_are_accepted_by_run_py():
  run_cli = experiment("run")

  for flags in study.VARIANTS.values():  # a fine-tune's source run is checked when it runs (it may not exist yet)
    flags = [f for f in flags if not f.startswith("--init-from=")]
    run_cli.config_from_args(run_cli.parse_args(flags + ["--preset=smoke"]))


def test_finished_runs_are_skipped(tmp_path, capsys):
  for name in ("dense_s0", "dense_s1"):
    (tmp_path / name).mkdir()
    (tmp_path / name / "summary.json").write_text("{}")
  assert study.main(["--out", str(tmp_path), "--variants", "dense", "--seeds", "0,1", "--lanes", "2"]) == 0
  out = capsys.readouterr().out
  assert out.count("already finished") == 2 and "2/2 runs finished" in out


@pytest.mark.parametrize("flags", [["--variants", "sparse"], ["--seeds", "a"], ["--lanes", "0"]])
def test_bad_study_flags_exit_2(tmp_path, flags):
  with pytest.raises(SystemExit) as e:
    study.main(["--out", str(tmp_path), *flags])
  assert e.value.code == 2


def test_two_shards_list_every_unfinished_run_exactly_once(tmp_path, capsys):
  variants = "dense,keep0.1,sandwich_dropout"
  (tmp_path / "keep0.1_s1").mkdir()
  (tmp_path / "keep0.1_s1" / "summary.json").write_text("{}")
  listed = []
  for shard in ("0/2", "1/2"):
    assert (
      study.main(["--out", str(tmp_path), "--variants", variants, "--seeds", "0,1", "--shard", shard, "--list"]) == 0
    )
    listed += capsys.readouterr().out.splitlines()
  workdirs = [line.split("--workdir=")[1].split()[0] for line in listed]
  expected = [str(tmp_path / f"{v}_s{s}") for s in (0, 1) for v in variants.split(",")]
  assert sorted(workdirs) == sorted(w for w in expected if not w.endswith("keep0.1_s1"))
  run_py = str(study.RUN)  # absolute, with this interpreter: the lines run from any directory
  assert all(line.startswith(f"{sys.executable} {run_py} ") for line in listed) and Path(run_py).is_absolute()


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--epochs=2.5"], "run.py: error: argument --epochs: invalid int value: '2.5' (see --help)"),
    (["--schedule=dense", "--keep=0.2"], "--keep does not apply to --schedule 'dense'"),
  ],
)
def test_list_refuses_run_flags_that_run_py_would_refuse_before_printing(tmp_path, capsys, flags, message):
  assert study.main(["--out", str(tmp_path), "--variants", "dropout", "--seeds", "0", "--list", "--", *flags]) == 2
  out = capsys.readouterr()
  assert out.out == "" and message in out.err


def test_fine_tunes_name_their_source_run_and_wait_for_it(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(study.VARIANTS, "ft", ["--schedule=constant", "--keep=0.1", "--init-from={out}/dense_s{seed}"])
  ((_, _, flags),) = study.plan(["ft"], [3], tmp_path)
  assert flags == ["--schedule=constant", "--keep=0.1", f"--init-from={tmp_path}/dense_s3", "--seed=3"]
  assert study.main(["--out", str(tmp_path), "--variants", "ft", "--seeds", "3"]) == 1
  out = capsys.readouterr().out
  assert f"{tmp_path}/dense_s3 has not finished" in out and "waiting for their source run: ft_s3" in out


@pytest.mark.parametrize("shard", ["2/2", "a/b", "1"])
def test_bad_shards_exit_2(tmp_path, shard):
  with pytest.raises(SystemExit) as e:
    study.main(["--out", str(tmp_path), "--shard", shard, "--list"])
  assert e.value.code == 2


def test_match_jpeg_takes_the_rth_image_of_each_class():
  copy_labels = np.repeat(np.arange(3), 4)  # class-major, like the image-folder copy
  genuine = np.array([2, 0, 2, 1, 0])
  assert jpeg_shift.match_jpeg(genuine, copy_labels).tolist() == [8, 0, 9, 4, 1]
  with pytest.raises(ValueError, match="class 0: 5 genuine images but only 4"):
    jpeg_shift.match_jpeg(np.zeros(5, int), copy_labels)


def test_check_pairs_refuses_different_pictures():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
  near = np.clip(a.astype(int) + rng.integers(-6, 7, a.shape), 0, 255).astype(np.uint8)
  assert 0 < jpeg_shift.check_pairs(a, near) < 6
  with pytest.raises(ValueError, match="do not match their JPEG partner"):
    jpeg_shift.check_pairs(a, a[::-1])


def test_jpeg_shift_end_to_end_on_a_trained_run(cifar_npz, cache, tmp_path):
  # Trained and tested on the genuine subset, so its "JPEG versions" are the genuine images themselves: the shift
  # must be exactly zero and the accuracy must equal the run's own final test accuracy.
  config = tiny_config(cifar_npz, cache, epochs=1, schedule="dense", eval_keeps=(1.0, 0.3))
  summary = train_and_evaluate(config, tmp_path / "run", progress=False)
  loaded_config, state, _ = load_trained(tmp_path / "run")
  assert loaded_config == config and int(state.step) == summary["steps"]
  r = jpeg_shift.evaluate_run(str(tmp_path / "run"), str(cifar_npz), [1.0, 0.3])
  assert r["pixel_diff"] == 0.0 and r["genuine"] == r["jpeg"]
  assert r["genuine"][1.0] == summary["keep_curve"]["1.0"] and r["genuine"][0.3] == summary["keep_curve"]["0.3"]
  text = jpeg_shift.markdown([r], [1.0, 0.3])
  assert "| dense | 0 |" in text and "+0.00 ± 0.00" in text
  with pytest.raises(FileNotFoundError, match="no config.json"):
    load_trained(tmp_path)


def test_reset_probe_replays_the_first_dense_step_after_a_reset_exactly(cifar_npz, cache, tmp_path):
  cyclic = {"period": 2, "min_keep": 0.2}
  config = tiny_config(cifar_npz, cache, epochs=3, schedule="cyclic", controller_options=cyclic, eval_keeps=(1.0,))
  train_and_evaluate(config, tmp_path / "run", progress=False)
  (result,) = reset_probe.probe_run(tmp_path / "run", steps=2, warmups=(2,))
  assert (result["cycle"], result["next_epoch"], result["keep_before"]) == (0, 3, pytest.approx(0.2))
  # 4 steps per epoch, logged every step: the first window of epoch 3 is its first step, which the probe replays.
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  epoch3, epoch1_loss = records[2], records[0]["train_loss"]
  assert result["steps"]["dense"][0]["loss"] == pytest.approx(epoch3["train_windows"]["loss"][0], rel=1e-6)
  assert len(result["steps"]["at_keep_before"]) == 2 and result["steps"]["dense"][0]["grad_norm"] > 0
  assert "| 0 | 3 | 0.200 |" in reset_probe.markdown([result], 2)
  # A 2-step reset warm-up: the same first loss, and half the first update (the ramp's first step is 1/2).
  plain, warm = result["steps"]["dense"][0], result["steps"]["dense_warmup2"][0]
  assert warm["loss"] == plain["loss"] and warm["update_norm"] == pytest.approx(plain["update_norm"] / 2, rel=1e-5)
  assert "warm-up 2" in reset_probe.markdown([result], 2) and result["cycle_first_loss"] == pytest.approx(epoch1_loss)


def test_the_frontier_block_is_one_variant_list_with_the_fine_tunes_last(tmp_path):
  names = [name for name, _, _ in study.plan(list(study.FRONTIER), [2], tmp_path)]
  assert len(names) == 20 and names[:6] == [f"{v}_s2" for v in ("sandwich", "sandwich_dropout", "keep0.3", "keep0.2",
                                                                 "keep0.1", "keep0.05")]  # fmt: skip
  tunes = [(name, flags) for name, _, flags in study.plan(list(study.FRONTIER), [2], tmp_path) if name.startswith("ft")]
  assert len(tunes) == 10 and names[-10:] == [name for name, _ in tunes]
  assert all(f"--init-from={tmp_path}/dense_s2" in flags for _, flags in tunes)
  assert dict(tunes)["ft0.1_e5_lr0.01w1_s2"][:5] == [
    "--schedule=constant", "--keep=0.1", "--epochs=5", "--warmup-epochs=1", "--learning-rate=0.01"
  ]  # fmt: skip
