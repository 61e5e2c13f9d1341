"""methods/plop.py: PLOP's loss terms (PLOP train.py::Trainer.train, features_distillation) on small tensors against
hand computations and explicit loops; the threshold pass (PLOP train.py::Trainer.find_median), the loss wiring and the
network's attentions."""
import contextlib
import math

import numpy as np
import pytest
import torch
from torch import nn

from methods import get_method, losses, plop
from methods.base import Batch, StepContext
from tests.helpers import REL, ce_px, per_pixel_mean


def entropy_by_hand(p):
    """ē of one pixel's probabilities p (a list), PLOP train.py::entropy: −(1/log K)(1/K) Σ p log(p + 1e-8)."""
    k = len(p)
    return -sum(x * math.log(x + 1e-8) for x in p) / k / math.log(k)


def pixels_to_map(pixels):
    """(1, K, 1, N) tensor from a list of N per-pixel probability (or logit) lists."""
    return torch.tensor(pixels, dtype=torch.float32).t()[None, :, None, :].contiguous()


def test_normalized_entropy_by_hand():
    pixels = [[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0]]
    result = plop.normalized_entropy(pixels_to_map(pixels))
    assert result.shape == (1, 1, 3) and result.dtype == torch.float32
    # (0.5, 0.25, 0.25): Σ p log p = −1.5 log 2, so ē = 1.5 log 2 / (3 log 3) (mean over channels, not sum)
    assert result[0, 0, 0].item() == pytest.approx(0.5 * math.log(2) / math.log(3), rel=1e-5)
    assert result[0, 0, 1].item() == pytest.approx(1 / 3, rel=1e-5)  # uniform over K channels gives 1/K
    assert abs(result[0, 0, 2].item()) < 1e-6  # one-hot: 0
    for i, p in enumerate(pixels):
        assert result[0, 0, i].item() == pytest.approx(entropy_by_hand(p), rel=1e-5, abs=1e-7)


def test_normalized_entropy_half_precision_input_is_computed_in_float32():
    probs = torch.softmax(torch.randn(2, 4, 3, 3), dim=1)
    result = plop.normalized_entropy(probs.to(torch.bfloat16))
    assert result.dtype == torch.float32


def test_entropy_histogram_bins_by_hand():
    pixels = [[0.5, 0.25, 0.25], [0.2, 0.5, 0.3], [0.0, 0.0, 1.0], [0.2, 0.5, 0.3], [0.2, 0.5, 0.3],
              [0.34, 0.33, 0.33]]
    probs = pixels_to_map(pixels)
    labels = torch.tensor([[[0, 0, 0, 2, 255, 0]]])  # pixels 3 (new class) and 4 (ignored) are not counted
    hist = plop.entropy_histogram(probs, labels, n_classes_total=5)
    assert hist.shape == (5, 100) and hist.dtype == torch.int64
    # v = ē / log(K_t), K_t = 5; bin = ⌊100 v⌋
    #   pixel 0: ē = 0.3155, v = 0.1960 -> row 0 (argmax), bin 19
    #   pixel 1: ē = 0.3124, v = 0.1941 -> row 1, bin 19
    #   pixel 2: ē = 0 -> row 2, bin 0
    #   pixel 5: ē = 0.3333, v = 0.2071 -> row 0, bin 20
    for i, row, column in ((0, 0, 19), (1, 1, 19), (5, 0, 20)):
        assert math.floor(100 * entropy_by_hand(pixels[i]) / math.log(5)) == column
    expected = torch.zeros(5, 100, dtype=torch.int64)
    expected[0, 19] = expected[1, 19] = expected[2, 0] = expected[0, 20] = 1
    assert torch.equal(hist, expected)
    # batches add up; a batch without background pixels adds nothing
    assert plop.entropy_histogram(probs, torch.full_like(labels, 255), 5).sum() == 0


