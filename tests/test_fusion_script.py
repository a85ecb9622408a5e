"""benchmarks/fusion.py end to end on toy sizes, as a user runs it: the compiled block launches
fewer non-matmul kernels and moves fewer bytes than eager, with the same matmul/attention calls,
and the eager counts find the dtype casts and RoPE's operators."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fusion.py"


def test_compiled_block_fuses_on_toy_sizes(tmp_path):
    out = tmp_path / "fusion.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--rank", "4", "--compile_grids",
                          "1", "4", "4", "1", "4", "8", "--out", str(out)],
                         check=False, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(out.read_text())
    assert "| non-matmul kernels per block, fwd+bwd |" in run.stdout
    small = [str(n) for n in r["compiled_tokens"]]
    assert small == ["16", "32"]
    for phase in ("forward", "backward"):
        eager, compiled = r["eager"][phase], r["compiled"][phase]
        for n in small:
            # the same matmuls and attention calls on both sides: the split is consistent
            assert compiled["extern"][n] == eager["extern"][n] > 0
            assert 0 < compiled["other"][n] < eager["other"][n]
            assert 0 < compiled["other_bytes"][n] < eager["other_bytes"][n]
            assert compiled["generated"][n] > 0 and compiled["num_bytes_accessed"][n] > compiled["other_bytes"][n]
        assert eager["casts"][small[0]] > 0 and eager["rope"][small[0]] > 0
        # bytes grow linearly in tokens: the fit through 16 and 32 tokens meets eager's count at 64
        assert str(r["tokens"]) in eager["other_bytes"] and eager["fit_error"] < 0.01
        assert compiled["block_bytes_extrapolated"] and not eager["block_bytes_extrapolated"]
        assert 0 < compiled["block_bytes"] < eager["block_bytes"]
    # forward: 10 Linear layers with a LoRA (base + down + up) and two attention calls
    assert r["eager"]["forward"]["extern"][small[0]] == 10 * 3 + 2
