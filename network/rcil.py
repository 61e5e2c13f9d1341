"""RCIL's dual-branch DeepLab-v3 (RCIL modules/residual.py, segmentation_module.py).

RCIL's network is MiB's (:mod:`network.mib`) with three changes:

* every norm layer is InPlace-ABN with a leaky-ReLU slope of 1.0, i.e. a *linear* batch normalisation, and
  the non-linearities are explicit LeakyReLU(0.01) modules; so the stem (``mod1``) has no activation
  between ``bn1`` and the max-pool and the head's xavier gain is ``calculate_gain('leaky_relu', 1.0)`` = 1;
* every residual block has a second 3×3 convolution ``conv2_new`` + ``bn2_new`` beside ``conv2`` + ``bn2``
  (:class:`DualBranchBlock`, swapped into MiB's body with :meth:`network.mib.MiBResNet.swap_blocks`), and the
  head a second ASPP ``map_convs_new`` + ``map_bn_new`` (:class:`DualDeeplabV3Head`);
* the two branches are mixed per channel by random gates (:class:`BranchGates`): in training each channel
  draws r ~ U(0, 1) and takes (w1, w2) = (2, 0) if r < 0.33, (0, 2) if 0.33 ≤ r < 0.66, else (1, 1); the
  mixture is ½(w1·b1 + w2·b2); in eval (w1, w2) = (1, 1), i.e. ½(b1 + b2).

At the start of every step t ≥ 1 the two branches of the step t-1 model are folded into one biased conv
(:func:`network.rcil_merge.merge_branches`): the merged conv reproduces the eval-time mixture, its BN becomes
the identity (eps 0) and both are frozen in eval mode; the ``_new`` branch keeps its step t-1 values and trains on.
A model built for the checkpoint of a merged step (``merged=True``) has the conv biases, so the checkpoints
of steps ≥ 1 load. ``forward(x)`` returns ``(logits, features)`` like :class:`network.mib.MiBDeepLab`, with
``attentions`` = the post-activation outputs of the last block of mod2..mod5, then x_pl (RCIL distils the
block *outputs*; PLOP the pre-activation sums).

Deviation from the reference: the gates come from a dedicated ``torch.Generator`` (:class:`BranchGates`, one
per model, seeded by the method from ``--random_seed``) instead of the global CPU RNG, so drawing them leaves
the global RNG untouched and a resumed run draws the same gates; eval-mode layers draw nothing.
"""
from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F

from network.abn import ABN, IDENTITY, IDENTITY_SLOPE, LEAKY_RELU, LEAKY_RELU_SLOPE
from network.backbone import check_backbone_args
from network.heads import check_classes_per_step
from network.mib import HEAD_CHANNELS, HEAD_DILATIONS, POOLING_SIZE, DeeplabV3Head, MiBDeepLab, image_pooling
from network.mib_resnet import MiBResNet, load_pretrained_body

#: Gate thresholds (RCIL modules/residual.py): r < 0.33 keeps the first branch only, 0.33 ≤ r < 0.66 the new branch
#: only, r ≥ 0.66 both.
GATE_FIRST_ONLY = 0.33
GATE_NEW_ONLY = 0.66
#: Branch weights (w1, w2) of the three gate outcomes, and the ½ of the mixture ½(w1·b1 + w2·b2).
WEIGHTS_FIRST_ONLY = (2.0, 0.0)
WEIGHTS_NEW_ONLY = (0.0, 2.0)
WEIGHTS_BOTH = (1.0, 1.0)
MIX_FACTOR = 0.5
#: Seed of a model's gate generator until the method reseeds it from ``--random_seed``.
DEFAULT_GATE_SEED = 0
#: RCIL's explicit non-linearities: LeakyReLU(0.01) (its norm layers are linear, slope 1.0;
#: RCIL modules/residual.py).
BRANCH_SLOPE = LEAKY_RELU_SLOPE
#: Suffix of the second branch's modules (``conv2_new``, ``bn2_new``, ``map_convs_new``, ``map_bn_new``).
NEW_SUFFIX = "_new"


