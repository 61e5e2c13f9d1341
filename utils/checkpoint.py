"""Checkpoint files: safe, verified loading of ciss and reference checkpoints (BARM utils/ckpt.py::save_ckpt; on torch >= 2.6
ciss allows their numpy ``best_score`` explicitly: docs/differences.md)."""
import hashlib
import os
import pickle
import random
import re
import zipfile
import zlib

import numpy as np
import torch

from utils.errors import UserError

# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+)")
# First bytes of a torch.save file: a zip archive (torch >= 1.6) or a legacy pickle (protocol 2+ opcode)
TORCH_FILE_MAGICS = (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")

# Errors torch.load raises for a file that is truncated, corrupt or not a checkpoint at all.
_READ_ERRORS = (
    pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, TypeError,
    AttributeError, KeyError, IndexError, ImportError,
)


def _torch_version():
    """(major, minor) of the installed torch, e.g. (2, 15) for "2.15.0+cu132"."""
    major, minor = re.match(r"(\d+)\.(\d+)", torch.__version__).groups()
    return int(major), int(minor)


def _numpy_safe_globals():
    """The numpy objects a BARM/SSUL checkpoint holds: ``best_score`` is a numpy float64 scalar (BARM
    utils/ckpt.py::save_ckpt).

    numpy 1.x pickles it as ``numpy.core.multiarray.scalar`` + ``numpy.dtype``, numpy 2 as
    ``numpy._core.multiarray.scalar`` + ``numpy.dtype``; rebuilding the dtype needs its class
    (``numpy.dtypes.Float64DType``). The ``(obj, "dotted.name")`` form (torch >= 2.6) registers the
    scalar constructor under both names; older torch registers it under its runtime name only.
    """
    scalar = np.float64(0).__reduce__()[0]  # numpy's scalar constructor, wherever this numpy keeps it
    dtype_classes = [np.dtype, type(np.dtype(np.float64))]
    if _torch_version() >= (2, 6):
        return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")] + dtype_classes
    return [scalar] + dtype_classes


def _reason(err):
    """The informative line of a ``torch.load`` error, without torch's weights-only header and footer."""
    text = str(err).split("WeightsUnpickler error:", 1)[-1]
    lines = [
        line.strip() for line in text.splitlines()
        if line.strip() and not line.startswith(("Weights only load failed", "Check the documentation"))
    ]
    return lines[0].split(". ")[0] if lines else type(err).__name__  # first sentence: torch appends advice


# --------------------------------------------------------------------------------------------------
# Integrity
# --------------------------------------------------------------------------------------------------

#: Where a ciss checkpoint records the digest of its tensors (written by :func:`save_checkpoint`).
DIGEST_KEY = "digest"
DIGEST_ALGORITHM = "sha256"
# What reading a damaged zip archive may raise
_ARCHIVE_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, RuntimeError, KeyError,
                   NotImplementedError)


def _tensors(obj, path=""):
    """``(path, tensor)`` of every tensor in nested dicts, lists and tuples, in their order (dict order is kept
    by ``torch.save`` and ``torch.load``)."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if path or key != DIGEST_KEY:
                yield from _tensors(value, f"{path}/{key}")
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from _tensors(value, f"{path}/{index}")


def tensor_digest(obj):
    """The SHA-256 of every tensor of a checkpoint (its place in the checkpoint, dtype, shape and bytes), the
    top-level :data:`DIGEST_KEY` left out. About 0.15 s for a ResNet-101's 170 MB on one CPU core."""
    digest = hashlib.new(DIGEST_ALGORITHM)
    for path, tensor in _tensors(obj):
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{path}:{data.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy())
    return digest.hexdigest()


