"""File-system checks shared by the dataset layouts (every problem is one :class:`UserError` line), and the
thread pool that decodes many files at once.

Decoding runs in threads, not processes: Pillow releases the GIL while it inflates and scans a PNG, so threads
scale with the cores for this work, and a thread pool never re-imports the caller's ``__main__``, so every
public function works from a plain script without ``if __name__ == "__main__":`` (process pools started with
"spawn" or "forkserver" re-run such a script in every worker, which then starts its own pool, without end).
"""
import os
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from utils.errors import UserError


def read_label(path, read):
    """``read(image)`` of the label PNG at ``path``; a file that cannot be decoded or is not an 8-bit
    single-channel image is a UserError naming it."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P"):
                raise UserError(f"label {path} has image mode {image.mode}: expected an 8-bit single-channel"
                                f" (L or P) PNG of class ids")
            return read(image)
    except UserError:
        raise
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"cannot decode label {path} ({err}): expected a PNG of class ids") from None


def check_dir(path, what):
    """Return ``path`` if it is a directory, else raise a UserError saying what was expected there."""
    if not os.path.isdir(path):
        raise UserError(f"{path} is not a directory: expected {what}")
    return path


def read_id_list(path, what):
    """Image ids of a split file: the stem of the first token of every non-empty line."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path} ({err.__class__.__name__}): expected {what}") from None
    ids = [os.path.splitext(os.path.basename(line.split()[0]))[0] for line in lines if line.strip()]
    if not ids:
        raise UserError(f"{path} lists no images: expected {what}")
    return ids


def list_stems(folder, extension):
    """Sorted stems of the files in ``folder`` ending with ``extension``."""
    stems = sorted(name[:-len(extension)] for name in os.listdir(folder) if name.endswith(extension))
    if not stems:
        raise UserError(f"{folder} holds no *{extension} files")
    return stems


def pair_files(ids, image_dir, image_ext, label_dir, label_ext):
    """``[(id, image_path, label_path)]`` for ``ids``; an id without image or label is a UserError."""
    images, labels = set(os.listdir(image_dir)), set(os.listdir(label_dir))
    for image_id in ids:
        if image_id + image_ext not in images:
            raise UserError(f"image {os.path.join(image_dir, image_id + image_ext)} is missing"
                            f" (listed in the split)")
        if image_id + label_ext not in labels:
            raise UserError(f"image {image_id} has no label: expected {os.path.join(label_dir, image_id + label_ext)}")
    return [(i, os.path.join(image_dir, i + image_ext), os.path.join(label_dir, i + label_ext)) for i in ids]


def usable_cpus():
    """The number of CPUs this process may run on (its affinity mask where the OS has one, as PyTorch's
    DataLoader counts them), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def parallel_imap(function, items, workers=None, chunksize=1):
    """``function(item)`` for every item, in order, lazily, computed by ``workers`` threads (default: the usable
    CPUs; 1 = in the calling thread). Stopping the iteration early cancels the work not yet started."""
    items = list(items)
    workers = max(1, min(workers or usable_cpus(), len(items)))
    if workers == 1:
        yield from map(function, items)
        return
    chunks = [items[i:i + chunksize] for i in range(0, len(items), chunksize)]
    with ThreadPoolExecutor(workers, thread_name_prefix="ciss-decode") as pool:
        futures = [pool.submit(lambda chunk: [function(item) for item in chunk], c) for c in chunks]
        try:
            for future in futures:
                yield from future.result()
        finally:
            for future in futures:
                future.cancel()
