"""Shared fixtures: small synthetic datasets generated once per test session."""
import shutil

import pytest

from datasets.synthetic import generate

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
