#!/usr/bin/env python
"""Trains LayerDiff from a config file.

  python scripts/train.py --config configs/shapes_cpu.py --workdir runs/shapes
  python scripts/train.py --config configs/tpu_v4.py --workdir gs://... --config.train.num_steps=20000

Override any config field with --config.<field>=<value>. A run resumes from the latest checkpoint in its
workdir unless --noresume. Several processes: jax.distributed starts from --coordinator_address,
--num_processes, --process_id (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), or by
itself on a multi-host Cloud TPU slice or a SLURM job. One run at a time may use a workdir (it is locked
while the run lasts). Ctrl-C stops after the current step with a checkpoint, as SIGTERM does; a second
Ctrl-C stops at once. Exit status: 0 when the run finished, or stopped on SIGTERM, Ctrl-C or at
config.train.time_limit_s after its checkpoint, 1 on a non-finite loss or a checkpoint that could not be
written (a full disk), 2 on a bad config (a missing --config file or one that does not load, an unknown
field, a bad value), a missing or unreadable input, or a workdir that is in use or cannot be written, 130
on a second Ctrl-C.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from layerdiff_jax.cli import absl_flags_parser, config_problem

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file (configs/*.py)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "folder for checkpoints, metrics and the exported model", required=True)
_RESUME = flags.DEFINE_bool("resume", True, "continue from the latest checkpoint in --workdir")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (multi-process runs)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (multi-process runs)")


def _without_traceback(record: logging.LogRecord) -> bool:
    """Keeps a log record's message, drops its traceback: orbax's background threads log a failed checkpoint
    write with a traceback per thread, and the trainer reports the failure itself."""
    record.exc_info, record.exc_text = None, None
    return True


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save step at INFO
    logging.getLogger("absl").addFilter(_without_traceback)  # a failed save is reported once, in one line
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config configs/shapes_cpu.py")

    from layerdiff_jax.mesh import initialize_distributed
    from layerdiff_jax.training.config import ConfigError, validate_config

    try:
        config = validate_config(_CONFIG.value)  # before jax.distributed, devices or any loading
    except ConfigError as e:
        print(f"bad config: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the --config file is missing or does not run
        print(f"bad config: {config_problem(e)}", file=sys.stderr)
        return 2
    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

    from layerdiff_jax.convert.core import ConversionError
    from layerdiff_jax.data.layers import DataError
    from layerdiff_jax.fileio import OutputFolderError
    from layerdiff_jax.training.checkpoint import CheckpointRestoreError
    from layerdiff_jax.training.trainer import NonFiniteLossError, train

    try:
        result = train(config, _WORKDIR.value, resume=_RESUME.value)
    except ConfigError as e:
        print(f"bad config: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ConversionError, CheckpointRestoreError, DataError, OutputFolderError) as e:
        # a missing or unreadable SD folder or dataset, checkpoints with --noresume, none that restores, a workdir
        # that another run holds or that cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a checkpoint or the model folder could not be written (a full disk)
        print(f"training stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C (the first stops after the step, with a checkpoint)
        print(f"training interrupted: it resumes from the last checkpoint in {_WORKDIR.value}/checkpoints", file=sys.stderr)
        return 130
    how = "stopped on request" if result.stopped_early else "stopped at the time limit" if result.out_of_time else "finished"
    print(f"{how} at step {result.step}" + (f"; model folder: {result.model_dir}" if result.model_dir else ""))
    return 0


if __name__ == "__main__":
    from layerdiff_jax.hostmem import reexec_with_huge_page_malloc

    reexec_with_huge_page_malloc()
    app.run(main, flags_parser=absl_flags_parser("train.py"))
