"""Incremental classifier heads on top of ASPP (BARM network/_deeplab.py::DeepLabHeadBgA, SSUL
network/_deeplab.py::DeepLabHead).

Every head takes ``(in_channels, classes_per_step, atrous_rates)``; ``classes_per_step`` counts the
classes of each step, step 0 including the background (VOC 15-1 at step 2: ``[16, 1, 1]``). A head
returns ``(logits, features)`` with logits at feature resolution (no upsampling) and grows by one
step in place with ``add_step(n_new)``.

Initialisation (BARM network/_deeplab.py::DeepLabHeadBgA): every Conv2d of the classifier gets
``kaiming_normal_`` (fan_in, gain sqrt(2)), BN weight 1 and bias 0; conv biases keep PyTorch's default
uniform draw. Random draws follow BARM's construction order: ASPP, head_pre, ears, heads, then the init
pass.
"""
import numbers

import torch
from torch import nn

from network.aspp import ASPP, ASPP_CHANNELS, conv_bn_relu
from utils.errors import UserError


def check_class_count(count, what):
    """Raise :class:`UserError` unless ``count`` is a positive integer."""
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1:
        raise UserError(f"{what} must be a positive integer, got {count!r}")


def check_classes_per_step(classes_per_step):
    """Validate ``classes_per_step`` (non-empty list of positive ints) and return it as a list of ints."""
    if isinstance(classes_per_step, (str, bytes)) or not hasattr(classes_per_step, "__len__") \
            or len(classes_per_step) == 0:
        raise UserError(
            "classes_per_step must be a non-empty list of class counts per step, step 0 including the "
            f"background (e.g. [16, 1, 1]), got {classes_per_step!r}"
        )
    for step, count in enumerate(classes_per_step):
        check_class_count(count, f"classes_per_step[{step}]")
    return [int(count) for count in classes_per_step]


