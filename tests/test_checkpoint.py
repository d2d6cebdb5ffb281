"""Tests for jaxsparse.checkpoint: exact round trips, retention across reopen, corruption fallback."""

import glob
import os
import shutil
import subprocess
import sys
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsparse.checkpoint import Checkpointer, Restored

TESTS = os.path.dirname(os.path.abspath(__file__))


class ControllerState(NamedTuple):
  keep: jax.Array  # float32 scalar
  cycle: jax.Array  # int32 scalar


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  controller: ControllerState
  key: jax.Array
  batch_stats: dict


def make_state(seed: int) -> TrainState:
  """A small TrainState-like pytree whose every leaf depends on `seed`."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  params = {
    "conv": {"kernel": jax.random.normal(k1, (3, 3, 2, 4), jnp.bfloat16)},
    "head": {"kernel": jax.random.normal(k2, (4, 3)), "bias": jnp.full((3,), seed, jnp.float32)},
  }
  opt_state = optax.adamw(1e-3).init(params)
  opt_state = jax.tree.map(lambda x: x + seed, opt_state)  # nonzero mu/nu/count
  return TrainState(
    step=jnp.int32(100 * seed + 7),
    params=params,
    opt_state=opt_state,
    controller=ControllerState(jnp.float32(1.0 / (seed + 3)), jnp.int32(seed)),
    key=jax.random.PRNGKey(seed + 1000),
    batch_stats={"norm": {"mean": jax.random.uniform(k3, (4,))}},
  )


def assert_bitwise_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    a, e = np.asarray(a), np.asarray(e)
    assert (a.dtype, a.shape) == (e.dtype, e.shape)
    assert a.tobytes() == e.tobytes()


def abstract(state):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def save_epochs(ckpt, epochs, cycle_ends=(), first_cycle=0):
  for epoch in epochs:
    cycle = first_cycle + list(cycle_ends).index(epoch) if epoch in cycle_ends else None
    ckpt.save(epoch, make_state(epoch), meta={"epoch": epoch}, cycle_end=cycle)
  ckpt.wait()


def test_round_trip_is_bitwise_with_types_and_meta(tmp_path):
  state = make_state(1)
  meta = {
    "epoch": 1,
    "step_in_epoch": 0,
    "data": {"seed": 3, "position": 1234},
    "config_hash": "ab12",
    "np_rng": {"state": 2**100 + 1},
  }
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    assert ckpt.save(1, state, meta=meta)
    restored, restored_meta = ckpt.restore(1, abstract(make_state(0)))
  assert_bitwise_equal(restored, state)
  assert isinstance(restored, TrainState)
  assert isinstance(restored.controller, ControllerState)
  assert type(restored.opt_state[0]) is type(state.opt_state[0])  # optax ScaleByAdamState
  assert restored.key.dtype == jnp.uint32 and restored.step.dtype == jnp.int32
  assert restored.params["conv"]["kernel"].dtype == jnp.bfloat16
  assert restored_meta == meta


def restore_across_topologies(directory):
  """Saves a state replicated on 4 devices and restores it replicated on 4, on 2 others and on 1 device: each
  restored leaf is placed as its template says. Needs 4 devices (run by the test below in a subprocess)."""
  devices = jax.devices()
  assert len(devices) == 4, devices
  replicated = NamedSharding(Mesh(np.array(devices), ("data",)), P())
  others = NamedSharding(Mesh(np.array(devices[2:]), ("data",)), P())
  single = jax.sharding.SingleDeviceSharding(devices[1])
  state = jax.device_put(make_state(2), replicated)
  with Checkpointer(directory) as ckpt:
    ckpt.save(2, state, meta={})
    for sharding in (replicated, others, single):
      template = jax.device_put(make_state(0), sharding)
      restored = ckpt.restore_latest(abstract(template))
      assert_bitwise_equal(restored.state, state)
      for leaf in jax.tree.leaves(restored.state):
        assert leaf.sharding == sharding and leaf.sharding.device_set == sharding.device_set, (leaf.sharding, sharding)


def test_restore_places_arrays_with_template_shardings(tmp_path):
  # The main process has one device, where every sharding is the same: cross topologies with 4 forced CPU devices.
  script = (
    f"import sys; sys.path.insert(0, {TESTS!r}); import test_checkpoint as t; t.restore_across_topologies(sys.argv[1])"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert sorted(os.listdir(tmp_path)) == ["2"]


def test_retention_keeps_latest_and_every_cycle_end(tmp_path):
  with Checkpointer(tmp_path, keep_latest=2) as ckpt:
    save_epochs(ckpt, range(1, 11), cycle_ends=(3, 7))
    assert ckpt.all_steps() == [3, 7, 9, 10]
    assert ckpt.cycle_checkpoints() == {0: 3, 1: 7}
    restored = ckpt.restore_latest(abstract(make_state(0)))
    assert (restored.step, restored.meta, restored.skipped) == (10, {"epoch": 10}, ())
    assert_bitwise_equal(restored.state, make_state(10))
    cycle_state, _ = ckpt.restore(3, abstract(make_state(0)))
    assert_bitwise_equal(cycle_state, make_state(3))


def test_keep_forever_set_survives_reopening(tmp_path):
  with Checkpointer(tmp_path, keep_latest=1) as ckpt:
    save_epochs(ckpt, range(1, 6), cycle_ends=(2, 4))
    assert ckpt.all_steps() == [2, 4, 5]
  with Checkpointer(tmp_path, keep_latest=1) as ckpt:
    assert ckpt.cycle_checkpoints() == {0: 2, 1: 4}
    save_epochs(ckpt, range(6, 9))
    assert ckpt.all_steps() == [2, 4, 8]
    assert ckpt.cycle_checkpoints() == {0: 2, 1: 4}


@pytest.mark.parametrize(
  "keep_cycles,kept_before,kept_after",
  [
    ("all", [2, 4, 6], [2, 4, 6, 9]),
    ("none", [], []),
    ("last:2", [4, 6], [6, 9]),
    ("every:2", [4], [4, 9]),
  ],
)
def test_cycle_retention_holds_across_reopening_and_keeps_a_fallback(tmp_path, keep_cycles, kept_before, kept_after):
  # Cycles 0, 1, 2 end at steps 2, 4, 6; after reopening, cycle 3 ends at step 9.
  with Checkpointer(tmp_path, keep_latest=2, keep_cycles=keep_cycles) as ckpt:
    save_epochs(ckpt, range(1, 8), cycle_ends=(2, 4, 6))
    assert ckpt.all_steps() == sorted(set(kept_before) | {6, 7})
  with Checkpointer(tmp_path, keep_latest=2, keep_cycles=keep_cycles) as ckpt:
    save_epochs(ckpt, range(8, 11), cycle_ends=(9,), first_cycle=3)
    assert ckpt.all_steps() == sorted(set(kept_after) | {9, 10})
  _flip_array_byte(str(tmp_path / "10"))  # the corrupt-checkpoint fallback works under every choice
  with Checkpointer(tmp_path, keep_latest=2, keep_cycles=keep_cycles) as ckpt:
    restored = ckpt.restore_latest(abstract(make_state(0)))
  assert restored.step == 9
  assert_bitwise_equal(restored.state, make_state(9))


@pytest.mark.parametrize("spec", ["some", "last:0", "every:", "last:x", 3])
def test_bad_cycle_retention_names_the_argument(tmp_path, spec):
  with pytest.raises(ValueError, match="keep_cycles must be 'all', 'none', 'last:N' or 'every:K'"):
    Checkpointer(tmp_path, keep_cycles=spec)


@pytest.mark.parametrize("make_dir", [False, True])
def test_empty_directory_restores_none(tmp_path, make_dir):
  directory = tmp_path / "checkpoints"
  if make_dir:
    directory.mkdir()
  with Checkpointer(directory) as ckpt:
    assert ckpt.restore_latest(abstract(make_state(0))) is None
    assert ckpt.all_steps() == [] and ckpt.cycle_checkpoints() == {}


def test_async_save_copies_before_return_and_restores_after_wait(tmp_path):
  state = make_state(5)
  expected = jax.tree.map(np.array, state)
  with Checkpointer(tmp_path, async_save=True) as ckpt:
    ckpt.save(5, state, meta={"epoch": 5})
    for leaf in jax.tree.leaves(state):  # what buffer donation in the next train step does
      leaf.delete()
    restored = ckpt.restore_latest(abstract(make_state(0)))
  assert restored.step == 5
  assert_bitwise_equal(restored.state, expected)


def _truncate_array_data(step_dir):
  files = glob.glob(os.path.join(step_dir, "state", "d", "*"))
  assert files
  for name in files:
    with open(name, "r+b") as f:
      f.truncate(os.path.getsize(name) // 2)


def _flip_array_byte(step_dir):
  for name in glob.glob(os.path.join(step_dir, "state", "d", "*")):
    data = bytearray(open(name, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(name, "wb").write(bytes(data))


CORRUPTIONS = {
  "truncated_array_file": _truncate_array_data,
  "flipped_array_byte": _flip_array_byte,
  "deleted_array_manifest": lambda d: os.remove(os.path.join(d, "state", "manifest.ocdbt")),
  "deleted_state_item": lambda d: shutil.rmtree(os.path.join(d, "state")),
  "truncated_meta_json": lambda d: open(os.path.join(d, "meta", "metadata"), "r+b").truncate(3),
}


# A failed tensorstore read leaves an asyncio callback that reports "Event loop is closed".
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupted_latest_falls_back_and_can_be_saved_again(tmp_path, corrupt, log_lines):
  with Checkpointer(tmp_path, keep_latest=3) as ckpt:
    save_epochs(ckpt, [1, 2, 3], cycle_ends=(3,))
  corrupt(str(tmp_path / "3"))
  with Checkpointer(tmp_path, keep_latest=3) as ckpt:
    restored = ckpt.restore_latest(abstract(make_state(0)))
    assert isinstance(restored, Restored)
    assert restored.step == 2 and [e for e, _ in restored.skipped] == [3]
    assert_bitwise_equal(restored.state, make_state(2))
    assert len(log_lines) == 1 and f"{tmp_path / '3'}: " in log_lines[0] and "failed to load" in log_lines[0]
    assert (tmp_path / "3.corrupt").is_dir()
    assert ckpt.all_steps() == [1, 2] and ckpt.cycle_checkpoints() == {}
    assert ckpt.save(3, make_state(33), meta={"epoch": 3})
    again = ckpt.restore_latest(abstract(make_state(0)))
  assert (again.step, again.skipped) == (3, ())
  assert_bitwise_equal(again.state, make_state(33))


def test_interrupted_save_is_ignored_and_cleaned_up(tmp_path, log_lines):
  with Checkpointer(tmp_path) as ckpt:
    save_epochs(ckpt, [1, 2])
  # What a process killed mid-save leaves (observed with os._exit right after an async save):
  # <step>.orbax-checkpoint-tmp/ with partial items and no commit_success.txt.
  partial = tmp_path / "3.orbax-checkpoint-tmp"
  shutil.copytree(tmp_path / "2", partial)
  os.remove(partial / "commit_success.txt")
  shutil.rmtree(partial / "state" / "d")
  with Checkpointer(tmp_path) as ckpt:
    restored = ckpt.restore_latest(abstract(make_state(0)))
    assert (restored.step, restored.skipped) == (2, ())
    assert ckpt.save(3, make_state(3), meta={"epoch": 3})
    assert ckpt.all_steps() == [2, 3]
  assert not log_lines
  assert sorted(os.listdir(tmp_path)) == ["2", "3"]


def test_template_mismatch_raises_and_renames_nothing(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    save_epochs(ckpt, [1, 2])
    wrong = {"params": make_state(0).params}
    with pytest.raises(RuntimeError, match="no checkpoint"):
      ckpt.restore_latest(abstract(wrong))
    assert ckpt.all_steps() == [1, 2]
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_save_rejects_old_epochs_and_non_json_meta(tmp_path, log_lines):
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.save(4, make_state(4), meta={"epoch": 4})
    assert not ckpt.save(4, make_state(5), meta={"epoch": 4}, cycle_end=0)
    assert not ckpt.save(3, make_state(3), meta={"epoch": 3})
    assert len(log_lines) == 2 and "step 4 is already saved" in log_lines[0]
    with pytest.raises(TypeError):
      ckpt.save(5, make_state(5), meta={"array": np.zeros(2)})
    assert ckpt.all_steps() == [4] and ckpt.cycle_checkpoints() == {}
  with pytest.raises(ValueError, match="keep_latest"):
    Checkpointer(tmp_path, keep_latest=0)


_KILLED_WRITER = """
import os, sys, jax.numpy as jnp
from jaxsparse.checkpoint import Checkpointer
ckpt = Checkpointer(sys.argv[1])
ckpt.save(1, {"w": jnp.full((4_000_000,), 1.0)}, meta={"epoch": 1})
ckpt.wait()
ckpt.save(2, {"w": jnp.full((4_000_000,), 2.0)}, meta={"epoch": 2})
os._exit(0)  # dies while the asynchronous write of epoch 2 is in flight
"""


@pytest.mark.slow
def test_process_killed_during_async_save(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], env=env, check=True, capture_output=True)
  # The write of epoch 2 (16 MB) was still in flight when the process died: no committed step 2.
  assert sorted(os.listdir(tmp_path)) == ["1", "2.orbax-checkpoint-tmp"]
  with Checkpointer(tmp_path) as ckpt:
    restored = ckpt.restore_latest({"w": jnp.zeros((4_000_000,))})
    assert (restored.step, restored.skipped) == (1, ())
    assert np.all(np.asarray(restored.state["w"]) == 1)
    assert ckpt.save(2, {"w": jnp.full((4_000_000,), 3.0)}, meta={"epoch": 2})
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]
