"""The published runs' protocol values, written from the reference repositories' scripts, configs and argparsers
(independently of ciss's ``methods/*`` tables), for the tests of the defaults (tests/engine/test_resolve.py) and of
the recipes (tests/scripts/test_recipes.py).

``PROTOCOLS[(name, dataset)]`` = ``(common, step0, steps)``: ``common`` holds the values of every step, ``step0`` and
``steps`` those of step 0 and of the steps t > 0; ``gpus`` is the published number of GPUs and ``global_batch`` the
batch of one optimizer step of the published run (per-GPU batch x GPUs). ``name`` is a method, or ``"<method>@plop"``
for one of MiB's methods run with PLOP's code (``--protocol plop``).
"""

# BARM utils/parser.py defaults: --crop_size 513, --random_seed 1, --weight_decay 1e-4, --output_stride 16.
# BARM scripts/run_init.sh: --crop_val --lr_policy poly --pseudo --bn_freeze --amp, 1 GPU (CUDA_VISIBLE_DEVICES=1).
BARM_COMMON = {"crop_size": 513, "crop_val": True, "lr_policy": "poly", "weight_decay": 1e-4, "random_seed": 1,
               "output_stride": 16, "amp": True}
# MiB argparser.py defaults: --crop_size 512, --random_seed 42, --weight_decay 1e-4, --output_stride 16, poly;
# MiB README commands: --crop_val, 2 GPUs x --batch_size 12, no --opt_level (fp32).
MIB_COMMON = {"crop_size": 512, "crop_val": True, "lr_policy": "poly", "weight_decay": 1e-4, "random_seed": 42,
              "output_stride": 16, "amp": False}
# PLOP scripts/voc/plop_*.sh, scripts/ade/plop_ade_*.sh: MiB's argparser values, --opt_level O1 (mixed precision).
PLOP_COMMON = {**MIB_COMMON, "amp": True}
# DKD configs/config_voc.json, config_ade.json: crop_size 512, seed 1, weight_decay 1e-4, output_stride 16, amp.
DKD_COMMON = {"crop_size": 512, "crop_val": True, "weight_decay": 1e-4, "random_seed": 1, "output_stride": 16,
              "amp": True}
# SSUL main.py parser defaults: --crop_size 513, --random_seed 1, --weight_decay 1e-4, --output_stride 16;
# SSUL run.sh / README: --crop_val --amp --gpu_id 0,1 (DataParallel).
SSUL_COMMON = {"crop_size": 513, "crop_val": True, "weight_decay": 1e-4, "random_seed": 1, "output_stride": 16,
               "amp": True}

MIB_VOC = (MIB_COMMON, {"train_epoch": 30, "global_batch": 24, "lr": 0.01, "gpus": 2},  # MiB README, VOC: --epochs 30
           {"train_epoch": 30, "global_batch": 24, "lr": 0.001, "gpus": 2})
MIB_ADE = (MIB_COMMON, {"train_epoch": 60, "global_batch": 24, "lr": 0.01, "gpus": 2},  # MiB README, ADE: --epochs 60
           {"train_epoch": 60, "global_batch": 24, "lr": 0.001, "gpus": 2})
PLOP_VOC = (PLOP_COMMON, MIB_VOC[1], MIB_VOC[2])  # PLOP scripts/voc/plop_15-1.sh (and 19-1, 15-5)
PLOP_ADE = (PLOP_COMMON, MIB_ADE[1], MIB_ADE[2])  # PLOP scripts/ade/plop_ade_100-50.sh (and 100-10, 100-5)
# BARM scripts/run_init.sh: EPOCH 50, BATCH 16, LR 0.001, 1 GPU; scripts/run.sh: EPOCH 20, BATCH 8 on 2 GPUs, LR 0.001
BARM_VOC = (BARM_COMMON, {"train_epoch": 50, "global_batch": 16, "lr": 0.001, "gpus": 1},
            {"train_epoch": 20, "global_batch": 16, "lr": 0.001, "gpus": 2})
# BARM README, ADE: step 0 60 epochs, batch 8, 1 GPU; scripts/runade.sh: 100 epochs, BATCH 4 on 2 GPUs, LR 0.01
BARM_ADE = (BARM_COMMON, {"train_epoch": 60, "global_batch": 8, "lr": 0.001, "gpus": 1},
            {"train_epoch": 100, "global_batch": 8, "lr": 0.01, "gpus": 2})

