"""methods/kproba.py: KProBA's numerics (KProBA KLDA.py::KLDA,
trainer/trainer.py::Trainer.compute_class_feature_averages) against direct numpy computations; the KProBA method's
prototype pass, loss and state. (BARM's loss with given pseudo-labels, which KProBA's loss uses, is tested in
tests/methods/test_barm.py.)"""
import copy
import dataclasses

import numpy as np
import pytest
import torch

from engine.cli import parse_args
from methods import barm, get_method, kproba, losses
from methods.base import Batch, StepContext
from network import build_model
from tests.helpers import barm_inputs


def phi_np(x, rff):
    """φ(x) = √(2/D)·cos(xΩ + b) in float64 from the member's Ω and b."""
    omega, b = rff.omega.double().numpy(), rff.b.double().numpy()
    return np.sqrt(2.0 / rff.D) * np.cos(np.asarray(x, dtype=np.float64) @ omega + b)


# ---------------------------------------------------------------- random Fourier features (KProBA KLDA.py::KLDA)

@pytest.mark.parametrize("seed", [42, 44])
def test_rff_equals_reference_draws_and_leaves_global_rng_alone(seed):
    d, D, sigma = 6, 40, 1e-4
    with torch.random.fork_rng():
        torch.manual_seed(123)
        before = torch.get_rng_state()
        rff = kproba.RandomFourierFeatures(d, D, sigma, seed)
        assert torch.equal(torch.get_rng_state(), before)
        # the reference: torch.manual_seed(seed), then Ω ~ N(0, √(2σ)) (d, D), then b = U[0, 1)·2π
        torch.manual_seed(seed)
        omega = torch.normal(0, torch.sqrt(torch.tensor(2 * sigma, dtype=torch.float32)), (d, D))
        b = torch.rand(D) * 2 * torch.pi
    assert torch.equal(rff.omega, omega) and torch.equal(rff.b, b)
    assert rff.omega.shape == (d, D) and rff.b.shape == (D,)
    assert 0 <= float(rff.b.min()) and float(rff.b.max()) < 2 * np.pi


def test_rff_features_formula():
    rff = kproba.RandomFourierFeatures(3, 9, sigma=0.5, seed=7)
    x = torch.tensor([[0.3, -1.2, 2.0], [0.0, 0.0, 0.0], [5.0, 1.0, -0.5]])
    out = rff(x)
    assert out.shape == (3, 9) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), phi_np(x.numpy(), rff), rtol=1e-5, atol=1e-6)
    batched = rff(x.double()[None])  # any leading shape, computed in float32
    assert batched.shape == (1, 3, 9) and batched.dtype == torch.float32


# --------------------------------------- prototypes (KProBA trainer/trainer.py::Trainer.compute_class_feature_averages)

D_SMALL = 7


def prototype_batches():
    g = torch.Generator().manual_seed(0)
    f1 = torch.randn(1, 3, 2, 2, generator=g)
    # labels at 4x4 are nearest-resized to 2x2: only the even positions count; odd positions say 2 everywhere
    l1 = torch.full((1, 4, 4), 2, dtype=torch.long)
    l1[0, ::2, ::2] = torch.tensor([[0, 2], [1, 255]])
    f2 = torch.randn(2, 3, 2, 2, generator=g)
    l2 = torch.tensor([[[2, 2], [0, 1]], [[255, 0], [0, 0]]])
    return [(f1, l1), (f2, l2)], [(f1, l1[:, ::2, ::2]), (f2, l2)]


