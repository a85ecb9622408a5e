"""The commands under ``torchrun`` with 2 CPU processes (gloo, float32) equal one process.

``wanlora-generate --ulysses_size 2`` (and with ``--dit_fsdp``) gives the final latent of one
process; the tiny DiT has 2 heads, and the 48x80-pixel, 9-frame video is 3x3x5 = 45 tokens, so
the sequence is padded and a chunk starts inside a frame.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from wanlora.commands.generate import main as generate_main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(module: str, args: list[str], nproc: int = 2) -> None:
    """``torchrun --nproc_per_node nproc -m module args`` on the CPU; raises with its output on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", module, *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def _flags(tiny_dir, task) -> list[str]:
    flags = json.loads((tiny_dir(task) / "manifest.json").read_text())["flags"]
    return [x for kv in flags.items() for x in kv]


def _latent(folder: Path):
    (path,) = sorted(folder.glob("*.safetensors"))
    return load_file(str(path))["latent"]


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_generate_ulysses_and_fsdp_equal_one_process(tiny_dir, tmp_path):
    common = _flags(tiny_dir, "t2v-1.3B") + [
        "--prompt", "a red ball bounces", "--video_size", "48", "80", "--video_length", "9",
        "--infer_steps", "3", "--seed", "7", "--output_type", "latent", "--device", "cpu"]
    assert generate_main(common + ["--save_path", str(tmp_path / "one")]) == 0
    one = _latent(tmp_path / "one")
    assert one.shape == (16, 3, 6, 10)

    r = torchrun("wanlora.commands.generate", common + ["--ulysses_size", "2", "--save_path", str(tmp_path / "sp")])
    assert "world 2 = 1 data-parallel × 2 sequence-parallel (Ulysses); FSDP2 sharded frozen DiT: off" in r.stderr
    assert _rel(_latent(tmp_path / "sp"), one) <= 1e-5

    torchrun("wanlora.commands.generate", common + ["--ulysses_size", "2", "--dit_fsdp", "--save_path",
                                                    str(tmp_path / "fsdp")])
    assert _rel(_latent(tmp_path / "fsdp"), one) <= 1e-5