PROTOCOLS = {
    ("barm", "voc"): BARM_VOC,
    ("barm", "ade"): BARM_ADE,
    # KProBA scripts/run_init.sh and run.sh: EPOCH 5, BATCH 16, LR 0.001, one GPU at every step
    ("kproba", "voc"): (BARM_COMMON, {"train_epoch": 5, "global_batch": 16, "lr": 0.001, "gpus": 1},
                        {"train_epoch": 5, "global_batch": 16, "lr": 0.001, "gpus": 1}),
    ("kproba", "ade"): BARM_ADE,  # KProBA README and scripts/runade.sh: BARM's ADE values
    # SSUL run.sh: EPOCH 50, BATCH 32, LR 0.01, --lr_policy poly, every step
    ("ssul", "voc"): ({**SSUL_COMMON, "lr_policy": "poly"}, {"train_epoch": 50, "global_batch": 32, "lr": 0.01,
                                                             "gpus": 2},
                      {"train_epoch": 50, "global_batch": 32, "lr": 0.01, "gpus": 2}),
    # SSUL README, ADE: --train_epoch 100 --batch_size 24 --lr 0.05 --lr_policy warm_poly
    ("ssul", "ade"): ({**SSUL_COMMON, "lr_policy": "warm_poly"}, {"train_epoch": 100, "global_batch": 24, "lr": 0.05,
                                                                  "gpus": 2},
                      {"train_epoch": 100, "global_batch": 24, "lr": 0.05, "gpus": 2}),
    # DKD configs/config_voc.json: batch 8 per GPU on 4 GPUs, lr 1e-3 then 1e-4 (scripts: --lr 0.0001 at t > 0),
    # 60 epochs, poly
    ("dkd", "voc"): ({**DKD_COMMON, "lr_policy": "poly"}, {"train_epoch": 60, "global_batch": 32, "lr": 1e-3, "gpus": 4},
                     {"train_epoch": 60, "global_batch": 32, "lr": 1e-4, "gpus": 4}),
    # DKD configs/config_ade.json: batch 6 per GPU on 4 GPUs, lr 2.5e-3 then 2.5e-4, 100 epochs, warm-up 0.2
    ("dkd", "ade"): ({**DKD_COMMON, "lr_policy": "warm_poly"}, {"train_epoch": 100, "global_batch": 24, "lr": 2.5e-3,
                                                                "gpus": 4},
                     {"train_epoch": 100, "global_batch": 24, "lr": 2.5e-4, "gpus": 4}),
    # RCIL scripts/voc/RCIL_15-1-overlap.sh (and the others): 4 GPUs x --batch_size 6, --lr 0.02 then 0.001,
    # --epochs 30, --opt_level O1; argparser.py: MiB's defaults
    ("rcil", "voc"): (PLOP_COMMON, {"train_epoch": 30, "global_batch": 24, "lr": 0.02, "gpus": 4},
                      {"train_epoch": 30, "global_batch": 24, "lr": 0.001, "gpus": 4}),
    # RCIL scripts/ade/RCIL_ade_100-50.sh: 4 GPUs x 6, --lr 0.01 then 0.001, --epochs 60, O1
    ("rcil", "ade"): (PLOP_COMMON, {"train_epoch": 60, "global_batch": 24, "lr": 0.01, "gpus": 4},
                      {"train_epoch": 60, "global_batch": 24, "lr": 0.001, "gpus": 4}),
    ("plop", "voc"): PLOP_VOC,
    ("plop", "ade"): PLOP_ADE,
}
# PLOP scripts/cityscapesDomain/mib_cityscapesDomain_1-1.sh, plop_cityscapesDomain_{1-1,11-1}.sh: 2 GPUs x
# --batch_size 12, --lr 0.01 then 0.001, --epochs 50, --opt_level O1; argparser.py: crop 512, seed 42
PLOP_CITYSCAPES = (PLOP_COMMON, {"train_epoch": 50, "global_batch": 24, "lr": 0.01, "gpus": 2},
                   {"train_epoch": 50, "global_batch": 24, "lr": 0.001, "gpus": 2})
