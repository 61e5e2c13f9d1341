"""Per-image class sets ("class index"), computed once from the label PNGs and cached.

The index records, for every image of a split, which of the 256 label values occur in its label map. The
step image lists (overlap / disjoint) are filters on it. Building it decodes every label once, with several
processes; it is then cached as ``{dataset}_{split}_class_index.npz`` in the cache folder (see
:func:`cache_folder`) and reused for as long as the label files are unchanged (same names, sizes and
modification times); otherwise it is rebuilt. BARM's ``{split}_cls.txt`` files (``id c1 c2 ...`` with the
foreground classes minus one) are accepted as an index too when placed in the cache folder.

Building the index also validates every label: a file that is not a single-channel 8-bit PNG, that cannot
be decoded, or that holds values outside the dataset's range is a :class:`UserError` naming the file, and
no cache file (nor a cache folder this call created) is left behind. A cache file that cannot be read
(truncated, damaged: any error while loading it) is rebuilt with one warning line.

A dataset whose label files hold other values than its class ids (a dataset of the user's own,
``datasets.custom``) passes a :class:`LabelValues`: the values a label may hold are then the described ones, the
index records class ids (the label values mapped through its table), the cache key includes the description's
digest (editing the description rebuilds the index) and every image's size (read from its
header) must equal its label's.

The labels are decoded by a thread pool (``datasets.files.parallel_imap``), never by a process pool, so
:func:`load_class_index` works from a script without a ``__main__`` guard.
"""
import hashlib
import logging
import os
import sys
from dataclasses import dataclass

import numpy as np

from PIL import Image

from datasets.files import parallel_imap, read_label
from utils.errors import UserError

log = logging.getLogger("ciss")

INDEX_VERSION = 1
LABEL_VALUES = 256


@dataclass(frozen=True)
class LabelValues:
    """How the label files of a dataset map to class ids: ``table`` (256 uint8: label value → class id, 255 =
    ignored), ``allowed`` (the label values a file may hold), ``source`` (the file that describes them, named in
    errors) and ``digest`` (of that description: part of the cache key)."""
    table: object
    allowed: tuple
    source: str
    digest: str


class ClassIndex:
    """``ids`` (list of image ids) and ``presence`` (bool array, images × 256 label values)."""

    def __init__(self, ids, presence):
        self.ids = list(ids)
        self.presence = np.asarray(presence, dtype=bool)
        if self.presence.shape != (len(self.ids), LABEL_VALUES):
            raise ValueError(f"presence must be {len(self.ids)}x{LABEL_VALUES}, got {self.presence.shape}")

    def __len__(self):
        return len(self.ids)

    def classes(self, i):
        """Sorted label values present in image ``i``."""
        return np.flatnonzero(self.presence[i]).tolist()

    def contains_any(self, values):
        """Boolean mask of the images containing at least one of ``values``."""
        values = sorted(set(values))
        if not values:
            return np.zeros(len(self), dtype=bool)
        return self.presence[:, values].any(axis=1)

    def contains_only(self, allowed):
        """Boolean mask of the images whose every label value is in ``allowed``."""
        others = sorted(set(range(LABEL_VALUES)) - set(allowed))
        return ~self.presence[:, others].any(axis=1)

    def counts(self):
        """Number of images in which each label value occurs (length 256)."""
        return self.presence.sum(axis=0)

    def remapped(self, table):
        """The index of the same images with every value ``v`` recorded as ``table[v]``."""
        presence = np.zeros_like(self.presence)
        for value in np.flatnonzero(self.presence.any(axis=0)):
            presence[:, table[value]] |= self.presence[:, value]
        return ClassIndex(self.ids, presence)


def label_presence(path):
    """The set of label values in one label PNG, as a bool array of length 256.

    Raises :class:`UserError` for a file that cannot be decoded or is not an 8-bit single-channel label.
    """
    histogram = read_label(path, lambda image: image.histogram())
    return np.asarray(histogram[:LABEL_VALUES]) > 0


def size_problem(image_path, label_path):
    """Why an image does not go with its label (its header cannot be read, or the sizes differ), or None."""
    try:
        with Image.open(image_path) as image:
            size = image.size
        with Image.open(label_path) as label:
            label_size = label.size
    except (OSError, SyntaxError, ValueError) as err:
        return f"cannot read image {image_path} ({err}): expected a JPEG or PNG image"
    if size != label_size:
        return (f"image {image_path} is {size[0]}x{size[1]} but its label {label_path} is {label_size[0]}x"
                f"{label_size[1]}: expected the same size")
    return None