def _norm(channels):
    """RCIL's norm layer: InPlace-ABN with activation ``leaky_relu`` and slope 1.0, a linear BN (RCIL
    modules/residual.py)."""
    return ABN(channels, LEAKY_RELU, IDENTITY_SLOPE)


def _leaky(x, inplace=False):
    return F.leaky_relu(x, negative_slope=BRANCH_SLOPE, inplace=inplace)


# --------------------------------------------------------------------------------------------------
# Gates
# --------------------------------------------------------------------------------------------------

def gate_weights(r):
    """The branch weights of RCIL's per-channel gates (RCIL modules/residual.py) from uniform draws ``r``.

    ``r``: float tensor of any shape (RCIL: (1, C, 1, 1)). Returns ``(w1, w2)`` of the same shape and dtype::

        (w1, w2) = (2, 0) where r < 0.33;  (0, 2) where 0.33 ≤ r < 0.66;  (1, 1) where r ≥ 0.66

    (comparisons in ``r``'s dtype, as the reference's ``r < 0.33`` on a float32 tensor). ``r = 1`` (eval) gives (1, 1).
    """
    first = r < GATE_FIRST_ONLY
    new = (r >= GATE_FIRST_ONLY) & (r < GATE_NEW_ONLY)

    def pick(index):
        return torch.where(first, torch.full_like(r, WEIGHTS_FIRST_ONLY[index]),
                           torch.where(new, torch.full_like(r, WEIGHTS_NEW_ONLY[index]),
                                       torch.full_like(r, WEIGHTS_BOTH[index])))

    return pick(0), pick(1)


def mix_branches(first, new, w1, w2):
    """RCIL's branch mixture (RCIL modules/residual.py): ``first * w1 * 0.5 + new * w2 * 0.5``, in the
    reference's order of operations. ``first``, ``new``: (B, C, H, W); ``w1``, ``w2``: (1, C, 1, 1) from
    :func:`gate_weights`."""
    return first * w1 * MIX_FACTOR + new * w2 * MIX_FACTOR


class BranchGates:
    """The random per-channel gates of one RCIL model, drawn from a dedicated CPU ``torch.Generator``.

    Every dual-branch layer of a model holds the same :class:`BranchGates`, so the draws of one training
    forward follow the layers' order. Training: r ~ U(0, 1) of shape (1, C, 1, 1) from :attr:`generator` (the
    global RNG is never used); eval: r = 1 and nothing is drawn. ``seed``, ``get_state`` and ``set_state`` let
    the method seed it from ``--random_seed`` and carry its state through ``--resume``.
    """

    def __init__(self, seed=DEFAULT_GATE_SEED):
        self.generator = torch.Generator()
        self.generator.manual_seed(int(seed))

    def seed(self, seed):
        self.generator.manual_seed(int(seed))

    def get_state(self):
        """The generator state (a uint8 CPU tensor)."""
        return self.generator.get_state()

    def set_state(self, state):
        self.generator.set_state(state)

    def weights(self, channels, training):
        """``(w1, w2)``, each (1, channels, 1, 1) float32 on the CPU (:func:`gate_weights`)."""
        if training:
            r = torch.rand(1, channels, 1, 1, dtype=torch.float32, generator=self.generator)
        else:
            r = torch.ones(1, channels, 1, 1, dtype=torch.float32)  # the reference sets r := 1 in eval
        return gate_weights(r)

    def mix(self, first, new, training):
        """The gated mixture of two (B, C, H, W) branch outputs (:func:`mix_branches`), in their dtype."""
        w1, w2 = self.weights(first.shape[1], training)
        w1 = w1.to(device=first.device, dtype=first.dtype)
        w2 = w2.to(device=first.device, dtype=first.dtype)
        return mix_branches(first, new, w1, w2)


