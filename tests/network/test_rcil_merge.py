"""network/rcil_merge.py: RCIL's branch merge (RCIL run.py::convert_model) against computations by hand."""
import pytest
import torch

from network import FAMILIES
from network.rcil import BranchGates, DualBranchBlock, DualDeeplabV3Head, add_merge_biases, build_rcil_model
from network.rcil_merge import fold_branch, merge_branches
from tests.helpers import assert_relative, check_merged_layers, eval_outputs, images, randomise_norm_layers as randomise


EPS = 1e-5


@pytest.fixture(autouse=True)
def rcil_family(monkeypatch):
    """The ``rcil`` family, until ``network/__init__.py`` registers it."""
    if "rcil" not in FAMILIES:
        monkeypatch.setitem(FAMILIES, "rcil", build_rcil_model)


# ---- merge ---------------------------------------------------------------------------------------------------


def test_fold_branch_by_hand():
    weight, bias = torch.tensor([[[[2.0]]]]), torch.tensor([1.0])
    # γ' = (|−3| + 1) / 2 = 2, β' = 0.2, s = √(3 + 1) = 2, t = 1: W' = 2, b' = 0.2 − 0.5·2/2 + 1·1 = 0.7
    w, b = fold_branch(weight, bias, torch.tensor([-3.0]), torch.tensor([0.4]), torch.tensor([0.5]),
                       torch.tensor([3.0]), 1.0)
    assert w.flatten().tolist() == [2.0] and b.tolist() == pytest.approx([0.7])
    w, b = fold_branch(weight, None, torch.tensor([-3.0]), torch.tensor([0.4]), torch.tensor([0.5]),
                       torch.tensor([3.0]), 1.0)
    assert b.tolist() == pytest.approx([-0.3])


@pytest.mark.slow  # ~1 s: builds, merges and runs RCIL ResNet-18 models
def test_merge_reproduces_the_two_branch_mixture():
    """The merged branch alone (gates (2, 0)) computes what the unmerged model computed in eval, ½(b1 + b2); the
    merged model's own eval output is ½(merged + new branch) (RCIL run.py::convert_model), so it differs."""
    model = randomise(build_rcil_model([3], "resnet18"))
    x = images()
    before = eval_outputs(model, x)
    new_branch = model.body.mod3.block2.convs.conv2_new.weight.clone()
    merge_branches(model)
    after = eval_outputs(model, x, first_only=True)
    for a, b in zip(after, before):
        assert_relative(a, b)
    mixed = eval_outputs(model, x)[0]
    assert not torch.allclose(mixed, before[0], rtol=1e-3)
    check_merged_layers(model)
    assert torch.equal(model.body.mod3.block2.convs.conv2_new.weight, new_branch)  # the new branch is kept
    assert model.merged and model.body.mod2.block1.merged

    # step >= 2: the merged checkpoint loads into a model built with the biases; its new branch has moved on
    state = model.state_dict()
    student = build_rcil_model([3], "resnet18", merged=True)
    student.load_state_dict(state)
    assert student.body.mod2.block1.convs.bn2.eps == EPS  # quirk (RCIL run.py::convert_model): a reload keeps eps 1e-5
    assert_relative(eval_outputs(student, x)[0], mixed, tol=1e-4)
    randomise(student, seed=4)  # different branches and statistics everywhere, merged biases kept
    with torch.no_grad():
        for block in (m for m in student.modules() if isinstance(m, DualBranchBlock)):
            block.convs.conv2.bias.normal_(0, 0.1)
    before = eval_outputs(student, x)
    merge_branches(student)
    for a, b in zip(eval_outputs(student, x, first_only=True), before):
        assert_relative(a, b)
    check_merged_layers(student)


def test_merge_of_bottleneck_block_and_head_slices():
    gates = BranchGates()
    block = randomise(DualBranchBlock(6, (8, 8, 12), stride=1, dilation=2, gates=gates), seed=5)
    head = randomise(DualDeeplabV3Head(12, 16, gates, hidden_channels=4, out_channels=8), seed=6)
    x = images((2, 6, 7, 7))
    for module in (block, head):
        module.eval()
    with torch.no_grad():
        before = head(block(x))
        merge_branches(block)
        merge_branches(head)
        gates.weights = lambda channels, training: (torch.full((1, channels, 1, 1), 2.0),
                                                    torch.zeros(1, channels, 1, 1))
        after = head(block(x))
    assert_relative(after, before)
    assert head.map_convs[2].bias.shape == (4,) and head.map_bn.eps == 0


@pytest.mark.slow  # ~1 s: builds three RCIL ResNet-18 models
def test_merge_biases_give_the_checkpoint_layout():
    model = build_rcil_model([3], "resnet18")
    keys = set(build_rcil_model([3], "resnet18", merged=True).state_dict())
    assert keys - set(model.state_dict()) == {f"body.mod{m}.block{b}.convs.conv2.bias" for m in range(2, 6)
                                              for b in (1, 2)} | {f"head.map_convs.{i}.bias" for i in range(4)}
    merge_branches(model)
    assert set(model.state_dict()) == keys
    assert add_merge_biases(build_rcil_model([3], "resnet18")).merged
