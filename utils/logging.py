"""Logging on rank 0: stdout messages, tqdm bars (only on a terminal), tensorboardX scalars."""
import logging
import sys

from tqdm import tqdm

LOGGER_NAME = "ciss"


def setup_logging(is_main):
    """Messages of the ``ciss`` logger (and the data modules') to stdout on rank 0; warnings only elsewhere."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    return logging.getLogger(LOGGER_NAME)


def progress(iterable, enabled, **kwargs):
    """A tqdm bar on stderr when ``enabled`` (rank 0) and stderr is a terminal; the bare iterable otherwise."""
    if enabled and sys.stderr.isatty():
        return tqdm(iterable, dynamic_ncols=True, leave=False, **kwargs)
    return iterable


class ScalarWriter:
    """tensorboardX scalars in ``folder`` on rank 0; does nothing on other ranks."""

    def __init__(self, folder, enabled):
        self.writer = None
        if enabled:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(folder)

    def scalars(self, values, step, prefix=""):
        if self.writer is not None:
            for name, value in values.items():
                if value is not None:
                    self.writer.add_scalar(f"{prefix}{name}", value, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()