def test_prototypes_equal_direct_computation():
    classes = [0, 2, 3, 4]
    acc = kproba.PrototypeAccumulator(classes, d=3, D=D_SMALL, sigma=0.5)
    batches, small_batches = prototype_batches()
    for features, labels in batches:
        acc.update(features, labels)
    g = torch.Generator().manual_seed(1)
    previous = {0: torch.randn(D_SMALL, generator=g), 3: torch.randn(D_SMALL, generator=g),
                5: torch.randn(D_SMALL, generator=g)}
    saved = {c: p.clone() for c, p in previous.items()}
    out = acc.finalize(previous)

    # direct: every pixel of class c over both batches, φ per member, mean, then mean over members
    rows = {c: [] for c in classes}
    for features, labels in small_batches:
        for b in range(features.shape[0]):
            for y in range(2):
                for x in range(2):
                    c = int(labels[b, y, x])
                    if c in rows:
                        rows[c].append(features[b, :, y, x].numpy())
    assert [len(rows[c]) for c in classes] == [5, 3, 0, 0]
    member_means = {c: np.mean([phi_np(np.array(rows[c]), m).mean(axis=0) if rows[c] else np.zeros(D_SMALL)
                                for m in acc.members], axis=0) for c in classes}
    expected = {
        0: 0.9 * saved[0].double().numpy() + 0.1 * member_means[0],  # momentum with the stored prototype
        2: member_means[2],  # new class
        3: 0.9 * saved[3].double().numpy(),  # updated class without pixels: μ̄ = 0 (reference)
        4: np.zeros(D_SMALL),  # new class without pixels
        5: saved[5].double().numpy(),  # stored, not updated: unchanged
    }
    assert sorted(out) == sorted(expected)
    for c, value in expected.items():
        np.testing.assert_allclose(out[c].numpy(), value, rtol=1e-5, atol=1e-6, err_msg=f"class {c}")
    assert all(torch.equal(previous[c], saved[c]) for c in saved)  # previous not modified
    assert acc.counts == {0: 5, 2: 3, 3: 0, 4: 0}
    assert [m.seed for m in acc.members] == list(kproba.KPROBA_SEEDS)


def test_prototype_state_round_trip():
    batches, _ = prototype_batches()
    whole = kproba.PrototypeAccumulator([0, 2], d=3, D=D_SMALL, sigma=0.5)
    for features, labels in batches:
        whole.update(features, labels)
    first = kproba.PrototypeAccumulator([0, 2], d=3, D=D_SMALL, sigma=0.5)
    first.update(*batches[0])
    state = first.state_dict()
    assert all(t.device.type == "cpu" for means in state["means"] for t in means.values())
    resumed = kproba.PrototypeAccumulator([0, 2], d=3, D=D_SMALL, sigma=0.5)
    resumed.load_state_dict(state)
    resumed.update(*batches[1])
    a, b = whole.finalize(), resumed.finalize()
    assert all(torch.allclose(a[c], b[c], rtol=1e-6, atol=1e-7) for c in (0, 2))
    with pytest.raises(ValueError):
        kproba.PrototypeAccumulator([0, 1], d=3, D=D_SMALL, sigma=0.5).load_state_dict(state)
    assert kproba.prototypes_state(a)[0].device.type == "cpu"


# ---------------------------------------------------- pseudo-labels (KProBA trainer/trainer.py::generate_pseudo_labels)

def reference_pseudo(features, prototypes, rff, q, labels, n_old, tau):
    """Per pixel: κ from φ(f), q given at label resolution; y > 0 kept, else argmax κ·q if its max > 0, else 0."""
    out = []
    for f, y, qp in zip(features, labels, q):
        phi = phi_np(f[None], rff)[0]
        w = np.zeros(n_old)
        for c, p in prototypes.items():
            if c < n_old:
                w[c] = np.exp(-np.linalg.norm(phi - p.double().numpy()) / tau)
        kappa = w / (w.sum() + 1e-8)
        score = kappa * qp
        out.append(int(y) if y > 0 else (int(np.argmax(score)) if score.max() > 0 else 0))
    return out


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def test_kproba_pseudo_labels_by_hand():
    rff = kproba.RandomFourierFeatures(2, 4, sigma=1.0, seed=42)
    f = np.array([[0.5, -1.0], [1.0, 2.0], [-0.7, 0.3], [2.0, 0.1]], dtype=np.float32)  # 4 pixels
    phi = phi_np(f, rff)
    prototypes = {
        0: torch.tensor(phi[3], dtype=torch.float32),  # close to pixel 3
        1: torch.tensor(phi[2], dtype=torch.float32),  # exactly pixel 2's features
        2: torch.tensor(phi[2] + 1.5, dtype=torch.float32),  # far from pixel 2
        7: torch.zeros(4),  # not an old class: ignored
    }
    labels = torch.tensor([[[255, 3, 0, 0]]])
    teacher = np.array([[0.0, 0.0, 0.0, 5.0], [0.0, 0.0, 1.0, 0.0], [3.0, 3.0, 1.1, -1.0]], dtype=np.float32)
    features = torch.from_numpy(f.T.copy()).view(1, 2, 1, 4)
    old_logits = torch.from_numpy(teacher).view(1, 3, 1, 4)
    q = [softmax(teacher[:, i].astype(np.float64)) for i in range(4)]
    expected = reference_pseudo(f, prototypes, rff, q, [255, 3, 0, 0], 3, 1.0)
    # 255 kept, a foreground pixel kept, pixel 2 relabelled by κ (teacher alone says 2), pixel 3 stays 0
    assert expected == [255, 3, 1, 0] and int(np.argmax(q[2])) == 2
    out = kproba.kproba_pseudo_labels(features, prototypes, rff, old_logits, labels, n_old=3)
    assert out.tolist() == [[expected]]

    # far prototypes and a tiny τ: every weight underflows, max κ·q = 0, background stays 0
    far = {c: torch.tensor(phi[0] + 5.0, dtype=torch.float32) for c in range(3)}
    out = kproba.kproba_pseudo_labels(features, far, rff, old_logits, labels, n_old=3, tau=1e-3)
    assert out.tolist() == [[[255, 3, 0, 0]]]
    # an old class without a prototype gets κ = 0 and cannot be chosen
    only_0_2 = {0: prototypes[0], 2: prototypes[2]}
    expected = reference_pseudo(f, only_0_2, rff, q, [255, 3, 0, 0], 3, 1.0)
    assert expected[2] != 1
    assert kproba.kproba_pseudo_labels(features, only_0_2, rff, old_logits, labels, 3).tolist() == [[expected]]


