"""methods/__init__.py: the registry of methods and hyper-parameter overrides."""
import pytest

from methods import get_method, list_methods
from utils.errors import UserError


def test_registry_and_overrides():
    assert set(list_methods()) >= {"barm", "ft"}
    barm = get_method("barm", w_tri=2.5)
    assert barm.hp.w_tri == 2.5 and barm.hp.w_fd == 4.0 and barm.hp.pseudo_thresh == 0.7
    with pytest.raises(UserError, match="no hyper-parameter"):
        get_method("barm", w_nothing=1)
    with pytest.raises(UserError, match="unknown method"):
        get_method("mib2")


@pytest.mark.parametrize("name", list_methods())
def test_a_dataset_no_reference_ran_takes_the_generic_defaults(name):
    """No published run (the trainer's generic defaults apply), VOC's per-dataset values and label tables."""
    method, on_voc = get_method(name, "custom"), get_method(name, "voc")
    assert method.published() is None
    assert method.hp == on_voc.hp
    steps = [[0, 1, 2], [3, 4]]
    for step, split in ((0, "train"), (1, "train"), (1, "val"), (1, "test")):
        assert list(method.label_policy(steps, step, split)) == list(on_voc.label_policy(steps, step, split))


def test_per_dataset_falls_back_to_voc():
    from methods.base import GENERIC_DATASET, per_dataset
    table = {"voc": 1, "ade": 2}
    assert (per_dataset(table, "ade"), per_dataset(table, "custom"), GENERIC_DATASET) == (2, 1, "voc")
