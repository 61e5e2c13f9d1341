"""engine/resolve.py: every method's defaults are its published run (tests/reference_protocols.py, written from the
reference repositories), the command line wins, --clean departs everywhere, and the global batch divides or stops."""
import pytest

from engine.cli import method_hyper, parse_args
from engine.resolve import DEVIATIONS, resolve_step
from methods import METHODS, get_method_class
from tests.reference_protocols import BEHAVIOUR, PLAIN_BEHAVIOUR, expected
from utils.errors import UserError

TASKS = {"voc": ("15-1", "10-1"), "ade": ("100-50", "100-10")}
PROTOCOL_FLAGS = ("crop_size", "crop_val", "lr_policy", "weight_decay", "random_seed", "output_stride", "amp",
                  "train_epoch", "lr")


def resolved(method, dataset, task, step, *flags, world=1):
    config = parse_args(["--method", method, "--dataset", dataset, "--task", task, "--data_root", "unused", *flags])
    cls = get_method_class(method)
    return resolve_step(config, cls(method_hyper(config, cls), dataset=dataset), step, world)


def protocol_names(method):
    """The reference runs of ``method``: its own, and PLOP's code's for MiB's methods (``--protocol plop``)."""
    if method in ("ft", "lwf", "lwf-mc", "ilt", "ewc", "pi", "rw", "mib"):
        return [(method, []), (f"{method}@plop", ["--protocol", "plop"])]
    return [(method, [])]


CASES = [(name, flags, method, dataset, task, step)
         for method in METHODS for name, flags in protocol_names(method)
         for dataset in ("voc", "ade") for task in TASKS[dataset] for step in (0, 1)]


@pytest.mark.parametrize("name, flags, method, dataset, task, step", CASES,
                         ids=[f"{c[0]}-{c[3]}-{c[4]}-step{c[5]}" for c in CASES])
