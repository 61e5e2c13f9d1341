"""utils/distributed.py: the process setup refuses more processes than GPUs."""
import pytest
import torch

from utils import distributed
from utils.errors import UserError


def test_more_processes_than_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(UserError, match="2 processes on this node but 1 visible GPU"):
        distributed.setup("auto")