def test_median_thresholds_reproduces_the_reference_loop():
    hist = torch.zeros(8, 100, dtype=torch.int64)
    # row 0: bin 0 holds >= half -> stop at k = 0: 0.01 * half / H[0] = 0.01 * 5 / 6
    hist[0, 0], hist[0, 1] = 6, 4
    # row 1: counts 2, 2, 2, 4 in bins 0..3, half = 5. Buggy loop (r adds the bin index): k=0: 5 > 0+2, r=0;
    # k=1: 5 > 0+2, r=1; k=2: 5 > 1+2, r=3; k=3: 3 <= 5 <= 3+4 -> stop: 0.03 + (5-3)/4*0.01 = 0.035.
    # (A correct cumulative count would stop in bin 2 with r=4: 0.02 + (5-4)/2*0.01 = 0.025.)
    hist[1, :4] = torch.tensor([2, 2, 2, 4])
    # row 2: no pixel -> τ_min
    # row 3: float bin index: k = 29 reads bin 28. half = 410; r = 0+1+...+27 = 378 at k = 28: 410 > 378+10;
    # r = 406 at k = 29, which reads H[28] = 10: 406 <= 410 <= 416 -> stop: 0.29 + (410-406)/10*0.01 = 0.294.
    # (Reading bin 29 would give 0.29 + 4/810*0.01.)
    hist[3, 28], hist[3, 29] = 10, 810
    # rows 4-6: all the mass in bin 29, which the loop never reads -> no stop; the result uses k = 99
    # (ℓ = 0.99, empty bin 99) and r = 0+1+...+99 = 4950: 0.99 + (half - 4950)/0 * 0.01
    hist[4, 29] = 5  # half 2.5 -> -inf -> max(-inf, 0.001) = 0.001
    hist[5, 29] = 10000  # half 5000 -> +inf stays inf
    hist[6, 29] = 9900  # half 4950 -> 0/0 = nan stays nan
    # row 7: stops on an empty bin: half = 1 = r at k = 2 (r = 0+1) and H[2] = 0 -> 0.02 + 0/0 -> nan
    hist[7, 29] = 2
    result = plop.median_thresholds(hist)
    assert result.shape == (8,) and result.dtype == torch.float32
    assert result[0].item() == pytest.approx(0.01 * 5 / 6, rel=1e-5)
    assert result[1].item() == pytest.approx(0.035, rel=1e-5)
    assert result[2].item() == pytest.approx(0.001, rel=1e-6)
    assert result[3].item() == pytest.approx(0.294, rel=1e-5)
    assert result[4].item() == pytest.approx(0.001, rel=1e-6)
    assert math.isinf(result[5].item()) and result[5].item() > 0
    assert math.isnan(result[6].item())
    assert math.isnan(result[7].item())


def test_median_thresholds_lower_bound():
    # A loop that stops gives a median >= 0.005 (stop at k = 0: 0.01 * half / H[0] with H[0] <= n_c), so a
    # median below τ_min comes from -inf or an empty class (above); with a larger τ_min the bound applies to
    # finite medians too: Python max(median, τ_min).
    hist = torch.zeros(2, 100, dtype=torch.int64)
    hist[0, 0], hist[0, 1] = 6, 4  # median 0.00833
    hist[1, :4] = torch.tensor([2, 2, 2, 4])  # median 0.035
    result = plop.median_thresholds(hist, min_threshold=0.009)
    assert result.tolist() == pytest.approx([0.009, 0.035], rel=1e-5)