PROTOCOLS[("plop", "cityscapes_domain")] = PLOP_CITYSCAPES
# RCIL scripts/cityscapesDomain/RCIL_cityscapes_11-5.sh (and 1-1): 4 GPUs x --batch_size 6, --lr 0.02 then 0.002,
# --epochs 50, --opt_level O1 (11-1: 0.004 at t > 0, TASK_CHANGES)
PROTOCOLS[("rcil", "cityscapes_domain")] = (PLOP_COMMON, {"train_epoch": 50, "global_batch": 24, "lr": 0.02, "gpus": 4},
                                            {"train_epoch": 50, "global_batch": 24, "lr": 0.002, "gpus": 4})
for _name in ("ft", "lwf", "lwf-mc", "ilt", "mib"):  # all run with PLOP's code there, whatever --protocol
    PROTOCOLS[(_name, "cityscapes_domain")] = PROTOCOLS[(f"{_name}@plop", "cityscapes_domain")] = PLOP_CITYSCAPES
for _name in ("ft", "lwf", "lwf-mc", "ilt", "ewc", "pi", "rw", "mib"):
    PROTOCOLS[(_name, "voc")] = MIB_VOC
    PROTOCOLS[(_name, "ade")] = MIB_ADE
    PROTOCOLS[(f"{_name}@plop", "voc")] = PLOP_VOC
    PROTOCOLS[(f"{_name}@plop", "ade")] = PLOP_ADE

#: Per-task exceptions: ``(name, dataset, task) -> (step0 changes, steps changes)``.
TASK_CHANGES = {
    # PLOP scripts/voc/plop_10-1.sh: --epochs 10 at the steps t > 0
    **{(name, "voc", "10-1"): ({}, {"train_epoch": 10})
       for name in ["plop"] + [f"{m}@plop" for m in ("ft", "lwf", "lwf-mc", "ilt", "ewc", "pi", "rw", "mib")]},
    # RCIL scripts/ade/RCIL_ade_100-10.sh and RCIL_ade_100-5.sh: 2 GPUs x --batch_size 12
    ("rcil", "ade", "100-10"): ({"gpus": 2}, {"gpus": 2}),
    ("rcil", "ade", "100-5"): ({"gpus": 2}, {"gpus": 2}),
    # RCIL scripts/cityscapesDomain/RCIL_cityscapes_11-1.sh: --lr 0.004 at the steps t > 0
    ("rcil", "cityscapes_domain", "11-1"): ({}, {"lr": 0.004}),
}

#: The reference behaviour of each published run (the deviations' published values): step 0, steps t > 0.
BEHAVIOUR = {
    # BARM trainer/trainer.py::Trainer.init_ckpt starts step 1 from step 0's best-validated file; Trainer.train
    # calls the module, not the DDP wrapper, at t > 0 (no gradient averaging over run.sh's 2 GPUs)
    ("barm", "voc"): {"select_best": (True, False), "sync_gradients": (True, False), "bn_chunks": (1, 1)},
    ("barm", "ade"): {"select_best": (True, False), "sync_gradients": (True, False), "bn_chunks": (1, 1)},
    # KProBA trainer/trainer.py: BARM's; its VOC steps ran on one GPU (run.sh), its ADE steps on 2 (runade.sh)
    ("kproba", "voc"): {"select_best": (True, False), "sync_gradients": (True, True), "bn_chunks": (1, 1)},
    ("kproba", "ade"): {"select_best": (True, False), "sync_gradients": (True, False), "bn_chunks": (1, 1)},
    # SSUL main.py: the best-validated weights at every step; nn.DataParallel over --gpu_id 0,1
    ("ssul", "voc"): {"select_best": (True, True), "sync_gradients": (True, True), "bn_chunks": (2, 2)},
    ("ssul", "ade"): {"select_best": (True, True), "sync_gradients": (True, True), "bn_chunks": (2, 2)},
}
#: Every other method's published run: the last weights, synchronised gradients (DDP), one BatchNorm per batch
#: (SyncBatchNorm or InPlace-ABN sync).
PLAIN_BEHAVIOUR = {"select_best": (False, False), "sync_gradients": (True, True), "bn_chunks": (1, 1)}


def expected(name, dataset, task, step):
    """The published values of ``name`` on ``dataset``/``task`` at ``step``: ``{flag: value}``."""
    common, step0, steps = PROTOCOLS[(name, dataset)]
    values = {**common, **(step0 if step == 0 else steps)}
    changes = TASK_CHANGES.get((name, dataset, task))
    if changes:
        values.update(changes[0] if step == 0 else changes[1])
    return values
