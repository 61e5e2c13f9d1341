"""engine/cli.py: method switches that default to on take both spellings."""
from engine.cli import parse_args


def test_boolean_hyper_parameters_take_both_spellings():
    """A method switch that defaults to on accepts --name (as the reference scripts pass it) and --no_name."""
    common = ["--data_root", "x", "--method", "ssul"]
    assert parse_args(common).freeze is True
    assert parse_args(common + ["--freeze"]).freeze is True
    assert parse_args(common + ["--no_freeze"]).freeze is False
    assert parse_args(["--data_root", "x", "--pseudo"]).pseudo is True  # off by default for BARM
