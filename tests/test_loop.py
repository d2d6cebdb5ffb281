"""End to end through train_and_evaluate: outputs, resume equivalence, config-mismatch refusal, method options.

The CLI smoke run, bad flags and the NaN stop are in test_reliability.py (one end-to-end run each)."""

import json

import jax
import numpy as np
import pytest

from conftest import assert_same_final_state, experiment, tiny_config
from jaxsparse import loop, parallel
from jaxsparse import train as train_lib
from jaxsparse.loop import ConfigMismatchError, train_and_evaluate

run_cli = experiment("run")


def _config(cifar_npz, tmp_cache, **kw):
  options = dict(epochs=3, schedule="adaptive_a", controller_options={"gamma": 0.5, "tol": 0.99}, eval_keeps=(1.0, 0.5))
  return tiny_config(cifar_npz, tmp_cache, **{**options, **kw})


def _records(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  drop = ("epoch_time_s", "eval_time_s", "wall_time_s")
  return [{k: v for k, v in json.loads(l).items() if k not in drop} for l in lines]


@pytest.fixture(scope="module")
def full_run(cifar_npz, cache, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("full")
  summary = train_and_evaluate(_config(cifar_npz, cache), workdir, progress=False)
  return workdir, summary


@pytest.fixture(scope="module")
def batchnorm_run(cifar_npz, cache, tmp_path_factory):
  """A finished one-epoch run of a BatchNorm WRN: a source with model state (batch_stats) for init_from."""
  workdir = tmp_path_factory.mktemp("batchnorm")
  config = _config(cifar_npz, cache, schedule="dense", controller_options={}, epochs=1, norm="batchnorm")
  train_and_evaluate(config, workdir, progress=False)
  return workdir


def _bitwise_equal(a, b) -> bool:
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
    np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def test_run_outputs_and_summary(full_run):
  workdir, summary = full_run
  for name in (
    "config.json",
    "metrics.jsonl",
    "summary.json",
    "plots/keep.png",
    "plots/accuracy.png",
    "plots/keep_curve.png",
  ):
    assert (workdir / name).exists(), name
  for key in (
    "test_accuracy",
    "best_test_accuracy",
    "keep_curve",
    "cycles",
    "epochs",
    "wall_time_s",
    "device",
    "data_source",
  ):
    assert key in summary, key
  assert summary["epochs"] == 3 and set(summary["keep_curve"]) == {"1.0", "0.5"}
  # The keep curve's price: mean achieved density and effective MACs per keep (WRN-10-1: 12.54 M dense MACs).
  assert summary["dense_macs"] == 12_541_952
  curve = summary["keep_macs"]
  assert {k: v["accuracy"] for k, v in curve.items()} == summary["keep_curve"]
  assert curve["0.5"]["density"] <= 0.5 + 1e-6 and curve["0.5"]["macs"] < curve["1.0"]["macs"] < 12_541_952
  assert curve["0.5"]["macs_fraction"] == pytest.approx(curve["0.5"]["macs"] / 12_541_952)
  assert summary["conv"] == "auto -> per layer (xla or wgrad_matmul by shape)"  # the default, on this CPU backend
  # Where the run was made: in summary.json and one provenance.jsonl line per start, never in config.json.
  saved = json.loads((workdir / "summary.json").read_text())
  (start,) = [json.loads(line) for line in (workdir / "provenance.jsonl").read_text().splitlines()]
  assert saved["provenance"]["cpu"] == start["cpu"] and len(saved["provenance"]["git"]["commit"]) in (7, 40)
  # Taken when the run started (the tree may change while it runs): the summary's is the start line's.
  assert saved["provenance"] == {k: v for k, v in start.items() if k not in ("started", "process_count")}
  assert "provenance" not in json.loads((workdir / "config.json").read_text())
  records = _records(workdir)
  # adaptive_a with tol=0.99 always compresses: 1.0 (dense reference epoch) -> 0.5 -> 0.25.
  assert [r["keep"] for r in records] == [1.0, 0.5, 0.25]
  assert all(len(r["density"]) == 7 for r in records)
  # 4 steps per epoch, logged every step (a tenth of an epoch, at least 1): the windows are the steps, and they
  # average to the epoch's loss.
  for r in records:
    assert r["train_windows"]["every"] == 1 and len(r["train_windows"]["loss"]) == 4
    assert np.mean(r["train_windows"]["loss"]) == pytest.approx(r["train_loss"], rel=1e-12)
  assert all(d <= 0.25 + 1e-6 for d in records[2]["density"].values())


def test_interrupted_run_resumes_bitwise(full_run, cifar_npz, cache, tmp_path):
  workdir, summary = full_run
  config = _config(cifar_npz, cache)

  with pytest.raises(loop.Interrupted):
    train_and_evaluate(
      config,
      tmp_path,
      progress=False,
      should_stop=lambda: (tmp_path / "metrics.jsonl").exists() and len(_records(tmp_path)) >= 2,
    )
  assert len(_records(tmp_path)) == 2
  resumed = train_and_evaluate(config, tmp_path, progress=False)
  assert _records(tmp_path) == _records(workdir)
  assert len((tmp_path / "provenance.jsonl").read_text().splitlines()) == 2  # the start and the restart
  assert resumed["keep_curve"] == summary["keep_curve"]
  assert_same_final_state(tmp_path, workdir)  # the parameters, optimiser and controller too, not only the logs


def test_config_mismatch_is_refused_and_nothing_overwritten(full_run, cifar_npz, cache):
  workdir, _ = full_run
  before = (workdir / "metrics.jsonl").read_text()
  with pytest.raises(ConfigMismatchError, match="seed: 0 -> 1.*fresh=True"):
    train_and_evaluate(_config(cifar_npz, cache, seed=1), workdir, progress=False)
  assert (workdir / "metrics.jsonl").read_text() == before


def test_cli_relative_keep_and_sandwich_with_distillation(cifar_npz, cache, tmp_path):
  argv = [
    "--preset=smoke",
    "--schedule=constant",
    "--keep=0.2",
    "--topk-keep=relative",
    "--regimes=3",
    "--distill",
    "--epochs=1",
    "--train-size=128",
    f"--data={cifar_npz}",
    f"--cache-dir={cache}",
    f"--workdir={tmp_path / 'sw'}",
    "--no-progress",
    "--eval-keeps=1,0.3",
  ]
  assert run_cli.main(argv) == 0
  summary = json.loads((tmp_path / "sw" / "summary.json").read_text())
  config = json.loads((tmp_path / "sw" / "config.json").read_text())
  assert summary["passes_per_step"] == 3
  assert (config["topk_keep"], config["regimes"], config["distill"]) == ("relative", 3, True)
  record = json.loads((tmp_path / "sw" / "metrics.jsonl").read_text().splitlines()[0])
  assert 0 < record["train_dense_accuracy"] <= 1
  assert all(d < 0.2 for d in record["density"].values())  # 20% of the active units: below 20% of all units


def test_eval_every_tests_every_nth_epoch_and_the_last(cifar_npz, cache, tmp_path):
  config = _config(cifar_npz, cache, schedule="dense", controller_options={}, eval_every=2)
  summary = train_and_evaluate(config, tmp_path, progress=False)
  tested = [r["test_accuracy"] is not None for r in _records(tmp_path)]
  assert tested == [False, True, True]
  assert all(r["val_accuracy"] is not None for r in _records(tmp_path))
  assert summary["best_epoch"] in (2, 3) and (tmp_path / "plots" / "accuracy.png").exists()
  with pytest.raises(ValueError, match="eval_every must be an integer >= 1"):
    config.replace(eval_every=0)


@pytest.mark.parametrize("source", ["full_run", "batchnorm_run"])
def test_init_from_restores_the_source_parameters_bitwise_with_a_fresh_optimiser(source, request, cifar_npz, cache):
  workdir = request.getfixturevalue(source)
  workdir = workdir[0] if source == "full_run" else workdir
  summary = json.loads((workdir / "summary.json").read_text())
  norm = "batchnorm" if source == "batchnorm_run" else "rmsnorm"
  config = _config(
    cifar_npz, cache, schedule="constant", controller_options={"keep": 0.5}, init_from=str(workdir), norm=norm
  )
  mesh = parallel.make_mesh()
  fresh = loop.initial_state(config, 4, mesh)
  state, origin = loop.init_from(config, fresh, mesh)
  _, trained, _ = loop.load_trained(workdir)
  assert _bitwise_equal(state.params, trained.params) and not _bitwise_equal(state.params, fresh.params)
  # The model state comes with the parameters: a BatchNorm source's running statistics, bit for bit.
  assert _bitwise_equal(state.model_state, trained.model_state)
  if norm == "batchnorm":
    assert set(state.model_state) == {"batch_stats"} and not _bitwise_equal(state.model_state, fresh.model_state)
  else:
    assert state.model_state == {}
  assert int(state.step) == 0 and float(state.controller.keep) == 0.5  # fresh step, optimiser and controller
  assert _bitwise_equal(state.opt_state, fresh.opt_state) and _bitwise_equal(state.rng, fresh.rng)
  assert origin == {"run": str(workdir.resolve()), "step": summary["steps"], "test_accuracy": summary["test_accuracy"]}


def test_init_from_refuses_what_is_not_a_finished_matching_run(full_run, cifar_npz, cache, tmp_path):
  workdir, _ = full_run
  unfinished = tmp_path / "unfinished"
  unfinished.mkdir()
  (unfinished / "config.json").write_text((workdir / "config.json").read_text())
  without_final = tmp_path / "without_final"  # finished, but its final checkpoint is gone
  without_final.mkdir()
  for name in ("config.json", "summary.json"):
    (without_final / name).write_text((workdir / name).read_text())
  mesh = parallel.make_mesh()
  for source, error in (
    (tmp_path / "missing", "is not a run directory"),
    (unfinished, "holds no finished run"),
    (without_final, "has no checkpoint of its final step"),
    (workdir, r"holds a wrn10_1 model \(norm rmsnorm\), not this config's wrn16_1 \(rmsnorm\)"),
  ):
    config = _config(cifar_npz, cache, init_from=str(source), model="wrn16_1" if source == workdir else "wrn10_1")
    with pytest.raises(ValueError, match=f"Config.init_from: {source} {error}"):
      loop.check_config(config)  # before any work
    with pytest.raises(ValueError, match=f"Config.init_from: {source} {error}"):
      loop.init_from(config, loop.initial_state(config, 4, mesh), mesh)


def test_fine_tuning_run_records_its_source_and_resumes_from_its_own_checkpoints(
  batchnorm_run, cifar_npz, cache, tmp_path, log_lines
):
  source = batchnorm_run
  config = _config(
    cifar_npz,
    cache,
    schedule="constant",
    controller_options={"keep": 0.5},
    epochs=1,
    norm="batchnorm",
    init_from=str(source),
  )
  summary = train_and_evaluate(config, tmp_path / "whole", progress=False)
  assert summary["init_from"]["run"] == str(source.resolve())
  assert json.loads((tmp_path / "whole" / "config.json").read_text())["init_from"] == str(source)

  # Stopped after 2 of its 4 steps (polls: the start, then one per step), then resumed: from its own checkpoint of
  # step 2, not from the source again, and it ends exactly as the uninterrupted fine-tune.
  polls = []
  with pytest.raises(loop.Interrupted, match="holds step 2 ") as info:
    train_and_evaluate(
      config, tmp_path / "parts", progress=False, should_stop=lambda: polls.append(1) or len(polls) == 3
    )
  assert (info.value.checkpoint, info.value.step, info.value.signum) == (
    str(tmp_path / "parts" / "checkpoints" / "2"),
    2,
    None,
  )
  assert not (tmp_path / "parts" / "metrics.jsonl").exists()
  log_lines.clear()
  resumed = train_and_evaluate(config, tmp_path / "parts", progress=False)
  assert any("resumed from" in line and "step 2 (epoch 1, step 2 of 4)" in line for line in log_lines), log_lines
  assert not any(line.startswith("initialised from") for line in log_lines), log_lines
  assert resumed["init_from"] == summary["init_from"] and resumed["keep_curve"] == summary["keep_curve"]
  assert _records(tmp_path / "parts") == _records(tmp_path / "whole")
  assert_same_final_state(tmp_path / "parts", tmp_path / "whole")

  before = (tmp_path / "whole" / "metrics.jsonl").read_text()
  assert train_and_evaluate(config, tmp_path / "whole", progress=False)["keep_curve"] == summary["keep_curve"]
  assert (tmp_path / "whole" / "metrics.jsonl").read_text() == before  # finished: nothing retrained from the source


def test_windows_of_steps_are_averaged_and_survive_a_mid_epoch_resume():
  steps = [{"loss": 1.0 + i, "accuracy": 0.1 * i, "density/a": 0.5} for i in range(5)]
  whole = loop._EpochSums(2)
  for m in steps:
    whole.add(m)
  part = loop._EpochSums(2)
  for m in steps[:3]:  # stopped inside the second window
    part.add(m)
  resumed = loop._EpochSums(2, json.loads(json.dumps(part.meta(0.0))))  # through a checkpoint's JSON meta
  for m in steps[3:]:
    resumed.add(m)
  for sums in (whole, resumed):
    sums.mark()  # the epoch's end closes the last, shorter window
  assert resumed.windows() == whole.windows()
  assert whole.windows()["loss"] == [1.5, 3.5, 5.0] and whole.windows()["every"] == 2
  assert whole.windows()["accuracy"] == pytest.approx([0.05, 0.25, 0.4])
  assert resumed.means() == whole.means()


def test_reset_warmup_changes_nothing_before_the_first_reset_and_ramps_the_steps_after(
  cifar_npz, cache, tmp_path, monkeypatch
):
  # The update scale of every step, as the train step computes it from the reset step the loop passes in.
  scales = {}
  real = train_lib._apply_grads

  def spy(state, grads, new_vars, metrics, densities, scale=None):
    record = lambda step, s: scales.__setitem__(int(step), float(s))  # noqa: E731
    jax.debug.callback(record, state.step, 1.0 if scale is None else scale)
    return real(state, grads, new_vars, metrics, densities, scale)

  monkeypatch.setattr(train_lib, "_apply_grads", spy)
  cyclic = dict(schedule="cyclic", controller_options={"period": 2, "min_keep": 0.2}, eval_keeps=(1.0,))
  train_and_evaluate(_config(cifar_npz, cache, **cyclic, reset_warmup_steps=4), tmp_path, progress=False)
  records = _records(tmp_path)
  assert [r["reset_after"] for r in records] == [False, True, False]  # the reset after epoch 2 (step 8)
  # Cycle 0 (steps 0-7) trains at the full rate: no reset began it. After the reset the update ramps up over 4
  # steps: the first update after the reset is a quarter of a plain one.
  assert [scales[step] for step in range(12)] == [1.0] * 8 + [0.25, 0.5, 0.75, 1.0]


def test_a_run_stopped_at_a_reset_and_inside_its_warmup_resumes_bitwise(cifar_npz, cache, tmp_path):
  # The reset after epoch 2 (step 8) starts a 4-step warm-up. The run stops right after the reset (at the end of
  # epoch 2), then again after step 10, half-way through the warm-up, then finishes.
  cyclic = dict(schedule="cyclic", controller_options={"period": 2, "min_keep": 0.2}, eval_keeps=(1.0,))
  config = _config(cifar_npz, cache, **cyclic, reset_warmup_steps=4)
  train_and_evaluate(config, tmp_path / "whole", progress=False)
  for polls_to_stop, step in ((11, 8), (3, 10)):  # polls: the start, one per step, one per epoch end
    polls = []
    with pytest.raises(loop.Interrupted, match=f"holds step {step} "):
      train_and_evaluate(
        config, tmp_path / "parts", progress=False, should_stop=lambda: polls.append(1) or len(polls) == polls_to_stop
      )
  _, stopped, _ = loop.load_trained(tmp_path / "parts")
  assert (int(stopped.step), int(stopped.reset_step), int(stopped.controller.cycle)) == (10, 8, 1)
  train_and_evaluate(config, tmp_path / "parts", progress=False)
  assert [r["cycle"] for r in _records(tmp_path / "parts")] == [0, 0, 1]
  assert _records(tmp_path / "parts") == _records(tmp_path / "whole")
  assert_same_final_state(tmp_path / "parts", tmp_path / "whole")


def _final_state(workdir):
  _, state, _ = loop.load_trained(workdir)
  return jax.device_get((state.params, state.controller))


def _same(a, b) -> bool:
  """Whether two pytrees of arrays are bitwise equal (NaN equal to NaN)."""
  return jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(x, y, equal_nan=True)), a, b))


