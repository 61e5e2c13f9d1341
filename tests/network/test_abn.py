"""network/abn.py: ABN, InPlace-ABN computed with standard layers (InPlace-ABN inplace_abn/functions.py:
docs/differences.md): numerics, gradients, state dict, synchronised variants."""
import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from network.abn import ABN, SyncABN, convert_sync_abn, effective_weight, sync_batch_norm
from network.mib import build_mib_model
from tests.helpers import randomise_norm_layers


EPS = 1e-5
SLOPE = 0.01


def reference_abn(x, gamma, beta, mean, var, slope):
    """InPlace-ABN's forward (InPlace-ABN inplace_abn/functions.py) restated, float64, per channel."""
    x, gamma, beta, mean, var = (np.asarray(t, dtype=np.float64) for t in (x, gamma, beta, mean, var))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + EPS) * (np.abs(gamma) + EPS).reshape(shape)
    y = y + beta.reshape(shape)
    return np.where(y >= 0, y, slope * y)


def abn_layer(channels=3, activation="leaky_relu", slope=SLOPE):
    torch.manual_seed(0)
    layer = ABN(channels, activation, slope)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, -0.7, 0.0])[:channels])  # negative and zero gamma
        layer.bias.copy_(torch.tensor([0.2, -0.3, 0.5])[:channels])
        layer.running_mean.copy_(torch.tensor([0.1, -1.0, 2.0])[:channels])
        layer.running_var.copy_(torch.tensor([0.5, 2.0, 1.5])[:channels])
    return layer


def batch(channels=3):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(4, channels, 5, 6, generator=generator) * 2 + torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1)


# ------------------------------------------------------------------------------------------------
# ABN layer (InPlace-ABN inplace_abn/functions.py)
# ------------------------------------------------------------------------------------------------

def test_abn_train_mode_matches_formula_and_updates_running_stats():
    layer, x = abn_layer().train(), batch()
    old_mean, old_var = layer.running_mean.numpy().copy(), layer.running_var.numpy().copy()
    y = layer(x)
    xs = x.double().numpy()
    n = xs.shape[0] * xs.shape[2] * xs.shape[3]  # 120 values per channel
    mu = xs.mean(axis=(0, 2, 3))
    biased = ((xs - mu.reshape(1, 3, 1, 1)) ** 2).sum(axis=(0, 2, 3)) / n
    expected = reference_abn(xs, [1.5, -0.7, 0.0], [0.2, -0.3, 0.5], mu, biased, SLOPE)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.running_mean.numpy(), 0.9 * old_mean + 0.1 * mu, rtol=1e-6)
    unbiased = biased * n / (n - 1)
    np.testing.assert_allclose(layer.running_var.numpy(), 0.9 * old_var + 0.1 * unbiased, rtol=1e-6)
    assert int(layer.num_batches_tracked) == 1


def test_abn_eval_mode_uses_running_stats():
    layer, x = abn_layer().eval(), batch()
    y = layer(x)
    expected = reference_abn(x.numpy(), [1.5, -0.7, 0.0], [0.2, -0.3, 0.5], [0.1, -1.0, 2.0], [0.5, 2.0, 1.5], SLOPE)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert layer.running_mean.tolist() == pytest.approx([0.1, -1.0, 2.0])
    assert int(layer.num_batches_tracked) == 0


