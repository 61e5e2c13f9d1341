"""Learning-rate schedules against the reference formulas (spec barm-ssul-kproba §4.3), computed by hand."""
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
