"""Shared fixtures: the real media folder and tiny model sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT.parent / "shared" / "media"


@pytest.fixture(scope="session")
def media_dir() -> Path:
    """``../shared/media`` beside the checkout (real clips and photos with captions)."""
    if not MEDIA.is_dir():
        pytest.skip(f"real media folder {MEDIA} is absent (it sits beside the checkout in CI)")
    return MEDIA


@pytest.fixture(scope="session")
def link_media(media_dir):
    """Factory: ``link_media(folder, *names)`` -> ``folder`` (created if need be) holding symbolic
    links to the named files of :func:`media_dir` and to their ``.txt`` captions."""

    def link(folder: Path, *names: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            for n in (name, f"{Path(name).stem}.txt"):
                (folder / n).symlink_to(media_dir / n)
        return folder

    return link


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Factory: ``tiny_dir(task)`` -> folder with that task's tiny model set, made once a session."""
    made: dict[str, Path] = {}

    def make(task: str) -> Path:
        if task not in made:
            from wanlora.tools.tiny import make_tiny

            out = tmp_path_factory.mktemp(f"tiny-{task}")
            make_tiny(task, out)
            made[task] = out
        return made[task]

    return make


@pytest.fixture
def mounted_tmpfs(tmp_path):
    """Factory: ``mounted_tmpfs(size_kib, read_only=False)`` -> a folder that is a fresh tmpfs of
    that size (a real full disk / read-only file system); skipped with the reason when this
    process cannot mount (not root, or no mount privilege in the container). Unmounted after."""
    import subprocess

    mounts: list[Path] = []

    def make(size_kib: int, read_only: bool = False) -> Path:
        target = tmp_path / f"tmpfs{len(mounts)}"
        target.mkdir()
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root; the injected-OSError tests cover this case")
        opts = f"size={size_kib}k" + (",ro" if read_only else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(target)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
        mounts.append(target)
        return target

    yield make
    import gc

    gc.collect()  # tensors memory-mapped from files on the tmpfs keep it busy
    for m in reversed(mounts):
        if subprocess.run(["umount", str(m)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(m)], capture_output=True)  # detached now, freed when unused


@pytest.fixture
def fresh_accelerate():
    """One torch thread during the test, and accelerate's process-wide state (``AcceleratorState``
    and ``PartialState``) reset after it, so the next ``train`` in this process starts clean. A
    module of training tests takes it for each test: ``pytestmark = pytest.mark.usefixtures("fresh_accelerate")``."""
    import torch

    torch.set_num_threads(1)
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def free_port():
    """Factory: ``free_port()`` -> a TCP port free on 127.0.0.1 now, a new one each call: torchrun's
    ``--master_port`` or ``MASTER_PORT`` (a fixed port clashes with another torchrun test running at
    the same time on the machine; a retry after "address already in use" asks again)."""
    import socket

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick
