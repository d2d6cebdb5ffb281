"""Train one run: flags -> Config -> jaxsparse.loop.train_and_evaluate -> summary.

  python experiments/run.py --schedule=adaptive_b                       # the paper preset (WRN-28-4, GPU)
  python experiments/run.py --schedule=adaptive_b --preset=cpu --data=../shared/data/cifar10-jpeg.tar.gz

Re-running the same command resumes from the run directory's checkpoints; --fresh starts over.
Ctrl-C (SIGINT) or SIGTERM saves a checkpoint at the current step, prints where, and exits with 130 or 143;
the same command then continues the run mid-epoch. A second signal aborts at once (the last checkpoint stays).
On Linux CPU machines the script re-executes itself once with glibc allocator settings (experiments/malloc_env.py)
unless GLIBC_TUNABLES is already set; `GLIBC_TUNABLES= python experiments/run.py ...` opts out.
Exit codes: 0 done, 1 a run error (bad data, unwritable run directory, non-finite loss...), 2 bad flags.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from jaxsparse import config as config_lib  # noqa: E402
from jaxsparse import controllers  # noqa: E402


def _option_value(text: str):
  """A controller option from the command line: int, float, 'none' -> None, else the string."""
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return None if text.lower() == "none" else text


def _keeps(text: str) -> tuple[float, ...]:
  try:
    return tuple(float(k) for k in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated keep ratios like 1,0.5,0.1; got {text!r}")


def _controller_flags() -> dict[str, dict[str, object]]:
  """option name -> {controller name: default} over every registered controller."""
  flags: dict[str, dict[str, object]] = {}
  for name in controllers.names():
    for opt, default in controllers.options(name).items():
      flags.setdefault(opt, {})[name] = default
  return flags


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument(
    "--schedule", default="adaptive_b", choices=controllers.names(), help="keep-ratio controller (default: %(default)s)"
  )
  p.add_argument(
    "--preset",
    default="paper",
    choices=sorted(config_lib.PRESETS),
    help="paper: WRN-28-4, full data, 200 epochs (GPU); cpu: ~8 min on 2 CPU cores; study: ~5 min and "
    "overfit: ~20 min on one core (README, Presets); smoke: seconds (default: %(default)s)",
  )
  p.add_argument(
    "--data",
    help="cifar10 (default: a prepared TFDS cifar10, else the original archive, downloaded "
    "once), tfds:cifar10, a CIFAR-10 image-folder .tar.gz or folder, "
    "cifar-10-python.tar.gz or its folder, or an .npz with x_train,y_train,x_test,y_test",
  )
  p.add_argument("--cache-dir", help="where decoded datasets are cached (default ~/.cache/jaxsparse)")
  p.add_argument("--epochs", type=int)
  p.add_argument("--seed", type=int)
  p.add_argument("--model", choices=sorted(config_lib.MODELS))
  p.add_argument("--norm", choices=config_lib.NORMS)
  p.add_argument("--dropout", type=float)
  p.add_argument("--dtype", choices=config_lib.DTYPES)
  p.add_argument(
    "--conv",
    choices=config_lib.CONVS,
    help="convolution implementation (default auto: wgrad_matmul on CPU, xla elsewhere; docs/performance.md)",
  )
  p.add_argument("--batch-size", type=int)
  p.add_argument("--learning-rate", "--lr", type=float)
  p.add_argument("--warmup-epochs", type=int)
  p.add_argument("--weight-decay", type=float)
  p.add_argument("--train-size", type=int, help="stratified subset of the training set")
  p.add_argument("--val-size", type=int, help="validation images held out of the training set")
  p.add_argument("--augment", choices=["none", "flip_crop"])
  p.add_argument("--topk-gradient", choices=config_lib.GRADIENTS)
  p.add_argument("--topk-score", choices=config_lib.SCORES)
  p.add_argument(
    "--topk-keep",
    choices=config_lib.TOPK_KEEPS,
    help="absolute (default): keep is a fraction of all units of a site; relative: of each example's "
    "active units (score > 0)",
  )
  p.add_argument(
    "--regimes",
    type=int,
    help="keep ratios trained per step (default 1); n >= 2: keep 1.0, the "
    "schedule's keep and n - 2 random keeps between (n passes per step)",
  )
  p.add_argument(
    "--distill",
    action="store_true",
    default=None,
    help="with --regimes >= 2: sparse passes learn from the dense pass's predictions",
  )
  p.add_argument("--eval-keeps", type=_keeps, help="test-time keep ratios for the final keep curve")
  p.add_argument("--eval-every", type=int, help="dense test accuracy every N epochs and at the last (default 1)")
  p.add_argument("--workdir", help="run directory (default: runs/<preset>_<schedule>_s<seed>)")
  p.add_argument("--fresh", action="store_true", help="delete this run's previous outputs and start over")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument(
    "--distributed",
    action="store_true",
    help="several processes, one run: call jax.distributed.initialize() first. With no coordinator "
    "flags or variables, JAX detects the cluster (SLURM, Open MPI, TPU pods, GKE)",
  )
  p.add_argument(
    "--coordinator-address",
    help="with --distributed: host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS, else detected)",
  )
  p.add_argument(
    "--num-processes",
    type=int,
    help="with --distributed: how many processes (default: $JAX_NUM_PROCESSES, else detected)",
  )
  p.add_argument(
    "--process-id",
    type=int,
    help="with --distributed: this process's index in [0, num-processes) (default: $JAX_PROCESS_ID, else detected)",
  )
  p.add_argument(
    "--heartbeat-timeout",
    type=int,
    metavar="SECONDS",
    help="with --distributed: a process silent this long counts as dead and every other process "
    "stops with an error naming it (default: JAX's, 100)",
  )
  group = p.add_argument_group("controller options (each applies to the schedules named)")
  for opt, defaults in _controller_flags().items():
    shown = ", ".join(f"{n}={d}" for n, d in defaults.items())
    group.add_argument(
      "--" + opt.replace("_", "-"), dest="ctrl_" + opt, type=_option_value, metavar="X", help=f"defaults: {shown}"
    )
  return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> config_lib.Config:
  overrides = {
    f: getattr(args, f)
    for f in (
      "data",
      "cache_dir",
      "epochs",
      "seed",
      "model",
      "norm",
      "dropout",
      "dtype",
      "conv",
      "batch_size",
      "learning_rate",
      "warmup_epochs",
      "weight_decay",
      "train_size",
      "val_size",
      "topk_gradient",
      "topk_score",
      "topk_keep",
      "regimes",
      "distill",
      "eval_keeps",
      "eval_every",
    )
    if getattr(args, f) is not None
  }
  if args.augment is not None:
    overrides["augment"] = None if args.augment == "none" else args.augment
  options = {k[len("ctrl_") :]: v for k, v in vars(args).items() if k.startswith("ctrl_") and v is not None}
  accepted = controllers.options(args.schedule)
  wrong = sorted(set(options) - set(accepted))
  if wrong:
    raise ValueError(
      f"--{wrong[0].replace('_', '-')} does not apply to --schedule={args.schedule}; its options "
      f"are: {', '.join('--' + o.replace('_', '-') for o in accepted) or 'none'}"
    )
  config = config_lib.preset(args.preset, schedule=args.schedule, controller_options=options, **overrides)
  from jaxsparse.loop import check_config

  check_config(config)
  return config


def distributed_args(args: argparse.Namespace) -> dict:
  """jax.distributed.initialize's coordinator_address / num_processes / process_id from the flags, else from
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (left out: JAX's cluster detection), and
  heartbeat_timeout_seconds from --heartbeat-timeout."""
  import os

  given = {
    "coordinator_address": args.coordinator_address,
    "num_processes": args.num_processes,
    "process_id": args.process_id,
    "heartbeat_timeout_seconds": args.heartbeat_timeout,
  }
  if not args.distributed:
    named = [k for k, v in given.items() if v is not None]
    if named:
      flag = "heartbeat-timeout" if named[0] == "heartbeat_timeout_seconds" else named[0].replace("_", "-")
      raise ValueError(f"--{flag} needs --distributed")
    return {}
  for key, var, cast in (
    ("coordinator_address", "JAX_COORDINATOR_ADDRESS", str),
    ("num_processes", "JAX_NUM_PROCESSES", int),
    ("process_id", "JAX_PROCESS_ID", int),
  ):
    if given[key] is None and os.environ.get(var):
      try:
        given[key] = cast(os.environ[var])
      except ValueError:
        raise ValueError(f"{var}={os.environ[var]!r} is not an integer") from None
  if given["heartbeat_timeout_seconds"] is not None and given["heartbeat_timeout_seconds"] < 1:
    raise ValueError(f"--heartbeat-timeout must be >= 1 second, got {given['heartbeat_timeout_seconds']}")
  if given["num_processes"] is not None and given["num_processes"] < 1:
    raise ValueError(f"--num-processes must be >= 1, got {given['num_processes']}")
  if (
    given["process_id"] is not None
    and given["num_processes"] is not None
    and not 0 <= given["process_id"] < given["num_processes"]
  ):
    raise ValueError(f"--process-id must be in [0, {given['num_processes']}), got {given['process_id']}")
  return {k: v for k, v in given.items() if v is not None}


class _StopRequest:
  """SIGINT / SIGTERM -> a flag the loop polls after every step; a second signal aborts at once."""

  def __init__(self):
    self.signum: int | None = None

  def __call__(self) -> bool:
    return self.signum is not None

  def handle(self, signum, frame):
    del frame
    if self.signum is not None:
      raise KeyboardInterrupt
    self.signum = signum
    print(
      f"\n{signal.Signals(signum).name}: saving a checkpoint after the current step (send it again to abort at once)",
      file=sys.stderr,
    )

  def install(self) -> dict:
    return {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    config = config_from_args(args)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    coordination = distributed_args(args)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.distributed:
    import jax

    # CPU processes exchange gradients through gloo (GPUs and TPUs use their own collectives).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**coordination)
  from tqdm.auto import tqdm

  from jaxsparse import data as data_lib
  from jaxsparse.loop import Interrupted, WorkdirError, train_and_evaluate

  logging.basicConfig(level=logging.WARNING)
  workdir = args.workdir or f"runs/{args.preset}_{config.schedule}_s{config.seed}"
  print(f"run directory: {workdir}", file=sys.stderr)
  stop = _StopRequest()
  previous = stop.install()
  try:
    train_and_evaluate(
      config, workdir, fresh=args.fresh, progress=not args.no_progress, log=tqdm.write, should_stop=stop
    )
  except (ValueError, data_lib.DataError, FloatingPointError, WorkdirError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except OSError as e:  # e.g. an unreadable --data or --cache-dir
    print(f"error: {e}; check the path, its permissions and the free disk space", file=sys.stderr)
    return 1
  except KeyboardInterrupt as e:  # Interrupted, or a second signal
    if not isinstance(e, Interrupted):
      e = f"aborted; the last checkpoint in {workdir}/checkpoints is intact; run the same command to resume"
    print(f"{e}", file=sys.stderr)
    return 128 + (stop.signum or signal.SIGINT)
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  return 0


if __name__ == "__main__":
  from malloc_env import reexec_with_tunables  # experiments/ is on sys.path when this runs as a script

  reexec_with_tunables()  # CPU runs: glibc keeps XLA's temp buffers (GLIBC_TUNABLES set by you: left as it is)
  sys.exit(main())
