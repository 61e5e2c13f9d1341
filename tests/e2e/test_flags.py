"""End to end: every flag of train.py is read: runs that together use every flag, with attribute reads
recorded."""
import json

import torch
import torchvision

import train
from engine.cli import build_parser, parse_args
from engine.config import RunConfig


class RecordingConfig(RunConfig):
    """A run configuration that remembers which settings were read (``to_dict()`` does not count); what it
    makes with ``replace`` records too."""
    reads = set()

    def __getattr__(self, name):
        type(self).reads.add(name)
        return super().__getattr__(name)


def recorded(argv):
    config = parse_args(argv)
    return RecordingConfig(config.to_dict(), config.explicit)


def parser_dests(parser):
    return {a.dest for a in parser._actions if a.dest != "help"}


def test_every_flag_is_read(tiny_voc, tmp_path):
    RecordingConfig.reads = set()
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    order = tmp_path / "custom.json"
    order.write_text(json.dumps([list(range(16)), [16], [17]]))
    ckpt = tmp_path / "ckpt"
    common = ["--data_root", tiny_voc, "--dataset", "voc", "--task", "15-1", "--task_file", str(order),
              "--overlap", "--cache_dir", str(tmp_path / "cache"), "--num_workers", "0", "--crop_size", "49",
              "--crop_val", "--batch_size", "4", "--val_batch_size", "8", "--method", "barm",
              "--model", "deeplabv3bga_resnet18", "--backbone", "resnet18", "--output_stride", "16",
              "--ckpt_dir", str(ckpt), "--subpath", "flags", "--device", "cpu", "--random_seed", "3"]
    train.run(recorded(common + [
        "--initial", "--pretrained", str(weights), "--train_epoch", "2", "--lr", "0.02", "--lr_policy", "step",
        "--step_size", "5", "--weight_decay", "2e-4", "--amp", "--channels_last", "on", "--select_best",
        "--val_interval", "1", "--print_interval", "1", "--loss_type", "bce_loss", "--w_tri", "4", "--w_fd", "3",
        "--w_gkd", "2", "--w_bga_ce", "0.5", "--backbone_lr0", "0.01", "--classifier_lr0", "0.02",
        "--aspp_lr", "0.002", "--old_lr", "0.0002"]))
    best = ckpt / "flags" / "custom" / "overlap" / "step0" / "final.pth"
    assert "selected" in torch.load(best, weights_only=False)  # --select_best: step 0's result is its best weights
    train.run(recorded(common + [
        "--curr_step", "1", "--end_step", "1", "--no_pretrained", "--train_epoch", "1", "--prev_ckpt", str(best),
        "--pseudo", "--pseudo_thresh", "0.6", "--bn_freeze", "--resume", "--lr_policy", "warm_poly", "--sync_gradients", "--bn_chunks", "1"]))
    train.run(recorded(common + ["--test", "--curr_step", "1", "--visualize", "1"]))
    by_global = [flag for flag in common if flag not in ("--batch_size", "4")] + ["--global_batch", "4"]
    train.run(recorded(by_global + ["--curr_step", "2", "--recipe", "flags-test", "--dry_run", "--clean"]))
    unread = parser_dests(build_parser("barm", "voc")) - RecordingConfig.reads
    assert not unread, f"flags never read: {sorted(unread)}"