def check_archive(path):
    """Verify a ``torch.save`` zip archive against its CRC-32 records (``torch.load`` does not): every member is
    read and checked. Legacy (pickle) files have no CRCs: they are checked by loading. Raises a UserError naming
    the file (and the damaged member) when it is damaged."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except _ARCHIVE_ERRORS as err:
        raise UserError(f"checkpoint file {path} is damaged ({type(err).__name__}: {err}): expected an intact file"
                        f" saved with torch.save") from None
    if damaged is not None:
        raise UserError(f"checkpoint file {path} is damaged: its member {damaged} fails its CRC-32 check (a bit"
                        f" flipped on disk or in transfer): copy it again or retrain the step")


def check_digest(checkpoint, path):
    """For a checkpoint that records the digest of its tensors (every one ciss writes), recompute and compare it:
    an archive rewritten with changed tensors, or a legacy file with flipped bytes, is refused (UserError)."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(DIGEST_KEY), dict):
        return
    recorded = checkpoint[DIGEST_KEY]
    if recorded.get("algorithm") != DIGEST_ALGORITHM or recorded.get("tensors") != tensor_digest(checkpoint):
        raise UserError(f"checkpoint file {path} is damaged: its tensors do not match the digest recorded when ciss"
                        f" saved it: copy it again or retrain the step")


def load_checkpoint_file(path, map_location="cpu"):
    """Load a checkpoint with ``torch.load(weights_only=True)``, allowing only the numpy scalar types.

    Tensors, plain containers and numpy float64 scalars load (BARM/SSUL checkpoints from numpy 1.x
    and 2 included); anything else is refused rather than unpickled. The numpy allow-list needs
    ``torch.serialization.safe_globals`` (torch >= 2.5; numpy-1.x pickles on numpy 2 need torch >= 2.6);
    on older torch the file is read with plain ``weights_only=True``, so checkpoints holding numpy
    scalars then need a newer torch.

    Before anything is used the file is verified: a zip archive against its CRC-32 records
    (:func:`check_archive`), and a checkpoint ciss wrote against the digest of its tensors (:func:`check_digest`).

    Raises:
        UserError: the path is missing or a directory, the file is truncated, damaged or corrupt, or it
            needs Python objects beyond tensors, containers and numpy scalars.
    """
    if not os.path.exists(path):
        raise UserError(f"checkpoint file {path} does not exist: expected a .pth file saved with torch.save")
    if os.path.isdir(path):
        raise UserError(f"checkpoint path {path} is a directory: expected a .pth file saved with torch.save")
    with open(path, "rb") as handle:
        magic = handle.read(2)
    if magic not in TORCH_FILE_MAGICS:
        raise UserError(f"checkpoint file {path} is not a torch checkpoint ({'empty' if not magic else 'unknown format'}):"
                        f" expected a .pth file saved with torch.save")
    check_archive(path)
    try:
        if hasattr(torch.serialization, "safe_globals"):
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        else:
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except _READ_ERRORS as err:
        refused = _REFUSED_GLOBAL.search(str(err))
        if refused:  # torch's weights-only unpickler met a global outside the allow-list
            raise UserError(
                f"checkpoint file {path} holds the Python object {refused.group(1)}, which is not loaded for "
                "safety: expected tensors, plain containers and numpy scalars only"
            ) from err
        raise UserError(
            f"checkpoint file {path} could not be read ({_reason(err)}): expected an intact file saved with "
            "torch.save"
        ) from err
    check_digest(checkpoint, path)
    return checkpoint


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "ciss-1"


def save_atomic(obj, path):
    """``torch.save`` to a temporary file beside ``path``, then rename: a reader sees the old file or the
    new one, never a half-written one (an interrupted save leaves no file behind)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise UserError(f"cannot write {path} ({err.strerror or err}): check the free space and permissions of"
                        f" {folder}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(checkpoint, path):
    """:func:`save_atomic` of a checkpoint dict with the digest of its tensors recorded under
    :data:`DIGEST_KEY` (:func:`load_checkpoint_file` checks it)."""
    checkpoint = {**checkpoint, DIGEST_KEY: {"algorithm": DIGEST_ALGORITHM, "tensors": tensor_digest(checkpoint)}}
    save_atomic(checkpoint, path)


def strip_module_prefix(state_dict):
    """State dict keys without DataParallel/DDP's ``module.`` prefix (BARM/SSUL layout)."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


# --------------------------------------------------------------------------------------------------
# Random-number-generator states (for --resume)
# --------------------------------------------------------------------------------------------------

def rng_state():
    """The torch (CPU and CUDA), Python and numpy generator states, as plain containers and tensors."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), int(position), int(has_gauss), float(cached)),
    }


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
