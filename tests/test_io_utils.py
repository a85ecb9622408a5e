"""Atomic writes: the final file appears whole or not at all, with the usual permissions."""

import os

import pytest
import torch
from safetensors.torch import load_file

from wanlora.io_utils import atomic_path, save_safetensors, write_json


def test_failed_write_leaves_previous_file_and_no_temp(tmp_path):
    target = tmp_path / "state.json"
    write_json(target, {"step": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("{half")
            raise RuntimeError("crash mid-write")
    assert target.read_text().strip().startswith("{") and '"step": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_safetensors_round_trip_and_permissions(tmp_path):
    path = tmp_path / "sub" / "x.safetensors"
    save_safetensors({"a": torch.arange(4.0)}, path, {"k": "v"})
    assert torch.equal(load_file(path)["a"], torch.arange(4.0))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# ---- several files, all or nothing; save errors with the fix; emergency copies


def _writer(data: bytes, fail: OSError | None = None):
    def write(path):
        if fail is not None and "out" in path.parts:  # fails only in the primary folder
            raise fail
        path.write_bytes(data)
    return write


def test_a_pair_is_written_whole_or_not_at_all(tmp_path):
    from wanlora.io_utils import atomic_paths

    a, b = tmp_path / "lora_high_noise.safetensors", tmp_path / "lora_low_noise.safetensors"
    a.write_bytes(b"old-a")
    with pytest.raises(OSError):
        with atomic_paths([a, b]) as (ta, tb):
            ta.write_bytes(b"new-a")
            raise OSError(28, "No space left on device")  # the disk fills at the second file
    assert a.read_bytes() == b"old-a" and not b.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [a.name]
    with atomic_paths([a, b]) as (ta, tb):
        ta.write_bytes(b"new-a")
        tb.write_bytes(b"new-b")
    assert a.read_bytes() == b"new-a" and b.read_bytes() == b"new-b"
    assert sorted(p.name for p in tmp_path.iterdir()) == [a.name, b.name]


@pytest.mark.parametrize("err, fix", [
    (OSError(28, "No space left on device"), "no space left on the device: free space there"),
    (PermissionError(13, "Permission denied"), "permission denied: make the folder writable (chmod u+w)"),
    (OSError(30, "Read-only file system"), "the file system is read-only: choose a folder on a writable disk"),
])
def test_a_failed_save_keeps_the_weights_elsewhere_and_says_where(tmp_path, err, fix):
    from wanlora.io_utils import SaveError, save_files

    out, spare = tmp_path / "out", tmp_path / "spare"
    out.mkdir()
    spare.mkdir()
    files = {out / "x_high_noise.safetensors": _writer(b"H", err), out / "x_low_noise.safetensors": _writer(b"L")}
    with pytest.raises(SaveError) as e:
        save_files(files, "LoRA weights", fallback_dirs=[spare])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cannot save LoRA weights to {out}: {fix}")
    assert msg.endswith(f"the LoRA weights were saved to {spare} instead "
                        "(x_high_noise.safetensors, x_low_noise.safetensors)")
    assert e.value.saved_to == spare and list(out.iterdir()) == []
    assert (spare / "x_high_noise.safetensors").read_bytes() == b"H"
    assert (spare / "x_low_noise.safetensors").read_bytes() == b"L"
    # no folder works: says so, still one line
    with pytest.raises(SaveError, match="no emergency copy could be written either$"):
        save_files(files, "LoRA weights", fallback_dirs=[])


def test_emergency_dirs_skip_the_failed_folder(tmp_path, monkeypatch):
    from wanlora.io_utils import emergency_dirs

    monkeypatch.setenv("WANLORA_EMERGENCY_DIR", str(tmp_path / "e"))
    monkeypatch.chdir(tmp_path)
    dirs = emergency_dirs(tmp_path)
    assert dirs[0] == (tmp_path / "e").resolve() and tmp_path.resolve() not in dirs
