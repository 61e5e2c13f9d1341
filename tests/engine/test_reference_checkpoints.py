"""Checkpoints written by the reference repositories load into ciss and give the outputs of the model they came from.

Each case saves a randomly initialised ciss model (ResNet-18, VOC 15-1 step 1) as the reference's code writes
its checkpoints: the wrapper dict, the ``module.`` prefix of a DDP/DataParallel state dict, the key names and the
keys InPlace-ABN does not have. The layouts are written here from the reference code, independently of ciss's
converters:

* BARM / KProBA (BARM utils/ckpt.py::save_ckpt): ``{"model_state": model.module.state_dict(), "optimizer_state",
  "best_score"}``, no prefix;
* SSUL (SSUL main.py::save_ckpt): ``{"cur_itrs", "model_state": model.module.state_dict(), "optimizer_state",
  "scheduler_state", "best_score"}``, no prefix;
* MiB / PLOP (MiB run.py::save_ckpt): ``{"epoch", "model_state": DDP state dict ("module." keys), "optimizer_state",
  "scheduler_state", "best_score", "trainer_state"}``; InPlace-ABN layers have no ``num_batches_tracked``;
* RCIL: MiB's wrapper; a step-0 file holds both branches (``conv2`` and ``conv2_new``), a file of step >= 1 the
  merged ``conv2`` with a bias (RCIL run.py::convert_model);
* DKD (DKD base/base_trainer.py::_save_checkpoint): ``{"arch", "epoch", "state_dict": DDP state dict, "optimizer",
  "monitor_best", "config"}`` with DKD's module names ``aspp.*`` (the ASPP and ``aspp.last_conv``) and ``cls.*``.
"""
import types

import pytest
import torch

from engine.context import StepContext
from engine.models import build_eval_model, model_spec, model_state
from methods import get_method
from utils.checkpoint import load_checkpoint_file
from utils.errors import UserError
from utils.tasks import get_task

STEPS = get_task("voc", "15-1")


def module_prefixed(state):
    return {f"module.{key}": value for key, value in state.items()}


def without_bn_counters(state):
    return {key: value for key, value in state.items() if not key.endswith("num_batches_tracked")}


#: ciss key prefix -> DKD's (DKD models/model.py::DeepLabV3: backbone, aspp (with last_conv), cls)
DKD_NAMES = (("classifier.last_conv.", "aspp.last_conv."), ("classifier.aspp.", "aspp."), ("classifier.cls.", "cls."),
             ("backbone.", "backbone."))


def dkd_named(state):
    renamed = {}
    for key, value in state.items():
        old, new = next((old, new) for old, new in DKD_NAMES if key.startswith(old))
        renamed[new + key[len(old):]] = value
    return renamed


def barm_file(state):
    return {"model_state": state, "optimizer_state": {"state": {}, "param_groups": []}, "best_score": -1}


def ssul_file(state):
    return {"cur_itrs": 1000, "model_state": state, "optimizer_state": {}, "scheduler_state": {}, "best_score": 0.5}


def mib_file(state):
    return {"epoch": 30, "model_state": module_prefixed(without_bn_counters(state)), "optimizer_state": {},
            "scheduler_state": {}, "best_score": 0.0, "trainer_state": None}


def dkd_file(state):
    return {"arch": "DeepLabV3", "epoch": 60, "state_dict": module_prefixed(dkd_named(state)), "optimizer": {},
            "monitor_best": 0, "config": {"name": "DKD"}}


