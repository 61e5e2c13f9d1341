"""engine/step.py: the best-weight selection score."""
import pytest

from engine.step import selection_score
from methods.base import StepContext


def test_selection_score_includes_background_at_step_0_only():
    steps = ((0, 1, 2), (3, 4))
    iou = {0: 0.9, 1: 0.5, 2: 0.1, 3: 0.3, 4: 0.7}
    assert selection_score(iou, StepContext("voc", steps, 0)) == pytest.approx((0.9 + 0.5 + 0.1) / 3)
    assert selection_score(iou, StepContext("voc", steps, 1)) == pytest.approx((0.3 + 0.7) / 2)