def _scan(item):
    """Packed presence bits of one label (``item``: its path, or ``(label path, image path)`` to compare their
    sizes too), or the error message (raised by the caller, in order)."""
    path, image_path = item if isinstance(item, tuple) else (item, None)
    try:
        bits = np.packbits(label_presence(path)).tobytes()
    except UserError as err:
        return None, str(err)
    problem = None if image_path is None else size_problem(image_path, path)
    return (None, problem) if problem else (bits, None)


def build_index(label_paths, ids, workers=None, progress=None, image_paths=None):
    """Decode every label of ``label_paths`` into a :class:`ClassIndex` over ``ids``, with ``workers``
    threads (default: the usable CPUs). The first undecodable label (in list order) is a UserError; with
    ``image_paths``, so is the first image whose size differs from its label's."""
    progress = sys.stderr.isatty() if progress is None else progress
    chunk = max(1, min(256, len(label_paths) // (8 * (workers or 1))))
    items = label_paths if image_paths is None else list(zip(label_paths, image_paths))
    packed = bytearray()
    for n, (bits, error) in enumerate(parallel_imap(_scan, items, workers, chunk), 1):
        if error is not None:
            raise UserError(error)
        packed += bits
        if progress and (n % 1000 == 0 or n == len(label_paths)):
            print(f"\rclass index: {n}/{len(label_paths)} labels", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    presence = np.unpackbits(np.frombuffer(bytes(packed), dtype=np.uint8).reshape(len(ids), -1), axis=1)
    return ClassIndex(ids, presence[:, :LABEL_VALUES].astype(bool))


def refuse_values(index, label_paths, allowed, expected):
    """Raise :class:`UserError` naming the first label that holds a value outside ``allowed``, its stray values,
    ``expected`` (the rest of the sentence: what the values should be) and how many labels are affected."""
    bad = ~index.contains_only(allowed)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        found = [v for v in index.classes(i) if v not in allowed]
        raise UserError(f"label {label_paths[i]} holds values {found}{expected}; {int(bad.sum())} label file(s) are"
                        f" affected")


def check_label_values(index, label_paths, num_classes, ignore_label):
    """Raise :class:`UserError` naming the first label with a value outside 0..num_classes-1 (and ignore)."""
    refuse_values(index, label_paths, set(range(num_classes)) | {ignore_label},
                  f": expected class ids 0..{num_classes - 1} (and {ignore_label} = ignore)")


def check_described_values(index, label_paths, values):
    """Raise :class:`UserError` naming the first label with a value its dataset's description does not list
    (``values``: a :class:`LabelValues`)."""
    refuse_values(index, label_paths, values.allowed,
                  f" that {values.source} does not describe: expected {list(values.allowed)} (class ids and the"
                  f" ignore value)")


def fingerprint(label_paths):
    """Hash of the label files' names, sizes and modification times (what invalidates the cache)."""
    digest = hashlib.sha1()
    for path in label_paths:
        try:
            stat = os.stat(path)
        except OSError as err:
            raise UserError(f"cannot read label {path}: {err.strerror}") from None
        digest.update(f"{os.path.basename(path)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _folder_path(data_root, cache_dir=None):
    if cache_dir:
        return cache_dir
    if os.access(data_root, os.W_OK):
        return os.path.join(data_root, ".ciss_cache")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = hashlib.sha1(os.path.abspath(data_root).encode()).hexdigest()[:16]
    return os.path.join(base, "ciss", key)


def cache_folder(data_root, cache_dir=None):
    """Where the index is cached (created if needed): ``cache_dir`` if given, else ``{data_root}/.ciss_cache``
    when the data folder is writable, else ``$XDG_CACHE_HOME/ciss/<hash of the data path>`` (default
    ``~/.cache``)."""
    folder = _folder_path(data_root, cache_dir)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the class-index cache folder {folder} ({err.strerror}):"
                        f" pass a writable --cache_dir") from None
    return folder


def _read_cache(path, key):
    """``(index, problem)``: the cached index (None if absent or stale) and, for a file that exists but
    cannot be read, why (else None)."""
    if not os.path.exists(path):
        return None, None
    try:
        with np.load(path, allow_pickle=False) as data:
            if int(data["version"]) != INDEX_VERSION or str(data["fingerprint"]) != key:
                return None, None
            ids = data["ids"].tolist()
            presence = np.unpackbits(data["presence"], axis=1)[:, :LABEL_VALUES].astype(bool)
            return ClassIndex(ids, presence), None
    # any failure to read the cache (zipfile.BadZipFile, a bad .npy header, a bad shape, a short read, ...)
    # means "rebuild it", never a crash that lasts until the folder is deleted by hand
    except Exception as err:  # noqa: BLE001
        return None, f"{err.__class__.__name__}: {err}"


def _write_cache(path, key, index):
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as handle:
            np.savez(handle, version=INDEX_VERSION, fingerprint=key, ids=np.asarray(index.ids),
                     presence=np.packbits(index.presence, axis=1))
        os.replace(tmp, path)
    except OSError as err:
        log.warning("could not write the class-index cache %s (%s); it will be rebuilt next time", path, err)
        if os.path.exists(tmp):
            os.remove(tmp)


def read_barm_cls_file(path, ids):
    """BARM's ``{split}_cls.txt`` as a :class:`ClassIndex` over ``ids``, or None if it does not cover them.

    Each line is ``image_id c1 c2 ...`` with the foreground classes present, written as label − 1; the
    background (0) and void (255) are not listed, so they are not marked present.
    """
    listed = {}
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                parts = line.split()
                if parts:
                    listed[parts[0]] = [int(c) + 1 for c in parts[1:]]
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"cannot read the class index {path} ({err}): expected lines 'image_id c1 c2 ...'") from None
    missing = [i for i in ids if i not in listed]
    if missing:
        log.warning("%s does not list %d image(s) of the split (e.g. %s); building the index from the labels",
                    path, len(missing), missing[0])
        return None
    presence = np.zeros((len(ids), LABEL_VALUES), dtype=bool)
    for row, image_id in enumerate(ids):
        values = listed[image_id]
        if any(not 0 < v < LABEL_VALUES for v in values):
            raise UserError(f"{path}: image {image_id} lists a class outside 0..254")
        presence[row, values] = True
    return ClassIndex(ids, presence)


def load_class_index(dataset, data_root, split, samples, num_classes, ignore_label, cache_dir=None,
                     workers=None, persist=True, values=None):
    """The class index of ``samples`` (``[(id, image, label)]`` of ``split``), from cache or built.

    Order of preference: BARM's ``{split}_cls.txt`` in the cache folder, the cached index if the label
    files are unchanged, else a fresh build (validated and cached). A cache file that cannot be read is
    rebuilt (one warning line). When a label is invalid (UserError) or the build is interrupted, a cache
    folder created by this call is removed again if it is still empty. ``persist=False`` reads a cache but
    writes none (``--dry_run``). ``values`` (a :class:`LabelValues`): the label values are the description's, not
    class ids; the index is mapped to class ids, and every image's size is checked against its label's.
    """
    ids = [s[0] for s in samples]
    label_paths = [s[2] for s in samples]
    image_paths = None if values is None else [s[1] for s in samples]
    existed = os.path.isdir(_folder_path(data_root, cache_dir))
    folder = cache_folder(data_root, cache_dir) if persist else _folder_path(data_root, cache_dir)
    try:
        return _load_or_build(dataset, split, ids, label_paths, folder, num_classes, ignore_label, workers, persist,
                              values, image_paths)
    except BaseException:
        if not existed:
            _remove_if_empty(folder)
        raise


def _load_or_build(dataset, split, ids, label_paths, folder, num_classes, ignore_label, workers, persist=True,
                   values=None, image_paths=None):
    barm_file = os.path.join(folder, f"{split}_cls.txt")
    if values is None and os.path.exists(barm_file):
        index = read_barm_cls_file(barm_file, ids)
        if index is not None:
            log.info("class index: %s (BARM format)", barm_file)
            return index
    cache_path = os.path.join(folder, f"{dataset}_{split}_class_index.npz")
    key = fingerprint(label_paths)
    if values is not None:  # the description and the images too: editing either rebuilds (and re-checks) the index
        key = f"{key}:{values.digest}:{fingerprint(image_paths)}"
    index, problem = _read_cache(cache_path, key)
    if index is not None and index.ids == ids:
        return index
    if problem is not None:
        log.warning("the class-index cache %s cannot be read (%s): rebuilding it from the %d %s %s labels",
                    cache_path, problem, len(ids), dataset, split)
    else:
        log.info("building the class index of %d %s %s labels (%s)", len(ids), dataset, split,
                 f"cached in {folder}" if persist else "not cached")
    index = build_index(label_paths, ids, workers=workers, image_paths=image_paths)
    if values is None:
        check_label_values(index, label_paths, num_classes, ignore_label)
    else:
        check_described_values(index, label_paths, values)
        index = index.remapped(values.table)
    if persist:
        _write_cache(cache_path, key, index)
    return index


def _remove_if_empty(folder):
    try:
        os.rmdir(folder)  # fails, harmlessly, when the folder holds anything
    except OSError:
        pass
