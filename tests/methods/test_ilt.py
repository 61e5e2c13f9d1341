"""methods/ilt.py: ILT's feature distillation (MiB train.py::Trainer.train) against an explicit loop."""
import pytest
import torch

from methods import ilt
from tests.helpers import REL


# ---- ILT (MiB train.py::Trainer.train) ---------------------------------------------------------------
def test_feature_mse_by_loop():
    gen = torch.Generator().manual_seed(6)
    f, g = torch.randn(2, 3, 2, 2, generator=gen), torch.randn(2, 3, 2, 2, generator=gen)
    values = [(float(a) - float(b)) ** 2 for a, b in zip(f.flatten(), g.flatten())]
    assert ilt.feature_mse(f, g).item() == pytest.approx(sum(values) / 24, rel=REL)