def test_defaults_are_the_published_run(name, flags, method, dataset, task, step):
    config = resolved(method, dataset, task, step, *flags)
    want = expected(name, dataset, task, step)
    for flag in PROTOCOL_FLAGS:
        assert getattr(config, flag) == pytest.approx(want[flag]), flag
        assert config.source(flag).startswith("published: "), (flag, config.source(flag))
    behaviour = BEHAVIOUR.get((method, dataset), PLAIN_BEHAVIOUR)
    assert config.sync_gradients == behaviour["sync_gradients"][step > 0]
    assert config.bn_chunks == behaviour["bn_chunks"][step > 0]
    assert get_method_class(method)(method_hyper(config, get_method_class(method)), dataset=dataset).selects_best(
        config_ctx(dataset, task, step), config.select_best) == behaviour["select_best"][step > 0]
    shards = 1 if config.sync_gradients else want["gpus"]
    assert (config.global_batch, config.reference_shards) == (want["global_batch"] // shards, shards)


DOMAIN_METHODS = ("ft", "lwf", "lwf-mc", "ilt", "mib", "plop", "rcil")  # those PLOP and RCIL ran on Cityscapes
DOMAIN_CASES = [(name, flags, method, task, step)
                for method in DOMAIN_METHODS for name, flags in protocol_names(method)
                for task in ("11-5", "11-1", "1-1") for step in (0, 1)]


@pytest.mark.parametrize("name, flags, method, task, step", DOMAIN_CASES,
                         ids=[f"{c[0]}-cityscapes_domain-{c[3]}-step{c[4]}" for c in DOMAIN_CASES])
def test_cityscapes_domain_defaults_are_the_published_run(name, flags, method, task, step):
    config = resolved(method, "cityscapes_domain", task, step, *flags)
    want = expected(name, "cityscapes_domain", task, step)
    for flag in PROTOCOL_FLAGS:
        assert getattr(config, flag) == pytest.approx(want[flag]), flag
        assert config.source(flag).startswith("published: "), (flag, config.source(flag))
    assert (config.global_batch, config.sync_gradients, config.held_out_test) == (want["global_batch"], True, False)


def test_held_out_test_is_a_clean_deviation():
    assert resolved("mib", "cityscapes_domain", "11-5", 1, "--clean").held_out_test is True
    assert resolved("mib", "cityscapes_domain", "11-5", 1, "--clean", "--no_held_out_test").held_out_test is False
    assert resolved("mib", "cityscapes_domain", "11-5", 1, "--held_out_test").source("held_out_test") == "command line"


def config_ctx(dataset, task, step):
    from engine.context import StepContext
    from utils.tasks import get_task
    return StepContext(dataset, get_task(dataset, task), step)


def test_the_command_line_and_a_recipe_win_and_say_so():
    config = resolved("mib", "voc", "15-1", 1, "--lr", "0.5", "--crop_size", "321", "--recipe", "r", "--no_amp")
    assert (config.lr, config.crop_size, config.amp) == (0.5, 321, False)
    assert config.source("lr") == config.source("crop_size") == "recipe r"
    assert config.source("amp") == "command line"
    assert config.source("train_epoch").startswith("published: MiB README")


def test_clean_turns_every_deviation_on_unless_a_flag_is_given():
    config = resolved("barm", "voc", "15-1", 1, "--clean")
    for deviation in DEVIATIONS:
        assert getattr(config, deviation.flag) == deviation.clean, deviation.flag
        assert config.source(deviation.flag) == "clean (--clean)"
    assert (config.global_batch, config.reference_shards) == (16, 1)
    assert resolved("barm", "voc", "15-1", 1, "--clean", "--no_sync_gradients").sync_gradients is False
    for method in METHODS:  # each method's own deviations too
        cls = get_method_class(method)
        hyper = method_hyper(parse_args(["--method", method, "--data_root", "x", "--clean"]), cls)
        for deviation in cls.deviations:
            assert getattr(hyper, deviation.flag) == deviation.clean, (method, deviation.flag)


def test_the_global_batch_divides_over_the_processes_or_stops_with_the_choices():
    assert (resolved("mib", "voc", "15-1", 0, world=4).batch_size, resolved("mib", "voc", "15-1", 0, world=3).batch_size) \
        == (6, 8)
    with pytest.raises(UserError, match=r"global batch 24 of step 0 does not divide over 5 processes: run 1, 2, 3,"
                                        r" 4, 6, 8, 12, 24 processes"):
        resolved("mib", "voc", "15-1", 0, world=5)
    config = resolved("mib", "voc", "15-1", 0, "--global_batch", "10", world=2)
    assert (config.global_batch, config.batch_size) == (10, 5)
    config = resolved("mib", "voc", "15-1", 0, "--batch_size", "5", world=3)  # BARM's meaning: per process
    assert (config.global_batch, config.batch_size) == (15, 5)


def test_an_unsynchronised_published_run_is_rank_0s_batch_on_any_number_of_processes():
    for world, per_process in ((1, 8), (2, 4), (4, 2), (8, 1)):
        config = resolved("barm", "voc", "15-1", 1, world=world)
        assert (config.global_batch, config.batch_size, config.reference_shards) == (8, per_process, 2)
    config = resolved("barm", "voc", "15-1", 1, "--batch_size", "6", world=2)  # each reference GPU's batch
    assert (config.global_batch, config.batch_size, config.reference_shards) == (6, 3, 2)
    with pytest.raises(UserError, match="does not divide over 3 processes: run 1, 2, 4, 8 processes"):
        resolved("barm", "voc", "15-1", 1, world=3)
    with pytest.raises(UserError, match="--crop_size 33 is too small for output stride 16"):
        resolved("barm", "voc", "15-1", 0, "--crop_size", "33")


@pytest.mark.parametrize("method", list(METHODS))
def test_a_dataset_of_ones_own_gets_the_generic_defaults(method, tmp_path):
    """No published run for ``--dataset custom``: every common flag is ciss's generic default."""
    from datasets.synthetic import generate_custom
    from engine.resolve import GENERIC
    root = str(tmp_path / "shapes")
    generate_custom(root, n_images=4, size=32, workers=1)
    config = parse_args(["--method", method, "--dataset", "custom", "--task", "4-2", "--data_root", root])
    cls = get_method_class(method)
    step = resolve_step(config, cls(method_hyper(config, cls), dataset="custom"), 1, 1)
    for name in PROTOCOL_FLAGS:
        assert getattr(step, name) == GENERIC[name] and step.source(name) == "default", (method, name)
