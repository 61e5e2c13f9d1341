"""End-to-end runs: every test in this folder is marked ``slow`` (deselect them with ``-m "not slow"``), and the
BARM step 0 that several files continue from is trained once per session."""
import pathlib

import pytest

from tests.helpers import run_inline, train_cmd

HERE = pathlib.Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    """Called with every collected item of the session: mark those under this folder."""
    for test in items:
        if HERE in pathlib.Path(test.path).resolve().parents:
            test.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def step0(tiny_voc, tmp_path_factory):
    """Step 0 trained once (1 epoch); tests copy its folder."""
    ckpt = tmp_path_factory.mktemp("step0")
    result = run_inline(train_cmd(tiny_voc, ckpt, "--initial", "--train_epoch", "1"))
    assert result.returncode == 0, result.stderr
    return ckpt
