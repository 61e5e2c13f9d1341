"""RCIL: representation compensation and pooled-cube knowledge distillation (RCIL train.py, run.py::convert_model).

RCIL trains a dual-branch network (:mod:`network.rcil`: a second 3×3 convolution per block and a second ASPP,
mixed by random per-channel gates) whose branches are merged into the frozen first branch at the start of each
step t ≥ 1; its loss at step t ≥ 1 is MiB's unbiased CE + 100 · unbiased KD (MiB
utils/loss.py::UnbiasedCrossEntropy, UnbiasedKnowledgeDistillationLoss) plus the pooled-cube KD (PCKD): a spatial
term comparing average-pooled squared maps at six kernel sizes and a channel term comparing squared maps averaged
over windows of three channels (RCIL train.py::features_distillation_spatial, features_distillation_channel).

* :class:`RCIL` — the method: MiB family protocol (:class:`methods.mib.MiBFamily`) with PLOP's label tables,
  model family ``rcil``, weight-only background initialisation of the new classifier, the branch merge in
  ``prepare_student``, the merged layers frozen and in eval mode every epoch, the gates' generator seeded from
  ``--random_seed`` and the step and carried in the method state (``--resume``).
* The PCKD terms as pure functions of tensors (:func:`pooled_cube_spatial`, :func:`pooled_cube_channel`); the
  student's small logits are collapsed to the teacher's channels as in PLOP (:func:`methods.losses.collapse_logits`).

Shapes: B images, K_t current classes, N_new classes added at this step.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from methods import losses
from methods.base import Published, hyper, per_dataset
from methods.losses import check_map_pairs, collapse_logits, layer_factors
from methods.lwf import kd_old_channels
from methods.mib_family import INIT_WEIGHTS, PLOP_PROTOCOL, MiBFamily, kd_alpha_hyper
from network import build_model
from network.rcil_merge import freeze_merged, merge_branches
from utils.tasks import is_domain_incremental

RCIL_W_KD = 100.0  # L = UNCE + 100·UNKD + PCKD (RCIL argparser.py: --loss_kd 100)
# The reference validates every 15 epochs (RCIL's --val_interval default, RCIL argparser.py); validation never
# selects.
RCIL_VAL_INTERVAL = 15
# Tag of the gates' seed sequence [--random_seed, step, tag] (any constant: it only separates the stream).
GATE_SEED_TAG = 4
GATE_STATE_KEY = "gate_generator"

# PCKD weights (hard-coded in RCIL train.py, which ignores --pod_factor):
# (every map but the last, the last map). Spatial: ℓ = 1..5 / ℓ = 6 (collapsed small logits);
# channel: ℓ = 1..4 / ℓ = 5 (x_pl). The same pair serves both terms.
PCKD_FACTOR_VOC = 0.01
PCKD_LAST_FACTOR_VOC = 0.0005
PCKD_FACTOR_ADE = 5e-6
PCKD_LAST_FACTOR_ADE = 5e-7
# Cityscapes domains (RCIL train.py, its cityscapes_domain constants): spatial term 5e-4 for mod2..mod5 and x_pl, 1e-4
# for the logits; channel term 1e-4 for mod2..mod5 and 0 for x_pl (the only dataset whose two terms differ)
PCKD_FACTOR_CITYSCAPES = 5e-4
PCKD_LAST_FACTOR_CITYSCAPES = 1e-4
PCKD_CHANNEL_FACTOR_CITYSCAPES = 1e-4
PCKD_CHANNEL_LAST_FACTOR_CITYSCAPES = 0.0
PCKD_FACTORS = {"voc": (PCKD_FACTOR_VOC, PCKD_LAST_FACTOR_VOC), "ade": (PCKD_FACTOR_ADE, PCKD_LAST_FACTOR_ADE),
                "cityscapes_domain": (PCKD_FACTOR_CITYSCAPES, PCKD_LAST_FACTOR_CITYSCAPES)}
PCKD_CHANNEL_FACTORS = {"cityscapes_domain": (PCKD_CHANNEL_FACTOR_CITYSCAPES, PCKD_CHANNEL_LAST_FACTOR_CITYSCAPES)}
PCKD_SPATIAL_KERNELS = (4, 8, 12, 16, 20, 24)  # avg-pool kernel sizes of the spatial term
PCKD_CHANNEL_WINDOW = 3  # channels averaged by the channel term (one zero channel of padding each side)
PCKD_SPATIAL_MAPS = 6  # stages mod2..mod5, x_pl, small logits
PCKD_CHANNEL_MAPS = 5  # stages mod2..mod5, x_pl (logits excluded)


#: RCIL's runs (RCIL scripts/voc/RCIL_*.sh: 4 GPUs x batch 6, lr 0.02 then 0.001, 30 epochs, apex O1;
#: scripts/ade/RCIL_ade_*.sh: lr 0.01 then 0.001, 60 epochs, 4 x 6 for 100-50 and 2 x 12 for 100-10, 100-5).
RCIL_PUBLISHED = {
    "voc": Published("RCIL scripts/voc/RCIL_*.sh (4 GPUs x batch 6, lr 0.02 then 0.001, 30 epochs, apex O1)",
                     train_epoch=(30, 30), global_batch=(24, 24), lr=(0.02, 0.001), gpus=(4, 4), amp=True),
    "ade": Published("RCIL scripts/ade/RCIL_ade_*.sh (4 GPUs x batch 6 or 2 x 12, lr 0.01 then 0.001, 60 epochs,"
                     " apex O1)",
                     train_epoch=(60, 60), global_batch=(24, 24), lr=(0.01, 0.001), gpus=(4, 4), amp=True,
                     tasks={"100-10": {"gpus": (2, 2)}, "100-5": {"gpus": (2, 2)}}),
    "cityscapes_domain": Published("RCIL scripts/cityscapesDomain/RCIL_cityscapes_{11-5,11-1,1-1}.sh (4 GPUs x batch 6,"
                                   " lr 0.02 then 0.002; 11-1: 0.004; 50 epochs, apex O1)",
                                   train_epoch=(50, 50), global_batch=(24, 24), lr=(0.02, 0.002), gpus=(4, 4),
                                   amp=True, tasks={"11-1": {"lr": (0.02, 0.004)}}),
}


def pckd_factors(dataset, n_maps):
    """The per-map weights λ_1..λ_n of a PCKD term on ``dataset``: the dataset's feature factor for every map but the
    last, its last-map factor for the last one (RCIL train.py); a dataset without its own factors takes VOC's
    (``methods.base.per_dataset``). Call it with :data:`PCKD_SPATIAL_MAPS` for the spatial term and
    :data:`PCKD_CHANNEL_MAPS` for the channel term (whose factors differ on cityscapes_domain)."""
    table = PCKD_CHANNEL_FACTORS if n_maps == PCKD_CHANNEL_MAPS and dataset in PCKD_CHANNEL_FACTORS else PCKD_FACTORS
    factor, last_factor = per_dataset(table, dataset)
    return layer_factors(n_maps, factor, last_factor)


def _spatial_pool(x, kernel):
    """AP_k: avg_pool2d, kernel k×k, stride 1, padding k // 2 (k/2 for the reference's even kernels), with the
    zero padding counted in the average; output (B, C, H + 2·(k//2) − k + 1, W + 2·(k//2) − k + 1).

    Computed as the separable box filter it is: a depthwise k×1 convolution with weights 1/k, then a 1×k one
    (the same sums as the reference's ``avg_pool2d``, ~1e-6 relative apart, for 2k instead of k² additions per
    output and the convolution kernels' speed: the six kernels of RCIL's spatial term cost 7-20x less on a
    CPU). TF32 is off for these convolutions on CUDA (its 10-bit mantissa would not keep the sums)."""
    channels = x.shape[1]
    rows = x.new_full((channels, 1, kernel, 1), 1.0 / kernel)
    columns = x.new_full((channels, 1, 1, kernel), 1.0 / kernel)
    with _no_tf32():
        pooled = F.conv2d(x, rows, padding=(kernel // 2, 0), groups=channels)
        return F.conv2d(pooled, columns, padding=(0, kernel // 2), groups=channels)


def _no_tf32():
    """cuDNN with TF32 off, the other settings as they are."""
    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                       allow_tf32=False)


def _channel_pool(x):
    """CP: the mean of each window of 3 consecutive channels, stride 1, one zero channel added on each side,
    always divided by 3; output (B, C, H, W)."""
    padded = F.pad(x, (0, 0, 0, 0, 1, 1))
    return (padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]) / PCKD_CHANNEL_WINDOW


def _per_sample_distance(old, new):
    """mean_b ‖old_b − new_b‖₂ over each sample's flattened elements (Frobenius norm, batch mean)."""
    return torch.linalg.vector_norm((old - new).reshape(old.shape[0], -1), ord=2, dim=-1).mean()


def pooled_cube_spatial(old_maps, new_maps, factors, n_classes_total, n_new, kernels=PCKD_SPATIAL_KERNELS):
    """RCIL's spatial pooled-cube KD (RCIL train.py::features_distillation_spatial).

    ``old_maps`` / ``new_maps``: lists of L teacher / student maps of equal shapes (B, C_ℓ, H_ℓ, W_ℓ) (RCIL: the
    four post-activation stage outputs, x_pl, and the small logits with the student collapsed by
    :func:`collapse_logits`); ``factors``: λ_ℓ (:func:`pckd_factors`); ``n_classes_total``: K_t; ``n_new``:
    N_new. Maps are squared first; AP_k = avg_pool2d(k×k, stride 1, padding k/2, zero padding counted)::

        D_ℓ = (1/|kernels|) Σ_k mean_b ‖AP_k(A_ℓ²)_b − AP_k(A'_ℓ²)_b‖₂
        L_sp = (1/L) Σ_ℓ λ_ℓ · √(K_t / N_new) · D_ℓ

    A kernel larger than the map is fine (its padding still makes the output (W + 1)²). Returns a float32 scalar.
    """
    check_map_pairs("pooled_cube_spatial", old_maps, new_maps, factors, n_new)
    schedule = math.sqrt(n_classes_total / n_new)
    total = old_maps[0].new_zeros((), dtype=torch.float32)
    for old, new, factor in zip(old_maps, new_maps, factors):
        old_sq, new_sq = old.float().pow(2), new.float().pow(2)
        distance = sum(_per_sample_distance(_spatial_pool(old_sq, k), _spatial_pool(new_sq, k)) for k in kernels)
        total = total + factor * schedule * distance / len(kernels)
    return total / len(old_maps)


def pooled_cube_channel(old_maps, new_maps, factors, n_classes_total, n_new):
    """RCIL's channel pooled-cube KD (RCIL train.py::features_distillation_channel).

    ``old_maps`` / ``new_maps``: lists of L teacher / student maps of equal shapes (B, C_ℓ, H_ℓ, W_ℓ) (RCIL: the
    four post-activation stage outputs and x_pl — the logits are not used by this term); ``factors``: λ_ℓ
    (:func:`pckd_factors`); ``n_classes_total``: K_t; ``n_new``: N_new. Maps are squared first; CP averages
    windows of 3 consecutive channels (stride 1, one zero channel each side, always divided by 3)::

        D_ℓ = mean_b ‖CP(A_ℓ²)_b − CP(A'_ℓ²)_b‖₂
        L_ch = (1/L) Σ_ℓ λ_ℓ · √(K_t / N_new) · D_ℓ

    Returns a float32 scalar.
    """
    check_map_pairs("pooled_cube_channel", old_maps, new_maps, factors, n_new)
    schedule = math.sqrt(n_classes_total / n_new)
    total = old_maps[0].new_zeros((), dtype=torch.float32)
    for old, new, factor in zip(old_maps, new_maps, factors):
        distance = _per_sample_distance(_channel_pool(old.float().pow(2)), _channel_pool(new.float().pow(2)))
        total = total + factor * schedule * distance
    return total / len(old_maps)


# ---- the method (RCIL argparser.py, train.py, run.py::convert_model) ----------------------------------------------

def gate_seed(seed, step):
    """The seed of the student's gate generator at ``step`` from ``--random_seed`` (a SeedSequence of both)."""
    return int(np.random.SeedSequence([int(seed), int(step), GATE_SEED_TAG]).generate_state(1)[0])


@dataclass
class RCILHyper:
    loss_kd: float = hyper(RCIL_W_KD, "t>0: weight of the unbiased knowledge distillation", low=0.0)
    alpha: float = kd_alpha_hyper()
    pckd_factor: float = hyper(PCKD_FACTOR_VOC, "t>0: pooled-cube KD weight of the four backbone stages (spatial and"
                                                " channel terms) and of x_pl (spatial term); ADE default 5e-6",
                               low=0.0)
    pckd_last_factor: float = hyper(PCKD_LAST_FACTOR_VOC, "t>0: pooled-cube KD weight of the last map of each term:"
                                                          " the small logits (spatial), x_pl (channel); ADE default"
                                                          " 5e-7", low=0.0)
    init_balanced: bool = hyper(True, "t>0: new classifier weights copied from the background's (RCIL's"
                                      " weight-only variant; biases keep their random init)")
    pckd_channel_factor: float = hyper(None, "t>0: channel pooled-cube KD weight of the four backbone stages (default:"
                                             " --pckd_factor; cityscapes_domain 1e-4)", low=0.0, type=float)
    pckd_channel_last_factor: float = hyper(None, "t>0: channel pooled-cube KD weight of x_pl (default:"
                                                  " --pckd_last_factor; cityscapes_domain 0)", low=0.0, type=float)


class RCIL(MiBFamily):
    """RCIL (RCIL train.py, run.py::convert_model) on the MiB family protocol (:class:`methods.mib.MiBFamily`).

    * Model: family ``rcil`` (:func:`network.rcil.build_rcil_model`); a model built for the checkpoint of a
      merged step (``layout_step`` ≥ 1) has the merged conv biases.
    * Step t ≥ 1 start (``prepare_student``): weight-only background init of ``cls[-1]``, then the branch merge
      (:func:`network.rcil.merge_branches`); the merged ``conv2``/``bn2``/``map_convs``/``map_bn`` stay frozen
      and in eval mode (``configure``, ``set_train_mode`` every epoch); the ``_new`` branches train on.
    * Gates: the student's generator is seeded with :func:`gate_seed` (``--random_seed``, step) before the first
      epoch; its state is the method state, so ``--resume`` draws the same gates. Eval-mode models (the teacher,
      validation, the test) use ½/½.
    * Loss: step 0 CE over all pixels; t ≥ 1 UNCE + ``loss_kd``·UNKD (upsampled logits) + spatial PCKD (6 maps:
      mod2..mod5 outputs, x_pl, collapsed small logits) + channel PCKD (5 maps: mod2..mod5 outputs, x_pl), with
      λ = ``pckd_factor`` / ``pckd_last_factor`` and √(K_t / N_new).
    * Validation every 15 epochs for the logs (RCIL's default; ``--val_interval`` overrides), never selecting.
    """

    name = "rcil"
    Hyper = RCILHyper
    model_families = ("rcil",)
    default_protocol = PLOP_PROTOCOL

    def __init__(self, hyper=None, dataset="voc"):
        super().__init__(hyper, dataset)
        self._gates = None  # the student's network.rcil.BranchGates, once configured
        self._pending_gate_state = None

    @classmethod
    def default_hyper(cls, dataset):
        """PCKD weights per dataset (RCIL train.py: 0.01 / 0.0005 on VOC, 5e-6 / 5e-7 on ADE)."""
        factor, last_factor = per_dataset(PCKD_FACTORS, dataset)
        if not is_domain_incremental(dataset):
            return RCILHyper(pckd_factor=factor, pckd_last_factor=last_factor)
        channel, channel_last = PCKD_CHANNEL_FACTORS[dataset]
        # RCIL's Cityscapes loss is CE + PCKD alone (RCIL train.py: no KD there) and no initialisation
        return RCILHyper(pckd_factor=factor, pckd_last_factor=last_factor, pckd_channel_factor=channel,
                         pckd_channel_last_factor=channel_last, loss_kd=0.0, init_balanced=False)

    def published(self):
        return RCIL_PUBLISHED.get(self.dataset)

    # ---- model ----------------------------------------------------------------------------------------
    def build_network(self, spec, classes_per_step, pretrained=None, layout_step=None):
        """RCIL's network; ``layout_step`` ≥ 1: the merged layout (conv biases) of that step's checkpoint."""
        merged = layout_step is not None and layout_step >= 1
        return build_model(spec.name, classes_per_step, backbone=spec.backbone, output_stride=spec.output_stride,
                           pretrained=pretrained, merged=merged)

    def background_init(self, ctx):
        return INIT_WEIGHTS if self.hp.init_balanced else None

    def prepare_student(self, model, previous, ctx):
        """Weight-only background init of the new classifier (RCIL segmentation_module.py::init_new_classifier),
        then the branch merge (RCIL run.py::convert_model)."""
        super().prepare_student(model, previous, ctx)
        merge_branches(model)

    def configure(self, model, ctx):
        """Merged layers frozen at t > 0; the student's gates attached to the method state (and a state restored
        before the student existed applied to them)."""
        super().configure(model, ctx)
        if ctx.step > 0:
            freeze_merged(model)
        self._gates = model.gates
        if self._pending_gate_state is not None:
            self._gates.set_state(self._pending_gate_state)
            self._pending_gate_state = None

    def set_train_mode(self, model, ctx):
        """``model.train()``, then the merged layers back to eval and frozen (as RCIL run.py does every epoch)."""
        super().set_train_mode(model, ctx)
        if ctx.step > 0:
            freeze_merged(model)

    # ---- passes before the first epoch ----------------------------------------------------------------
    def before_step(self, model, teacher, data, ctx):
        """Seed the student's gate generator from ``--random_seed`` and the step (:func:`gate_seed`)."""
        super().before_step(model, teacher, data, ctx)
        model.gates.seed(gate_seed(data.seed, ctx.step))

    # ---- per batch ------------------------------------------------------------------------------------
    def loss(self, outputs, teacher_outputs, batch, ctx):
        """RCIL's loss (RCIL train.py). ``outputs`` / ``teacher_outputs``: ``(z^s, features)`` of the student
        (K_t channels) and the teacher (K_old), logits at feature resolution; ``batch.labels`` (B, H, W), 255 ignored.

        Step 0: ``ce`` = mean over all B·H·W pixels of CE(up(z), y). Step t ≥ 1, with up(·) the bilinear upsampling
        to (H, W) and A_ℓ / A'_ℓ the teacher / student ``attentions`` (mod2..mod5 outputs, x_pl)::

            total = unce(up(z), y) + loss_kd · unkd(up(z), up(z^old))
                    + pooled_cube_spatial([A_1..A_5, z^old], [A'_1..A'_5, collapse(z)], λ_sp, K_t, N_new)
                    + pooled_cube_channel([A_1..A_5], [A'_1..A'_5], λ_ch, K_t, N_new)

        λ_sp = (pckd_factor ×5, pckd_last_factor), λ_ch = (pckd_factor ×4, pckd_last_factor). Returns the named
        float32 terms with ``total``.
        """
        logits, features = outputs
        labels = batch.labels
        up = self.upsampled(logits, labels)
        if ctx.step == 0:
            ce = losses.ce_all_pixels(up, labels)
            return {"total": ce, "ce": ce}
        old_logits, old_features = teacher_outputs
        new_maps, old_maps = list(features["attentions"]), list(old_features["attentions"])
        domain_step = not ctx.adds_classes
        # a domain step: equal channels, nothing to collapse, √(K_t / N_new) = 1 (RCIL train.py counts the 19 classes
        # as new there)
        n_new = ctx.num_classes if domain_step else ctx.num_new
        small = features["sem_logits_small"]
        spatial = pooled_cube_spatial(
            old_maps + [old_features["sem_logits_small"]],
            new_maps + [small if domain_step else collapse_logits(small, ctx.num_old)],
            layer_factors(PCKD_SPATIAL_MAPS, self.hp.pckd_factor, self.hp.pckd_last_factor), ctx.num_classes, n_new)
        channel_factor = self.hp.pckd_factor if self.hp.pckd_channel_factor is None else self.hp.pckd_channel_factor
        channel_last = (self.hp.pckd_last_factor if self.hp.pckd_channel_last_factor is None
                        else self.hp.pckd_channel_last_factor)
        channel = pooled_cube_channel(old_maps, new_maps, layer_factors(PCKD_CHANNEL_MAPS, channel_factor, channel_last),
                                      ctx.num_classes, n_new)
        old_up = self.upsampled(old_logits, labels)
        if domain_step:  # RCIL train.py on Cityscapes: CE + PCKD (+ loss_kd · KD over all channels, 0 as published)
            ce = losses.ce_all_pixels(up, labels)
            kd = kd_old_channels(up, old_up, alpha=self.hp.alpha)
            return {"total": ce + self.hp.loss_kd * kd + spatial + channel, "ce": ce, "kd": kd,
                    "pckd_spatial": spatial, "pckd_channel": channel}
        unce = losses.unbiased_ce(up, labels, ctx.num_old)
        unkd = losses.unbiased_kd(up, old_up, alpha=self.hp.alpha)
        total = unce + self.hp.loss_kd * unkd + spatial + channel
        return {"total": total, "unce": unce, "unkd": unkd, "pckd_spatial": spatial, "pckd_channel": channel}

    # ---- validation -----------------------------------------------------------------------------------
    def validation_due(self, iteration, iterations_per_epoch, total_iterations, val_interval):
        """Every 15 epochs (RCIL's ``--val_interval`` default, RCIL argparser.py), or every ``--val_interval``
        epochs."""
        every = RCIL_VAL_INTERVAL if val_interval is None else val_interval
        return super().validation_due(iteration, iterations_per_epoch, total_iterations, every)

    # ---- state ----------------------------------------------------------------------------------------
    def state_dict(self):
        """The student's gate-generator state (``--resume`` draws the same gates)."""
        state = super().state_dict()
        if self._gates is not None:
            state[GATE_STATE_KEY] = self._gates.get_state()
        return state

    def load_state_dict(self, state):
        state = dict(state)
        gate_state = state.pop(GATE_STATE_KEY, None)
        super().load_state_dict(state)
        if gate_state is None:
            return
        if self._gates is not None:
            self._gates.set_state(gate_state)
        else:
            self._pending_gate_state = gate_state  # applied when the student is configured

    def load_previous_state(self, state, ctx):
        """Step t-1's gate state is not carried: step t seeds its own generator (:meth:`before_step`)."""
        super().load_previous_state({k: v for k, v in state.items() if k != GATE_STATE_KEY}, ctx)
