"""utils/schedulers.py: learning-rate schedules against the reference formulas (BARM utils/scheduler.py::PolyLR,
WarmupPolyLR), computed by hand."""
import pytest
import torch

from utils.errors import UserError
from utils.schedulers import build_scheduler


def lrs(policy, total, steps, base=(0.01, 1e-4), **kwargs):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in base]
    optimizer = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, base)], lr=base[0])
    scheduler = build_scheduler(policy, optimizer, total, **kwargs)
    seen = [[g["lr"] for g in optimizer.param_groups]]
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        seen.append([g["lr"] for g in optimizer.param_groups])
    return seen


def test_poly_with_floor():
    seen = lrs("poly", 10, 10)
    for it, (a, b) in enumerate(seen):
        factor = (1 - it / 10) ** 0.9
        assert a == pytest.approx(max(0.01 * factor, 1e-6), rel=1e-12)
        assert b == pytest.approx(max(1e-4 * factor, 1e-6), rel=1e-12)
    assert seen[-1] == [1e-6, 1e-6]
    assert seen[9][1] == pytest.approx(max(1e-4 * 0.1 ** 0.9, 1e-6))  # the 1e-4 group is floored near the end


def test_warm_poly():
    total = 20  # warm-up W = 2 iterations
    seen = lrs("warm_poly", total, total)
    assert seen[0][0] == pytest.approx(0.01 * 0.001)  # f(0) = 0.001
    assert seen[1][0] == pytest.approx(0.01 * (0.001 * 0.5 + 0.5) * (1 - 1 / 20) ** 0.9)
    assert seen[2][0] == pytest.approx(0.01 * (1 - 2 / 20) ** 0.9)
    assert seen[-1][0] == 0.0  # no floor


def test_step_policy():
    seen = lrs("step", 100, 7, step_size=3)
    assert [round(s[0] / 0.01, 6) for s in seen] == [1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01]


def test_bad_policy_and_zero_iterations():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(UserError, match="poly"):
        build_scheduler("cosine", optimizer, 10)
    with pytest.raises(UserError, match="at least one iteration"):
        build_scheduler("poly", optimizer, 0)


def test_method_schedule_options_floor_and_unrounded_warmup():
    """MiB/DKD's poly has no floor; DKD's warm-up is 20% of the iterations, not rounded (MiB utils/scheduler.py::PolyLR,
    DKD utils/lr_scheduler.py::WarmupPolyLR)."""
    group = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([group], lr=1e-6)
    scheduler = build_scheduler("poly", optimizer, 10, min_lr=0.0)
    for _ in range(9):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-6 * 0.1 ** 0.9)  # below BARM's 1e-6 floor
    optimizer = torch.optim.SGD([group], lr=1.0)
    scheduler = build_scheduler("warm_poly", optimizer, 7, warmup=0.2, round_warmup=False)
    optimizer.step()
    scheduler.step()  # it = 1 < W = 1.4 (int() would give W = 1 and no warm-up left)
    ramp = 0.001 * (1 - 1 / 1.4) + 1 / 1.4
    assert optimizer.param_groups[0]["lr"] == pytest.approx(ramp * (1 - 1 / 7) ** 0.9)