def test_entropy_pseudo_labels_and_factor_by_hand():
    # 3 images of 1 x 4 pixels, teacher with K_old = 3 channels, K_t = 4 (the thresholds' length)
    logits = [
        [[0.0, 8.0, 0.0], [0.1, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
        [[9.0, 0.0, 0.0], [0.0, 0.0, 9.0], [0.0, 0.0, 0.0], [0.0, 3.0, 0.0]],
        [[0.0, 0.0, 0.0], [9.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
    ]
    old_logits = torch.cat([pixels_to_map(image) for image in logits])  # (3, 3, 1, 4)
    labels = torch.tensor([[[0, 0, 3, 255]], [[0, 1, 3, 3]], [[3, 255, 3, 3]]])
    thresholds = torch.tensor([0.05, 0.0015, 0.0001, 0.05])

    def v(pixel):  # ē / log(K_t) of one teacher pixel
        exp = [math.exp(z) for z in pixel]
        return entropy_by_hand([e / sum(exp) for e in exp]) / math.log(4)

    # image 0: pixel 0 -> ŷ = 1 with v = 0.00132 < τ_1 = 0.0015 (it would fail with log(K_old): 0.00167) -> 1;
    #          pixel 1 -> ŷ = 0, nearly uniform, v = 0.24 >= 0.05 -> 255; pixel 2 new class, pixel 3 ignored: kept
    assert v(logits[0][0]) < 0.0015 < v(logits[0][0]) * math.log(4) / math.log(3)
    assert v(logits[0][1]) > 0.05
    # image 1: pixel 0 -> ŷ = 0, v = 0.0005 < 0.05 -> 0; pixel 1 (label 1 < K_old counts as background)
    #          -> ŷ = 2, v = 0.0005 >= τ_2 = 0.0001 (τ of the prediction, not of the label) -> 255
    assert v(logits[1][0]) < 0.05 and 0.0001 < v(logits[1][1]) < 0.0015
    # image 2: no background pixel -> unchanged, a = 0 / (0 + 1e-6) = 0
    new_labels, factor = plop.entropy_pseudo_labels(old_logits, labels, thresholds, n_old=3)
    assert new_labels.tolist() == [[[1, 255, 3, 255]], [[0, 255, 3, 3]], [[3, 255, 3, 3]]]
    assert new_labels.dtype == labels.dtype
    assert labels.tolist() == [[[0, 0, 3, 255]], [[0, 1, 3, 3]], [[3, 255, 3, 3]]]  # input untouched
    assert factor.shape == (3,) and factor.dtype == torch.float32
    # rel 1e-7 tells the ε apart from a clamp of the denominator (1/2 differs from 1/(2 + 1e-6) by 5e-7)
    assert factor.tolist() == pytest.approx([1 / (2 + 1e-6), 1 / (2 + 1e-6), 0.0], rel=1e-7, abs=0)


def test_weighted_ce_all_pixels_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 1, 4)
    labels = torch.tensor([[[1, 255, 3, 255]], [[0, 255, 3, 3]], [[3, 255, 3, 3]]])
    factor = torch.tensor([0.5, 0.25, 0.0])
    total = 0.0
    for b in range(3):
        for x in range(4):
            y = labels[b, 0, x].item()
            if y == 255:
                continue  # ignored pixel: loss 0, still counted in the mean
            z = logits[b, :, 0, x].tolist()
            ce = math.log(sum(math.exp(v) for v in z)) - z[y]
            total += factor[b].item() * ce
    expected = total / 12  # all B·H·W pixels
    result = plop.weighted_ce_all_pixels(logits, labels, factor)
    assert result.item() == pytest.approx(expected, rel=1e-5)


def test_local_pod_tiny_by_hand():
    old = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # squared: [[1, 4], [9, 16]]
    new = torch.zeros_like(old)
    # one scale: width means (2.5, 12.5), height means (5, 10); √(K_t/N_new) = √(4/1) = 2
    expected = 2 * math.sqrt(2.5 ** 2 + 12.5 ** 2 + 5 ** 2 + 10 ** 2)
    result = plop.local_pod([old], [new], [1.0], n_classes_total=4, n_new=1, scales=(1,))
    assert result.item() == pytest.approx(expected, rel=1e-6)


def local_pod_numpy(old_maps, new_maps, factors, n_total, n_new, scales):
    """Local POD (PLOP train.py::features_distillation) with explicit loops over maps, samples, scales and regions."""
    total = 0.0
    for old, new, factor in zip(old_maps, new_maps, factors):
        old, new = old.astype(np.float64) ** 2, new.astype(np.float64) ** 2
        batch, channels, _, width = old.shape
        norms = []
        for b in range(batch):
            diff = []
            for s in scales:
                k = width // s
                for i in range(s):
                    for j in range(s):
                        ra = old[b, :, i * k:(i + 1) * k, j * k:(j + 1) * k]
                        rb = new[b, :, i * k:(i + 1) * k, j * k:(j + 1) * k]
                        for c in range(channels):
                            for row in range(k):  # mean over the width axis
                                diff.append(sum(ra[c, row, :]) / k - sum(rb[c, row, :]) / k)
                        for c in range(channels):
                            for col in range(k):  # mean over the height axis
                                diff.append(sum(ra[c, :, col]) / k - sum(rb[c, :, col]) / k)
            assert len(diff) == sum(2 * s * s * channels * (width // s) for s in scales)  # 14·C·W if 4 | W
            norms.append(math.sqrt(sum(d * d for d in diff)))
        total += factor * math.sqrt(n_total / n_new) * sum(norms) / batch
    return total / len(old_maps)


def test_local_pod_against_explicit_loops():
    rng = np.random.default_rng(0)
    # 6x6 is not divisible by 4: at scale 4 the regions are 1x1 and cover only the top-left 4x4
    shapes = [(2, 3, 8, 8), (2, 4, 6, 6), (2, 2, 4, 4)]
    old_maps = [rng.normal(size=shape).astype(np.float32) for shape in shapes]
    new_maps = [rng.normal(size=shape).astype(np.float32) for shape in shapes]
    factors = losses.layer_factors(3, plop.POD_FACTOR_VOC, plop.POD_LOGITS_FACTOR_VOC)
    assert factors == [0.01, 0.01, 0.0005]
    expected = local_pod_numpy(old_maps, new_maps, factors, 5, 2, (1, 2, 4))
    new_tensors = [torch.from_numpy(m).requires_grad_() for m in new_maps]
    result = plop.local_pod([torch.from_numpy(m) for m in old_maps], new_tensors, factors,
                            n_classes_total=5, n_new=2)
    assert result.dtype == torch.float32
    assert result.item() == pytest.approx(expected, rel=1e-5)
    result.backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in new_tensors)


def test_local_pod_rejects_mismatched_maps():
    with pytest.raises(ValueError, match="collapse"):
        plop.local_pod([torch.zeros(1, 3, 2, 2)], [torch.zeros(1, 4, 2, 2)], [1.0], 4, 1)
    with pytest.raises(ValueError, match="n_new"):
        plop.local_pod([torch.zeros(1, 3, 2, 2)], [torch.zeros(1, 3, 2, 2)], [1.0], 4, 0)


def test_named_constants():
    assert plop.POD_FACTORS == {"voc": (0.01, 0.0005), "ade": (0.001, 1e-5), "cityscapes_domain": (1e-4, 1e-4)}
    assert plop.ENTROPY_THRESHOLD_MIN == 0.001 and plop.ENTROPY_BINS == 100 and plop.POD_SCALES == (1, 2, 4)


# ---- PLOP: the threshold pass and the loss wiring (PLOP train.py::Trainer.find_median, Trainer.train) ----------
class FakeData:
    """What ``before_step`` uses of :class:`engine.passes.StepData`."""

    def __init__(self, batches):
        self.batches_, self.reduced = batches, 0
        self.device = torch.device("cpu")

    def train_batches(self):
        return iter(self.batches_)

    def autocast(self):
        return contextlib.nullcontext()

    def eval_mode(self, *models):
        return contextlib.nullcontext()

    def all_reduce(self, tensor):
        self.reduced += 1
        return tensor


class ConstantTeacher(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, images):
        return self.logits, {}


def test_plop_thresholds_from_the_teacher_pass():
    # K_old = 2 teacher channels, K_t = 3. Pixels (one image, 1×6): confident class 0, confident class 0, uniform
    # (argmax 0, ē = 1/2, v = ē / log 3 -> bin 45), confident class 1, a new-class pixel, an ignored pixel.
    logits = torch.tensor([[10.0, 10.0, 0.0, -10.0, 10.0, 10.0], [-10.0, -10.0, 0.0, 10.0, -10.0, -10.0]])
    labels = torch.tensor([[[0, 0, 0, 0, 2, 255]]])
    data = FakeData([Batch(torch.zeros(1, 3, 1, 6), labels)])
    ctx = StepContext("voc", ((0, 1), (2,)), 1)
    # published: each process keeps its own histogram (PLOP train.py::find_median has no all-reduce)
    get_method("plop").before_step(None, ConstantTeacher(logits[None, :, None, :]), data, ctx)
    assert data.reduced == 0
    method = get_method("plop", histogram_per_process=False)
    method.before_step(None, ConstantTeacher(logits[None, :, None, :]), data, ctx)
    assert data.reduced == 1  # the fix: the histogram is summed over the processes
    # class 0: 2 pixels in bin 0, 1 in bin 45; half = 1.5 ≤ H[0, 0] -> stops at k = 0: 0.01 · 1.5 / 2
    # class 1: 1 pixel in bin 0 -> 0.01 · 0.5 / 1; class 2: empty -> τ_min
    assert method.thresholds.tolist() == pytest.approx([0.0075, 0.005, 0.001], rel=1e-6)
    assert math.floor(100 * 0.5 / math.log(3)) == 45
    state = method.state_dict()
    fresh = get_method("plop")
    fresh.load_state_dict(state)
    fresh.load_previous_state({"thresholds": torch.ones(3)}, ctx)  # nothing is carried across steps
    assert torch.equal(fresh.thresholds, method.thresholds)
    step0 = get_method("plop")
    step0.before_step(None, None, FakeData([]), StepContext("voc", ((0, 1), (2,)), 0))
    assert step0.thresholds is None


def constant_maps(values, channels=1, width=4):
    return [torch.full((1, channels, width, width), float(v)) for v in values]


def test_plop_loss_wiring():
    # one image, labels at the small-logit size (4×4): upsampling is the identity
    ctx = StepContext("voc", ((0, 1), (2,)), 1)
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, 0, :2] = 2  # new class
    labels[0, 3, 3] = 255
    old_logits = torch.zeros(1, 2, 4, 4)
    old_logits[:, 0, :2] = 10.0  # confident background in rows 0-1: pseudo-label 0, kept
    old_logits[:, 1, 2] = 10.0  # confident class 1 in row 2: pseudo-label 1, kept
    # row 3: uniform (ē/log 3 = 0.455 > τ): the background pixels there become ignored
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, 4, 4, generator=gen)
    method = get_method("plop")
    method.thresholds = torch.tensor([0.01, 0.01, 0.001])
    student = (logits, {"attentions": constant_maps([1, 2, 3, 4, 5]), "sem_logits_small": logits})
    teacher = (old_logits, {"attentions": constant_maps([1, 2, 3, 4, 6]), "sem_logits_small": old_logits})
    terms = method.loss(student, teacher, Batch(torch.zeros(1, 3, 4, 4), labels), ctx)
    pseudo = labels.clone()
    pseudo[0, 2] = 1
    pseudo[0, 3, :3] = 255
    background = 16 - 2 - 1  # label < K_old, 255 excluded
    factor = (background - 3) / (background + 1e-6)
    ce = factor * per_pixel_mean(ce_px, logits, pseudo)
    assert terms["ce"].item() == pytest.approx(ce, rel=REL)
    # POD: constant maps give Φ entries all equal to the squared value, 14·C·W of them -> d = √56 · |a² − b²|;
    # map 5: |36 − 25|; the small logits: teacher z^old vs the student collapsed to [z0 + z2, z1]
    collapsed = torch.stack([logits[0, 0] + logits[0, 2], logits[0, 1]])
    emb = []
    for old, new in zip(old_logits[0], collapsed):  # Φ per channel, by explicit region means
        for x in (old ** 2, new ** 2):
            parts = []
            for s in (1, 2, 4):
                k = 4 // s
                for i in range(s):
                    for j in range(s):
                        r = x[i * k:(i + 1) * k, j * k:(j + 1) * k]
                        parts.append((r.mean(dim=1), r.mean(dim=0)))
            emb.append(parts)
    # the embedding concatenates, per region, all channels' width means then all channels' height means: the
    # distance does not depend on the order, so sum squared differences channel by channel
    squared = 0.0
    for channel in range(2):
        for (wo, ho), (wn, hn) in zip(emb[2 * channel], emb[2 * channel + 1]):
            squared += float(((wo - wn) ** 2).sum() + ((ho - hn) ** 2).sum())
    schedule = math.sqrt(3 / 1)
    pod = (0.01 * schedule * math.sqrt(56) * 11 + 0.0005 * schedule * math.sqrt(squared)) / 6
    assert terms["pod"].item() == pytest.approx(pod, rel=REL)
    assert terms["total"].item() == pytest.approx(ce + pod, rel=REL)
    no_factor = get_method("plop", classif_adaptive_factor=False)
    no_factor.thresholds = method.thresholds
    terms = no_factor.loss(student, teacher, Batch(torch.zeros(1, 3, 4, 4), labels), ctx)
    assert terms["ce"].item() == pytest.approx(ce / factor, rel=REL)


def test_plop_network_exposes_the_attentions():
    from methods.base import ModelSpec
    model = get_method("plop").build_network(ModelSpec("mib", "resnet18"), [3, 1])
    model.eval()
    with torch.no_grad():
        _, features = model(torch.randn(1, 3, 33, 33))
    assert len(features["attentions"]) == 5 and features["sem_logits_small"].shape[1] == 4