def test_kproba_pseudo_labels_upsample_kappa_and_softmax_teacher():
    rff = kproba.RandomFourierFeatures(2, 4, sigma=1.0, seed=43)
    f = np.array([[0.2, 1.0], [-1.5, 0.4]], dtype=np.float32)  # 2 feature pixels -> 4 label pixels
    phi = phi_np(f, rff)
    # at feature pixel 0: w_1 = 1 and w_0 = exp(-ln 5) = 0.2, so κ favours class 1 five to one
    prototypes = {0: torch.tensor(phi[0] + [np.log(5.0), 0, 0, 0], dtype=torch.float32),
                  1: torch.tensor(phi[0], dtype=torch.float32)}
    teacher = np.array([[3.0, -2.0], [0.0, 2.0]])  # (channel, feature pixel)
    weights = [(1.0, 0.0), (0.75, 0.25), (0.25, 0.75), (0.0, 1.0)]  # bilinear, align_corners False, 2 -> 4
    kappas = []
    for i in range(2):
        w = np.array([np.exp(-np.linalg.norm(phi[i] - prototypes[c].double().numpy())) for c in range(2)])
        kappas.append(w / (w.sum() + 1e-8))
    expected, with_sigmoid = [], []
    for a, b in weights:
        kappa = a * kappas[0] + b * kappas[1]
        z = a * teacher[:, 0] + b * teacher[:, 1]
        expected.append(int(np.argmax(kappa * softmax(z))))
        with_sigmoid.append(int(np.argmax(kappa / (1 + np.exp(-z)))))
    assert expected[0] == 0 and with_sigmoid[0] == 1  # softmax (not the BCE sigmoid) matters here
    features = torch.from_numpy(f.T.copy()).view(1, 2, 1, 2)
    old_logits = torch.tensor(teacher, dtype=torch.float32).view(1, 2, 1, 2)
    labels = torch.zeros(1, 1, 4, dtype=torch.long)
    out = kproba.kproba_pseudo_labels(features, prototypes, rff, old_logits, labels, 2)
    assert out.tolist() == [[expected]]
    with pytest.raises(ValueError):
        kproba.kproba_pseudo_labels(features, prototypes, rff, old_logits, labels, 3)


def test_rff_runs_in_float32_under_autocast():
    rff = kproba.RandomFourierFeatures(8, 16, sigma=0.5, seed=1)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = rff(x)
    assert out.dtype == torch.float32 and torch.equal(out, rff(x))


# ---------- the method class (KProBA trainer/trainer.py::Trainer.compute_class_feature_averages, Trainer.train_episode)

def test_prototype_classes():
    assert kproba.prototype_classes([3], 0) == [0, 1, 2]
    assert kproba.prototype_classes([3, 1, 1], 2) == [0, 4]
    assert kproba.prototype_classes([6, 5, 5], 1) == [0, 6, 7, 8, 9, 10]


