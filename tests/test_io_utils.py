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
