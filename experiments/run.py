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
import dataclasses
import json
import logging
import signal
import sys
import typing
from pathlib import Path

from jaxsparse import config as config_lib
from jaxsparse import controllers
from jaxsparse.errors import Explained


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


def flag(option: str) -> str:
  """The command-line flag of a Config field, controller option or train_and_evaluate argument: ``train_size`` ->
  ``--train-size``, ``controller_options.keep`` -> ``--keep``."""
  return "--" + option.rpartition(".")[2].replace("_", "-")


def in_flags(error: Exception) -> str:
  """An error's message, naming the options of the library's errors (`jaxsparse.errors.Explained`) by their flags."""
  return error.render(flag) if isinstance(error, Explained) else str(error)


_ALIASES = {"learning_rate": ["--lr"]}


def _add_config_flags(p: argparse.ArgumentParser) -> None:
  """One flag per Config field (but controller_options: one flag per controller option, below), with the field's
  help and choices; every default is None, meaning "the preset's value"."""
  hints = typing.get_type_hints(config_lib.Config)
  group = p.add_argument_group("run options (Config fields; default: the preset's value)")
  for field in dataclasses.fields(config_lib.Config):
    meta = field.metadata
    if not meta.get("flag", True):
      continue
    kind = hints[field.name]
    kwargs: dict = {"dest": field.name, "default": None, "help": meta["help"]}
    choices = meta.get("choices")
    if kind is bool:
      kwargs["action"] = argparse.BooleanOptionalAction
    elif field.name == "eval_keeps":
      kwargs.update(type=_keeps, metavar="K,K,...")
    elif choices is not None and None in choices:  # e.g. augment: "none" on the command line
      kwargs["choices"] = ["none" if c is None else c for c in choices]
    elif choices is not None:
      kwargs["choices"] = sorted(choices) if field.name == "model" else list(choices)
    else:
      base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # int | None -> int
      kwargs["type"] = base
    group.add_argument(flag(field.name), *_ALIASES.get(field.name, []), **kwargs)


