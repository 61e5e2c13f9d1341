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