# method, step of the checkpoint, file writer, reference key names that must be in the file
CASES = [
    ("barm", 1, barm_file, ("backbone.layer4.1.bn2.running_var", "classifier.head_pre.0.weight",
                            "classifier.ear.0.0.weight", "classifier.head.1.bias", "classifier.aspp.project.0.weight")),
    ("kproba", 1, barm_file, ("classifier.ear.0.1.running_mean", "classifier.head.0.weight")),
    ("ssul", 1, ssul_file, ("classifier.head.0.0.weight", "classifier.head.1.3.bias", "classifier.head.2.1.weight")),
    ("mib", 1, mib_file, ("module.body.mod2.block1.convs.conv1.weight", "module.body.mod3.block1.proj_bn.running_var",
                          "module.head.map_bn.weight", "module.cls.0.weight", "module.cls.1.bias")),
    ("plop", 1, mib_file, ("module.body.mod5.block2.convs.bn2.weight", "module.head.global_pooling_conv.weight")),
    ("rcil", 0, mib_file, ("module.body.mod2.block1.convs.conv2_new.weight", "module.head.map_convs_new.0.weight")),
    ("rcil", 1, mib_file, ("module.body.mod2.block1.convs.conv2.bias", "module.body.mod2.block1.convs.conv2_new.weight")),
    ("dkd", 1, dkd_file, ("module.backbone.layer1.0.conv1.weight", "module.aspp.convs.0.0.weight",
                          "module.aspp.last_conv.0.weight", "module.cls.0.weight", "module.cls.2.bias")),
]


def random_model(method, step):
    spec = model_spec(types.SimpleNamespace(model=None, backbone="resnet18", output_stride=16), type(method))
    ctx = StepContext("voc", STEPS, step)
    torch.manual_seed(0)
    model = method.build_network(spec, ctx.classes_per_step, layout_step=step)
    with torch.no_grad():  # non-trivial BN statistics and biases, so that a key mix-up shows in the outputs
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and ("running_var" in name or name.endswith("bias")):
                tensor.uniform_(0.5, 1.5)
    return model.eval(), spec, ctx


@pytest.mark.parametrize("name, step, writer, reference_keys", CASES,
                         ids=[f"{c[0]}-step{c[1]}" for c in CASES])
def test_a_reference_checkpoint_gives_the_outputs_of_its_model(tmp_path, name, step, writer, reference_keys):
    method = get_method(name)
    model, spec, ctx = random_model(method, step)
    path = str(tmp_path / "reference.pth")
    contents = writer(model.state_dict())
    state = contents.get("model_state", contents.get("state_dict"))
    assert set(reference_keys) <= set(state), "the layout written here is not the reference's"
    torch.save(contents, path)
    loaded = build_eval_model(method, spec, ctx, model_state(load_checkpoint_file(path)), path)
    images = torch.randn(2, 3, 65, 65)
    with torch.no_grad():
        expected, _ = model(images)
        got, _ = loaded.eval()(images)
    assert torch.equal(got, expected)


def test_a_checkpoint_of_another_network_or_class_count_is_refused_naming_both(tmp_path):
    dkd_model, _, _ = random_model(get_method("dkd"), 1)
    path = str(tmp_path / "dkd.pth")
    torch.save(dkd_file(dkd_model.state_dict()), path)
    barm = get_method("barm")
    _, spec, ctx = random_model(barm, 1)
    with pytest.raises(UserError, match=r"holds a dkd \(DKD's network\), not the deeplabv3bga or deeplabv3inc"):
        build_eval_model(barm, spec, ctx, model_state(load_checkpoint_file(path)), path)
    model, spec, _ = random_model(barm, 1)
    torch.save(barm_file(model.state_dict()), path)
    ctx2 = StepContext("voc", STEPS, 2)  # step 2 of 15-1 needs one more head
    with pytest.raises(UserError, match=r"does not fit the model for classes per step \[16, 1, 1\]"):
        build_eval_model(barm, spec, ctx2, model_state(load_checkpoint_file(path)), path)
    other = StepContext("voc", get_task("voc", "15-5"), 1)  # 5 new classes, where the file has 1
    with pytest.raises(UserError, match=r"wrong shape classifier.head.1.bias.*\(2,\) in the file, \(6,\) in the model"):
        build_eval_model(barm, spec, other, model_state(load_checkpoint_file(path)), path)
