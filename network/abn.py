"""Activated batch normalisation computing what InPlace-ABN computes (InPlace-ABN inplace_abn/functions.py).

MiB, PLOP and RCIL normalise with mapillary's ``InPlaceABN(Sync)`` (a CUDA extension). Its forward is

    y = act((x - mu) / sqrt(sigma^2 + eps) * (|gamma| + eps) + beta),   eps = 1e-5,

with mu, sigma^2 the biased batch statistics in training (synchronised over all ranks for the Sync
variant) and the running statistics in eval; in training the running statistics move with momentum
0.1, the running variance with the *unbiased* batch variance. torch's ``F.batch_norm`` computes
exactly this normalisation and running-statistic update (it also normalises with the biased variance
and updates ``running_var`` with the unbiased one), so :class:`ABN` is ``F.batch_norm`` with the
effective scale |gamma| + eps followed by the activation. The weight gradient follows the extension:
d|gamma|/dgamma = sign(gamma) with sign(0) = +1 (the extension flips the gradient of negative weights only).

Activations: ``"leaky_relu"`` with slope 0.01 (MiB/PLOP), ``"leaky_relu"`` with slope 1.0 (RCIL:
the identity, RCIL modules/residual.py) and ``"identity"`` (no activation: ``bn3`` / ``proj_bn`` of a block).

Parameters and buffers carry the names of the reference checkpoints (``weight``, ``bias``,
``running_mean``, ``running_var``) plus ``num_batches_tracked`` (inplace_abn >= 1.0 has it; the
2018 ImageNet files do not): a state dict without it loads, the counter then restarts from 0.

:class:`ABN` is deliberately **not** a ``torch.nn.modules.batchnorm._BatchNorm``: the generic
``nn.SyncBatchNorm.convert_sync_batchnorm`` would replace it by a plain SyncBatchNorm and silently
drop the |gamma| + eps scale and the activation. Use :func:`convert_sync_abn` for multi-GPU CUDA
training (it may be combined with torch's converter, which leaves :class:`ABN` untouched).
"""
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

#: InPlace-ABN's epsilon: in the variance and added to |gamma| (InPlace-ABN inplace_abn/functions.py).
ABN_EPS = 1e-5
#: Running-statistics momentum of InPlace-ABN (InPlace-ABN inplace_abn/functions.py).
ABN_MOMENTUM = 0.1
#: LeakyReLU slope of MiB/PLOP's norm layers (``activation_param=.01``, MiB segmentation_module.py::make_model).
LEAKY_RELU_SLOPE = 0.01
#: RCIL's norm-layer slope: a leaky ReLU with slope 1 is the identity (RCIL modules/residual.py).
IDENTITY_SLOPE = 1.0

LEAKY_RELU = "leaky_relu"
IDENTITY = "identity"
ACTIVATIONS = (LEAKY_RELU, IDENTITY)


def effective_weight(weight, eps=ABN_EPS):
    """InPlace-ABN's scale |gamma| + eps (InPlace-ABN inplace_abn/functions.py), shape (C,).

    The absolute value is ``where(gamma < 0, -gamma, gamma)`` so that its gradient is sign(gamma)
    with sign(0) = +1, as in the extension's backward (``dweight[weight < 0] *= -1``).
    """
    return torch.where(weight < 0, -weight, weight) + eps


def apply_activation(x, activation, slope, inplace=False):
    """``leaky_relu`` with ``slope`` (a slope of 1 returns ``x`` unchanged) or ``identity``."""
    if activation == LEAKY_RELU and slope != IDENTITY_SLOPE:
        return F.leaky_relu(x, negative_slope=slope, inplace=inplace)
    return x


def abn(x, weight, bias, running_mean, running_var, training, momentum=ABN_MOMENTUM, eps=ABN_EPS,
        activation=LEAKY_RELU, slope=LEAKY_RELU_SLOPE):
    """Functional InPlace-ABN (not in place), as InPlace-ABN inplace_abn/functions.py.

    Args:
        x: (B, C, ...) input.
        weight, bias: (C,) gamma and beta (the scale used is |gamma| + eps).
        running_mean, running_var: (C,) running statistics, updated in place when ``training``.
        training: normalise with the batch statistics (biased variance) and update the running ones
            (running_var with the unbiased variance, momentum ``momentum``); else use the running ones.

    Returns:
        act((x - mu) / sqrt(sigma^2 + eps) * (|gamma| + eps) + beta), same shape as ``x``.
    """
    y = F.batch_norm(x, running_mean, running_var, effective_weight(weight, eps), bias, training, momentum, eps)
    return apply_activation(y, activation, slope, inplace=True)  # y is fresh; batch_norm's backward needs x only


