"""Measure the activation memory of one Wan DiT block per token, on the CPU, at the real widths.

For each DiT family (A14B/14B: D=5120, TI2V-5B: D=3072, 1.3B: D=1536) one block with random
weights in the compute dtype (bf16) and a LoRA of rank 32 on its ten Linear layers runs at several
token counts; a dispatch-mode tracker (:class:`LiveBytes`) follows the storage of every tensor the
block's operators create until it is freed and reports the peak of their sum (activations and
temporaries; the weights exist before and are not counted):

* ``train``: forward with autograd then backward (what one block costs inside a gradient-
  checkpointed step: its recomputation and backward), input ``[1, T, D]`` float32;
* ``infer``: forward under ``torch.no_grad`` (one block of a generation step).

The text context is 512 rows (padded umT5), the SDPA attention kernel the one PyTorch picks on
the CPU (a fused kernel, memory linear in T, as flash/cuDNN attention on CUDA). A least-squares
line ``bytes = a·T + b`` is fitted per family and mode and printed with its largest relative
residual; ``wanlora.training.memory`` carries the fitted constants.

    python benchmarks/activation_memory.py [--tokens 128 256 512 768] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

FAMILIES = {"14B": (5120, 13824), "5B": (3072, 14336), "1.3B": (1536, 8960)}


class LiveBytes(TorchDispatchMode):
    """Live bytes of the storages created by operators inside the mode, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = WeakIdKeyDictionary()
        self.current = self.peak = 0

    def _free(self, n: int) -> None:
        self.current -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                if st not in self.live:
                    n = st.nbytes()
                    self.live[st] = n
                    weakref.finalize(st, self._free, n)
                    self.current += n
                    self.peak = max(self.peak, self.current)
        return out


def measure(dim: int, ffn: int, tokens: int, train: bool, rank: int = 32, dtype=torch.bfloat16) -> int:
    """Peak activation + temporary bytes of one block at ``tokens`` tokens (batch 1)."""
    from wanlora.models.dit import WanBlock, rope_tables
    from wanlora.lora.adapter import LoRAModule

    torch.manual_seed(0)
    block = WanBlock(dim, ffn, dim // 128).to(dtype)
    for m in (block.norm3, ):
        m.float()
    block.modulation.data = block.modulation.data.float()
    block.requires_grad_(False)
    loras = []
    for name, lin in block.named_modules():
        if isinstance(lin, torch.nn.Linear):
            lora = LoRAModule(name, lin, lora_dim=rank, alpha=rank)
            torch.nn.init.normal_(lora.lora_up.weight, std=1e-3)
            lora.apply_to()
            loras.append(lora)
    w = tokens // 8
    grid = (1, 8, w)
    rope = rope_tables(grid, 128)
    x = torch.randn(1, 8 * w, dim, requires_grad=train)
    e0 = torch.randn(1, 1, 6, dim) * 0.1
    ctx = torch.randn(1, 512, dim, dtype=dtype)
    tracker = LiveBytes()
    with tracker:
        if train:
            out = block(x, e0, ctx, rope, dtype, "sdpa")
            out.float().square().mean().backward()
        else:
            with torch.no_grad():
                out = block(x, e0, ctx, rope, dtype, "sdpa")
        del out
    return tracker.peak


def fit(points: list[tuple[int, int]]) -> dict:
    """Least-squares ``bytes = a·T + b`` with the largest relative residual."""
    t = torch.tensor([p[0] for p in points], dtype=torch.float64)
    y = torch.tensor([p[1] for p in points], dtype=torch.float64)
    a_mat = torch.stack([t, torch.ones_like(t)], 1)
    sol = torch.linalg.lstsq(a_mat, y[:, None]).solution[:, 0]
    pred = a_mat @ sol
    return {"per_token": float(sol[0]), "constant": float(sol[1]),
            "max_rel_residual": float(((pred - y).abs() / y).max())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 256, 512, 768])
    p.add_argument("--families", nargs="+", default=list(FAMILIES))
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}", "families": {}}
    for fam in args.families:
        dim, ffn = FAMILIES[fam]
        res = {}
        for mode in ("train", "infer"):
            pts = []
            for t in args.tokens:
                t0 = time.perf_counter()
                b = measure(dim, ffn, t, mode == "train")
                pts.append((t, b))
                print(f"{fam:5s} {mode:5s} T={t:5d}: {b / 2**20:9.1f} MiB  ({time.perf_counter() - t0:.0f}s)",
                      flush=True)
            f = fit(pts)
            res[mode] = {"points": pts, **f}
            print(f"{fam:5s} {mode:5s} fit: {f['per_token'] / 1024:.2f} KiB/token + "
                  f"{f['constant'] / 2**20:.1f} MiB, max residual {100 * f['max_rel_residual']:.2f} %", flush=True)
        out["families"][fam] = res
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
