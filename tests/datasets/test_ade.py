"""datasets/ade.py: the ADE palette is deterministic and its colours are distinct."""
import numpy as np

from datasets import ade
from tests.helpers import VOID


def test_ade_palette_is_deterministic_and_distinct():
    palette = ade.palette().astype(np.int64)
    assert palette.shape == (256, 3) and tuple(palette[0]) == (0, 0, 0) and tuple(palette[255]) == VOID
    classes = palette[:151]
    distances = np.sqrt(((classes[:, None] - classes[None]) ** 2).sum(-1)) + np.eye(151) * 1e9
    assert distances.min() >= 36  # one step of the 8-level grid
    for reserved in ((255, 255, 255), VOID):
        assert np.sqrt(((classes - np.array(reserved)) ** 2).sum(-1)).min() >= 36
    assert np.array_equal(ade.palette(), palette)