# --------------------------------------------------------------------------------------------------
# Backbone block and head
# --------------------------------------------------------------------------------------------------

class DualBranchBlock(nn.Module):
    """RCIL's residual block (RCIL modules/residual.py).

    Bottleneck (``channels`` of length 3): u = LeakyReLU(bn1(conv1 x)); b1 = bn2(conv2 u), b2 = bn2_new(conv2_new u)
    (3×3, the block's stride and dilation, padding = dilation); m = gated mixture (:class:`BranchGates`);
    out = LeakyReLU(bn3(conv3 LeakyReLU(m)) + shortcut). Basic (length 2, ResNet-18/34; the reference defines no
    dual basic block, this is ciss's analogue for small test models): u = LeakyReLU(bn1(conv1 x)) with conv1 3×3
    carrying the stride, b1/b2 from the 3×3 conv2 / conv2_new, out = LeakyReLU(m + shortcut). Norm layers are
    linear (slope 1), LeakyReLUs have slope 0.01; shortcut = proj_bn(proj_conv x) when the stride is not 1 or the
    channels change, else x. Key names follow the reference (``convs.conv2_new.weight``, ``convs.bn2_new.*``).

    ``merged`` (after :func:`network.rcil_merge.merge_branches`, or built for a merged checkpoint) gives ``conv2`` a bias.
    """

    def __init__(self, in_channels, channels, stride=1, dilation=1, gates=None):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) not in (2, 3):
            raise ValueError(f"channels must have 2 (basic) or 3 (bottleneck) values, got {channels}")
        self.in_channels, self.channels = int(in_channels), channels
        self.stride, self.dilation, self.slope = int(stride), int(dilation), BRANCH_SLOPE
        self.bottleneck = len(channels) == 3
        self.gates = gates if gates is not None else BranchGates()
        mid = channels[1]

        def conv3x3(cin, cout, conv_stride):
            return nn.Conv2d(cin, cout, 3, stride=conv_stride, padding=dilation, dilation=dilation, bias=False)

        if self.bottleneck:
            layers = [("conv1", nn.Conv2d(in_channels, channels[0], 1, bias=False)), ("bn1", _norm(channels[0])),
                      ("conv2", conv3x3(channels[0], mid, stride)), ("bn2", _norm(mid)),
                      ("conv3", nn.Conv2d(mid, channels[2], 1, bias=False)), ("bn3", ABN(channels[2], IDENTITY)),
                      ("conv2_new", conv3x3(channels[0], mid, stride)), ("bn2_new", _norm(mid))]
        else:
            layers = [("conv1", conv3x3(in_channels, channels[0], stride)), ("bn1", _norm(channels[0])),
                      ("conv2", conv3x3(channels[0], mid, 1)), ("bn2", _norm(mid)),
                      ("conv2_new", conv3x3(channels[0], mid, 1)), ("bn2_new", _norm(mid))]
        self.convs = nn.ModuleDict(OrderedDict(layers))
        if stride != 1 or in_channels != channels[-1]:
            self.proj_conv = nn.Conv2d(in_channels, channels[-1], 1, stride=stride, bias=False)
            self.proj_bn = ABN(channels[-1], IDENTITY)

    @property
    def merged(self):
        return self.convs.conv2.bias is not None

    def forward(self, x):
        c = self.convs
        shortcut = self.proj_bn(self.proj_conv(x)) if hasattr(self, "proj_conv") else x
        u = _leaky(c.bn1(c.conv1(x)))
        mixed = self.gates.mix(c.bn2(c.conv2(u)), c.bn2_new(c.conv2_new(u)), self.training)
        out = c.bn3(c.conv3(_leaky(mixed))) if self.bottleneck else mixed
        return _leaky(out + shortcut, inplace=True)  # out + shortcut is a fresh tensor


