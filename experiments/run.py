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
import contextlib
import dataclasses
import functools
import logging
import os
import signal
import sys
import typing

import jax
from tqdm import tqdm

from jaxsparse import config as config_lib
from jaxsparse import controllers, loop
from jaxsparse.errors import Explained
from jaxsparse.workdir import finished


def _option_value(text: str):
  """A controller option from the command line: int, float, 'none' -> None, else the string."""
  for cast in (int, float):
    with contextlib.suppress(ValueError):
      return cast(text)
  return None if text.lower() == "none" else text


def _keeps(text: str) -> tuple[float, ...]:
  try:
    return tuple(float(k) for k in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated keep ratios like 1,0.5,0.1; got {text!r}")


def flag(option: str) -> str:
  """The command-line flag of a Config field, controller option or train_and_evaluate argument: ``train_size`` ->
  ``--train-size``, ``controller_options.keep`` -> ``--keep``."""
  return "--" + option.rpartition(".")[2].replace("_", "-")


def in_flags(error: Exception) -> str:
  """An error's message, naming the options of the library's errors (`jaxsparse.errors.Explained`) by their flags."""
  return error.render(flag) if isinstance(error, Explained) else str(error)


class _Parser(argparse.ArgumentParser):
  """argparse, with a mistake reported in one line (not the whole usage) and a pointer to --help."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None) -> argparse.Namespace:
  p = _Parser(prog="run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument(
    "--preset", default="paper", choices=sorted(config_lib.PRESETS),
    help="paper: WRN-28-4, all data, 200 epochs (GPU); cpu, study, overfit: CPU-sized (README, Presets); "
    "smoke: seconds (default: %(default)s)",
  )  # fmt: skip
  for name, what in (
    ("workdir", "run directory (default: runs/<preset>_<schedule>_s<seed>)"),
    ("fresh", "delete this run's previous outputs and start over"),
    ("reevaluate", "a finished run (summary.json, same config) is evaluated again; without it, it is left as it is"),
    ("no-progress", "no progress bar"),
    ("distributed", "several processes, one run: call jax.distributed.initialize() first (without the four flags "
     "below or their variables JAX detects the cluster: SLURM, Open MPI, TPU pods, GKE)"),
  ):  # fmt: skip
    p.add_argument(f"--{name}", help=what, **({} if name == "workdir" else {"action": "store_true"}))
  for name, kind, what in (
    ("coordinator-address", str, "host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS, else detected)"),
    ("num-processes", int, "how many processes (default: $JAX_NUM_PROCESSES, else detected)"),
    ("process-id", int, "this process's index in [0, num-processes) (default: $JAX_PROCESS_ID, else detected)"),
    ("heartbeat-timeout", int, "seconds after which a silent process counts as dead (default: JAX's, 100)"),
  ):
    p.add_argument(f"--{name}", type=kind, help=f"with --distributed: {what}")
  group = p.add_argument_group("run options (Config fields; default: the preset's value)")
  hints = typing.get_type_hints(config_lib.Config)
  for field in (f for f in dataclasses.fields(config_lib.Config) if f.metadata["flag"]):
    choices, kind = field.metadata["choices"], hints[field.name]
    kwargs: dict = {"dest": field.name, "default": None, "help": field.metadata["help"]}
    if kind is bool:
      kwargs["action"] = argparse.BooleanOptionalAction
    elif field.name == "eval_keeps":
      kwargs.update(type=_keeps, metavar="K,K,...")
    elif choices is not None:  # augment's None is "none" on the command line
      kwargs["choices"] = sorted(choices) if field.name == "model" else ["none" if c is None else c for c in choices]
    else:
      kwargs["type"] = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))  # int | None -> int
    group.add_argument(flag(field.name), *(["--lr"] if field.name == "learning_rate" else []), **kwargs)
  group = p.add_argument_group("controller options (each applies to the schedules named)")
  defaults: dict[str, dict] = {}  # option -> {controller: its default}
  for name in controllers.names():
    for option, default in controllers.options(name).items():
      defaults.setdefault(option, {})[name] = default
  for option, shown in defaults.items():
    shown = ", ".join(f"{n}={d}" for n, d in shown.items())
    group.add_argument(flag(option), dest="ctrl_" + option, type=_option_value, metavar="X", help=f"defaults: {shown}")
  return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> config_lib.Config:
  """The preset, with every flag given overriding its field; raises ValueError (`in_flags` words it)."""
  fields = [f.name for f in dataclasses.fields(config_lib.Config) if f.metadata["flag"]]
  overrides = {k: getattr(args, k) for k in fields if getattr(args, k) is not None}
  if overrides.get("augment") == "none":
    overrides["augment"] = None
  options = {k[len("ctrl_") :]: v for k, v in vars(args).items() if k.startswith("ctrl_") and v is not None}
  config = config_lib.preset(args.preset, controller_options=options, **overrides)
  loop.check_config(config)
  return config


def distributed_args(args: argparse.Namespace) -> dict:
  """jax.distributed.initialize's arguments from the flags, else JAX_NUM_PROCESSES / JAX_PROCESS_ID (JAX reads
  JAX_COORDINATOR_ADDRESS itself; whatever is left out, JAX's cluster detection finds)."""
  given = {"coordinator_address": args.coordinator_address, "num_processes": args.num_processes,
           "process_id": args.process_id, "heartbeat_timeout_seconds": args.heartbeat_timeout}  # fmt: skip
  if not args.distributed:
    named = [k for k, v in given.items() if v is not None]
    if named:
      raise ValueError(f"{flag(named[0].removesuffix('_seconds'))} needs --distributed")
    return {}
  for key, var in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
    if given[key] is None and (text := os.environ.get(var, "").strip()):
      if not text.isdigit():
        raise ValueError(f"{var}={text!r} is not an integer")
      given[key] = int(text)
  timeout, n, i = given["heartbeat_timeout_seconds"], given["num_processes"], given["process_id"]
  for wrong, problem in (
    (timeout is not None and timeout < 1, f"--heartbeat-timeout must be >= 1 second, got {timeout}"),
    (n is not None and n < 1, f"--num-processes must be >= 1, got {n}"),
    (None not in (i, n) and not 0 <= i < n, f"--process-id must be in [0, {n}), got {i}"),
  ):
    if wrong:
      raise ValueError(problem)
  return {k: v for k, v in given.items() if v is not None}


class _TqdmHandler(logging.Handler):
  """Log lines printed above the progress bar."""

  def emit(self, record):
    tqdm.write(self.format(record))


def main(argv=None) -> int:
  args, say = parse_args(argv), functools.partial(print, file=sys.stderr)
  try:
    config, coordination = config_from_args(args), distributed_args(args)
  except ValueError as e:
    say(f"error: {in_flags(e)}")
    return 2
  if args.distributed:
    # CPU processes exchange gradients through gloo (GPUs and TPUs use their own collectives).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**coordination)
  logger = logging.getLogger("jaxsparse")  # the library's one channel, printed above the progress bar
  logger.handlers, logger.propagate = [_TqdmHandler()], False
  logger.setLevel(logging.INFO)
  workdir = args.workdir or f"runs/{args.preset}_{config.schedule}_s{config.seed}"
  say(f"run directory: {workdir}")
  with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # not a finished run (`workdir.finished`)
    saved, summary = finished(workdir)
    if saved == config and not (args.fresh or args.reevaluate):
      say(
        f"{workdir} holds this run, finished: dense test accuracy {summary['test_accuracy']:.4f} (best "
        f"{summary['best_test_accuracy']:.4f}); nothing to do (--reevaluate evaluates it again, --fresh starts over)"
      )
      return 0
  try:
    loop.train_and_evaluate(config, workdir, fresh=args.fresh, progress=not args.no_progress)
  except (ValueError, FloatingPointError, loop.WorkdirError) as e:  # bad data, a full disk, a diverged run
    say(f"error: {in_flags(e)}")
    return 1
  except OSError as e:  # e.g. an unreadable --data or --cache-dir
    say(f"error: {e}; check the path, its permissions and the free disk space")
    return 1
  except loop.Interrupted as e:
    say(e)
    return 128 + (e.signum or signal.SIGINT)
  except KeyboardInterrupt as e:  # a second signal, or Ctrl-C before the run trains
    say(f"aborted; the last checkpoint in {workdir}/checkpoints is intact; run the same command to resume")
    return 128 + getattr(e, "signum", signal.SIGINT)
  return 0


if __name__ == "__main__":
  from malloc_env import reexec_with_tunables  # the script's own folder is where Python looks first

  reexec_with_tunables()  # CPU runs: glibc keeps XLA's temp buffers (GLIBC_TUNABLES set by you: left as it is)
  sys.exit(main())
