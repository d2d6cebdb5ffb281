"""Data parallelism on a 1-D `data` mesh: shardings and host -> device feeding.

One compiled program serves 1 CPU, 8 GPUs or a TPU pod slice: the batch is sharded on the mesh's `data` axis and
the train state is replicated; XLA inserts the gradient all-reduce. Multi-process runs call
`jax.distributed.initialize()` first (in the entry point, not here); each process then feeds its own slice of
every global batch and `make_array_from_process_local_data` assembles the global array. Process 0 writes the
run's files (`is_primary`); `sync` and `any_process` keep the processes in step.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh named `data` over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  if batch_size % mesh.size:
    raise ValueError(
      f"batch size {batch_size} is not divisible by the {mesh.size} devices of the mesh; "
      f"choose a multiple of {mesh.size}"
    )


def to_global(local_batch: dict, mesh: Mesh) -> dict:
  """This process's slice of a global batch (numpy) -> global jax arrays sharded on `data`."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def prefetch_to_mesh(batches: Iterable[dict], mesh: Mesh, size: int = 2) -> Iterator[dict]:
  """Feeds batches to the devices `size` steps ahead, from a background thread, so devices never wait on host.

  The thread only runs numpy and device_put work; exceptions in it are re-raised in the consumer.
  """
  if size < 1:
    yield from (to_global(b, mesh) for b in batches)
    return
  q: queue.Queue = queue.Queue(maxsize=size)
  done = object()
  stop = threading.Event()

  def producer():
    try:
      for b in batches:
        if stop.is_set():
          return
        q.put(to_global(b, mesh))
      q.put(done)
    except BaseException as e:  # surfaced to the consumer
      q.put(e)

  thread = threading.Thread(target=producer, daemon=True)
  thread.start()
  try:
    while True:
      item = q.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    while thread.is_alive():  # unblock a producer waiting on a full queue
      try:
        q.get_nowait()
      except queue.Empty:
        thread.join(timeout=0.01)


def is_primary() -> bool:
  """Whether this process writes the run's files (process 0; the only process of a single-process run)."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Waits until every process of a multi-process run reaches the barrier `name`; nothing with one process."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """Whether `flag` is True in any process (a collective in multi-process runs: every process must call it)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))