def reference_members(d, D=kproba.KPROBA_RFF_DIM, sigma=kproba.KPROBA_SIGMA, seeds=kproba.KPROBA_SEEDS):
    """(Ω, b) per member drawn as the reference's KLDA: global torch.manual_seed(seed), normal, then rand."""
    members = []
    with torch.random.fork_rng():
        for seed in seeds:
            torch.manual_seed(seed)
            omega = torch.normal(0, torch.sqrt(torch.tensor(2 * sigma, dtype=torch.float32)), (d, D))
            members.append((omega.double().numpy(), (torch.rand(D) * 2 * torch.pi).double().numpy()))
    return members


def phi_ref(x, member):
    omega, b = member
    return np.sqrt(2.0 / omega.shape[1]) * np.cos(x @ omega + b)


class FakeData:
    """The part of ``StepData`` a prototype pass uses."""

    def __init__(self, batches):
        self.batches_ = batches
        self.dist = type("Dist", (), {"distributed": False})()

    def train_batches(self):
        return iter(self.batches_)


@pytest.mark.slow  # ~1 s: train-mode passes of BARM models and 5000-dimensional features
def test_before_step_prototypes_equal_a_direct_computation():
    ctx = StepContext("voc", ((0, 1, 2), (3,)), 0)
    torch.manual_seed(0)
    model = build_model("deeplabv3bga_resnet18", [3])
    g = torch.Generator().manual_seed(3)
    images = [torch.randn(2, 3, 49, 49, generator=g) for _ in range(2)]
    labels = [torch.randint(0, 3, (2, 49, 49), generator=g) for _ in range(2)]
    labels[1][1] = 255
    reference = copy.deepcopy(model)
    method = get_method("kproba")
    method.set_train_mode(model, ctx)
    torch.manual_seed(7)  # the same ASPP dropout masks (train mode) in the pass and in the direct computation
    method.before_step(model, None, FakeData([Batch(i, l) for i, l in zip(images, labels)]), ctx)

    # direct: train-mode features (batch statistics) of each batch, labels nearest-resized to 4x4 (pixel 16·i)
    reference.train()
    torch.manual_seed(7)
    with torch.no_grad():
        reference(images[0])  # the reference's probe: one more train-mode forward at the start
        rows = {c: [] for c in range(3)}
        for image, label in zip(images, labels):
            back_out = reference(image)[1]["back_out"].double().numpy()
            pick = [int(i * 49 / 4) for i in range(4)]  # nearest, 49 -> 4: source index floor(i·49/4)
            small = label[:, pick][:, :, pick].numpy()
            for b in range(2):
                for y in range(4):
                    for x in range(4):
                        if small[b, y, x] in rows:
                            rows[small[b, y, x]].append(back_out[b, :, y, x])
    members = reference_members(512)
    for c in range(3):
        expected = np.mean([phi_ref(np.array(rows[c]), m).mean(axis=0) for m in members], axis=0)
        np.testing.assert_allclose(method.prototypes[c].numpy(), expected, rtol=1e-4, atol=1e-6, err_msg=str(c))
    assert sorted(method.prototypes) == [0, 1, 2]
    # BN running statistics moved exactly as by the probe and the pass (train mode at step 0)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), name

    # t > 0 with --bn_freeze: statistics untouched; background blended with momentum 0.9, class 3 new
    ctx1 = StepContext("voc", ((0, 1, 2), (3,)), 1)
    student = build_model("deeplabv3bga_resnet18", [3, 1])
    frozen = get_method("kproba", bn_freeze=True, pseudo=True)
    frozen.load_previous_state(method.state_dict(), ctx1)
    frozen.configure(student, ctx1)
    frozen.set_train_mode(student, ctx1)
    before = {k: v.clone() for k, v in student.state_dict().items() if "running" in k}
    labels1 = [torch.where(l == 2, torch.full_like(l, 3), torch.zeros_like(l)) for l in labels]
    frozen.before_step(student, None, FakeData([Batch(i, l) for i, l in zip(images, labels1)]), ctx1)
    assert all(torch.equal(student.state_dict()[k], v) for k, v in before.items())
    assert sorted(frozen.prototypes) == [0, 1, 2, 3]
    assert torch.equal(frozen.prototypes[1], method.prototypes[1])
    assert not torch.equal(frozen.prototypes[0], method.prototypes[0])


