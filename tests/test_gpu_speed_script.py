"""benchmarks/gpu_speed.py: its FLOP formula gives the figures the speed work is measured
against, and the script runs end to end on tiny sizes (so the one-shot GPU run does not fail on a
typo after minutes of set-up)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_speed.py"
_spec = importlib.util.spec_from_file_location("gpu_speed", _PATH)
gpu_speed = importlib.util.module_from_spec(_spec)
sys.modules["gpu_speed"] = gpu_speed  # dataclasses look their module up there
_spec.loader.exec_module(gpu_speed)


def test_flop_formula_at_real_sizes():
    """A14B expert at 832x480x81: 32 760 tokens, ~4.25 PFLOP of model FLOPs per LoRA step, 63 %
    of them attention (80 % at 1280x720x81)."""
    arch = gpu_speed.ARCHS["A14B"]
    assert gpu_speed.token_grid(arch, gpu_speed.SIZES["480p"]) == (21, 30, 52)
    assert gpu_speed.token_grid(arch, gpu_speed.SIZES["720p"]) == (21, 45, 80)
    assert gpu_speed.token_grid(gpu_speed.ARCHS["5B"], gpu_speed.SIZES["480p"]) == (21, 15, 26)
    total = gpu_speed.train_flops(32760, 5120, 13824, 40)
    assert abs(total / 4.25e15 - 1) < 0.01
    for tokens, share in ((32760, 0.63), (75600, 0.80)):
        linear, attn = gpu_speed.block_flops(tokens, 5120, 13824)
        assert abs(3 * attn / (2 * linear + 3 * attn) - share) < 0.01
    # a forward of one Linear of one block, by hand: q projection = 2·L·D² of the 12·L·D² term
    linear, _ = gpu_speed.block_flops(10, 8, 16, text_len=4)
    assert linear == 12 * 10 * 64 + 4 * 4 * 64 + 4 * 10 * 8 * 16


def test_script_runs_on_tiny_sizes(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "rows.json"
    gpu_speed.main(["--tiny", "--device", "cpu", "--no_compile", "--attn_modes", "sdpa,sage",
                    "--sections", "block,step,generate,sync", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    done = {(r["section"], r["config"]) for r in rows if r.get("s", 0) > 0}
    assert {c for s, c in done if s.startswith("A14B block")} == {
        f"{size} eager sdpa{fp8}" for size in ("480p", "720p") for fp8 in ("", " fp8_scaled", " fp8_compute")}
    assert {s for s, c in done} >= {"1.3B training step (checkpointed)", "5B training step (checkpointed)",
                                    "A14B expert generation step (CFG batched)"}
    errors = {r["config"]: r["error"] for r in rows if "error" in r}
    assert "no backward" in errors["480p eager sage"]  # refused as training refuses it
    assert errors["1.3B 480p"] == "ValueError: needs CUDA"
    assert errors["1.3B widths, 4 blocks, 480p, train()"] == "ValueError: needs CUDA"
