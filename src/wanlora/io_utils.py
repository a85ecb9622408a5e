"""Atomic file writes: every file the project writes goes through here.

A file is written under a temporary name in the destination folder, flushed to disk and renamed
over the final name (``os.replace`` is atomic on POSIX and Windows), so a crash never leaves a
half-written cache, LoRA, video or training state behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from safetensors.torch import save_file

def _file_mode() -> int:
    # os.umask can only be read by setting it; done once, at import, not per write (threads).
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()

__all__ = ["SaveError", "atomic_path", "atomic_paths", "emergency_dirs", "os_error_fix", "save_error", "save_files",
           "save_safetensors", "save_torch_state_dict", "write_json", "write_text"]


class SaveError(ValueError):
    """A write that failed for a reason the user can fix (disk full, permissions, read-only).

    One line: what was being saved, where, the cause and the fix; ``saved_to`` is the folder an
    emergency copy went to (:func:`save_files`), or None. A ``ValueError``, so every command
    prints it as one line (:mod:`wanlora.commands.cli`).
    """

    def __init__(self, message: str, path: Path | None = None, saved_to: Path | None = None):
        super().__init__(message)
        self.path, self.saved_to = path, saved_to


_FIXES = {
    errno.ENOSPC: "no space left on the device: free space there or choose a folder on another disk",
    errno.EDQUOT: "disk quota exceeded: free space in your quota or choose a folder on another disk",
    errno.EACCES: "permission denied: make the folder writable (chmod u+w) or choose another folder",
    errno.EPERM: "operation not permitted: make the folder writable or choose another folder",
    errno.EROFS: "the file system is read-only: choose a folder on a writable disk",
    errno.ENOTDIR: "a path component is a file, not a folder: choose another path",
    errno.EISDIR: "the path is a folder: give a file name",
    errno.ENAMETOOLONG: "the file name is too long: choose a shorter --output_name or folder",
}


def os_error_fix(e: OSError, path: str | os.PathLike) -> str:
    """The cause and the fix of a write error, in words: free space for ENOSPC/EDQUOT (with the
    free space of ``path``'s disk), permissions for EACCES/EPERM/EROFS, else the system's message."""
    fix = _FIXES.get(e.errno) or f"{e.strerror or e}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        with contextlib.suppress(OSError):
            folder = next((p for p in (Path(path), *Path(path).parents) if p.is_dir()), Path("."))
            fix += f" ({shutil.disk_usage(folder).free / 2**30:.1f} GiB free in {folder})"
    return fix


def save_error(e: OSError, what: str, path: str | os.PathLike) -> SaveError:
    """The one-line :class:`SaveError` for ``e`` raised while writing ``what`` (e.g. ``"LoRA"``)
    to ``path``: ``cannot save <what> to <path>: <cause and fix>`` (:func:`os_error_fix`)."""
    return SaveError(f"cannot save {what} to {path}: {os_error_fix(e, path)}", Path(path))


def emergency_dirs(primary: str | os.PathLike) -> list[Path]:
    """Folders to try when a save into ``primary`` fails, in order: ``$WANLORA_EMERGENCY_DIR``
    (when set), the current folder, the home folder, the system's temporary folder — without
    ``primary`` itself and without duplicates."""
    cands = [os.environ.get("WANLORA_EMERGENCY_DIR"), os.getcwd(), os.path.expanduser("~"), tempfile.gettempdir()]
    seen, out = {Path(primary).resolve()}, []
    for c in cands:
        if c:
            p = Path(c).resolve()
            if p not in seen:
                seen.add(p)
                out.append(p)
    return out


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


@contextlib.contextmanager
def atomic_paths(paths: Sequence[str | os.PathLike]) -> Iterator[list[Path]]:
    """All-or-nothing writes of several files: yield a temporary path next to each of ``paths``;
    when the block succeeds, flush every file and only then rename them all into place.

    On an exception in the block (a disk filling up at the second file, a kill) every temporary
    file is removed and no file of ``paths`` is touched: a two-expert LoRA pair is written whole
    or not at all. Renames are metadata-only operations in one folder, the step a full disk does
    not fail.
    """
    paths = [Path(p) for p in paths]
    tmps: list[Path] = []
    try:
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{p.stem}.tmp.", suffix=p.suffix, dir=p.parent)
            os.close(fd)
            tmps.append(Path(tmp))
        yield list(tmps)
        for t in tmps:
            with open(t, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(t, _FILE_MODE)
        for t, p in zip(tmps, paths):
            os.replace(t, p)
    except BaseException:
        for t in tmps:
            with contextlib.suppress(FileNotFoundError):
                t.unlink()
        raise


def save_files(writers: dict[str | os.PathLike, Callable[[Path], None]], what: str = "files",
               fallback_dirs: Sequence[str | os.PathLike] | None = None) -> list[Path]:
    """Write several files all-or-nothing (:func:`atomic_paths`); if that fails with an
    ``OSError`` (disk full, permissions), write them into the first of ``fallback_dirs`` that
    works, under the same names, and raise.

    Args:
        writers: ``{final path: write(path)}``; ``write`` writes the whole file to the path given
            (a temporary one).
        what: what the files are, for the message (``"LoRA weights"``).
        fallback_dirs: folders for an emergency copy (default :func:`emergency_dirs` of the first
            file's folder); ``()`` for none.
    Returns:
        The final paths, written.
    Raises:
        SaveError: one line with the cause and the fix (:func:`save_error`), and where the
            emergency copy went (``saved_to``) or that none could be written. Other exceptions
            propagate unchanged, with no file written.
    """
    paths = [Path(p) for p in writers]
    try:
        with atomic_paths(paths) as tmps:
            for write, tmp in zip(writers.values(), tmps):
                write(tmp)
        return paths
    except OSError as e:
        err = save_error(e, what, paths[0] if len(paths) == 1 else paths[0].parent)
    if fallback_dirs is None:
        fallback_dirs = emergency_dirs(paths[0].parent)
    for d in fallback_dirs:
        targets = [Path(d) / p.name for p in paths]
        if any(t.exists() for t in targets):
            targets = [Path(d) / f"{p.stem}-emergency{p.suffix}" for p in paths]
        try:
            with atomic_paths(targets) as tmps:
                for write, tmp in zip(writers.values(), tmps):
                    write(tmp)
        except OSError:
            continue
        names = ", ".join(t.name for t in targets)
        raise SaveError(f"{err}; the {what} were saved to {d} instead ({names})", err.path, Path(d)) from None
    raise SaveError(f"{err}; no emergency copy could be written either", err.path) from None


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` to a ``.safetensors`` file atomically.

    Tensors are made contiguous and moved to the CPU; metadata values must be strings (the
    safetensors header format).

    Raises:
        OSError: the write failed (disk full, permissions, ...) with its ``errno`` — safetensors'
            own error type for I/O failures is turned back into the ``OSError`` it reports.
    """
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except Exception as e:  # safetensors reports I/O errors as its own type: "... (os error 28)"
            m = re.search(r"os error (\d+)", str(e))
            if m is None:
                raise
            code = int(m.group(1))
            raise OSError(code, os.strerror(code), str(tmp)) from None


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
