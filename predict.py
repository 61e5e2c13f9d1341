"""Segment a folder of images with the checkpoint of any step, on the CPU or a GPU.

    python predict.py --ckpt checkpoints/BARM/15-1/overlap/step3/final.pth --images photos/ --out predictions/
                      [--device auto|cpu|cuda|cuda:N] [--crop_size N]

The checkpoint (a ciss ``final.pth`` / ``last.pth``) names its method, hyper-parameters, model, dataset and
classes; the model of that step is built with the same calls as ``--test`` (``Method.build_network`` with the
step's layout, every key loaded exactly) and predicts with ``Method.predict``. Every ``.jpg``, ``.jpeg``,
``.png``, ``.bmp`` and ``.webp`` file of ``--images`` (not its subfolders) is read as RGB and, by default,
segmented at its own size; ``--crop_size N`` resizes its shorter side to N and centre-crops N x N first (the
evaluation transform of ``--crop_val``). For each image ``{stem}``:

* ``{out}/{stem}.png``: the prediction as an 8-bit palette PNG whose values are the dataset's class ids (VOC:
  0..20, ADE: 0..150) with the dataset's colours;
* ``{out}/panels/{stem}.png``: image | prediction with a legend of the classes present
  (``utils.visualize.prediction_panel``, without ground truth).
"""
import argparse
import dataclasses
import logging
import os
import types

import numpy as np
import torch
from PIL import Image

from datasets import get_layout
from datasets.incremental import open_image
from datasets.transforms import normalize
from engine.models import load_exact, model_spec, model_state
from methods import get_method_class
from utils.checkpoint import load_checkpoint_file
from utils.distributed import resolve_device
from utils.errors import UserError, exit_on_user_error
from utils.logging import setup_logging
from engine.panels import PANEL_DIR, palette_indices, save_prediction_panels

log = logging.getLogger("ciss")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
REQUIRED_KEYS = ("method", "dataset", "classes", "model_state")


@dataclasses.dataclass
class Predictor:
    """A step's model in eval mode on ``device`` with its method, dataset and channel -> class id table."""
    model: torch.nn.Module
    method: object
    dataset: str
    class_ids: list
    device: torch.device
    step: int
    crop_size: int = None
    data_root: str = None  # the training data folder (a dataset of one's own names its classes there)

    def transform(self, image):
        """uint8 (3, H, W) of a PIL image through the method's evaluation transform."""
        crop_val = self.crop_size is not None
        tensor, _ = self.method.eval_transform(self.crop_size, crop_val)(image, Image.new("L", image.size))
        return tensor

    def __call__(self, image):
        """Channel positions (H, W) (int64, CPU) predicted for a uint8 (3, H, W) image."""
        with torch.no_grad():
            logits, _ = self.model(normalize(image[None].to(self.device)))
            return self.method.predict(logits, image.shape[-2:])[0].cpu()


def load_predictor(path, device="auto", crop_size=None):
    """The :class:`Predictor` of the checkpoint at ``path`` on ``device`` ("auto", "cpu", "cuda", "cuda:N").

    Raises:
        UserError: the file is missing or unreadable, or is not a ciss checkpoint (no method, dataset, classes).
    """
    checkpoint = load_checkpoint_file(path)
    missing = [k for k in REQUIRED_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise UserError(f"checkpoint {path} lacks {', '.join(missing)}: expected a ciss checkpoint"
                        f" (step*/final.pth or last.pth written by train.py)")
    method_cls = get_method_class(checkpoint["method"])
    dataset = checkpoint["dataset"]
    hyper = method_cls.default_hyper(dataset)
    known = {f.name for f in dataclasses.fields(hyper)}
    hyper = dataclasses.replace(hyper, **{k: v for k, v in checkpoint.get("hyper", {}).items() if k in known})
    method = method_cls(hyper, dataset=dataset)
    recorded = types.SimpleNamespace(model=checkpoint.get("model"), backbone=checkpoint.get("backbone"),
                                     output_stride=checkpoint.get("output_stride") or 16)
    spec = model_spec(recorded, method_cls)
    classes = [list(s) for s in checkpoint["classes"]]
    model = method.build_network(spec, [len(s) for s in classes], layout_step=len(classes) - 1)
    load_exact(model, model_state(checkpoint), path)
    device = resolve_device(device)
    model = model.to(device).eval()
    return Predictor(model=model, method=method, dataset=dataset, class_ids=[c for s in classes for c in s],
                     device=device, step=len(classes) - 1, crop_size=crop_size,
                     data_root=checkpoint.get("args", {}).get("data_root"))


def list_images(folder):
    """Sorted image files of ``folder`` (not recursive); none is a :class:`UserError`."""
    if not os.path.isdir(folder):
        raise UserError(f"--images {folder} is not a folder: expected a folder of images")
    files = sorted(os.path.join(folder, name) for name in os.listdir(folder)
                   if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, name)))
    if not files:
        raise UserError(f"--images {folder} holds no image: expected files ending in {', '.join(IMAGE_EXTENSIONS)}")
    return files


def save_class_png(prediction, class_ids, palette, path):
    """The prediction (channel positions) as a palette PNG of class ids with the dataset's colours."""
    image = Image.fromarray(palette_indices(prediction, class_ids).astype(np.uint8), mode="P")
    image.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
    image.save(path)


def predict_folder(ckpt, images, out, device="auto", crop_size=None):
    """Predict every image of the folder ``images`` with the checkpoint ``ckpt``; returns the written
    ``{out}/{stem}.png`` paths (panels in ``{out}/panels/``)."""
    predictor = load_predictor(ckpt, device, crop_size)
    layout = get_layout(predictor.dataset, predictor.data_root)
    palette = layout.palette()
    files = list_images(images)
    try:
        os.makedirs(os.path.join(out, PANEL_DIR), exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create --out {out} ({err.strerror or err})") from None
    written = []
    for path in files:
        stem = os.path.splitext(os.path.basename(path))[0]
        image = predictor.transform(open_image(path))
        prediction = predictor(image)
        target = os.path.join(out, f"{stem}.png")
        save_class_png(prediction, predictor.class_ids, palette, target)
        save_prediction_panels([image], [prediction], os.path.join(out, PANEL_DIR), [stem], palette,
                               layout.CLASS_NAMES, class_ids=predictor.class_ids)
        written.append(target)
    log.info("%d prediction(s) of %s (%s, step %d) in %s", len(written), ckpt, predictor.method.name,
             predictor.step, out)
    return written


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a ciss checkpoint of any step (step<t>/final.pth)")
    parser.add_argument("--images", required=True, help="folder of images (.jpg .jpeg .png .bmp .webp)")
    parser.add_argument("--out", required=True, help="output folder: <stem>.png predictions, panels/<stem>.png")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N"
                                                         " (default: %(default)s)")
    parser.add_argument("--crop_size", type=int, default=None,
                        help="resize the shorter side to N and centre-crop N x N (default: each image at its size)")
    args = parser.parse_args(argv)
    if args.crop_size is not None and args.crop_size <= 0:
        parser.error(f"--crop_size {args.crop_size}: expected a positive number of pixels")
    return args


@exit_on_user_error
def main(argv=None):
    setup_logging(True)
    args = parse_args(argv)
    return predict_folder(args.ckpt, args.images, args.out, args.device, args.crop_size)


if __name__ == "__main__":
    main()
