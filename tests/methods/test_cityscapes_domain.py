"""The methods on Cityscapes domains (PLOP scripts/cityscapesDomain/*.sh, RCIL scripts/cityscapesDomain/*.sh, PLOP
train.py, RCIL train.py): which run and which are refused, their published defaults, and what their losses become
at a step that adds no class, each loss against a formula written out here."""
import math

import pytest
import torch
import torch.nn.functional as F

from methods import METHODS, get_method
from methods.base import StepContext
from methods.plop import PLOP
from utils.tasks import get_domains, get_task

DATASET = "cityscapes_domain"
K = 19
RUNS = ("ft", "lwf", "lwf-mc", "ilt", "mib", "plop", "rcil")
REFUSED = ("barm", "kproba", "ssul", "dkd", "ewc", "pi", "rw")


def ctx(step, task="11-5"):
    return StepContext(DATASET, tuple(tuple(s) for s in get_task(DATASET, task)), step,
                       domains=tuple(tuple(d) for d in get_domains(DATASET, task)))


def test_every_method_either_runs_or_says_why_not():
    assert set(RUNS) | set(REFUSED) == set(METHODS)
    for name in RUNS:
        assert get_method(name, dataset=DATASET).refusal() is None, name
        assert get_method(name, dataset="voc").refusal() is None, name
    for name in REFUSED:
        reason = get_method(name, dataset=DATASET).refusal()
        assert reason and "\n" not in reason, name
        assert get_method(name, dataset="voc").refusal() is None, name
    assert "background" in get_method("barm", dataset=DATASET).refusal()
    assert "unknown" in get_method("ssul", dataset=DATASET).refusal()
    assert "EWC" in get_method("ewc", dataset=DATASET).refusal()


@pytest.mark.parametrize("name,flag", [("mib", "init_balanced"), ("plop", "init_balanced"),
                                       ("plop", "classif_adaptive_factor"), ("rcil", "init_balanced")])
def test_background_options_are_refused(name, flag):
    reason = get_method(name, dataset=DATASET, **{flag: True}).refusal()
    assert f"--{flag}" in reason and f"--no_{flag}" in reason


def test_step_context_of_a_domain_step():
    step1 = ctx(1)
    assert step1.classes_per_step == [K] and step1.teacher_classes_per_step == [K]
    assert step1.num_classes == K and step1.num_old == K and step1.num_new == 0 and not step1.adds_classes
    assert ctx(0).num_old == 0 and ctx(0).adds_classes and ctx(0).setting == "domains"


def test_published_defaults():
    mib = get_method("mib", dataset=DATASET)
    assert mib.hp.loss_kd == 10 and not mib.hp.init_balanced
    for name in ("ft", "lwf", "lwf-mc", "ilt", "mib", "plop"):
        published = get_method(name, dataset=DATASET).published()
        assert published.for_step("11-5", 0)["lr"] == 0.01 and published.for_step("11-5", 1)["lr"] == 0.001
        assert published.for_step("1-1", 3)["train_epoch"] == 50 and published.global_batch == (24, 24)
        assert published.gpus == (2, 2) and published.amp and published.crop_size == 512
    plop = get_method("plop", dataset=DATASET)
    assert (plop.hp.pod_factor, plop.hp.pod_logits_factor) == (1e-4, 1e-4)
    assert not plop.hp.init_balanced and not plop.hp.classif_adaptive_factor
    rcil = get_method("rcil", dataset=DATASET)
    assert (rcil.hp.loss_kd, rcil.hp.pckd_factor, rcil.hp.pckd_last_factor) == (0, 5e-4, 1e-4)
    assert (rcil.hp.pckd_channel_factor, rcil.hp.pckd_channel_last_factor) == (1e-4, 0)
    published = rcil.published()
    assert [published.for_step(task, 1)["lr"] for task in ("11-5", "11-1", "1-1")] == [0.002, 0.004, 0.002]
    assert published.for_step("11-1", 0)["lr"] == 0.02 and published.gpus == (4, 4)
    assert get_method("rcil", dataset="voc").hp.pckd_channel_factor is None  # VOC/ADE: the spatial factors


# ---- losses at a domain step -------------------------------------------------------------------------------------
H = W = 8  # label size; logits at 4 x 4


def outputs(seed):
    g = torch.Generator().manual_seed(seed)
    features = {"attentions": [torch.randn(2, c, 4, 4, generator=g) for c in (3, 4, 5, 6, 7)],
                "sem_logits_small": torch.randn(2, K, 4, 4, generator=g), "body": torch.randn(2, 6, 4, 4, generator=g)}
    return torch.randn(2, K, 4, 4, generator=g), features


def batch_labels():
    labels = torch.randint(0, K, (2, H, W), generator=torch.Generator().manual_seed(9))
    labels[:, 0] = 255
    return labels


class Batch:
    def __init__(self, labels):
        self.labels = labels


def up(z):
    return F.interpolate(z, size=(H, W), mode="bilinear", align_corners=False)


def ce_reference(z, labels):
    """Softmax CE summed over the labelled pixels, divided by all B·H·W pixels."""
    log_p = torch.log_softmax(up(z), dim=1)
    valid = labels != 255
    picked = log_p.gather(1, labels.clamp(max=K - 1)[:, None])[:, 0]
    return -(picked * valid).sum() / labels.numel()


def kd_reference(z, z_old):
    """−mean over pixels of (1/19) Σ_c softmax(z_old)_c · log_softmax(z)_c (PLOP utils/loss.py::
    KnowledgeDistillationLoss)."""
    return -(torch.softmax(up(z_old), 1) * torch.log_softmax(up(z), 1)).sum(1).mean() / K


