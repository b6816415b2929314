"""What the command-line entry points share: `run`, which prints a user's error as one line (jaxgpt/errors.py),
flag parsing with one-line config errors, and the flags and initialisation of multi-process launches."""
from __future__ import annotations

import os
import sys

import jax
from absl import app, flags

from jaxgpt.errors import UserError

FLAGS = flags.FLAGS


def fail(message) -> None:
    """Exits with `error: message` as one line on stderr and status 1."""
    print("error: " + "; ".join(line.strip() for line in str(message).strip().splitlines()), file=sys.stderr)
    sys.exit(1)


def log(is_main: bool, message: str):
    """A line on standard output from process 0 (the others print nothing)."""
    if is_main:
        print(message, flush=True)


def run(main) -> None:
    """app.run(main) with config-aware flag parsing; a UserError ends the program as one line, not a traceback."""
    def guarded(argv):
        try:
            return main(argv)
        except (UserError, OSError) as e:  # OSError: a path a user named, permissions, a full disk
            fail(e)
    app.run(guarded, flags_parser=parse_flags)


def define_distributed_flags():
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a multi-process launch that JAX "
                        "cannot detect by itself (SLURM and Open MPI are detected).")
    flags.DEFINE_integer("num_processes", None, "Processes in a multi-process launch.")
    flags.DEFINE_integer("process_id", None, "This process's index in a multi-process launch.")
    flags.DEFINE_integer("heartbeat_timeout", 60, "Seconds without a heartbeat after which a multi-process run "
                         "declares a peer dead and every process exits with an error (instead of hanging).")


def maybe_initialize_distributed():
    if (options := distributed_options(os.environ)) is not None:
        jax.distributed.initialize(**options)


def distributed_options(environ) -> dict | None:
    """jax.distributed.initialize's arguments, or None for a single process: the explicit flags, else a SLURM job
    of several tasks, an Open MPI launch of several processes or JAX_COORDINATOR_ADDRESS (JAX reads the rest)."""
    options = dict(heartbeat_timeout_seconds=FLAGS.heartbeat_timeout)
    if FLAGS.coordinator_address or FLAGS.num_processes:
        return options | dict(coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
                              process_id=FLAGS.process_id)
    if any(int(environ.get(v) or 1) > 1 for v in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")):
        return options
    return options if environ.get("JAX_COORDINATOR_ADDRESS") else None


def parse_flags(argv):
    """absl's parser, its errors (a wrong type, an unknown config field, a missing flag) as one line."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        fail(e)
    except (AttributeError, KeyError) as e:  # ml_collections: an unknown field, "'lrr'\nDid you mean ..."
        while isinstance(e, (AttributeError, KeyError)) and e.args and not isinstance(e.args[0], str):
            e = e.args[0]
        field, _, hint = str(e.args[0] if e.args else e).partition("\n")
        field = field.strip("'\"")
        bad = [a for a in argv[1:] if a.startswith(("--config.", "-config.")) and field in a]
        fail(f"unknown config field {field!r} in {' '.join(bad) or argv[1:]}" + (f" ({hint})" if hint else "")
             + "; every field is listed in configs/base.py")
