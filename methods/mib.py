"""MiB: modeling the background (methods spec §4.8). PLACEHOLDER: the method class is added later.

For now this module holds MiB's background-aware initialisation of the new classifier, shared with
PLOP (same init, §4.9/§10) and RCIL (weights only, §4.10).
"""
import torch
from torch import nn


def init_new_classifier(cls_old0: nn.Conv2d, cls_new: nn.Conv2d, with_bias=True):
    """Background-aware initialisation of the new step's classifier, in place (methods spec §4.8).

    ``cls_old0`` is step 0's classifier (``cls[0]``, channel 0 = background) and ``cls_new`` the current
    step's classifier (``cls[-1]``, N_new = ``cls_new.out_channels`` channels); both 1×1 convolutions over
    the same features. With W_bg, b_bg the weight and bias of channel 0 of ``cls_old0``::

        W_new,c ← W_bg                              for every new class c
        b_new,c ← b_bg − log(N_new + 1)             for every new class c      (with_bias)
        b_bg    ← b_bg − log(N_new + 1)                                        (with_bias)

    so the old background probability is split evenly over background + N_new classes. The background
    bias is lowered again at every step (MiB:segmentation_module.py::init_new_classifier, spec §9.6:
    reproduced on purpose). ``with_bias=False`` is RCIL's VOC/ADE variant (methods spec §4.10): only the
    weights are copied, the biases keep their values. Runs under ``no_grad``; returns None.
    """
    if cls_old0.in_channels != cls_new.in_channels or cls_old0.kernel_size != cls_new.kernel_size:
        raise ValueError(f"init_new_classifier: the classifiers differ in input ({cls_old0.in_channels} vs "
                         f"{cls_new.in_channels} channels) or kernel size ({cls_old0.kernel_size} vs "
                         f"{cls_new.kernel_size})")
    if with_bias and (cls_old0.bias is None or cls_new.bias is None):
        raise ValueError("init_new_classifier: with_bias=True needs both classifiers to have a bias")
    n_new = cls_new.out_channels
    with torch.no_grad():
        cls_new.weight.copy_(cls_old0.weight[0:1].expand_as(cls_new.weight))
        if with_bias:
            # the reference computes log(N_new + 1) as a float32 tensor: same rounding here
            shift = torch.log(torch.tensor(float(n_new + 1), dtype=torch.float32)).to(cls_old0.bias.device)
            new_bias = cls_old0.bias[0] - shift.to(cls_old0.bias.dtype)
            cls_new.bias.copy_(new_bias.expand_as(cls_new.bias))
            cls_old0.bias[0] = new_bias
