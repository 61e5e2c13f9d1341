"""utils/logging.py: the fan-out of a step's scalars, tables and figures to the chosen backends."""
import glob
import sys

import pytest

from utils.errors import UserError
from utils.logging import ScalarWriter, StepLoggers, WandbWriter, require_loggers


def test_tensorboard_alone_writes_events_on_rank_0_only_and_takes_no_media(tmp_path):
    main, other = tmp_path / "main", tmp_path / "other"
    for folder, enabled in ((main, True), (other, False)):
        folder.mkdir()
        loggers = StepLoggers(["tensorboard"], enabled, str(folder))
        assert [type(b) for b in loggers.backends] == [ScalarWriter] and not loggers.takes_media
        loggers.scalars({"total": 1.5, "absent": None}, 3, "loss/")
        loggers.table("summary", ("step",), [{"step": 0}], 3)  # tensorboard takes no tables: nothing happens
        loggers.close()
    assert len(glob.glob(str(main / "events.out.tfevents.*"))) == 1
    assert not list(other.iterdir())


def test_a_disabled_rank_starts_no_wandb_run(tmp_path):
    loggers = StepLoggers(["tensorboard", "wandb"], False, str(tmp_path), run_id="abc", name="step0", group="g")
    assert [type(b) for b in loggers.backends] == [ScalarWriter, WandbWriter] and not loggers.takes_media
    loggers.scalars({"lr": 0.1}, 1)
    loggers.close()
    assert not list(tmp_path.iterdir())


def test_wandb_missing_is_a_user_error(monkeypatch):
    require_loggers(["tensorboard"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(UserError, match=r"^--logger wandb needs the wandb package: pip install wandb$"):
        require_loggers(["tensorboard", "wandb"])