def sync_batch_norm(x, weight, bias, running_mean, running_var, momentum, eps, process_group, world_size):
    """Training-mode batch normalisation with statistics over every rank of ``process_group`` (CUDA).

    Same function as ``F.batch_norm(..., training=True)`` on the concatenation of all ranks' batches
    (mean and biased variance for the normalisation, unbiased variance for ``running_var``): it is the
    autograd function behind ``nn.SyncBatchNorm``, so gradients flow across ranks as there. ``weight``
    is the effective scale (:func:`effective_weight`), not gamma.
    """
    from torch.nn.modules._functions import SyncBatchNorm as SyncBatchNormFunction  # torch-internal; lazy
    return SyncBatchNormFunction.apply(x, weight, bias, running_mean, running_var, eps, momentum, process_group,
                                       world_size)


class ABN(nn.Module):
    """Activated batch normalisation with InPlace-ABN's numerics (InPlace-ABN inplace_abn/functions.py), not in place.

    ``forward(x)`` returns act((x - mu) / sqrt(sigma^2 + eps) * (|gamma| + eps) + beta) for (B, C, ...)
    inputs; see :func:`abn`. ``num_batches_tracked`` counts training forwards (not used: the momentum
    is fixed).

    Args:
        num_features: C.
        activation: ``"leaky_relu"`` or ``"identity"``.
        activation_param: the leaky-ReLU slope (0.01 MiB/PLOP, 1.0 = identity for RCIL).
        eps, momentum: 1e-5 and 0.1 as in InPlace-ABN.
    """

    def __init__(self, num_features, activation=LEAKY_RELU, activation_param=LEAKY_RELU_SLOPE, eps=ABN_EPS,
                 momentum=ABN_MOMENTUM):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown ABN activation {activation!r}: expected one of {', '.join(ACTIVATIONS)}")
        self.num_features = int(num_features)
        self.activation = activation
        self.activation_param = float(activation_param)
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reset_running_stats(self):
        """Running mean 0, running variance 1, counter 0."""
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def reset_parameters(self):
        """Running statistics 0/1, gamma 1, beta 0 (InPlace-ABN's initialisation)."""
        self.reset_running_stats()
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def _normalize(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, effective_weight(self.weight, self.eps),
                            self.bias, self.training, self.momentum, self.eps)

    def forward(self, x):
        if self.training:
            self.num_batches_tracked.add_(1)
        y = self._normalize(x)
        return apply_activation(y, self.activation, self.activation_param, inplace=True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The 2018 ImageNet InPlace-ABN files (and inplace_abn < 1.0) have no num_batches_tracked (InPlace-ABN README).
        key = prefix + "num_batches_tracked"
        if key not in state_dict:
            state_dict[key] = torch.zeros_like(self.num_batches_tracked)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self):
        act = self.activation + (f"[{self.activation_param}]" if self.activation == LEAKY_RELU else "")
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, activation={act}"


class SyncABN(ABN):
    """:class:`ABN` whose training statistics are synchronised over ``process_group`` (InPlaceABNSync).

    Under an initialised ``torch.distributed`` with more than one rank, training-mode statistics are
    computed over all ranks' batches (:func:`sync_batch_norm`, CUDA only); otherwise it is an
    :class:`ABN`. Eval mode always uses the running statistics. Made by :func:`convert_sync_abn`.
    """

    def __init__(self, num_features, activation=LEAKY_RELU, activation_param=LEAKY_RELU_SLOPE, eps=ABN_EPS,
                 momentum=ABN_MOMENTUM, process_group=None):
        super().__init__(num_features, activation, activation_param, eps, momentum)
        self.process_group = process_group

    def _world_size(self):
        """Ranks to synchronise with (1: no synchronisation)."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group or dist.group.WORLD)

    def _normalize(self, x):
        world_size = self._world_size()
        if world_size == 1:
            return super()._normalize(x)
        if x.device.type == "cpu":
            raise RuntimeError("SyncABN synchronises statistics on CUDA only: do not convert the model for CPU "
                               "training (convert_sync_abn is for CUDA + torch.distributed)")
        return sync_batch_norm(x, effective_weight(self.weight, self.eps), self.bias, self.running_mean,
                               self.running_var, self.momentum, self.eps, self.process_group or dist.group.WORLD,
                               world_size)


def convert_sync_abn(module, process_group=None):
    """Replace every :class:`ABN` in ``module`` by a :class:`SyncABN` (InPlaceABNSync,
    InPlace-ABN inplace_abn/functions.py).

    Works like ``nn.SyncBatchNorm.convert_sync_batchnorm``: the new layers share the old layers'
    parameters and buffers (same tensors, so the state dict and any optimizer built on them are
    unchanged), keep the activation, slope, eps, momentum and training mode; the converted module is
    returned (``module`` itself unless it is an :class:`ABN`). Layers already synchronised are kept.
    torch BatchNorm layers are left alone (convert them with torch's converter).
    """
    output = module
    if isinstance(module, ABN) and not isinstance(module, SyncABN):
        output = SyncABN(module.num_features, module.activation, module.activation_param, module.eps,
                         module.momentum, process_group)
        output.weight = module.weight
        output.bias = module.bias
        output.running_mean = module.running_mean
        output.running_var = module.running_var
        output.num_batches_tracked = module.num_batches_tracked
        output.train(module.training)
    for name, child in module.named_children():
        output.add_module(name, convert_sync_abn(child, process_group))
    return output