def test_step0_is_plain_ce_for_the_ce_methods():
    z, features = outputs(1)
    labels = batch_labels()
    for name in ("ft", "lwf", "ilt", "mib", "plop", "rcil"):
        terms = get_method(name, dataset=DATASET).loss((z, features), None, Batch(labels), ctx(0))
        assert set(terms) == {"total", "ce"}, name
        assert terms["total"].item() == pytest.approx(ce_reference(z, labels).item(), rel=1e-5), name


def test_mib_is_ce_plus_ten_kd():
    (z, features), (z_old, old_features) = outputs(1), outputs(2)
    labels = batch_labels()
    terms = get_method("mib", dataset=DATASET).loss((z, features), (z_old, old_features), Batch(labels), ctx(1))
    expected = ce_reference(z, labels) + 10 * kd_reference(z, z_old)
    assert set(terms) == {"total", "ce", "kd"}
    assert terms["total"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_lwf_ilt_lwfmc_distil_all_nineteen_channels():
    (z, features), (z_old, old_features) = outputs(1), outputs(2)
    labels = batch_labels()
    lwf = get_method("lwf", dataset=DATASET).loss((z, features), (z_old, old_features), Batch(labels), ctx(1))
    assert lwf["total"].item() == pytest.approx((ce_reference(z, labels) + 100 * kd_reference(z, z_old)).item(),
                                                rel=1e-5)
    ilt = get_method("ilt", dataset=DATASET).loss((z, features), (z_old, old_features), Batch(labels), ctx(1))
    mse = ((features["body"] - old_features["body"]) ** 2).mean()
    assert ilt["total"].item() == pytest.approx((lwf["total"] + 100 * mse).item(), rel=1e-5)
    mc = get_method("lwf-mc", dataset=DATASET).loss((z, features), (z_old, old_features), Batch(labels), ctx(1))
    icarl = K * F.binary_cross_entropy_with_logits(up(z), torch.sigmoid(up(z_old)))
    assert mc["icarl"].item() == pytest.approx(icarl.item(), rel=1e-5)


def local_pod_reference(old, new):
    """mean_b ‖Φ(old²) − Φ(new²)‖₂, Φ = the width- and height-means of every region at scales 1, 2, 4 (PLOP
    train.py::features_distillation), with explicit loops."""
    pieces_old, pieces_new = [], []
    width = old.shape[-1]
    for scale in (1, 2, 4):
        k = width // scale
        for i in range(scale):
            for j in range(scale):
                for x, pieces in ((old.pow(2), pieces_old), (new.pow(2), pieces_new)):
                    region = x[:, :, i * k:(i + 1) * k, j * k:(j + 1) * k]
                    pieces += [region.mean(dim=3).flatten(1), region.mean(dim=2).flatten(1)]
    return (torch.cat(pieces_old, 1) - torch.cat(pieces_new, 1)).norm(dim=1).mean()


def test_plop_is_ce_plus_local_pod_with_factor_one_and_no_pseudo_labels():
    (z, features), (z_old, old_features) = outputs(1), outputs(2)
    # the stage maps agree: only the (uncollapsed) logits map is distilled
    old_features = {**old_features, "attentions": [a.clone() for a in features["attentions"]]}
    labels = batch_labels()
    plop = get_method("plop", dataset=DATASET, pod_logits_factor=1e-3)
    terms = plop.loss((z, features), (z_old, old_features), Batch(labels), ctx(1))
    assert plop.thresholds is None  # no entropy thresholds, no pseudo-labels
    pod = 1e-3 * local_pod_reference(old_features["sem_logits_small"], features["sem_logits_small"]) / 6
    assert terms["ce"].item() == pytest.approx(ce_reference(z, labels).item(), rel=1e-5)
    assert terms["pod"].item() == pytest.approx(pod.item(), rel=1e-5)


def test_plop_before_step_computes_no_thresholds_at_a_domain_step():
    plop = PLOP(dataset=DATASET)
    plop.before_step(None, None, None, ctx(1))  # returns before touching the data
    assert plop.thresholds is None


def test_rcil_is_ce_plus_pckd_and_the_channel_term_ignores_x_pl():
    (z, features), (z_old, old_features) = outputs(1), outputs(2)
    same = [a.clone() for a in features["attentions"]]
    labels = batch_labels()
    rcil = get_method("rcil", dataset=DATASET)
    # only x_pl (the fifth map) differs: its channel factor is 0
    only_x_pl = {**old_features, "attentions": same[:4] + [old_features["attentions"][4]],
                 "sem_logits_small": features["sem_logits_small"].clone()}
    terms = rcil.loss((z, features), (z_old, only_x_pl), Batch(labels), ctx(1))
    assert terms["pckd_channel"].item() == 0 and terms["pckd_spatial"].item() > 0
    assert "unce" not in terms and terms["ce"].item() == pytest.approx(ce_reference(z, labels).item(), rel=1e-5)
    expected = terms["ce"] + terms["pckd_spatial"] + terms["pckd_channel"]  # loss_kd 0: no KD in the total
    assert terms["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    # only mod2 differs: channel = 1e-4 · mean_b ‖CP(A²) − CP(A'²)‖ / 5, CP the zero-padded 3-channel window mean
    only_first = {**only_x_pl, "attentions": [old_features["attentions"][0]] + same[1:]}
    terms = rcil.loss((z, features), (z_old, only_first), Batch(labels), ctx(1))

    def cp(x):
        padded = F.pad(x.pow(2), (0, 0, 0, 0, 1, 1))
        return (padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]) / 3

    distance = (cp(old_features["attentions"][0]) - cp(features["attentions"][0])).flatten(1).norm(dim=1).mean()
    assert terms["pckd_channel"].item() == pytest.approx(1e-4 * distance.item() / 5, rel=1e-5)
    assert math.isfinite(terms["pckd_spatial"].item())
