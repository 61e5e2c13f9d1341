"""engine/models.py: a recorded backbone implied by the model name is adopted without an announcement; the one rule
for which checkpoint a step may start from (check_start), used by training, --resume and --test alike, over every
pair of the methods' configurations (table-driven, no training)."""
import itertools
import logging

import pytest

from engine.config import RunConfig
from engine.models import adopt_recorded_model, check_start
from methods import get_method
from utils.errors import UserError


def test_recorded_backbone_implied_by_the_model_name_is_not_announced(caplog):
    checkpoint = {"model": "deeplabv3bga_resnet18", "backbone": "resnet18", "output_stride": 16}
    named = RunConfig({"model": "deeplabv3bga_resnet18", "backbone": None, "output_stride": 16}, explicit={"model"})
    with caplog.at_level(logging.INFO, logger="ciss"):
        adopted = adopt_recorded_model(named, checkpoint, "prev.pth")
    assert adopted.backbone == "resnet18" and "continuing with it" not in caplog.text
    assert named.backbone is None and adopted.source("backbone") == "checkpoint prev.pth"  # a new configuration
    unnamed = RunConfig({"model": None, "backbone": None, "output_stride": 16})
    with caplog.at_level(logging.INFO, logger="ciss"):
        adopted = adopt_recorded_model(unnamed, checkpoint, "prev.pth")
    assert (adopted.model, adopted.backbone) == ("deeplabv3bga_resnet18", "resnet18")
    assert "trained with --backbone resnet18: continuing with it" in caplog.text


#: Every method configuration a user can run: name, hyper-parameter overrides.
CONFIGS = {
    "barm": ("barm", {}), "kproba": ("kproba", {}), "ssul": ("ssul", {}), "ssul-m": ("ssul", {"mem_size": 100}),
    "dkd": ("dkd", {}), "dkd-m": ("dkd", {"mem_size": 100}), "rcil": ("rcil", {}), "plop": ("plop", {}),
    "mib": ("mib", {}), "ft": ("ft", {}), "lwf": ("lwf", {}), "lwf-mc": ("lwf-mc", {}), "ilt": ("ilt", {}),
    "ewc": ("ewc", {}), "pi": ("pi", {}), "rw": ("rw", {}),
    "mib (plop protocol)": ("mib", {"protocol": "plop"}), "ilt (plop protocol)": ("ilt", {"protocol": "plop"}),
}

#: Written from the reference repositories, not from ciss: a step 0 is the same training for the MiB repository's
#: FT, LwF, ILT and MiB (plain CE on MiB's network and labels, MiB run.py::main) and, on PLOP's labels, for PLOP
#: and the methods PLOP re-ran under its protocol; LwF-MC trains step 0 with BCE; EWC, PI and RW carry their
#: statistics; BARM, KProBA (its prototypes), SSUL, DKD and RCIL (their own networks) share with nobody. The
#: memory variants (SSUL-M, DKD-M) are the same method at step 0.
SHARED_STEP0 = [{"mib", "ft", "lwf", "ilt"}, {"plop", "mib (plop protocol)", "ilt (plop protocol)"},
                {"ssul", "ssul-m"}, {"dkd", "dkd-m"}]


#: On ADE, MiB's and PLOP's training labels are the same (ADE class 0 and the old and future classes are
#: background, MiB dataset/ade.py and PLOP dataset/ade.py; they differ at evaluation only): one group.
SHARED_STEP0_ADE = [SHARED_STEP0[0] | SHARED_STEP0[1]] + SHARED_STEP0[2:]


def method(config, dataset="voc"):
    name, overrides = CONFIGS[config]
    return get_method(name, dataset=dataset, **overrides)


def checkpoint_of(config, dataset="voc"):
    trained = method(config, dataset)
    return {"method": trained.name, "hyper": trained.hyper_dict(), "dataset": dataset}


def same_group(a, b, groups):
    return a == b or any(a in group and b in group for group in groups)


@pytest.mark.parametrize("dataset,groups", [("voc", SHARED_STEP0), ("ade", SHARED_STEP0_ADE)])
@pytest.mark.parametrize("trained,run", list(itertools.product(CONFIGS, CONFIGS)))
def test_which_step0_a_step1_may_start_from(trained, run, dataset, groups):
    same_method = CONFIGS[trained][0] == CONFIGS[run][0]
    if same_group(trained, run, groups) or same_method:
        adopted = check_start(checkpoint_of(trained, dataset), "step0/final.pth", 0, method(run, dataset))
        assert adopted == (None if same_method else CONFIGS[trained][0])
    else:
        with pytest.raises(UserError) as refusal:
            check_start(checkpoint_of(trained, dataset), "step0/final.pth", 0, method(run, dataset))
        message = str(refusal.value)
        assert "step0/final.pth" in message and f"--method {CONFIGS[trained][0]};" in message
        assert f"--method {CONFIGS[run][0]} cannot start from it" in message


@pytest.mark.parametrize("trained,run", [("mib", "lwf"), ("lwf", "mib"), ("ssul", "barm"), ("plop", "mib")])
def test_only_a_step0_is_shared(trained, run):
    with pytest.raises(UserError, match="only a step 0 can be shared between methods"):
        check_start(checkpoint_of(trained), "step1/final.pth", 1, method(run))
    assert check_start(checkpoint_of(run), "step1/final.pth", 1, method(run)) is None  # the same method: yes


def test_reference_checkpoints_and_unknown_methods():
    assert check_start({"model_state": {}}, "official.pth", 0, method("barm")) is None  # records no method
    with pytest.raises(UserError, match="--method sdr, which this version of ciss does not know"):
        check_start({"method": "sdr", "hyper": {}}, "other.pth", 0, method("mib"))
