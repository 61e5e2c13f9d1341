"""End to end: a training step with --device_augment (the workers plan, the device decodes and
transforms)."""
import train
from engine.cli import parse_args
from tests.helpers import step_dir
from utils.checkpoint import load_checkpoint_file


def test_training_with_device_augmentation(tiny_voc, tmp_path):
    argv = ["--data_root", tiny_voc, "--ckpt_dir", str(tmp_path), "--task", "15-1", "--overlap", "--backbone",
            "resnet18", "--no_pretrained", "--crop_size", "49", "--batch_size", "4", "--num_workers", "1",
            "--crop_val", "--val_interval", "0", "--initial", "--train_epoch", "1", "--device", "cpu",
            "--device_augment", "--clean"]
    train.run(parse_args(argv))
    assert "metrics" in load_checkpoint_file(f"{step_dir(tmp_path, 0)}/final.pth")
