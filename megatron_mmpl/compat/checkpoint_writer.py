"""megatron-core 0.16.1's checkpoint-writer helper process, started by us so that the trainer decides how it
handles signals.

`dist_checkpointing.save` (torch_dist, FileSystemWriterAsync) collects the forked writers' results through a
queue of a `multiprocessing.Manager` it spawns on first use (`filesystem_async._get_write_results_queue`). When a
scheduler signals the whole process group, that Manager's server died of SIGTERM/SIGUSR1 and the trainer's
stop-save failed with BrokenPipeError; after a kill -9 of the trainer it kept running. We create the queue from a
Manager started with the trainer's helper-process initializer (training/signals.py: ignore the stop signals, die
with the trainer).

A failed write (disk full) is also logged by `FileSystemWriterAsync.write_preloaded_data_multiproc` as "Local
process N encountered an error: ..." before the exception reaches the trainer, which reports it in one line naming
the file and the fix (training/checkpoint.py); that log line is dropped so the user gets one line, not two.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections.abc import Callable
from multiprocessing.managers import SyncManager

_MANAGER: SyncManager | None = None


def _not_a_writer_error(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Local process ")


def install_results_queue(initializer: Callable[[], None]) -> None:
    """Give megatron's writer its results queue from a Manager whose server runs `initializer` first, and drop its
    duplicate error log line (once per process; call before the first save)."""
    global _MANAGER
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if _not_a_writer_error not in filesystem_async.logger.filters:
        filesystem_async.logger.addFilter(_not_a_writer_error)
    if filesystem_async._results_queue is not None:
        return
    _MANAGER = SyncManager(ctx=mp.get_context("spawn"))
    _MANAGER.start(initializer=initializer)
    filesystem_async._results_queue = _MANAGER.Queue()
