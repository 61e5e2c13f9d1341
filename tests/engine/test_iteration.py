"""engine/iteration.py: one training iteration: a non-finite loss skips the update, bf16 autocast on the CPU, the
gradient hook with unscaled gradients and a penalty, and the CUDA-only fp16 paths (a GradScaler, the gradient hook
under it). The CUDA tests are skipped on machines without CUDA (the CPU tests cover the same code paths with bf16
autocast)."""
import pytest
import torch
from torch import nn

from engine.iteration import add_gradients, grad_scaler, train_iteration
from methods.base import Batch, StepContext
from methods.finetune import FineTune
from tests.helpers import barm_setup, make_setup
from utils.schedulers import build_scheduler
from utils.tasks import get_task


STEPS = get_task("voc", "15-1")
CTX = StepContext("voc", STEPS, 1)
CUDA = torch.cuda.is_available()
TINY_CTX = StepContext("voc", ((0, 1, 2), (3,)), 1)  # the gradient hook's tests


def test_non_finite_loss_skips_the_update_but_steps_the_schedule():
    method, student, teacher, images, labels = make_setup()
    before = {k: v.detach().clone() for k, v in student.state_dict().items()}
    original_loss = method.loss

    def nan_loss(*args):
        terms = original_loss(*args)
        terms["total"] = terms["total"] * float("nan")
        return terms

    method.loss = nan_loss
    optimizer = torch.optim.SGD(method.param_groups(student, CTX, 0.01), lr=0.01, momentum=0.9, nesterov=True)
    scheduler = build_scheduler("poly", optimizer, 10)
    scaler = grad_scaler(torch.device("cpu"), amp=False)
    _, nonfinite = train_iteration(student, student, teacher, method, CTX, Batch(images, labels), optimizer,
                                   scheduler, scaler, False)
    assert bool(nonfinite)
    assert scheduler.last_epoch == 1
    for key, value in student.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("amp", [False, True])
def test_cpu_training_step_with_and_without_bf16_autocast(amp):
    method, student, teacher, images, labels = make_setup()
    optimizer = torch.optim.SGD(method.param_groups(student, CTX, 0.01), lr=0.01, momentum=0.9, nesterov=True)
    scheduler = build_scheduler("poly", optimizer, 10)
    scaler = grad_scaler(torch.device("cpu"), amp=False)
    terms, nonfinite = train_iteration(student, student, teacher, method, CTX, Batch(images, labels), optimizer,
                                       scheduler, scaler, amp)
    # losses in fp32 under autocast
    assert not bool(nonfinite) and all(v.dtype == torch.float32 for v in terms.values())


# ---- the gradient hook, unit level ---------------------------------------------------------------------

class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x), {}


class PenaltyMethod(FineTune):
    """CE on the logits; records the gradients it sees; penalty 0.5·Σw² (gradient w)."""
    uses_gradients = True

    def __init__(self, boost=1.0):
        super().__init__()
        self.seen, self.boost = [], boost

    def loss(self, outputs, teacher_outputs, batch, ctx):
        ce = self.boost * nn.functional.cross_entropy(outputs[0].float(), batch.labels)
        return {"total": ce, "ce": ce}

    def after_backward(self, model, ctx, finite):
        self.seen.append((finite, model.conv.weight.grad.clone()))
        penalty = 0.5 * (model.conv.weight ** 2).sum()
        return {"total": penalty, "reg": penalty}


def tiny_batch():
    generator = torch.Generator().manual_seed(0)
    return Batch(torch.randn(2, 3, 5, 5, generator=generator), torch.randint(0, 4, (2, 5, 5), generator=generator))


def run_one_iteration(init_scale, boost=1.0):
    torch.manual_seed(0)
    model, method, batch = TinyNet(), PenaltyMethod(boost), tiny_batch()
    before = model.conv.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = build_scheduler("poly", optimizer, 10)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)  # an enabled scaler, as fp16 on CUDA
    terms, nonfinite = train_iteration(model, model, None, method, TINY_CTX, batch, optimizer, scheduler, scaler, False)
    return model, method, batch, before, terms, not bool(nonfinite), scaler


