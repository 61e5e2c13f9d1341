"""methods/regularizers.py: the shared parts of EWC, PI and RW: min-max normalisation, the statistics of the
previous step a regularized method needs, and the method state across a resume."""
import pytest
import torch

from methods import get_method
from methods.base import StepContext
from methods.regularizers import min_max_normalize
from tests.helpers import Tiny, iterate, normalize
from utils.errors import UserError


def test_min_max_normalize():
    assert min_max_normalize(torch.tensor([2.0, 4.0, 3.0])).tolist() == pytest.approx(normalize([2.0, 4.0, 3.0]))
    assert min_max_normalize(torch.tensor([5.0, 5.0])).tolist() == [0.0, 0.0]


CTX0 = StepContext("voc", ((0, 1, 2), (3, 4)), 0)
CTX1 = StepContext("voc", ((0, 1, 2), (3, 4)), 1)


def test_regularized_methods_need_the_statistics_of_the_previous_step():
    for name in ("ewc", "pi", "rw"):
        with pytest.raises(UserError, match=f"train step 0 \\(and every step\\) with --method {name}"):
            get_method(name).load_previous_state({}, CTX1)
    ewc = get_method("ewc")
    ewc.configure(Tiny([1.0]), CTX0)
    ewc.end_of_step(Tiny([1.0]), CTX0)
    with pytest.raises(UserError, match="RW statistics"):
        get_method("rw").load_previous_state(ewc.state_dict(), CTX1)


@pytest.mark.parametrize("name", ["ewc", "pi", "rw"])
def test_regularized_method_state_round_trip(name):
    def start(state=None):
        method = get_method(name, **({"reg_iterations": 2} if name == "rw" else {}))
        method.load_previous_state(carry, CTX1)
        student = Tiny([1.5, 1.0], v=[3.0])
        method.prepare_student(student, Tiny([1.0, 2.0]), CTX1)
        method.configure(student, CTX1)
        if state is not None:
            method.load_state_dict(state)
        return method, student

    zero = get_method(name)
    zero.configure(Tiny([1.0, 2.0]), CTX0)
    iterate(zero, Tiny([1.0, 2.0]), CTX0, {"w": [0.3, 0.1]})
    zero.end_of_step(Tiny([1.1, 2.0]), CTX0)
    carry = zero.state_dict()

    def run(method, student, grads):
        out = []
        for g in grads:
            penalty = iterate(method, student, CTX1, {"w": g, "v": [g[0]]})
            out.append(penalty["total"].item())
            with torch.no_grad():
                student.w.sub_(0.1 * torch.tensor(g))
        method.end_of_step(student, CTX1)
        return out, method.state_dict()["carry"]

    grads = [[0.1, 0.2], [0.3, -0.1], [-0.2, 0.4], [0.05, 0.05]]
    straight, straight_carry = run(*start(), grads)
    first, student = start()
    run_first = []
    for g in grads[:2]:
        run_first.append(iterate(first, student, CTX1, {"w": g, "v": [g[0]]})["total"].item())
        with torch.no_grad():
            student.w.sub_(0.1 * torch.tensor(g))
    saved = first.state_dict()
    resumed, _ = start(saved)
    with torch.no_grad():
        resumed_student = Tiny(student.w.tolist(), v=student.v.tolist())
    rest, resumed_carry = run(resumed, resumed_student, grads[2:])
    assert run_first + rest == pytest.approx(straight, rel=1e-6)
    for key, value in straight_carry.items():
        if key != "kind":
            for n in value:
                assert torch.allclose(value[n], resumed_carry[key][n], rtol=1e-6), (key, n)