def test_all_reduce_combines_the_processes_means():
    batches, _ = prototype_batches()
    whole = kproba.PrototypeAccumulator([0, 1, 2], d=3, D=D_SMALL, sigma=0.5)
    for features, labels in batches:
        whole.update(features, labels)
    rank0 = kproba.PrototypeAccumulator([0, 1, 2], d=3, D=D_SMALL, sigma=0.5)
    rank1 = kproba.PrototypeAccumulator([0, 1, 2], d=3, D=D_SMALL, sigma=0.5)
    rank0.update(*batches[0])
    rank1.update(*batches[1])
    # the other process's contributions, from the definition: counts n_c and sums n_c·μ_c per member
    other = [torch.tensor([float(rank1.counts[c]) for c in (0, 1, 2)], dtype=torch.float64),
             torch.stack([torch.stack([m[c].double() * rank1.counts[c] for c in (0, 1, 2)]) for m in rank1.means])]

    def reduce(tensor):
        tensor += other.pop(0)

    rank0.all_reduce(reduce)
    assert rank0.counts == whole.counts
    a, b = rank0.finalize(), whole.finalize()
    for c in (0, 1, 2):
        torch.testing.assert_close(a[c], b[c], rtol=1e-5, atol=1e-7)


def test_method_loss_uses_kappa_pseudo_labels():
    (logits, features), (prev_logits, prev_features), labels = barm_inputs(seed=4)
    ctx = StepContext("voc", ((0, 1, 2), (3,)), 1)
    g = torch.Generator().manual_seed(5)
    prototypes = {c: torch.randn(kproba.KPROBA_RFF_DIM, generator=g) * 0.01 for c in range(3)}
    method = get_method("kproba", pseudo=True)
    method.load_state_dict({"prototypes": prototypes})
    batch = Batch(torch.zeros(2, 3, 49, 49), labels)
    terms = method.loss((logits, features), (prev_logits, prev_features), batch, ctx)

    # independent pseudo-labels: κ at 4x4 from the student's back_out (member 0 drawn as the reference), bilinear
    # to 49x49, times the teacher's softmax; background pixels only
    member = reference_members(512, seeds=(42,))[0]
    back_out = features["back_out"].double().numpy()
    kappa = np.zeros((2, 3, 4, 4))
    for b in range(2):
        for y in range(4):
            for x in range(4):
                phi = phi_ref(back_out[b, :, y, x][None], member)[0]
                w = np.array([np.exp(-np.linalg.norm(phi - prototypes[c].double().numpy())) for c in range(3)])
                kappa[b, :, y, x] = w / (w.sum() + 1e-8)
    kappa_up = losses.upsample(torch.from_numpy(kappa), (49, 49)).numpy()
    q = torch.softmax(losses.upsample(prev_logits.double(), (49, 49)), dim=1).numpy()
    score = kappa_up * q
    expected = np.where(labels.numpy() > 0, labels.numpy(), np.where(score.max(1) > 0, score.argmax(1), 0))
    assert (expected[labels.numpy() == 0] > 0).any()  # some background pixels become old classes
    want, _ = barm.barm_loss(logits, features, prev_logits, prev_features, labels, 1,
                               pseudo_labels=torch.from_numpy(expected))
    for key in want:
        torch.testing.assert_close(terms[key], want[key], rtol=1e-5, atol=1e-6)
    barm_terms, _ = barm.barm_loss(logits, features, prev_logits, prev_features, labels, 1)
    assert not torch.allclose(terms["std"], barm_terms["std"])  # not BARM's thresholded rule


def test_method_state_round_trip_and_no_pseudo_thresh(tmp_path):
    method = get_method("kproba")
    method.prototypes = {0: torch.arange(3.0), 2: torch.ones(3)}
    path = tmp_path / "state.pth"
    torch.save({"method_state": method.state_dict()}, path)
    state = torch.load(path, weights_only=True)["method_state"]
    restored = get_method("kproba")
    restored.load_state_dict(state)
    assert restored.prototypes.keys() == {0, 2} and torch.equal(restored.prototypes[0], torch.arange(3.0))
    nxt = get_method("kproba")
    nxt.load_previous_state(state, StepContext("voc", ((0, 1, 2), (3,)), 1))
    assert torch.equal(nxt.previous_prototypes[2], torch.ones(3)) and nxt.prototypes == {}
    with pytest.raises(ValueError):
        restored.load_state_dict({**state, "rff_dim": 10})
    barm_fields = [f.name for f in dataclasses.fields(get_method("barm").hp)]
    assert [f.name for f in dataclasses.fields(method.hp)] == [n for n in barm_fields if n != "pseudo_thresh"]
    with pytest.raises(SystemExit):
        parse_args(["--data_root", str(tmp_path), "--method", "kproba", "--pseudo_thresh", "0.5"])