def init_classifier_weights(module):
    """BARM's ``_init_weight`` (network/_deeplab.py::DeepLabHeadBgA): kaiming-normal conv weights, BN weight 1
    and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def _conv3x3_block():
    """Sequential(3x3 conv 256->256 pad 1 without bias, BN, ReLU): BARM's head_pre / ear, SSUL's head trunk."""
    return conv_bn_relu(ASPP_CHANNELS, ASPP_CHANNELS, 3)


class _IncrementalHeadBase(nn.Module):
    """Shared bookkeeping: ``aspp`` (built first, as in BARM), ``classes_per_step``, ``num_classes``."""

    def __init__(self, in_channels, classes_per_step, atrous_rates):
        super().__init__()
        self.classes_per_step = check_classes_per_step(classes_per_step)
        self.aspp = ASPP(in_channels, atrous_rates)

    @property
    def num_classes(self):
        """Number of classes seen so far (steps 0..t, background included)."""
        return sum(self.classes_per_step)

    @property
    def num_outputs(self):
        """Number of logit channels (equals :attr:`num_classes` except for SSUL's unknown channel)."""
        return self.num_classes

    def _adopt(self, *modules):
        """Initialise freshly built modules and move them to the head's device, dtype, memory format and mode."""
        reference = self.aspp.convs[1][0].weight
        channels_last = reference.is_contiguous(memory_format=torch.channels_last) and not reference.is_contiguous()
        for module in modules:
            init_classifier_weights(module)
            module.to(device=reference.device, dtype=reference.dtype)
            if channels_last:
                module.to(memory_format=torch.channels_last)
            module.train(self.training)


class BackgroundAdaptationHead(_IncrementalHeadBase):
    """BARM's ``DeepLabHeadBgA`` (BARM network/_deeplab.py::DeepLabHeadBgA).

    ``head_pre`` feeds ``head[0]`` (n_0 channels, channel 0 = background b_0); for each incremental
    step k an ``ear[k-1]`` reads the ASPP output and feeds ``head[k]`` (n_k + 1 channels, channel 0
    = background residual r_k). Background logit:

    * t = 0: Z_0[:, 0];
    * training mode, t >= 1: sg(Z_0[:, 0]) + sum_{k=1}^{t-1} sg(min(Z_k[:, 0], 0)) + Z_t[:, 0]
      (sg = detach; the current residual is unclamped and carries the gradient);
    * eval mode: Z_0[:, 0] + sum_{k=1}^{t} min(Z_k[:, 0], 0).

    Logits = cat(bg, Z_0[:, 1:], Z_1[:, 1:], ..., Z_t[:, 1:]). Features: ``feature`` (ASPP output),
    ``prev_heads`` (raw Z_k), ``ear_feats`` ([head_pre output, ear outputs...]).
    """

    def __init__(self, in_channels, classes_per_step, atrous_rates):
        super().__init__(in_channels, classes_per_step, atrous_rates)
        self.head_pre = _conv3x3_block()
        self.ear = nn.ModuleList([_conv3x3_block() for _ in self.classes_per_step[1:]])
        self.head = nn.ModuleList(
            [nn.Conv2d(ASPP_CHANNELS, self.classes_per_step[0], 1)]
            + [nn.Conv2d(ASPP_CHANNELS, n + 1, 1) for n in self.classes_per_step[1:]]
        )
        init_classifier_weights(self)

    def add_step(self, n_new):
        """Append an ear and a head with ``n_new`` classes plus the background residual channel."""
        check_class_count(n_new, "number of new classes")
        ear, head = _conv3x3_block(), nn.Conv2d(ASPP_CHANNELS, n_new + 1, 1)
        self._adopt(ear, head)
        self.ear.append(ear)
        self.head.append(head)
        self.classes_per_step.append(int(n_new))

    def forward(self, x):
        feature = self.aspp(x)
        ear_feats = [self.head_pre(feature)] + [ear(feature) for ear in self.ear]
        prev_heads = [head(f) for head, f in zip(self.head, ear_feats)]
        if len(prev_heads) == 1:
            logits = prev_heads[0]
        else:
            residuals = [z[:, 0:1] for z in prev_heads[1:]]
            if self.training:
                bg = prev_heads[0][:, 0:1].detach()
                for r in residuals[:-1]:
                    bg = bg + r.clamp(max=0).detach()
                bg = bg + residuals[-1]
            else:
                bg = prev_heads[0][:, 0:1]
                for r in residuals:
                    bg = bg + r.clamp(max=0)
            logits = torch.cat([bg] + [z[:, 1:] for z in prev_heads], dim=1)
        return logits, {"feature": feature, "prev_heads": prev_heads, "ear_feats": ear_feats}


class SSULHead(_IncrementalHeadBase):
    """SSUL's ``DeepLabHead`` (SSUL network/_deeplab.py::DeepLabHead): one Sequential(3x3 conv, BN, ReLU, 1x1
    conv) per entry.

    With ``unknown=True`` the entries have [1 (unknown), 1 (background), n_0 - 1, n_1, ...] outputs,
    else [n_0, n_1, ...]; logits are their concatenation. Unlike SSUL, which upsampled the logits to
    the input size inside the model, logits stay at feature resolution: the method upsamples them.
    Features: ``feature`` (ASPP output).
    """

    def __init__(self, in_channels, classes_per_step, atrous_rates, unknown=False):
        super().__init__(in_channels, classes_per_step, atrous_rates)
        self.unknown = bool(unknown)
        if self.unknown and self.classes_per_step[0] < 2:
            raise UserError(
                "the SSUL head with an unknown class needs at least one base class besides the background "
                f"at step 0, got classes_per_step[0] = {self.classes_per_step[0]}"
            )
        self.head = nn.ModuleList([self._entry(c) for c in self.head_channels])
        init_classifier_weights(self)

    @property
    def head_channels(self):
        """Output channels of each ``head`` entry."""
        n_0, *rest = self.classes_per_step
        return ([1, 1, n_0 - 1] if self.unknown else [n_0]) + rest

    @property
    def num_outputs(self):
        return sum(self.head_channels)

    @staticmethod
    def _entry(channels):
        block = _conv3x3_block()
        block.append(nn.Conv2d(ASPP_CHANNELS, channels, 1))
        return block

    def add_step(self, n_new):
        """Append a head entry with ``n_new`` outputs."""
        check_class_count(n_new, "number of new classes")
        entry = self._entry(n_new)
        self._adopt(entry)
        self.head.append(entry)
        self.classes_per_step.append(int(n_new))

    def forward(self, x):
        feature = self.aspp(x)
        logits = torch.cat([head(feature) for head in self.head], dim=1)
        return logits, {"feature": feature}


class IncrementalHead(_IncrementalHeadBase):
    """Plain incremental head for MiB-style methods: ``head_pre``, then one 1x1 conv per step.

    ``head[0]`` has n_0 outputs (background in channel 0), ``head[k]`` has n_k. Logits are their
    concatenation. Features: ``feature`` (ASPP output), ``pre_logits`` (head_pre output, the input of
    every 1x1 head) and ``prev_heads`` (per-step logits).
    """

    def __init__(self, in_channels, classes_per_step, atrous_rates):
        super().__init__(in_channels, classes_per_step, atrous_rates)
        self.head_pre = _conv3x3_block()
        self.head = nn.ModuleList([nn.Conv2d(ASPP_CHANNELS, n, 1) for n in self.classes_per_step])
        init_classifier_weights(self)

    def add_step(self, n_new):
        """Append a 1x1 head with ``n_new`` outputs."""
        check_class_count(n_new, "number of new classes")
        head = nn.Conv2d(ASPP_CHANNELS, n_new, 1)
        self._adopt(head)
        self.head.append(head)
        self.classes_per_step.append(int(n_new))

    def forward(self, x):
        feature = self.aspp(x)
        pre_logits = self.head_pre(feature)
        prev_heads = [head(pre_logits) for head in self.head]
        logits = torch.cat(prev_heads, dim=1)
        return logits, {"feature": feature, "pre_logits": pre_logits, "prev_heads": prev_heads}
