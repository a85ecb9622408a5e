"""benchmarks/input_pipeline.py runs end to end on tiny sizes: real caches, the trainer's loader,
the data wait the training loop measures."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "input_pipeline.py"
_spec = importlib.util.spec_from_file_location("input_pipeline", _PATH)
input_pipeline = importlib.util.module_from_spec(_spec)
sys.modules["input_pipeline"] = input_pipeline
_spec.loader.exec_module(input_pipeline)


def test_script_runs_on_tiny_sizes(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "rows.json"
    input_pipeline.main(["--work", str(tmp_path / "work"), "--resolution", "64", "64", "--frames", "9",
                         "--steps", "3", "--warmup", "1", "--workers", "--epochs", "1", "--json", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["workers"] == 0 and row["loader"]["batches"] == 5 and row["loader"]["batches_per_s"] > 0
    t = row["training"]
    assert t["steps"] == 3 and 0 <= t["data_wait_s_mean"] <= t["data_wait_s_max"] < t["s_per_step"]
