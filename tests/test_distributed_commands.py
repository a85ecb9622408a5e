"""The commands under ``torchrun`` with 2 CPU processes (gloo, float32) equal one process.

``wanlora-generate --ulysses_size 2`` (and with ``--dit_fsdp``) gives the final latent of one
process; the tiny DiT has 2 heads, and the 48x80-pixel, 9-frame video is 3x3x5 = 45 tokens, so
the sequence is padded and a chunk starts inside a frame.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tiny_runs import train_argv
from wanlora.commands.generate import main as generate_main


def torchrun(module: str, args: list[str], port: int, nproc: int = 2) -> None:
    """``torchrun --nproc_per_node nproc --master_port port -m module args`` on the CPU; raises with its
    output on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", module, *args]
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


def test_generate_ulysses_and_fsdp_equal_one_process(tiny_dir, tmp_path, free_port):
    common = _flags(tiny_dir, "t2v-1.3B") + [
        "--prompt", "a red ball bounces", "--video_size", "48", "80", "--video_length", "9",
        "--infer_steps", "3", "--seed", "7", "--output_type", "latent", "--device", "cpu"]
    assert generate_main(common + ["--save_path", str(tmp_path / "one")]) == 0
    one = _latent(tmp_path / "one")
    assert one.shape == (16, 3, 6, 10)

    r = torchrun("wanlora.commands.generate", common + ["--ulysses_size", "2", "--save_path", str(tmp_path / "sp")],
                 free_port())
    assert "world 2 = 1 data-parallel × 2 sequence-parallel (Ulysses); FSDP2 sharded frozen DiT: off" in r.stderr
    assert _rel(_latent(tmp_path / "sp"), one) <= 1e-5

    torchrun("wanlora.commands.generate", common + ["--ulysses_size", "2", "--dit_fsdp", "--save_path",
                                                    str(tmp_path / "fsdp")], free_port())
    assert _rel(_latent(tmp_path / "fsdp"), one) <= 1e-5


# ---- training -------------------------------------------------------------------------------------

PROBE = Path(__file__).with_name("distributed_train_probe.py")


def _train_flags(tiny_dir, out: Path, *extra: str) -> list[str]:
    flags = json.loads((tiny_dir("t2v-1.3B") / "manifest.json").read_text())["flags"]
    return train_argv(flags, out, "--max_train_steps", "4", *extra, lr="1e-2")


def _lora(out: Path) -> dict:
    return load_file(str(out / "lora.safetensors"))


def _run_probe(args: list[str], nproc: int, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(PROBE.parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(port), str(PROBE), *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def _max_rel(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(_rel(a[k].double(), b[k].double()) for k in a if b[k].norm() > 0)


def test_train_ulysses_equals_one_process(tiny_dir, tmp_path, free_port):
    _run_probe(_train_flags(tiny_dir, tmp_path / "one"), 1, free_port())
    r = _run_probe(_train_flags(tiny_dir, tmp_path / "sp", "--ulysses_size", "2"), 2, free_port())
    assert "world 2 = 1 data-parallel × 2 sequence-parallel (Ulysses); FSDP2 sharded frozen DiT: off" in r.stderr
    one, sp = _lora(tmp_path / "one"), _lora(tmp_path / "sp")
    assert _max_rel(sp, one) <= 1e-4
    ups = [v for k, v in one.items() if "lora_up" in k]  # zero at the start: it trained
    assert ups and all(v.norm() > 0 for v in ups)


def test_train_fsdp_equals_ddp(tiny_dir, tmp_path, free_port):
    _run_probe(_train_flags(tiny_dir, tmp_path / "ddp"), 2, free_port())
    r = _run_probe(_train_flags(tiny_dir, tmp_path / "fsdp", "--dit_fsdp"), 2, free_port())
    assert "world 2 = 2 data-parallel × 1 sequence-parallel (Ulysses); FSDP2 sharded frozen DiT: on" in r.stderr
    assert _max_rel(_lora(tmp_path / "fsdp"), _lora(tmp_path / "ddp")) <= 1e-5


def test_layout_errors_are_one_line(tiny_dir, tmp_path, capsys, monkeypatch):
    from accelerate.state import AcceleratorState

    from tests.distributed_train_probe import SeqBatches
    from wanlora.commands.train import parse_config
    from wanlora.training.trainer import train

    monkeypatch.delenv("WANLORA_TRACEBACK", raising=False)
    flags = _flags(tiny_dir, "t2v-1.3B") + ["--output_type", "latent", "--save_path", str(tmp_path / "g")]
    with pytest.raises(SystemExit) as e:  # a flag error: argparse's usage and one line
        generate_main(flags + ["--interactive", "--ulysses_size", "2"])
    assert e.value.code == 2
    assert "--interactive reads one terminal: it runs in one process" in capsys.readouterr().err
    assert generate_main(flags + ["--prompt", "a ball", "--ulysses_size", "2"]) == 2
    assert "error: --ulysses_size 2 needs several processes: launch with `torchrun" in capsys.readouterr().err

    a14b = json.loads((tiny_dir("t2v-A14B") / "manifest.json").read_text())["flags"]
    argv = ["--task", "t2v-A14B", "--dit", a14b["--dit"], "--dataset_config", "unused.toml", "--output_dir",
            str(tmp_path / "t"), "--max_train_steps", "1", "--dit_fsdp"]
    try:
        with pytest.raises(ValueError, match="--dit_fsdp trains one A14B expert per run"):
            train(parse_config(argv + ["--dit_high_noise", a14b["--dit_high_noise"]]), dataset=SeqBatches())
        AcceleratorState._reset_state(reset_partial_state=True)
        with pytest.raises(ValueError, match="--dit_fsdp needs several processes"):
            train(parse_config(argv), dataset=SeqBatches())
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
