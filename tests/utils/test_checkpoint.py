"""utils/checkpoint.py: safe checkpoint loading (BARM utils/ckpt.py::save_ckpt files, loaded on torch >= 2.6:
docs/differences.md), unreadable files as one-line user errors; every checkpoint verified before use (zip CRC-32
records, the digest of the tensors a ciss checkpoint records), a damaged file one UserError naming it."""
import io
import os
import zipfile

import numpy as np
import pytest
import torch

from utils.checkpoint import DIGEST_KEY, load_checkpoint_file, save_checkpoint, tensor_digest
from utils.errors import UserError


# ------------------------------------------------------------------------------------------------
# load_checkpoint_file
# ------------------------------------------------------------------------------------------------

def barm_checkpoint():
    return {
        "model_state": {"backbone.conv1.weight": torch.arange(6.0).reshape(1, 1, 2, 3)},
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0]}]},
        "best_score": np.float64(0.6123),
    }


def test_barm_checkpoint_with_numpy_score_loads(tmp_path):
    path = tmp_path / "step0.pth"
    torch.save(barm_checkpoint(), path)
    loaded = load_checkpoint_file(str(path))
    assert isinstance(loaded["best_score"], np.float64) and loaded["best_score"] == 0.6123
    assert torch.equal(loaded["model_state"]["backbone.conv1.weight"], torch.arange(6.0).reshape(1, 1, 2, 3))
    assert loaded["optimizer_state"]["param_groups"][0]["lr"] == 0.01


def test_numpy1_pickled_scalar_loads(tmp_path):
    """A checkpoint whose pickle names ``numpy.core.multiarray.scalar``, as numpy 1.x writes it."""
    buffer = io.BytesIO()
    torch.save(barm_checkpoint(), buffer)
    rewritten = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source, \
            zipfile.ZipFile(rewritten, "w", zipfile.ZIP_STORED) as target:
        for name in source.namelist():
            data = source.read(name)
            if name.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
                assert b"numpy.core.multiarray\nscalar" in data
            target.writestr(name, data)
    path = tmp_path / "numpy1.pth"
    path.write_bytes(rewritten.getvalue())
    loaded = load_checkpoint_file(str(path))
    assert loaded["best_score"] == 0.6123


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_with_other_globals_is_refused(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    torch.save({"model_state": {}, "payload": _RunsACommand(marker)}, path)
    with pytest.raises(UserError, match=r"evil\.pth holds the Python object \S*system"):
        load_checkpoint_file(str(path))
    assert not marker.exists()


def test_unreadable_checkpoints_raise_user_error(tmp_path):
    path = tmp_path / "full.pth"
    torch.save(barm_checkpoint(), path)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match=r"truncated\.pth.*could not be read"):
        load_checkpoint_file(str(truncated))
    with pytest.raises(UserError, match=r"missing\.pth does not exist"):
        load_checkpoint_file(str(tmp_path / "missing.pth"))
    with pytest.raises(UserError, match="is a directory"):
        load_checkpoint_file(str(tmp_path))


def small_checkpoint():
    generator = torch.Generator().manual_seed(0)
    return {"model_state": {"w": torch.randn(64, 64, generator=generator), "b": torch.zeros(64)},
            "method_state": {"stats": [torch.ones(3), {"f": torch.arange(5)}]}, "epoch": 3, "method": "ft"}


def flip_middle_bytes(path, count=16):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(count):
        data[middle + i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_saved_checkpoint_records_the_digest_of_its_tensors_and_loads(tmp_path):
    path = tmp_path / "final.pth"
    checkpoint = small_checkpoint()
    save_checkpoint(checkpoint, str(path))
    loaded = load_checkpoint_file(str(path))
    assert loaded[DIGEST_KEY]["algorithm"] == "sha256"
    assert loaded[DIGEST_KEY]["tensors"] == tensor_digest(checkpoint)
    assert torch.equal(loaded["model_state"]["w"], checkpoint["model_state"]["w"]) and loaded["epoch"] == 3
    assert DIGEST_KEY not in checkpoint  # the caller's dict is not modified


def test_the_digest_sees_every_tensor_its_place_and_its_dtype():
    base = small_checkpoint()
    digest = tensor_digest(base)
    changed = small_checkpoint()
    changed["method_state"]["stats"][1]["f"][2] = 7  # a nested tensor
    assert tensor_digest(changed) != digest
    renamed = small_checkpoint()
    renamed["model_state"] = {"v": renamed["model_state"]["w"], "b": renamed["model_state"]["b"]}
    assert tensor_digest(renamed) != digest
    retyped = small_checkpoint()
    retyped["model_state"]["b"] = retyped["model_state"]["b"].double()
    assert tensor_digest(retyped) != digest
    assert tensor_digest({**base, "epoch": 4}) == digest  # plain values are not tensors
    assert tensor_digest({**base, DIGEST_KEY: {"tensors": "x"}}) == digest  # the digest itself is left out


def test_flipped_bytes_in_a_zip_archive_name_the_damaged_member(tmp_path):
    path = tmp_path / "final.pth"
    save_checkpoint(small_checkpoint(), str(path))
    assert zipfile.is_zipfile(path)
    flip_middle_bytes(path)
    with pytest.raises(UserError, match=r"final\.pth is damaged: its member .*data/.* fails its CRC-32 check"):
        load_checkpoint_file(str(path))


def test_flipped_bytes_in_a_legacy_file_fail_the_digest(tmp_path):
    path = tmp_path / "legacy.pth"
    checkpoint = small_checkpoint()
    checkpoint[DIGEST_KEY] = {"algorithm": "sha256", "tensors": tensor_digest(checkpoint)}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False)  # no CRC records
    assert not zipfile.is_zipfile(path) and load_checkpoint_file(str(path))["epoch"] == 3
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="legacy.pth is damaged: its tensors do not match the digest"):
        load_checkpoint_file(str(path))


def test_an_intact_archive_with_a_changed_tensor_fails_the_digest(tmp_path):
    path = tmp_path / "final.pth"
    save_checkpoint(small_checkpoint(), str(path))
    tampered = torch.load(path, weights_only=True)
    tampered["model_state"]["w"][0, 0] += 1.0
    torch.save(tampered, path)  # a valid archive again, with the recorded digest of the original tensors
    assert zipfile.ZipFile(path).testzip() is None
    with pytest.raises(UserError, match="is damaged: its tensors do not match the digest recorded"):
        load_checkpoint_file(str(path))


def test_reference_checkpoints_without_a_digest_get_the_archive_check(tmp_path):
    path = tmp_path / "reference.pth"
    torch.save({"model_state": {"module.w": torch.ones(4)}}, path)  # as the reference repositories save
    assert torch.equal(load_checkpoint_file(str(path))["model_state"]["module.w"], torch.ones(4))
    flip_middle_bytes(path, count=2)
    with pytest.raises(UserError, match="reference.pth"):
        load_checkpoint_file(str(path))