def test_step_level_controller_moves_the_keep_inside_epochs_and_resumes_mid_epoch_bitwise(cifar_npz, cache, tmp_path):
  # tighten_relax deciding at every step, never relaxing (tol 0.99): keep 0.7 ** t after t steps, 4 steps per epoch.
  options = {"interval": 1, "tighten": 0.3, "tol": 0.99}
  config = _config(cifar_npz, cache, schedule="tighten_relax", controller_options=options, val_size=0)
  a, b = tmp_path / "a", tmp_path / "b"
  summary = train_and_evaluate(config, a, progress=False)
  keeps = [1.0]
  for _ in range(12):
    keeps.append(float(jax.numpy.float32(keeps[-1]) * jax.numpy.float32(0.7)))
  records = _records(a)
  assert [r["keep"] for r in records] == pytest.approx([sum(keeps[4 * e : 4 * e + 4]) / 4 for e in range(3)], rel=1e-6)
  assert [r["next_keep"] for r in records] == pytest.approx([keeps[4], keeps[8], keeps[12]], rel=1e-6)
  assert summary["cycles"] == 0 and all(r["val_accuracy"] is None for r in records)
  calls = []
  with pytest.raises(loop.Interrupted):
    train_and_evaluate(config, b, progress=False, should_stop=lambda: calls.append(1) or len(calls) >= 7)
  assert len(_records(b)) == 1  # stopped after step 6, inside epoch 2
  train_and_evaluate(config, b, progress=False)
  assert _records(b) == records
  params_a, ctrl_a = _final_state(a)
  params_b, ctrl_b = _final_state(b)
  assert _same((params_a, ctrl_a), (params_b, ctrl_b))


