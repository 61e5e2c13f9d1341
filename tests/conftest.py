"""Shared fixtures: small synthetic datasets generated once per test session."""
import shutil

import pytest

from datasets.synthetic import generate


@pytest.fixture(scope="session")
def synthetic_voc(tmp_path_factory):
    """A read-only-by-convention synthetic VOC2012 folder (copy it before modifying)."""
    root = str(tmp_path_factory.mktemp("voc") / "VOC2012")
    generate("voc", root, n_train=120, n_val=30, size=96, seed=0, workers=1)
    return root


@pytest.fixture(scope="session")
def synthetic_ade(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ade") / "ADEChallengeData2016")
    generate("ade", root, n_train=160, n_val=20, size=80, seed=0, workers=1)
    return root


@pytest.fixture
def voc_copy(synthetic_voc, tmp_path):
    """A private copy of the synthetic VOC folder that a test may modify."""
    root = str(tmp_path / "VOC2012")
    shutil.copytree(synthetic_voc, root, ignore=shutil.ignore_patterns(".ciss_cache"))
    return root


@pytest.fixture(scope="session")
def tiny_voc(tmp_path_factory):
    """A small synthetic VOC folder for training runs."""
    root = str(tmp_path_factory.mktemp("tiny") / "VOC2012")
    generate("voc", root, n_train=60, n_val=16, size=80, seed=1, workers=1)
    return root
