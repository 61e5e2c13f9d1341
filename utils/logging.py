"""Logging on rank 0: stdout messages, a log file in the run folder, tqdm bars (only on a terminal), and a step's
scalars, tables and figures through :class:`StepLoggers` to the backends ``--logger`` chooses: tensorboardX events
in the step folder (:class:`ScalarWriter`), a WandB run (:class:`WandbWriter`, optional: the wandb package is
imported only when chosen)."""
import importlib
import logging
import logging.handlers
import os
import sys
import uuid

from utils.errors import UserError

from tqdm import tqdm

LOGGER_NAME = "ciss"
#: The backends ``--logger`` chooses from (one or more; tensorboard is the default).
LOGGERS = ("tensorboard", "wandb")
DEFAULT_LOGGERS = ("tensorboard",)
#: The WandB project of a run when the ``WANDB_PROJECT`` environment variable does not name one.
WANDB_PROJECT = "ciss"
WANDB_MISSING = "--logger wandb needs the wandb package: pip install wandb"
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
    makes tensorboard drop the interrupted run's events from that iteration on, so curves do not overlap. Tables
    and figures are WandB's: the results files hold them for tensorboard users (``takes_media`` is false)."""

    takes_media = False

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

    def table(self, name, columns, rows, step):
        pass

    def image(self, name, path, step):
        pass

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def require_loggers(names):
    """Raise a :class:`UserError` when a chosen backend's package cannot be imported (checked with the other flags,
    before anything is written)."""
    if "wandb" in names:
        try:
            importlib.import_module("wandb")  # an optional heavy dependency: imported only when chosen
        except ImportError:
            raise UserError(WANDB_MISSING) from None


class WandbWriter:
    """One WandB run per step folder, on rank 0 (nothing on other ranks), started when the step's training starts
    (so that a login or network problem shows at once): ``run_id`` is the step's run id (``results.json``'s
    ``run_id``), which ``--resume`` keeps, so a resumed step continues the same WandB run; ``name`` and ``group``
    name it (``step1`` in ``barm/15-1/overlap``), ``config`` is the resolved configuration (``config.json``'s
    content). WandB's environment variables win over what ciss would pass: ``WANDB_PROJECT`` (else
    :data:`WANDB_PROJECT`), ``WANDB_RUN_GROUP``, ``WANDB_DIR`` (else ``folder``, the run folder), and
    ``WANDB_MODE`` (``offline``: no network; ``wandb sync`` uploads later).

    Scalars are logged with ``step=`` the iteration tensorboard uses, so the two hold the same (name, step,
    value) points. WandB keeps a run's steps increasing: a resumed step that logs iterations an interrupted run
    had already logged past is dropped by the WandB server until it passes them (offline files keep both)."""

    takes_media = True

    def __init__(self, enabled, folder, run_id, name, group, config):
        self.run = None
        if not enabled:
            return
        import wandb  # an optional heavy dependency: imported only when chosen (require_loggers checked it)

        self.wandb = wandb
        environ = os.environ
        try:
            self.run = wandb.init(id=run_id, resume="allow", name=name, config=config,
                                  project=None if environ.get("WANDB_PROJECT") else WANDB_PROJECT,
                                  group=None if environ.get("WANDB_RUN_GROUP") else group,
                                  dir=None if environ.get("WANDB_DIR") else folder)
        except wandb.errors.UsageError as err:  # not logged in, a bad project or entity
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(f"--logger wandb could not start a run: {reason.rstrip('.')}; WANDB_MODE=offline logs"
                            f" without an account") from None

    def scalars(self, values, step, prefix=""):
        values = {f"{prefix}{name}": value for name, value in values.items() if value is not None}
        if self.run is not None and values:
            self.run.log(values, step=step)

    def table(self, name, columns, rows, step):
        if self.run is not None:
            data = [[row.get(column) for column in columns] for row in rows]
            self.run.log({name: self.wandb.Table(columns=list(columns), data=data)}, step=step)

    def image(self, name, path, step):
        if self.run is not None:
            self.run.log({name: self.wandb.Image(path)}, step=step)

    def close(self):
        if self.run is not None:
            self.run.finish()
            self.run = None


class StepLoggers:
    """A step's scalars, tables and figures, fanned out to the backends ``names`` (of :data:`LOGGERS`), on rank 0
    (``enabled``). ``step_folder`` holds the tensorboard events; ``run_folder`` (the setting folder), ``run_id``,
    ``name``, ``group`` and ``config`` are what WandB needs (:class:`WandbWriter`); ``purge_step``: where a resumed
    step restarts. The trainer logs through this object and never asks which backends there are."""

    def __init__(self, names, enabled, step_folder, *, run_folder=None, run_id=None, name=None, group=None,
                 config=None, purge_step=None):
        self.backends = []
        if "tensorboard" in names:
            self.backends.append(ScalarWriter(step_folder, enabled, purge_step=purge_step))
        if "wandb" in names:
            self.backends.append(WandbWriter(enabled, run_folder or step_folder, run_id, name, group, config))
        self.enabled = enabled

    @property
    def takes_media(self):
        """Whether a backend takes tables and figures (so that they are worth drawing) on this rank."""
        return self.enabled and any(backend.takes_media for backend in self.backends)

    def scalars(self, values, step, prefix=""):
        for backend in self.backends:
            backend.scalars(values, step, prefix)

    def table(self, name, columns, rows, step):
        """``rows``: dicts with the ``columns`` as keys."""
        for backend in self.backends:
            backend.table(name, columns, rows, step)

    def image(self, name, path, step):
        """The image file at ``path`` (read when logged: it may be removed afterwards)."""
        for backend in self.backends:
            backend.image(name, path, step)

    def close(self):
        """Close every backend (all of them, also when one fails)."""
        backends, self.backends = self.backends, []
        errors = []
        for backend in backends:
            try:
                backend.close()
            except Exception as err:  # noqa: BLE001 - the others still close; the first failure is raised
                errors.append(err)
        if errors:
            raise errors[0]
