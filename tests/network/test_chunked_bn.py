"""network/chunked_bn.py: BatchNorm as DataParallel over N GPUs computes it (SSUL's step 0), against N separate
BatchNorm copies fed each its chunk, as DataParallel's replicas are."""
import copy

import torch
from torch import nn

from network.chunked_bn import ChunkedBatchNorm2d, convert_chunked_batchnorm


def replicas_reference(bn, x, chunks):
    """What nn.DataParallel computes: replica i normalises chunk i; only replica 0 is the original module."""
    parts = torch.chunk(x, chunks, dim=0)
    outputs = [bn(parts[0])]
    for part in parts[1:]:
        outputs.append(copy.deepcopy(bn)(part))  # a copy: its running statistics are discarded
    return torch.cat(outputs, dim=0)


def test_each_chunk_has_its_own_statistics_and_only_the_first_updates_the_running_ones():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 4, 4) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1) + 1.5
    plain = nn.BatchNorm2d(3, momentum=0.01)
    with torch.no_grad():
        plain.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        plain.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    model = nn.Sequential(copy.deepcopy(plain))
    convert_chunked_batchnorm(model, 2)
    assert isinstance(model[0], ChunkedBatchNorm2d) and model[0].chunks == 2
    reference = copy.deepcopy(plain)
    expected = replicas_reference(reference, x, 2)  # chunks of 3 and 2 images, as torch.chunk / scatter
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(model[0], name), getattr(reference, name))
    first = x[:3]  # the running mean moved towards the first chunk's mean only
    torch.testing.assert_close(model[0].running_mean, 0.99 * torch.zeros(3) + 0.01 * first.mean(dim=(0, 2, 3)))


def test_same_parameters_state_dict_and_eval_mode_as_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Sequential(nn.BatchNorm2d(3)))
    keys = list(model.state_dict())
    weight = model[1].weight
    convert_chunked_batchnorm(model, 2)
    assert list(model.state_dict()) == keys and model[1].weight is weight  # the optimizer's parameter, kept
    assert isinstance(model[2][0], ChunkedBatchNorm2d)
    model.eval()
    x = torch.randn(4, 3, 2, 2)
    plain = nn.BatchNorm2d(3).eval()
    plain.load_state_dict(model[1].state_dict())
    torch.testing.assert_close(model[1](x), plain(x))
    assert convert_chunked_batchnorm(nn.BatchNorm2d(3), 1).__class__ is nn.BatchNorm2d  # one chunk: unchanged
