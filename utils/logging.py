"""Logging on rank 0: stdout messages, a log file in the run folder, tqdm bars (only on a terminal),
tensorboardX scalars."""
import logging
import logging.handlers
import os
import sys
import uuid

from tqdm import tqdm

LOGGER_NAME = "ciss"
LOG_FILE = "train.log"
_BUFFER_CAPACITY = 100000


class _Buffer(logging.handlers.BufferingHandler):
    """Keeps the records of a run until its log file can be opened (never flushes by itself)."""

    def shouldFlush(self, record):
        if len(self.buffer) > self.capacity:  # keep the newest records only
            del self.buffer[0]
        return False


def setup_logging(is_main, stream=None):
    """Messages of the ``ciss`` logger (and the data modules') to ``stream`` (default stdout) on rank 0; warnings
    only elsewhere. Records are also buffered until :func:`attach_log_file` names the run's log file."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler, _Buffer(_BUFFER_CAPACITY)]
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    return logging.getLogger(LOGGER_NAME)


def attach_log_file(folder):
    """Append the run's messages (those buffered since start-up included) to ``folder/train.log``; returns the
    handler (pass it to :func:`detach_log_file`)."""
    root = logging.getLogger()
    handler = logging.FileHandler(os.path.join(folder, LOG_FILE), encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    for buffer in [h for h in root.handlers if isinstance(h, _Buffer)]:
        for record in buffer.buffer:
            handler.handle(record)
        root.removeHandler(buffer)
    root.addHandler(handler)
    return handler


def detach_log_file(handler):
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        handler.close()


def plural(count, word, words=None):
    """``"1 epoch"``, ``"2 epochs"`` (``words``: an irregular plural)."""
    return f"{count} {word if count == 1 else (words or word + 's')}"


def progress(iterable, enabled, **kwargs):
    """A tqdm bar on stderr when ``enabled`` (rank 0) and stderr is a terminal; the bare iterable otherwise."""
    if enabled and sys.stderr.isatty():
        return tqdm(iterable, dynamic_ncols=True, leave=False, **kwargs)
    return iterable


class ScalarWriter:
    """tensorboardX scalars in ``folder`` on rank 0 (nothing on other ranks). The events file is created at the
    first scalar, so a run that fails before training writes none; ``purge_step`` (a resumed step's iteration)
    makes tensorboard drop the interrupted run's events from that iteration on, so curves do not overlap."""

    def __init__(self, folder, enabled, purge_step=None):
        self.folder, self.enabled, self.purge_step = folder, enabled, purge_step
        self.writer = None

    def scalars(self, values, step, prefix=""):
        if not self.enabled:
            return
        if self.writer is None:
            from tensorboardX import SummaryWriter
            # a suffix of its own: two runs within one second would otherwise write the same events file
            self.writer = SummaryWriter(self.folder, purge_step=self.purge_step,
                                        filename_suffix=f".{uuid.uuid4().hex[:8]}")
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(f"{prefix}{name}", value, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
