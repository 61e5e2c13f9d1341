"""Shared fixtures: small synthetic datasets generated once per test session, and a checkpoint of a tiny model
(tests/test_predict.py, tests/engine/test_panels.py)."""
import shutil
import types

import pytest
import torch

from datasets.synthetic import generate
from engine.models import model_spec
from methods import get_method
from utils.checkpoint import CHECKPOINT_FORMAT, save_atomic
from utils.tasks import get_task

FOLDERS = {"voc": "VOC2012", "ade": "ADEChallengeData2016"}


def synthetic(tmp_path_factory, name, dataset, **settings):
    """A synthetic dataset folder, read-only by convention (copy it before modifying)."""
    root = str(tmp_path_factory.mktemp(name) / FOLDERS[dataset])
    generate(dataset, root, workers=1, **settings)
    return root


@pytest.fixture(scope="session")
def synthetic_voc(tmp_path_factory):
    return synthetic(tmp_path_factory, "voc", "voc", n_train=120, n_val=30, size=96, seed=0)


@pytest.fixture(scope="session")
def synthetic_ade(tmp_path_factory):
    return synthetic(tmp_path_factory, "ade", "ade", n_train=160, n_val=20, size=80, seed=0)


@pytest.fixture(scope="session")
def tiny_voc(tmp_path_factory):
    """A small VOC folder for training runs."""
    return synthetic(tmp_path_factory, "tiny", "voc", n_train=60, n_val=16, size=80, seed=1)


@pytest.fixture(scope="session")
def tiny_ade(tmp_path_factory):
    """A small ADE folder for training runs (100-50 overlap: 60 images at step 0, 11 at step 1)."""
    return synthetic(tmp_path_factory, "tiny_ade", "ade", n_train=60, n_val=12, size=64, seed=2)


@pytest.fixture
def voc_copy(synthetic_voc, tmp_path):
    """A private copy of the synthetic VOC folder that a test may modify."""
    root = str(tmp_path / "VOC2012")
    shutil.copytree(synthetic_voc, root, ignore=shutil.ignore_patterns(".ciss_cache"))
    return root


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A step-1 VOC 15-1 checkpoint of fine-tuning on resnet18 (random weights), saved as the trainer does."""
    method = get_method("ft", "voc")
    args = types.SimpleNamespace(model=None, backbone="resnet18", output_stride=16)
    spec = model_spec(args, type(method))
    steps = get_task("voc", "15-1")
    torch.manual_seed(0)
    model = method.build_network(spec, [len(s) for s in steps[:2]], layout_step=1)
    with torch.no_grad():  # a classifier of larger weights, so the prediction is not one class everywhere
        for name, parameter in model.named_parameters():
            if name.startswith("cls."):
                parameter.normal_(0, 1)
    path = str(tmp_path_factory.mktemp("ckpt") / "final.pth")
    save_atomic({"format": CHECKPOINT_FORMAT, "model_state": model.state_dict(), "method": method.name,
                 "hyper": method.hyper_dict(), "dataset": "voc", "task": "15-1", "setting": "overlap", "step": 1,
                 "classes": [list(s) for s in steps[:2]], "model": spec.name, "backbone": spec.backbone,
                 "output_stride": spec.output_stride, "args": {"crop_size": 65}}, path)
    return path, model.eval(), method
