"""RCIL's branch merge: at the start of every step t ≥ 1 the two branches of each dual-branch layer of the step
t-1 model are folded into one biased convolution with an identity norm layer, frozen in eval mode (RCIL
run.py::convert_model, run.py::merge). The network itself is ``network/rcil.py``.
"""
import torch
from torch import nn

from network.abn import effective_weight
from network.rcil import dual_blocks, dual_heads


def fold_branch(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps):
    """One branch's conv + eval-mode InPlace-ABN, halved, as one biased conv (RCIL run.py::merge).

    ``weight`` (C_out, C_in, k, k), ``bias`` (C_out,) or None; the norm layer's γ, β, μ, σ² (C_out,) and ε::

        γ' = (|γ| + ε) / 2,  β' = β / 2,  s = √(σ² + ε),  t = γ' / s
        W' = W · t (per output channel),  b' = β' − μ · γ' / s + t · bias

    so that conv(u; W', b') = ½ · ABN(conv(u; W, bias)) in eval mode. Returns ``(W', b')``.
    """
    gamma = effective_weight(bn_weight, eps) / 2
    beta = bn_bias / 2
    std = (running_var + eps).sqrt()
    t = gamma / std
    folded_bias = beta - running_mean * gamma / std  # the reference's order of operations
    if bias is not None:
        folded_bias = folded_bias + t * bias
    return weight * t.reshape(-1, 1, 1, 1), folded_bias


def _fold_bn(conv, bn, start=0):
    """:func:`fold_branch` of ``conv`` with channels ``start .. start + C_out`` of the norm layer ``bn``."""
    part = slice(start, start + conv.out_channels)
    return fold_branch(conv.weight, conv.bias, bn.weight[part], bn.bias[part], bn.running_mean[part],
                       bn.running_var[part], bn.eps)


def _set_identity(bn):
    """The merged norm layer: γ 1, β 0, μ 0, σ² 1, ε 0: exactly the identity (RCIL run.py::merge)."""
    bn.weight.fill_(1.0)
    bn.bias.zero_()
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)
    bn.eps = 0.0


def _set_merged(conv, weight, bias):
    conv.weight.copy_(weight)
    if conv.bias is None:
        conv.bias = nn.Parameter(bias.detach().clone())
    else:
        conv.bias.copy_(bias)


def merged_layers(model):
    """``(frozen modules, merged norm layers)`` of a merged model: every block's ``conv2`` and ``bn2`` and the
    head's ``map_convs`` and ``map_bn`` (RCIL run.py::convert_model)."""
    modules, norms = [], []
    for block in dual_blocks(model):
        modules += [block.convs.conv2, block.convs.bn2]
        norms.append(block.convs.bn2)
    for head in dual_heads(model):
        modules += [head.map_convs, head.map_bn]
        norms.append(head.map_bn)
    return modules, norms


def freeze_merged(model):
    """Merged layers frozen (``requires_grad`` False) and their norm layers in eval mode (RCIL run.py
    re-applies this after ``model.train()`` at every epoch)."""
    modules, norms = merged_layers(model)
    for module in modules:
        module.requires_grad_(False)
    for norm in norms:
        norm.eval()


def merge_branches(model):
    """Fold both branches of every dual-branch layer into the first one, in place (RCIL
    run.py::convert_model, run.py::merge).

    For every block: (W1', b1') = :func:`fold_branch` of (conv2 with its bias, if any, and bn2), (W2', b2') of
    (conv2_new, bn2_new); conv2 ← (W1' + W2', b1' + b2'), bn2 ← identity with ε = 0. The head likewise per
    256-channel slice i: map_convs[i] with channels i of map_bn, map_convs_new[i] with those of map_bn_new; map_bn ←
    identity.
    The norm layers' own ε is used, so at step ≥ 2 the identity bn2 of the loaded merged checkpoint (ε 1e-5 in a
    freshly built model) folds with t = (1 + 1e-5) / (2·√(1 + 1e-5)), as in the reference. conv2_new, bn2_new,
    map_convs_new and map_bn_new keep their values. The merged layers are frozen (:func:`freeze_merged`).

    In eval mode the merged model computes what the unmerged one did, ½(b1 + b2), up to rounding.
    """
    with torch.no_grad():
        for block in dual_blocks(model):
            c = block.convs
            w1, b1 = _fold_bn(c.conv2, c.bn2)
            w2, b2 = _fold_bn(c.conv2_new, c.bn2_new)
            _set_merged(c.conv2, w1 + w2, b1 + b2)
            _set_identity(c.bn2)
        for head in dual_heads(model):
            start = 0
            for conv, conv_new in zip(head.map_convs, head.map_convs_new):
                w1, b1 = _fold_bn(conv, head.map_bn, start)
                w2, b2 = _fold_bn(conv_new, head.map_bn_new, start)
                _set_merged(conv, w1 + w2, b1 + b2)
                start += conv.out_channels
            _set_identity(head.map_bn)
    freeze_merged(model)
    return model
