"""The example ``configs/accelerate_*.yaml`` load in Accelerate and fit the distributed flags.

Each must load with Accelerate's own config reader (unknown keys fail), use plain DDP
(``MULTI_GPU``: wanlora shards the DiT itself with ``--dit_fsdp``, Accelerate's FSDP mode would wrap
the LoRA wrapper instead), give every machine the same number of processes, and its comment's
command must parse with ``wanlora.train``'s parser, its ``--ulysses_size`` dividing the processes of
one machine.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig

from wanlora.commands.train import parse_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("accelerate_*.yaml"))


def _command(path: Path) -> list[str]:
    """The ``-m wanlora.train`` flags of the file's comment (continuation lines joined)."""
    text = " ".join(line.lstrip("# ").rstrip("\\ ") for line in path.read_text().splitlines() if line.startswith("#"))
    m = re.search(r"-m wanlora\.train (.+?)(?:\s(?:#|Keep|distributed_type|Run)|$)", text)
    assert m, f"{path.name}: no `-m wanlora.train ...` command in its comment"
    flags = re.sub(r"\[--ulysses_size [^\]]*\]", "--ulysses_size 2", m.group(1))
    return shlex.split(flags.replace("[--dit_fsdp]", "--dit_fsdp"))


def test_there_are_examples():
    assert {p.name for p in CONFIGS} >= {"accelerate_1node_8gpu.yaml", "accelerate_2node_16gpu.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_config(path, monkeypatch):
    monkeypatch.chdir(path.parents[1])  # the commands name configs/... from the repository root
    cfg = ClusterConfig.from_yaml_file(str(path))
    assert str(cfg.distributed_type).endswith("MULTI_GPU") and not cfg.fsdp_config
    assert cfg.num_processes % cfg.num_machines == 0
    per_machine = cfg.num_processes // cfg.num_machines
    config = parse_config(_command(path))
    assert config.launch.dit_fsdp or config.launch.ulysses_size > 1
    assert per_machine % config.launch.ulysses_size == 0, "a sequence group must stay on one machine"
