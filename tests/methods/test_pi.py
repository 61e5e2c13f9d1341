"""methods/pi.py: PI (MiB utils/regularizer.py::PI) on a tiny "model" of named parameters, against its formulas
evaluated with plain Python floats, and as a method."""
import pytest
import torch

from methods import get_method
from methods.base import StepContext
from methods.pi import PI
from tests.helpers import (C0, FINAL0, FINAL1, REL, STEP0, STEP1, THETA0, Tiny, as_lists, assert_close, iterate,
                           make_params, normalize, penalty_value, reload, run_updates as run, set_params,
                           weighted_distance)


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


# ---- as a method ---------------------------------------------------------------------------------------

CTX0 = StepContext("voc", ((0, 1, 2), (3, 4)), 0)


def test_pi_method_importance():
    method = get_method("pi")
    model = Tiny([1.0, 2.0])
    method.configure(model, CTX0)  # θ_ref = the values at configure (step 0)
    iterate(method, model, CTX0, {"w": [0.5, 0.5]})
    with torch.no_grad():
        model.w.copy_(torch.tensor([0.8, 2.5]))  # an optimizer step
    iterate(method, model, CTX0, {"w": [1.0, -2.0]})  # δ = g ⊙ (θ_prev − θ) = (0.2, 1.0)
    method.end_of_step(model, CTX0)
    omega = [0.2 / (0.2 ** 2 + 1e-20), 1.0 / (0.5 ** 2 + 1e-20)]
    assert method.state_dict()["carry"]["score"]["w"].tolist() == pytest.approx(omega, rel=1e-5)
