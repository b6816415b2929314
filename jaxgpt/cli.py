"""What the command-line entry points share: absl flag parsing with one-line config errors, and the flags and
initialisation of multi-process (jax.distributed) launches."""
from __future__ import annotations

import os
import sys

import jax
from absl import flags

FLAGS = flags.FLAGS


def define_distributed_flags():
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a multi-process launch that JAX "
                        "cannot detect by itself (SLURM and Open MPI are detected).")
    flags.DEFINE_integer("num_processes", None, "Processes in a multi-process launch.")
    flags.DEFINE_integer("process_id", None, "This process's index in a multi-process launch.")
    flags.DEFINE_integer("heartbeat_timeout", 60, "Seconds without a heartbeat after which a multi-process run "
                         "declares a peer dead and every process exits with an error (instead of hanging).")


def maybe_initialize_distributed():
    """jax.distributed for multi-process launches: explicit flags, or the cluster environment JAX detects."""
    if FLAGS.coordinator_address or FLAGS.num_processes:
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                                   heartbeat_timeout_seconds=FLAGS.heartbeat_timeout)
    elif any(int(os.environ.get(v, "1")) > 1 for v in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")) or \
            os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(heartbeat_timeout_seconds=FLAGS.heartbeat_timeout)


def parse_flags(argv):
    """absl's parser, with an unknown config field reported as one line instead of ml_collections' traceback."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"FATAL Flags parsing error: {e}")
    except (AttributeError, KeyError) as e:
        field = str(e).strip("'\"")
        bad = [a for a in argv[1:] if a.startswith(("--config.", "-config.")) and field in a]
        sys.exit(f"FATAL Flags parsing error: unknown config field {field!r} in {' '.join(bad) or argv[1:]}; "
                 "every field is listed in configs/base.py")
