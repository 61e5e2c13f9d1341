"""One training run per run folder: a lock file holding the owner's pid and host.

The lock is created atomically (``O_CREAT | O_EXCL``) as ``{folder}/.lock`` with a JSON line ``{"pid", "host",
"started"}``. A second run on the same folder stops with one line naming the owner. A lock whose owner is gone
(same host, no such process) is stale: it is replaced, with a log line. A lock held by another host cannot be
checked and is respected; the message says how to remove it.
"""
import json
import logging
import os
import socket
import time

from utils.errors import UserError
from utils.jsonfile import read_json_or_none

log = logging.getLogger("ciss")

LOCK_NAME = ".lock"


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """``with RunLock(folder):`` holds the folder's lock for the duration (see the module docstring)."""

    def __init__(self, folder):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.held = False

    def acquire(self):
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create the run folder {self.folder} ({err.strerror}): check --ckpt_dir") from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except PermissionError:
                raise UserError(f"the run folder {self.folder} is not writable: check --ckpt_dir") from None
            except FileExistsError:
                owner = read_json_or_none(self.path)
                if owner is None or (owner.get("host") == me["host"] and not _alive(int(owner.get("pid", -1)))):
                    log.info("removing the stale lock %s (%s)", self.path,
                             "unreadable" if owner is None else f"process {owner['pid']} is gone")
                    try:
                        os.remove(self.path)
                    except FileNotFoundError:
                        pass
                    continue
                raise UserError(f"another run (pid {owner.get('pid')} on {owner.get('host')}, started"
                                f" {owner.get('started')}) is training in {self.folder}: wait for it, or remove"
                                f" {self.path} if that run is gone") from None
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(me, handle)
            self.held = True
            return self
        raise UserError(f"cannot take the lock {self.path}: another run keeps re-creating it")

    def release(self):
        if self.held:
            owner = read_json_or_none(self.path)
            if owner is not None and owner.get("pid") == os.getpid():
                os.remove(self.path)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
