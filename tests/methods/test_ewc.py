"""methods/ewc.py: EWC (MiB utils/regularizer.py::EWC) on a tiny "model" of named parameters, against its formulas
evaluated with plain Python floats, and as a method."""
import logging

import pytest
import torch

from methods import get_method
from methods.base import StepContext
from methods.ewc import EWC
from tests.helpers import (C0, FINAL0, REL, STEP0, STEP1, THETA0, Tiny, as_lists, assert_close, ewc_fisher, iterate,
                           make_params, normalize, penalty_value, reload, run_updates as run, set_params,
                           weighted_distance)
from utils.errors import UserError


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


# ---- as a method ---------------------------------------------------------------------------------------

CTX0 = StepContext("voc", ((0, 1, 2), (3, 4)), 0)
CTX1 = StepContext("voc", ((0, 1, 2), (3, 4)), 1)


def test_ewc_method_statistics_penalty_and_carry():
    method = get_method("ewc")
    model = Tiny([1.0, 2.0])
    method.configure(model, CTX0)
    assert iterate(method, model, CTX0, {"w": [0.1, -0.2]}) is None  # no penalty at step 0
    assert iterate(method, model, CTX0, {"w": [50.0, 50.0]}, finite=False) is None  # skipped: not finite
    iterate(method, model, CTX0, {"w": [0.3, 0.0]})
    method.end_of_step(model, CTX0)
    fisher = [0.9 * 0.09 + 0.1 * (0.9 * 0.01 + 0.1), 0.0 + 0.1 * (0.9 * 0.04 + 0.1)]
    state = method.state_dict()
    assert state["carry"]["kind"] == "ewc"
    assert state["carry"]["fisher"]["w"].tolist() == pytest.approx(fisher, rel=1e-6)

    step1 = get_method("ewc")
    step1.load_previous_state(state, CTX1)
    previous, student = Tiny([1.0, 2.0]), Tiny([1.5, 1.0], v=[3.0])
    step1.prepare_student(student, previous, CTX1)
    step1.configure(student, CTX1)
    penalty = iterate(step1, student, CTX1, {"w": [0.0, 0.0], "v": [1.0]})
    low, high = min(fisher), max(fisher)
    normalized = [(f - low) / (high - low + 1e-8) for f in fisher]
    expected = 500 * (normalized[0] * 0.5 ** 2 + normalized[1] * 1.0 ** 2)  # v (new) is not penalised
    assert penalty["total"].item() == pytest.approx(expected, rel=1e-5)
    assert penalty["reg"].item() == penalty["total"].item() and penalty["total"].requires_grad
    # the new parameter starts its Fisher at 1 and is updated: F = 0.9·1² + 0.1·1
    assert step1.regularizer.fisher["v"].tolist() == pytest.approx([1.0])