class _Parser(argparse.ArgumentParser):
  """argparse, with a mistake reported in one line (not the whole usage) and a pointer to --help."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None) -> argparse.Namespace:
  p = _Parser(prog="run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument(
    "--preset",
    default="paper",
    choices=sorted(config_lib.PRESETS),
    help="paper: WRN-28-4, all data, 200 epochs (GPU); cpu, study, overfit: CPU-sized (README, Presets); "
    "smoke: seconds (default: %(default)s)",
  )
  p.add_argument("--workdir", help="run directory (default: runs/<preset>_<schedule>_s<seed>)")
  p.add_argument("--fresh", action="store_true", help="delete this run's previous outputs and start over")
  p.add_argument(
    "--reevaluate",
    action="store_true",
    help="a finished run (summary.json, same config) is evaluated again; without it, it is left as it is",
  )
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument(
    "--distributed",
    action="store_true",
    help="several processes, one run: call jax.distributed.initialize() first (no coordinator flags or "
    "variables: JAX detects the cluster: SLURM, Open MPI, TPU pods, GKE)",
  )
  for name, kind, what in (
    ("coordinator-address", str, "host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS, else detected)"),
    ("num-processes", int, "how many processes (default: $JAX_NUM_PROCESSES, else detected)"),
    ("process-id", int, "this process's index in [0, num-processes) (default: $JAX_PROCESS_ID, else detected)"),
    ("heartbeat-timeout", int, "seconds after which a silent process counts as dead (default: JAX's, 100)"),
  ):
    p.add_argument(f"--{name}", type=kind, help=f"with --distributed: {what}")
  _add_config_flags(p)
  group = p.add_argument_group("controller options (each applies to the schedules named)")
  for opt, defaults in _controller_flags().items():
    shown = ", ".join(f"{n}={d}" for n, d in defaults.items())
    group.add_argument(flag(opt), dest="ctrl_" + opt, type=_option_value, metavar="X", help=f"defaults: {shown}")
  return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> config_lib.Config:
  """The preset, with every flag given overriding its field; raises ValueError (`in_flags` words it)."""
  overrides = {
    f.name: getattr(args, f.name)
    for f in dataclasses.fields(config_lib.Config)
    if f.metadata.get("flag", True) and getattr(args, f.name) is not None
  }
  if overrides.get("augment") == "none":
    overrides["augment"] = None
  schedule = overrides.get("schedule", config_lib.PRESETS[args.preset].schedule)
  options = {k[len("ctrl_") :]: v for k, v in vars(args).items() if k.startswith("ctrl_") and v is not None}
  accepted = controllers.options(schedule)
  wrong = sorted(set(options) - set(accepted))
  if wrong:
    raise ValueError(
      f"{flag(wrong[0])} does not apply to --schedule={schedule}; its options "
      f"are: {', '.join(flag(o) for o in accepted) or 'none'}"
    )
  config = config_lib.preset(args.preset, controller_options=options, **overrides)
  from jaxsparse.loop import check_config

  check_config(config)
  return config


def distributed_args(args: argparse.Namespace) -> dict:
  """jax.distributed.initialize's coordinator_address / num_processes / process_id from the flags, else from
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (left out: JAX's cluster detection), and
  heartbeat_timeout_seconds from --heartbeat-timeout."""
  import os

  keys = ("coordinator_address", "num_processes", "process_id", "heartbeat_timeout_seconds")
  given = {k: getattr(args, k.replace("_seconds", "")) for k in keys}
  named = [k for k, v in given.items() if v is not None]
  if not args.distributed:
    if named:
      raise ValueError(f"{flag(named[0].replace('_seconds', ''))} needs --distributed")
    return {}
  for key, cast in (("coordinator_address", str), ("num_processes", int), ("process_id", int)):
    var = f"JAX_{key.upper()}"
    if given[key] is None and os.environ.get(var):
      try:
        given[key] = cast(os.environ[var])
      except ValueError:
        raise ValueError(f"{var}={os.environ[var]!r} is not an integer") from None
  timeout, n, i = given["heartbeat_timeout_seconds"], given["num_processes"], given["process_id"]
  if timeout is not None and timeout < 1:
    raise ValueError(f"--heartbeat-timeout must be >= 1 second, got {timeout}")
  if n is not None and n < 1:
    raise ValueError(f"--num-processes must be >= 1, got {n}")
  if i is not None and n is not None and not 0 <= i < n:
    raise ValueError(f"--process-id must be in [0, {n}), got {i}")
  return {k: v for k, v in given.items() if v is not None}


class _TqdmHandler(logging.Handler):
  """Log lines printed above the progress bar."""

  def emit(self, record):
    from tqdm.auto import tqdm

    tqdm.write(self.format(record))


def _log_to_terminal() -> None:
  """The library's one channel, the "jaxsparse" logger, printed (INFO and up) above the progress bar."""
  logger = logging.getLogger("jaxsparse")
  if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
    logger.addHandler(_TqdmHandler())
  logger.setLevel(logging.INFO)
  logger.propagate = False


def _finished(workdir: str, config: config_lib.Config) -> dict | None:
  """The summary of the finished run in `workdir` (its summary.json and the checkpoint of its last step) if it was
  made with `config`, else None."""
  from jaxsparse.workdir import config_diff

  path = Path(workdir)
  try:
    if config_diff(config, path / "config.json"):
      return None
    summary = json.loads((path / "summary.json").read_text())
    return summary if (path / "checkpoints" / str(summary["steps"])).is_dir() else None
  except (OSError, ValueError, KeyError, TypeError):
    return None


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    config, coordination = config_from_args(args), distributed_args(args)
  except ValueError as e:
    print(f"error: {in_flags(e)}", file=sys.stderr)
    return 2
  if args.distributed:
    import jax

    # CPU processes exchange gradients through gloo (GPUs and TPUs use their own collectives).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**coordination)
  from jaxsparse import data as data_lib
  from jaxsparse.loop import Interrupted, WorkdirError, train_and_evaluate

  _log_to_terminal()
  workdir = args.workdir or f"runs/{args.preset}_{config.schedule}_s{config.seed}"
  print(f"run directory: {workdir}", file=sys.stderr)
  finished = _finished(workdir, config)
  if finished is not None and not (args.fresh or args.reevaluate):
    print(
      f"{workdir} holds this run, finished: dense test accuracy {finished['test_accuracy']:.4f} (best "
      f"{finished['best_test_accuracy']:.4f}); nothing to do (--reevaluate evaluates it again, --fresh starts over)",
      file=sys.stderr,
    )
    return 0
  try:
    train_and_evaluate(config, workdir, fresh=args.fresh, progress=not args.no_progress)
  except (ValueError, data_lib.DataError, FloatingPointError, WorkdirError) as e:
    print(f"error: {in_flags(e)}", file=sys.stderr)
    return 1
  except OSError as e:  # e.g. an unreadable --data or --cache-dir
    print(f"error: {e}; check the path, its permissions and the free disk space", file=sys.stderr)
    return 1
  except Interrupted as e:
    print(e, file=sys.stderr)
    return 128 + (e.signum or signal.SIGINT)
  except KeyboardInterrupt as e:  # a second signal, or Ctrl-C before the run trains
    print(
      f"aborted; the last checkpoint in {workdir}/checkpoints is intact; run the same command to resume",
      file=sys.stderr,
    )
    return 128 + getattr(e, "signum", signal.SIGINT)
  return 0


if __name__ == "__main__":
  from malloc_env import reexec_with_tunables  # the script's own folder is where Python looks first

  reexec_with_tunables()  # CPU runs: glibc keeps XLA's temp buffers (GLIBC_TUNABLES set by you: left as it is)
  sys.exit(main())
