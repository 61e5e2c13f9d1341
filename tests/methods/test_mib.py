"""methods/mib.py: MiB's background initialisation can be switched off."""
import torch

from methods import get_method
from methods.base import StepContext
from network import build_model


STEPS = ((0, 1, 2), (3, 4), (5,))


# ---- background initialisation on MiB's network (MiB segmentation_module.py::init_new_classifier) ----------------
def student_from(previous, classes_per_step, seed=1):
    torch.manual_seed(seed)
    student = build_model("mib_resnet18", classes_per_step)
    student.load_state_dict(previous.state_dict(), strict=False)
    return student


def test_mib_init_can_be_switched_off():
    torch.manual_seed(0)
    previous = build_model("mib_resnet18", [3])
    student = student_from(previous, [3, 1])
    weight = student.cls[1].weight.detach().clone()
    get_method("mib", init_balanced=False).prepare_student(student, previous, StepContext("voc", STEPS, 1))
    assert torch.equal(student.cls[1].weight, weight)