def dual_block_from(old_block, gates, copy_weights):
    """A :class:`DualBranchBlock` with the geometry of MiB's ``old_block`` (a :meth:`MiBResNet.swap_blocks`
    factory). ``copy_weights``: take every weight and statistic of ``old_block`` and duplicate its
    ``conv2``/``bn2`` into ``conv2_new``/``bn2_new`` (RCIL's ImageNet loading, RCIL segmentation_module.py)."""
    block = DualBranchBlock(old_block.in_channels, old_block.channels, old_block.stride, old_block.dilation, gates)
    if copy_weights:
        state = old_block.state_dict()
        for key in list(state):
            layer, _, rest = key.partition(".")[2].partition(".")
            if key.startswith("convs.") and layer in ("conv2", "bn2"):
                state[f"convs.{layer}{NEW_SUFFIX}.{rest}"] = state[key].clone()
        block.load_state_dict(state, strict=True)
    return block


class DualDeeplabV3Head(DeeplabV3Head):
    """RCIL's ``DeeplabV3`` head (RCIL modules/deeplab.py).

    MiB's head (:class:`network.mib.DeeplabV3Head`, linear norm layers) plus ``map_convs_new`` + ``map_bn_new``,
    a second ASPP of the same geometry. Forward, for x (B, in_channels, h, w)::

        m   = gated mixture of map_bn(cat map_convs(x)) and map_bn_new(cat map_convs_new(x))   (1024 channels)
        out = red_conv(LeakyReLU(m))
        pool = pool_red_conv(LeakyReLU(global_pooling_bn(global_pooling_conv(image_pooling(x)))))
        x_pl = LeakyReLU(red_bn(out + pool))                                                      (B, 256, h, w)

    Every conv is ``xavier_normal_`` with gain ``calculate_gain('leaky_relu', 1.0)`` = 1.0 (RCIL
    modules/deeplab.py); the two ASPPs are initialised independently. ``merged`` gives every ``map_convs[i]`` a bias.
    """

    def __init__(self, in_channels, output_stride=16, gates=None, hidden_channels=HEAD_CHANNELS,
                 out_channels=HEAD_CHANNELS, pooling_size=POOLING_SIZE):
        super().__init__(in_channels, output_stride, IDENTITY_SLOPE, hidden_channels, out_channels, pooling_size)
        self.gates = gates if gates is not None else BranchGates()
        self.map_convs_new = nn.ModuleList([nn.Conv2d(in_channels, hidden_channels, 1, bias=False)] + [
            nn.Conv2d(in_channels, hidden_channels, 3, padding=d, dilation=d, bias=False)
            for d in HEAD_DILATIONS[output_stride]
        ])
        self.map_bn_new = _norm(hidden_channels * len(self.map_convs_new))
        gain = nn.init.calculate_gain("leaky_relu", IDENTITY_SLOPE)
        for conv in self.map_convs_new:
            nn.init.xavier_normal_(conv.weight, gain)

    @property
    def merged(self):
        return self.map_convs[0].bias is not None

    def forward(self, x):
        first = self.map_bn(torch.cat([conv(x) for conv in self.map_convs], dim=1))
        new = self.map_bn_new(torch.cat([conv(x) for conv in self.map_convs_new], dim=1))
        out = self.red_conv(_leaky(self.gates.mix(first, new, self.training)))
        pool = self.global_pooling_bn(self.global_pooling_conv(image_pooling(x, self.pooling_size, self.training)))
        pool = self.pool_red_conv(_leaky(pool))
        return _leaky(self.red_bn(out + pool))  # a (B, C, 1, 1) pool broadcasts like the reference's repeat


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------

