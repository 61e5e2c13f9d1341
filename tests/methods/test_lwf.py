"""methods/lwf.py: LwF's KD on the old channels and LwF-MC's BCE and iCaRL distillation
(MiB utils/loss.py::KnowledgeDistillationLoss, BCEWithLogitsLossWithIgnoreIndex) against explicit loops."""
import pytest

from methods import losses, lwf
from tests.helpers import B, C, H, REL, W, bce, lse, make_inputs, pixels, sigmoid, softmax, z_at


# ---- LwF / ILT KD (MiB utils/loss.py::KnowledgeDistillationLoss) -------------------------------------
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_kd_old_channels_by_loop(alpha):
    logits, old_logits, _ = make_inputs(seed=3)
    n_old = old_logits.shape[1]
    total = 0.0
    for b, i, j in pixels():
        z = z_at(logits, b, i, j)[:n_old]  # log-softmax over the old channels only
        q = softmax([alpha * v for v in z_at(old_logits, b, i, j)])
        d = lse(z)
        total += sum(q[c] * (z[c] - d) for c in range(n_old)) / n_old
    expected = -total / (B * H * W)
    assert lwf.kd_old_channels(logits, old_logits, alpha).item() == pytest.approx(expected, rel=REL)


# ---- LwF-MC (MiB utils/loss.py::BCEWithLogitsLossWithIgnoreIndex, train.py::Trainer.train) -----------
def test_bce_all_pixels_by_loop():
    logits, _, labels = make_inputs(seed=4)
    total = 0.0
    for b, i, j in pixels():
        y = int(labels[b, i, j])
        if y == 255:
            continue
        z = z_at(logits, b, i, j)
        total += sum(bce(z[c], 1.0 if c == y else 0.0) for c in range(C))
    assert lwf.bce_all_pixels(logits, labels).item() == pytest.approx(total / (B * H * W), rel=REL)
    # BARM's BCE divides by the valid pixels instead
    assert losses.bce_with_ignore(logits, labels).item() == pytest.approx(total / (B * H * W - 3), rel=REL)


def test_icarl_distillation_by_loop():
    logits, old_logits, _ = make_inputs(seed=5)
    n_old = old_logits.shape[1]
    total = 0.0
    for b, i, j in pixels():
        z, z_old = z_at(logits, b, i, j), z_at(old_logits, b, i, j)
        total += sum(bce(z[c], sigmoid(z_old[c])) for c in range(n_old))
    expected = n_old * total / (B * n_old * H * W)
    assert lwf.icarl_distillation(logits, old_logits).item() == pytest.approx(expected, rel=REL)
