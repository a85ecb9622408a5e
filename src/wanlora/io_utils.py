"""Atomic file writes: every file the project writes goes through here.

A file is written under a temporary name in the destination folder, flushed to disk and renamed
over the final name (``os.replace`` is atomic on POSIX and Windows), so a crash never leaves a
half-written cache, LoRA, video or training state behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

def _file_mode() -> int:
    # os.umask can only be read by setting it; done once, at import, not per write (threads).
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()

__all__ = ["atomic_path", "save_safetensors", "save_torch_state_dict", "write_json", "write_text"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``.

    The temporary file keeps ``path``'s suffix (or ``suffix``) so libraries that pick a format
    from the extension (PyAV, Pillow) still work. On an exception the temporary file is removed
    and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.stem}.tmp.", suffix=path.suffix if suffix is None else suffix, dir=path.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp (and some writers) create 0600; give the file the permissions a plain open()
        # would have given it.
        os.chmod(tmp_path, _FILE_MODE)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` to a ``.safetensors`` file atomically.

    Tensors are made contiguous and moved to the CPU; metadata values must be strings (the
    safetensors header format).
    """
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def save_torch_state_dict(state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a state dict as a ``.pth`` file (``torch.save``), atomically and reproducibly.

    Saved through a file object, so the zip archive's inner name does not depend on the temporary
    file's name and the same tensors always give the same bytes. Tensors are moved to the CPU and
    made contiguous. Read back with ``torch.load(path, weights_only=True)``.
    """
    sd = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(sd, f)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented UTF-8 JSON atomically."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
