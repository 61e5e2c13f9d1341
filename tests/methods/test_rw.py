"""methods/rw.py: RW (MiB utils/regularizer.py::RW) on a tiny "model" of named parameters, against its formulas
evaluated with plain Python floats, and as a method."""
import pytest
import torch

from methods import get_method
from methods.base import StepContext
from methods.ewc import EWC
from methods.rw import RW
from tests.helpers import (C0, FINAL0, FINAL1, REL, STEP0, STEP1, THETA0, Tiny, as_lists, assert_close, ema, ewc_fisher,
                           iterate, make_params, normalize, reload, run_updates as run, set_params, weighted_distance)
from utils.errors import UserError


def rw_run(fisher_start, names, iterations, every):
    fisher = {n: list(v) for n, v in fisher_start.items()}
    score = {n: [0.0] * len(fisher[n]) for n in names}
    tmp, count = None, 0
    for theta, grads in iterations:
        if count % every == 0:
            if tmp is not None:
                for n in names:
                    if grads.get(n) is None or n not in tmp:
                        continue
                    score[n] = [s + g * (p - t) / (0.5 * f * (t - p) ** 2 + 1e-8)
                                for s, g, p, t, f in zip(score[n], grads[n], tmp[n], theta[n], fisher[n])]
            tmp = {n: theta[n] for n in names if grads.get(n) is not None}
        count += 1
        for n in names:
            if grads.get(n) is not None:
                fisher[n] = ema(fisher[n], grads[n])
    return fisher, score


# ---- RW (MiB utils/regularizer.py::RW) -----------------------------------------------------------------
EVERY = 2  # reg_iterations, small enough for the score step to run twice in four updates


def rw_step0():
    params = make_params(THETA0)
    reg = RW(params, iterations=EVERY)
    run(reg, params, STEP0)
    return reg, params


def test_rw_step0_score_and_fisher():
    reg, params = rw_step0()
    assert reg.penalty(params) is None
    ones = {n: [1.0] * len(v) for n, v in THETA0.items()}
    fisher, score = rw_run(ones, ["a", "b"], STEP0, EVERY)
    # the score step at update 3 uses the Fisher after update 2 (the previous iteration's)
    fisher2 = ewc_fisher(ones, STEP0[:2])
    g, p, t = STEP0[2][1]["a"][0], STEP0[0][0]["a"][0], STEP0[2][0]["a"][0]
    assert score["a"][0] == pytest.approx(g * (p - t) / (0.5 * fisher2["a"][0] * (t - p) ** 2 + 1e-8))
    carry = reg.end_step(params)
    assert carry["kind"] == "rw"
    assert_close(as_lists(carry["fisher"]), fisher)
    assert_close(as_lists(carry["score"]), {n: [s if s >= 0 else 0.0 for s in v] for n, v in score.items()})
    assert any(s < 0 for v in score.values() for s in v)


def test_rw_default_period_is_ten():
    params = make_params(THETA0)
    reg = RW(params)
    iterations = [(STEP0[k % 4][0], STEP0[k % 4][1]) for k in range(11)]
    run(reg, params, iterations)
    ones = {n: [1.0] * len(v) for n, v in THETA0.items()}
    _, score = rw_run(ones, ["a", "b"], iterations, 10)
    assert_close(as_lists(reg.end_step()["score"]), {n: [max(s, 0.0) for s in v] for n, v in score.items()})
    _, wrong = rw_run(ones, ["a", "b"], iterations, 2)
    assert as_lists(reg.end_step()["score"])["a"] != pytest.approx([max(s, 0.0) for s in wrong["a"]])


def rw_step1():
    reg0, params0 = rw_step0()
    carry = reg0.end_step(params0)
    reference = {n: torch.tensor(v) for n, v in FINAL0.items()}
    params = make_params({**FINAL0, "c": C0})
    return RW(params, reference=reference, previous=carry, iterations=EVERY), params, reference, carry