@pytest.mark.parametrize("activation, slope, effective_slope", [
    ("leaky_relu", SLOPE, SLOPE),
    ("leaky_relu", 1.0, 1.0),     # RCIL: slope 1 = identity (RCIL modules/residual.py)
    ("identity", SLOPE, 1.0),     # bn3 / proj_bn: no activation whatever the slope
])
def test_abn_activations(activation, slope, effective_slope):
    layer, x = abn_layer(activation=activation, slope=slope).eval(), batch()
    y = layer(x)
    expected = reference_abn(x.numpy(), [1.5, -0.7, 0.0], [0.2, -0.3, 0.5], [0.1, -1.0, 2.0], [0.5, 2.0, 1.5],
                             effective_slope)
    assert (expected < 0).any()
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_abn_gradients_follow_sign_of_gamma():
    """dL/dgamma_c = s_c * sum(g * xhat) with s = sign(gamma), sign(0) = +1 (the extension's backward)."""
    layer, x = abn_layer(activation="identity").eval(), batch()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    (layer(x) * g).sum().backward()
    xhat = (x.double() - torch.tensor([0.1, -1.0, 2.0]).double().view(1, 3, 1, 1)) \
        / torch.sqrt(torch.tensor([0.5, 2.0, 1.5]).double().view(1, 3, 1, 1) + EPS)
    base = (g.double() * xhat).sum(dim=(0, 2, 3))
    expected = base * torch.tensor([1.0, -1.0, 1.0]).double()
    torch.testing.assert_close(layer.weight.grad.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad.double(), g.double().sum(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)


def test_abn_state_dict_names_and_loading_with_or_without_counter():
    layer = abn_layer()
    assert list(layer.state_dict()) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    legacy = {k: torch.full((3,), 0.25) for k in ("weight", "bias", "running_mean", "running_var")}
    fresh = ABN(3)
    fresh.num_batches_tracked.fill_(5)
    fresh.load_state_dict(legacy, strict=True)  # the 2018 ImageNet files have no num_batches_tracked
    assert int(fresh.num_batches_tracked) == 0 and fresh.running_var.tolist() == [0.25] * 3
    fresh.load_state_dict({**legacy, "num_batches_tracked": torch.tensor(7)}, strict=True)
    assert int(fresh.num_batches_tracked) == 7


def test_torch_sync_converter_cannot_drop_the_abn_affine():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), abn_layer()).eval()
    x = batch()
    before = model(x)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(converted[1]) is ABN and not isinstance(converted[1], nn.modules.batchnorm._BatchNorm)
    torch.testing.assert_close(converted(x), before, rtol=0, atol=0)


def test_convert_sync_abn_keeps_state_dict_and_function():
    torch.manual_seed(0)
    model = build_mib_model([3, 2], "resnet18").eval()
    randomise_norm_layers(model)
    x = torch.randn(2, 3, 33, 33)
    expected, _ = model(x)
    state = model.state_dict()
    n_abn = sum(isinstance(m, ABN) for m in model.modules())
    converted = convert_sync_abn(model)
    layers = [m for m in converted.modules() if isinstance(m, ABN)]
    assert len(layers) == n_abn and all(type(m) is SyncABN for m in layers)
    assert converted.body.mod1.bn1.activation_param == SLOPE
    assert converted.body.mod2.block1.convs.bn2.activation == "identity"
    new_state = converted.state_dict()
    assert list(new_state) == list(state)
    assert all(new_state[k].data_ptr() == v.data_ptr() for k, v in state.items())  # same tensors
    assert not converted.training
    logits, _ = converted(x)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    single = convert_sync_abn(ABN(4).train())
    assert type(single) is SyncABN and single.training


@pytest.mark.skipif(not torch.cuda.is_available(), reason="synchronised batch statistics need CUDA (nccl)")
def test_sync_batch_norm_on_cuda_matches_formula(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        layer, x = abn_layer(), batch()
        device = torch.device("cuda")
        gamma = layer.weight.detach().to(device).requires_grad_(True)
        beta = layer.bias.detach().to(device).requires_grad_(True)
        running_mean, running_var = layer.running_mean.to(device), layer.running_var.to(device)
        xs = x.clone().to(device).requires_grad_(True)
        y = sync_batch_norm(xs, effective_weight(gamma), beta, running_mean, running_var, 0.1, EPS,
                            dist.group.WORLD, 1)
        xd = x.double().numpy()
        mu, var = xd.mean(axis=(0, 2, 3)), xd.var(axis=(0, 2, 3))
        expected = reference_abn(xd, [1.5, -0.7, 0.0], [0.2, -0.3, 0.5], mu, var, 1.0)
        np.testing.assert_allclose(y.detach().cpu().numpy(), expected, rtol=1e-5, atol=1e-5)
        n = xd.size // 3
        np.testing.assert_allclose(running_var.cpu().numpy(), 0.9 * np.array([0.5, 2.0, 1.5]) + 0.1 * var * n / (n - 1),
                                   rtol=1e-5)
        g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))  # a plain sum has ~0 gradients
        (y * g.to(device)).sum().backward()
        layer.train()
        layer.activation = "identity"
        x_cpu = x.clone().requires_grad_(True)
        (layer(x_cpu) * g).sum().backward()
        torch.testing.assert_close(gamma.grad.cpu(), layer.weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(xs.grad.cpu(), x_cpu.grad, rtol=1e-4, atol=1e-5)
    finally:
        dist.destroy_process_group()
