"""EWC, PI and RW (MiB utils/regularizer.py::EWC, PI, RW) on a tiny "model" of named parameters, against their
formulas evaluated with plain Python floats."""
import io
import logging

import pytest
import torch

from methods.ewc import EWC
from methods.pi import PI
from methods.regularizers import min_max_normalize
from methods.rw import RW
from utils.errors import UserError

REL = 1e-5
ALPHA = 0.9

# step 0: initial weights, then per iteration the weights at the update and the task-loss gradients
THETA0 = {"a": [1.0, 2.0], "b": [0.5, -1.0, 3.0]}
STEP0 = [
    ({"a": [1.0, 2.0], "b": [0.5, -1.0, 3.0]}, {"a": [0.5, -1.0], "b": [2.0, 0.0, 1.0]}),
    ({"a": [0.8, 2.1], "b": [0.5, -0.5, 2.0]}, {"a": [1.5, 0.2], "b": [-0.5, 1.0, 0.3]}),
    ({"a": [0.6, 2.1], "b": [0.7, 0.0, 2.5]}, {"a": [0.1, 0.4], "b": [0.0, -2.0, 0.6]}),
    ({"a": [0.55, 2.2], "b": [0.6, 0.1, 2.2]}, {"a": [-0.3, 0.9], "b": [1.0, 0.5, -0.4]}),
]
FINAL0 = {"a": [0.5, 2.3], "b": [0.5, 0.2, 2.0]}  # b[0] ends where it started: PI's 1e-20 denominator
# step 1: the step-0 result is θ*; "c" is the new classifier
C0 = [0.3, -0.2]
STEP1 = [
    ({"a": [0.5, 2.3], "b": [0.5, 0.2, 2.0], "c": C0}, {"a": [0.2, -0.1], "b": [1.0, 1.0, 1.0], "c": [0.5, 0.5]}),
    ({"a": [0.45, 2.5], "b": [0.4, 0.3, 2.1], "c": [0.35, -0.1]},
     {"a": [0.4, 0.3], "b": None, "c": [1.0, -2.0]}),
    ({"a": [0.3, 2.6], "b": [0.2, 0.3, 2.3], "c": [0.4, 0.0]},
     {"a": [-1.0, 0.6], "b": [0.3, -0.2, 0.7], "c": [0.1, 0.2]}),
    ({"a": [0.35, 2.4], "b": [0.1, 0.6, 2.2], "c": [0.5, 0.3]},
     {"a": [0.5, 0.5], "b": [-0.6, 0.4, 0.2], "c": [-0.3, 0.6]}),
]
FINAL1 = {"a": [0.4, 2.2], "b": [0.0, 0.5, 2.6], "c": [0.45, 0.1]}


# ---- plain-Python formulas ------------------------------------------------------------------------------
def normalize(values):
    low, high = min(values), max(values)
    return [(v - low) / (high - low + 1e-8) for v in values]


def ema(fisher, grad):
    return [ALPHA * g * g + (1 - ALPHA) * f for f, g in zip(fisher, grad)]


def weighted_distance(importance, theta, theta_ref):
    return sum(sum(w * (t - r) ** 2 for w, t, r in zip(importance[n], theta[n], theta_ref[n])) for n in importance)


def ewc_fisher(start, iterations):
    fisher = {n: list(v) for n, v in start.items()}
    for _, grads in iterations:
        for n, g in grads.items():
            if g is not None:
                fisher[n] = ema(fisher[n], g)
    return fisher


def pi_delta(names, iterations):
    delta = {n: [0.0] * len(THETA0.get(n, C0)) for n in names}
    prev = None
    for theta, grads in iterations:
        if prev is not None:
            for n in names:
                if grads.get(n) is None or n not in prev:
                    continue
                delta[n] = [d + g * (p - t) for d, g, p, t in zip(delta[n], grads[n], prev[n], theta[n])]
        prev = {n: theta[n] for n in names if grads.get(n) is not None}
    return delta


def pi_score(delta, final, theta_ref, previous):
    score = {}
    for n in delta:
        omega = [d / ((t - r) ** 2 + 1e-20) for d, t, r in zip(delta[n], final[n], theta_ref[n])]
        omega = [w if w > 0 else 0.0 for w in omega]
        if n in previous:
            omega = [w + p for w, p in zip(omega, previous[n])]
        score[n] = omega
    return score


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