class RCILDeepLab(MiBDeepLab):
    """RCIL's ``IncrementalSegmentationModule`` (RCIL segmentation_module.py): ``body`` (MiB's ResNet with
    :class:`DualBranchBlock` blocks), ``head`` (:class:`DualDeeplabV3Head`), ``cls``; :attr:`gates` is the
    :class:`BranchGates` shared by every dual-branch layer.

    ``forward(x)`` returns ``(z^s, features)``: logits at feature resolution and ``body`` (mod5 output),
    ``pre_logits`` (x_pl), ``sem_logits_small`` (= z^s) and ``attentions`` = [outputs of the last block of
    mod2..mod5 (post-activation), x_pl] (the maps of pooled-cube distillation, RCIL
    train.py::features_distillation_spatial).
    """

    def __init__(self, body, head, classes_per_step, gates):
        super().__init__(body, head, classes_per_step, norm_act="identity")
        self.gates = gates

    @property
    def merged(self):
        """Whether the model has the merged layout (conv biases of steps ≥ 1)."""
        return self.head.merged

    def forward(self, x):
        taps = self.body(x)
        x_b = taps["out"]
        x_pl = self.head(x_b)
        logits = torch.cat([conv(x_pl) for conv in self.cls], dim=1)
        return logits, {"body": x_b, "pre_logits": x_pl, "sem_logits_small": logits,
                        "attentions": list(taps["stages"]) + [x_pl]}


def dual_blocks(model):
    """Every :class:`DualBranchBlock` of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, DualBranchBlock)]


def dual_heads(model):
    """Every :class:`DualDeeplabV3Head` of ``model``."""
    return [m for m in model.modules() if isinstance(m, DualDeeplabV3Head)]


def _zero_bias(conv):
    conv.bias = nn.Parameter(torch.zeros(conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype))


def add_merge_biases(model):
    """Give every ``conv2`` and ``map_convs[i]`` a zero bias: the layout of a merged step's checkpoint (the
    reference attaches them before loading a step ≥ 1 checkpoint, RCIL run.py::convert_model). In place."""
    for block in dual_blocks(model):
        if block.convs.conv2.bias is None:
            _zero_bias(block.convs.conv2)
    for head in dual_heads(model):
        for conv in head.map_convs:
            if conv.bias is None:
                _zero_bias(conv)
    return model


def build_rcil_model(classes_per_step, backbone="resnet101", output_stride=16, pretrained=None, merged=False,
                     pooling_size=POOLING_SIZE):
    """Build RCIL's dual-branch DeepLab-v3 (RCIL segmentation_module.py) for the classes of steps 0..t.

    MiB's body with slope-1 norm layers (:class:`network.mib.MiBResNet`), its ImageNet InPlace-ABN weights
    loaded, then every block swapped for a :class:`DualBranchBlock` (the ImageNet ``conv2``/``bn2`` duplicated
    into ``conv2_new``/``bn2_new``; without ``pretrained`` the new branch has its own random init), the dual
    head (xavier, gain 1) and MiB's classifiers; one :class:`BranchGates` shared by every dual-branch layer.

    Args:
        classes_per_step: class counts per step, step 0 including the background.
        backbone, output_stride, pretrained, pooling_size: as :func:`network.mib.build_mib_model`.
        merged: the layout of a checkpoint of a merged step (t ≥ 1): ``conv2`` and ``map_convs`` with a (zero)
            bias. The merged norm layers keep ε = 1e-5, as the reference's teacher and test reload (RCIL
            run.py).

    Raises:
        UserError: unknown backbone or output stride, bad class counts, unusable weights.
    """
    check_backbone_args(backbone, output_stride)
    classes_per_step = check_classes_per_step(classes_per_step)
    # quirk (RCIL models/resnet.py): slope-1 norm layers, so the stem has no activation before its max-pool
    body = MiBResNet(backbone, output_stride, IDENTITY_SLOPE)
    if pretrained is not None:
        load_pretrained_body(body, pretrained)
    gates = BranchGates()
    body.swap_blocks(lambda mod, index, old: dual_block_from(old, gates, copy_weights=pretrained is not None))
    head = DualDeeplabV3Head(body.out_channels, output_stride, gates, pooling_size=pooling_size)
    model = RCILDeepLab(body, head, classes_per_step, gates)
    if merged:
        # quirk (RCIL run.py): biases only; the identity norm layers keep eps 1e-5
        add_merge_biases(model)
    return model
