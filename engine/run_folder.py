"""The folder of a training run (``{ckpt_dir}/{subpath}/{task}/{setting}``): opened by rank 0 once the first
step's inputs are valid, so that a run that fails on its inputs writes nothing. Opening takes the folder's lock
(one training run per folder), starts the log file ``train.log`` (with the messages since start-up), and
removes what an interrupted run left behind in a step folder (temporary checkpoint and results files)."""
import glob
import logging
import os

from utils.logging import attach_log_file, detach_log_file
from utils.runlock import RunLock

log = logging.getLogger("ciss")

LEFTOVER_PATTERNS = (".*.pth.*.tmp", ".*.json.*.tmp", ".*.csv.*.tmp")


class RunFolder:
    def __init__(self, root, is_main):
        self.root, self.is_main = root, is_main
        self.lock = RunLock(root)
        self.log_handler = None

    def open(self):
        """Lock the folder and start its log file (rank 0; once)."""
        if not self.is_main or self.lock.held:
            return
        self.lock.acquire()
        self.log_handler = attach_log_file(self.root)

    def clean_step(self, step_dir):
        """Remove temporary files an interrupted run left in ``step_dir`` (none can be in use: the folder is
        locked)."""
        if not self.is_main:
            return
        for pattern in LEFTOVER_PATTERNS:
            for path in glob.glob(os.path.join(step_dir, pattern)):
                log.info("removing %s, left by an interrupted run", path)
                os.remove(path)

    def close(self):
        detach_log_file(self.log_handler)
        self.log_handler = None
        self.lock.release()