# ---- the tiny model ------------------------------------------------------------------------------------
def make_params(values):
    return {n: torch.tensor(v, requires_grad=True) for n, v in values.items()}


def set_params(params, values):
    with torch.no_grad():
        for n, v in values.items():
            params[n].copy_(torch.tensor(v))


def run(reg, params, iterations):
    for theta, grads in iterations:
        set_params(params, theta)
        reg.update(params, {n: None if g is None else torch.tensor(g) for n, g in grads.items()})


def as_lists(store):
    return {n: t.tolist() for n, t in store.items()}


def assert_close(actual, expected):
    assert set(actual) == set(expected)
    for n in expected:
        assert actual[n] == pytest.approx(expected[n], rel=REL, abs=1e-12), n


def reload(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def penalty_value(reg, params):
    value = reg.penalty(params)
    return None if value is None else value.item()


def test_min_max_normalize():
    assert min_max_normalize(torch.tensor([2.0, 4.0, 3.0])).tolist() == pytest.approx(normalize([2.0, 4.0, 3.0]))
    assert min_max_normalize(torch.tensor([5.0, 5.0])).tolist() == [0.0, 0.0]


# ---- EWC (MiB utils/regularizer.py::EWC) ---------------------------------------------------------------
def ewc_step0():
    params = make_params(THETA0)
    reg = EWC(params)
    run(reg, params, STEP0[:3])
    return reg, params


def test_ewc_step0_fisher_and_no_penalty():
    reg, params = ewc_step0()
    assert reg.penalty(params) is None
    ones = {n: [1.0] * len(v) for n, v in THETA0.items()}
    carry = reg.end_step(params)
    assert carry["kind"] == "ewc"
    assert_close(as_lists(carry["fisher"]), ewc_fisher(ones, STEP0[:3]))


def test_ewc_skips_missing_gradients():
    params = make_params(THETA0)
    reg = EWC(params)
    reg.update(params, {"a": torch.tensor([2.0, 1.0]), "b": None})
    fisher = as_lists(reg.end_step()["fisher"])
    assert fisher["b"] == [1.0, 1.0, 1.0]
    assert fisher["a"] == pytest.approx([0.9 * 4 + 0.1, 0.9 + 0.1])


def test_ewc_step1_penalty_and_fisher():
    reg0, params0 = ewc_step0()
    set_params(params0, FINAL0)
    carry = reg0.end_step(params0)
    fisher0 = as_lists(carry["fisher"])
    params = make_params({**FINAL0, "c": C0})
    reg = EWC(params, reference={n: params0[n].detach().clone() for n in FINAL0}, previous=carry)
    assert penalty_value(reg, params) == 0.0
    set_params(params, STEP1[2][0])
    theta = STEP1[2][0]
    importance = {n: normalize(fisher0[n]) for n in ("a", "b")}  # the new classifier is not penalised
    expected = weighted_distance(importance, theta, FINAL0)
    penalty = reg.penalty(params)
    assert penalty.item() == pytest.approx(expected, rel=REL)
    penalty.backward()
    grad_a = [2 * w * (t - r) for w, t, r in zip(importance["a"], theta["a"], FINAL0["a"])]
    assert params["a"].grad.tolist() == pytest.approx(grad_a, rel=REL)
    assert params["c"].grad is None
    # statistics continue from the carried (un-normalised) Fisher; new parameters start from ones
    run(reg, params, STEP1)
    start = {**fisher0, "c": [1.0, 1.0]}
    assert_close(as_lists(reg.end_step(params)["fisher"]), ewc_fisher(start, STEP1))
    # the penalty keeps using the carried Fisher, not the running one
    assert reg.penalty(params).item() == pytest.approx(weighted_distance(importance, STEP1[-1][0], FINAL0), rel=REL)


def test_ewc_frozen_parameters_are_neither_tracked_nor_penalised():
    params = make_params(THETA0)
    params["b"].requires_grad_(False)
    carry = {"kind": "ewc", "fisher": {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([1.0, 2.0, 5.0])}}
    reg = EWC(params, reference={n: torch.zeros(len(v)) for n, v in THETA0.items()}, previous=carry)
    expected = sum(w * t * t for w, t in zip(normalize([1.0, 3.0]), THETA0["a"]))
    assert reg.penalty(params).item() == pytest.approx(expected, rel=REL)
    assert "b" not in EWC(params).end_step()["fisher"]


def test_ewc_without_carried_statistics_does_not_penalise(caplog):
    params = make_params(THETA0)
    reference = {n: torch.zeros(len(v)) for n, v in THETA0.items()}
    with caplog.at_level(logging.WARNING, logger="ciss"):
        assert EWC(params, reference=reference).penalty(params) is None
    assert "penalty is disabled" in caplog.text
    assert EWC(params, reference=reference, previous={}).penalty(params) is None
    with pytest.raises(UserError, match="'pi', expected 'ewc'"):
        EWC(params, reference=reference, previous={"kind": "pi", "score": {"a": torch.ones(2)}})


def test_ewc_state_round_trip():
    reg0, params0 = ewc_step0()
    carry = reg0.end_step(params0)
    reference = {n: torch.tensor(v) for n, v in FINAL0.items()}
    params = make_params({**FINAL0, "c": C0})
    reg = EWC(params, reference=reference, previous=carry)
    run(reg, params, STEP1[:2])
    fresh = EWC(make_params({**FINAL0, "c": C0}), reference=reference)
    fresh.load_state_dict(reload(reg.state_dict()))
    run(reg, params, STEP1[2:])
    run(fresh, params, STEP1[2:])
    for n, t in reg.end_step()["fisher"].items():
        assert torch.equal(t, fresh.end_step()["fisher"][n])
    assert torch.equal(reg.penalty(params), fresh.penalty(params))


# ---- PI (MiB utils/regularizer.py::PI) -----------------------------------------------------------------
def pi_step0():
    params = make_params(THETA0)
    reg = PI(params)
    run(reg, params, STEP0)
    set_params(params, FINAL0)
    return reg, params


def test_pi_step0_importance():
    reg, params = pi_step0()
    assert reg.penalty(params) is None
    delta = pi_delta(["a", "b"], STEP0)
    expected = pi_score(delta, FINAL0, THETA0, {})  # θ_ref at step 0 = the initial weights
    assert delta["b"][0] != 0 and expected["b"][0] > 1e10  # b[0] came back: δ / 1e-20
    assert any(v < 0 for v in delta["a"] + delta["b"])  # some negative path integrals are clipped to 0
    carry = reg.end_step(params)
    assert carry["kind"] == "pi"
    assert_close(as_lists(carry["score"]), expected)


def pi_step1():
    reg0, params0 = pi_step0()
    carry = reg0.end_step(params0)
    reference = {n: torch.tensor(v) for n, v in FINAL0.items()}
    params = make_params({**FINAL0, "c": C0})
    return PI(params, reference=reference, previous=carry), params, reference, carry


def test_pi_step1_penalty_and_summed_importance():
    reg, params, _, carry = pi_step1()
    previous = as_lists(carry["score"])
    assert penalty_value(reg, params) == 0.0
    run(reg, params, STEP1)
    set_params(params, FINAL1)
    importance = {n: normalize(previous[n]) for n in ("a", "b")}
    assert reg.penalty(params).item() == pytest.approx(weighted_distance(importance, FINAL1, FINAL0), rel=REL)
    delta = pi_delta(["a", "b", "c"], STEP1)
    # b had no gradient at the second update: no δ there, and no θ_prev for it at the third
    assert delta["b"] == pytest.approx([g * (p - t) for g, p, t in zip(STEP1[3][1]["b"], STEP1[2][0]["b"],
                                                                         STEP1[3][0]["b"])])
    theta_ref = {**FINAL0, "c": C0}  # θ* for old parameters, the initial values for the new classifier
    assert_close(as_lists(reg.end_step(params)["score"]), pi_score(delta, FINAL1, theta_ref, previous))


def test_pi_state_round_trip():
    reg, params, reference, _ = pi_step1()
    run(reg, params, STEP1[:2])
    fresh = PI(make_params(STEP1[1][0]), reference=reference)  # built from mid-step weights
    fresh.load_state_dict(reload(reg.state_dict()))
    run(reg, params, STEP1[2:])
    run(fresh, params, STEP1[2:])
    set_params(params, FINAL1)
    expected = reg.end_step(params)["score"]
    for n, t in fresh.end_step(params)["score"].items():
        assert torch.equal(t, expected[n])
    assert torch.equal(reg.penalty(params), fresh.penalty(params))


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