def test_rw_step1_penalty_and_averaged_score():
    reg, params, _, carry = rw_step1()
    fisher0, score0 = as_lists(carry["fisher"]), as_lists(carry["score"])
    run(reg, params, STEP1)
    set_params(params, FINAL1)
    importance = {n: [f + s for f, s in zip(normalize(fisher0[n]), normalize(score0[n]))] for n in ("a", "b")}
    assert reg.penalty(params).item() == pytest.approx(weighted_distance(importance, FINAL1, FINAL0), rel=REL)
    fisher, score = rw_run({**fisher0, "c": [1.0, 1.0]}, ["a", "b", "c"], STEP1, EVERY)
    saved = {n: [max(s, 0.0) for s in v] for n, v in score.items()}
    saved = {n: [0.5 * (s + o) for s, o in zip(v, score0[n])] if n in score0 else v for n, v in saved.items()}
    carry1 = reg.end_step(params)
    assert_close(as_lists(carry1["fisher"]), fisher)
    assert_close(as_lists(carry1["score"]), saved)


def test_rw_needs_both_carried_statistics():
    reg0, params0 = rw_step0()
    carry = reg0.end_step(params0)
    params = make_params({**FINAL0, "c": C0})
    reg = RW(params, reference={n: torch.tensor(v) for n, v in FINAL0.items()},
             previous={"kind": "rw", "fisher": carry["fisher"], "score": {}})
    assert reg.penalty(params) is None
    assert reg.end_step()["fisher"]["a"].tolist() == [1.0, 1.0]  # the Fisher restarts from ones, as the reference


@pytest.mark.parametrize("stop", [2, 3])  # before a score step (θ_tmp, F) and before a plain one (count)
def test_rw_state_round_trip(stop):
    reg, params, reference, _ = rw_step1()
    run(reg, params, STEP1[:stop])
    fresh = RW(make_params(STEP1[stop - 1][0]), reference=reference, iterations=EVERY)
    fresh.load_state_dict(reload(reg.state_dict()))
    run(reg, params, STEP1[stop:])
    run(fresh, params, STEP1[stop:])
    set_params(params, FINAL1)
    a, b = reg.end_step(params), fresh.end_step(params)
    for key in ("fisher", "score"):
        for n, t in a[key].items():
            assert torch.equal(t, b[key][n])
    assert torch.equal(reg.penalty(params), fresh.penalty(params))
    with pytest.raises(UserError):
        fresh.load_state_dict(EWC(params).state_dict())


# ---- as a method ---------------------------------------------------------------------------------------

CTX0 = StepContext("voc", ((0, 1, 2), (3, 4)), 0)


def test_rw_method_score_and_fisher():
    method = get_method("rw", reg_iterations=1, reg_alpha=0.5)
    model = Tiny([1.0, 2.0])
    method.configure(model, CTX0)
    iterate(method, model, CTX0, {"w": [2.0, 0.0]})  # θ_tmp ← θ; F = 0.5·g² + 0.5·1 = (2.5, 0.5)
    with torch.no_grad():
        model.w.copy_(torch.tensor([0.0, 3.0]))
    iterate(method, model, CTX0, {"w": [1.0, 1.0]})  # S += g(θ_tmp − θ) / (½ F (θ − θ_tmp)² + 1e-8), old F
    method.end_of_step(model, CTX0)
    carry = method.state_dict()["carry"]
    score = [max(1.0 * 1.0 / (0.5 * 2.5 * 1.0 + 1e-8), 0.0), max(1.0 * -1.0 / (0.5 * 0.5 * 1.0 + 1e-8), 0.0)]
    assert carry["score"]["w"].tolist() == pytest.approx(score, rel=1e-6)
    assert carry["fisher"]["w"].tolist() == pytest.approx([0.5 + 1.25, 0.5 + 0.25], rel=1e-6)