def test_gradient_hook_sees_unscaled_task_gradients_and_its_penalty_is_added():
    model, method, batch, before, terms, finite, scaler = run_one_iteration(init_scale=1024.0)
    torch.manual_seed(0)
    fresh = TinyNet()  # same initial weights as the trained one
    task = nn.functional.cross_entropy(fresh(batch.images)[0], batch.labels)
    task.backward()
    assert finite and len(method.seen) == 1
    hook_finite, hook_grad = method.seen[0]
    assert hook_finite
    torch.testing.assert_close(hook_grad, fresh.conv.weight.grad, rtol=1e-6, atol=1e-7)  # not × 1024
    expected = before - 0.1 * (fresh.conv.weight.grad + before)  # SGD on task + penalty gradients
    torch.testing.assert_close(model.conv.weight.detach(), expected, rtol=1e-6, atol=1e-7)
    assert set(terms) == {"total", "ce", "reg"}
    torch.testing.assert_close(terms["total"], terms["ce"].detach() + terms["reg"].detach())
    assert scaler.get_scale() == 1024.0


def test_gradient_hook_when_the_scaler_skips_the_step():
    model, method, batch, before, terms, finite, scaler = run_one_iteration(init_scale=2.0 ** 127, boost=1e6)
    assert finite  # the loss itself is finite; its scaled gradients overflow
    assert method.seen[0][0] is False  # the hook is told, so it skips its statistics
    torch.testing.assert_close(model.conv.weight.detach(), before, rtol=0, atol=0)  # no update, no penalty
    assert scaler.get_scale() < 2.0 ** 127  # the scaler closed its iteration and lowered the scale


def test_add_gradients_accumulates_without_touching_other_parameters():
    a, b = nn.Parameter(torch.tensor([1.0, 2.0])), nn.Parameter(torch.tensor([3.0]))
    a.grad = torch.tensor([0.5, 0.5])
    add_gradients((a ** 2).sum(), [a, b])
    assert a.grad.tolist() == [2.5, 4.5] and b.grad is None


# ---- CUDA only -----------------------------------------------------------------------------------------

@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("channels_last", [False, True])
def test_fp16_training_step_with_grad_scaler(channels_last):
    device = torch.device("cuda")
    method, student, teacher, batch = barm_setup(device, channels_last)
    optimizer = torch.optim.SGD(method.param_groups(student, CTX, 0.01), lr=0.01, momentum=0.9, nesterov=True)
    scheduler = build_scheduler("poly", optimizer, 10)
    scaler = grad_scaler(device, amp=True)
    assert scaler.is_enabled()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    terms, nonfinite = train_iteration(student, student, teacher, method, CTX, batch, optimizer, scheduler, scaler,
                                       True)
    assert not bool(nonfinite) and all(v.dtype == torch.float32 for v in terms.values())
    assert any(not torch.equal(v, before[k]) for k, v in student.state_dict().items())


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gradient_hook_under_the_cuda_grad_scaler():
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 1).to(device)
    seen = []

    class Method:
        uses_gradients = True

        def loss(self, outputs, teacher_outputs, batch, ctx):
            ce = nn.functional.cross_entropy(outputs.float(), batch.labels)
            return {"total": ce}

        def after_backward(self, student, ctx, finite):
            seen.append(student.weight.grad.clone())
            return None

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x)

    images = torch.randn(2, 3, 5, 5, device=device)
    labels = torch.randint(0, 4, (2, 5, 5), device=device)
    reference = nn.functional.cross_entropy(model(images).float(), labels)
    expected = torch.autograd.grad(reference, model.weight)[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = grad_scaler(device, amp=True)
    train_iteration(Wrapper(), model, None, Method(), CTX, Batch(images, labels), optimizer,
                    build_scheduler("poly", optimizer, 10), scaler, amp=False)
    torch.testing.assert_close(seen[0], expected, rtol=1e-4, atol=1e-6)  # unscaled