def test_a_step_level_controller_refuses_the_reset_warmup(cifar_npz, cache, tmp_path):
  config = _config(cifar_npz, cache, schedule="tighten_relax", controller_options={}, reset_warmup_steps=3)
  with pytest.raises(loop.OptionError, match="Config.reset_warmup_steps needs an epoch-level schedule"):
    train_and_evaluate(config, tmp_path, progress=False)
  assert not (tmp_path / "config.json").exists()


def test_eval_every_does_not_change_training(cifar_npz, cache, tmp_path):
  config = _config(cifar_npz, cache, epochs=2, val_size=0, schedule="adaptive_a")
  train_and_evaluate(config.replace(eval_every=1), tmp_path / "every", progress=False)
  train_and_evaluate(config.replace(eval_every=3), tmp_path / "last", progress=False)
  every, last = _final_state(tmp_path / "every"), _final_state(tmp_path / "last")
  assert _same(every, last)
  drop = ("test_accuracy", "test_loss")
  assert [{k: v for k, v in r.items() if k not in drop} for r in _records(tmp_path / "every")] == [
    {k: v for k, v in r.items() if k not in drop} for r in _records(tmp_path / "last")
  ]


def test_lr_by_epoch_holds_each_epochs_first_value(cifar_npz, cache):
  config = _config(cifar_npz, cache, epochs=4, warmup_epochs=0, learning_rate=0.1)
  per_step, per_epoch = loop._lr_schedule(config, 5), loop._lr_schedule(config.replace(lr_by_epoch=True), 5)
  steps = jax.numpy.arange(20)
  want = [0.1 * (1 + np.cos(np.pi * (s // 5) / 4)) / 2 for s in range(20)]  # PyTorch's CosineAnnealingLR(T_max=4)
  np.testing.assert_allclose(per_epoch(steps), want, rtol=1e-6)
  np.testing.assert_allclose(per_step(steps[::5]), want[::5], rtol=1e-6)
  assert per_step(3) < per_epoch(3)


def test_script_preset_is_the_published_recipe():
  from jaxsparse import config as config_lib

  c = config_lib.PRESETS["script"]
  assert (c.schedule, c.epochs, c.batch_size, c.learning_rate, c.warmup_epochs, c.weight_decay) == (
    "tighten_relax",
    500,
    128,
    0.1,
    0,
    0.0,
  )
  assert (c.val_size, c.train_size, c.seed, c.lr_by_epoch, c.nesterov, c.momentum) == (0, None, 3407, True, True, 0.9)
  model = loop.build_model(c)
  assert (model.depth, model.widen, model.norm, model.norm_eps, model.norm_bias) == (28, 4, "rmsnorm", 1e-8, True)
  assert (model.shortcut, model.rounding, model.zero_init_residual, c.augment) == ("input", "floor", False, None)
  assert model.padding == "symmetric"
  assert loop.check_config(c).step is not None  # the step-level controller, and nothing refused
