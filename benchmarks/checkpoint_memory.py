"""Peak memory of a gradient-checkpointed LoRA step: our DiT against diffusers' WanTransformer3DModel.

Both models are built at a real size (default: Wan2.1 T2V-1.3B) under ``FakeTensorMode``, so
nothing is computed and nothing is allocated: every operator's output storages are counted while
they live (a ``TorchDispatchMode`` with weak references to the storages), which gives the peak of
live tensor bytes exactly as a caching allocator without fragmentation would see it, in seconds
and at any size, on any machine. Both sides run the same step: the same LoRA (rank 32 on the 10
Linear layers of every block, float32), gradient checkpointing per block, the same latents and
text, a float32 MSE loss, ``backward()``. What each side saves for backward outside the recomputed
blocks is listed by shape and dtype (``saved_tensors_hooks``).

    python benchmarks/checkpoint_memory.py                      # 1.3B, 1950 tokens, float32 weights
    python benchmarks/checkpoint_memory.py --dtype bf16         # bf16 weights, bf16 autocast
    python benchmarks/checkpoint_memory.py --dtype bf16 --segments 5   # two-level checkpointing

(1950 tokens = latent grid 5x15x26: 17 frames at 240x416.)
"""

from __future__ import annotations

import argparse
import sys
import weakref
from collections import Counter

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from wanlora.models.dit import WanDiT, WanDiTConfig
from wanlora.models.loading import cast_dit
from wanlora.networks.lora import LoRAModule

PRESETS = {"1.3B": (1536, 8960, 12, 30), "5B": (3072, 14336, 24, 30), "14B": (5120, 13824, 40, 40)}
TARGETS_OURS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
TARGETS_DIFFUSERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                     "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every storage an operator creates while the storage lives."""

    def __init__(self):
        super().__init__()
        self.sizes = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0

    def add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st in self.sizes:
            return
        n = st.nbytes()
        self.sizes[st] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, n)

    def _free(self, n: int) -> None:
        self.current -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


def _lora(model: torch.nn.Module, blocks, targets, rank: int) -> list[LoRAModule]:
    mods = []
    for i, block in enumerate(blocks):
        for name in targets:
            m = LoRAModule(f"lora_{i}_{name}", block.get_submodule(name), lora_dim=rank, alpha=rank)
            m.apply_to()
            mods.append(m)
    return mods


def build(side: str, dim, ffn, heads, layers, dtype, segments: int = 0):
    """``(model, blocks, call)``: ``call(x, t, ctx_padded) -> velocity``; ``segments``: ours
    with two-level checkpointing (``--gradient_checkpointing_segments``)."""
    if side == "ours":
        cfg = WanDiTConfig(dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=layers, in_channels=16,
                           out_channels=16)
        m = cast_dit(WanDiT(cfg), dtype).requires_grad_(False)
        m.set_gradient_checkpointing(True, segments=segments)
        return m, m.blocks, TARGETS_OURS, lambda x, t, ctx: m(x, t, ctx)
    from diffusers import WanTransformer3DModel

    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=dim // heads,
                              in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=ffn,
                              num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                              eps=1e-6).requires_grad_(False)
    for name, p in m.named_parameters():  # from_pretrained(torch_dtype=...)'s policy: fp32 modules kept
        keep = any(k in name.split(".") for k in m._keep_in_fp32_modules)
        p.data = p.data.to(torch.float32 if keep else dtype)
    m.enable_gradient_checkpointing()
    m.train()
    return m, m.blocks, TARGETS_DIFFUSERS, lambda x, t, ctx: m(x, t, ctx, return_dict=False)[0]


def measure(side: str, a) -> dict:
    """One forward + backward of ``side`` (``"ours"`` / ``"diffusers"``) at ``a``'s model, grid,
    dtype, rank and segments under ``FakeTensorMode``. Returns ``{"side", "weights",
    "after_forward", "peak", "saved"}``: bytes of the weights (LoRA included), bytes alive after the
    forward and at the peak above the weights, and what was saved for backward by (shape, dtype)."""
    dim, ffn, heads, layers = PRESETS[a.model]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    with FakeTensorMode():
        model, blocks, targets, call = build(side, dim, ffn, heads, layers, dtype, a.segments)
        loras = _lora(model, blocks, targets, a.rank)
        live = LiveBytes()
        for t in list(model.parameters()) + list(model.buffers()) + [p for m in loras for p in m.parameters()]:
            live.add(t)
        weights = live.current
        x = torch.randn(1, 16, *a.grid)
        t = torch.tensor([500.0])
        ctx = torch.randn(1, 512, 4096)  # zero-padded text (both models take 512 rows)
        saved, seen = Counter(), WeakIdKeyDictionary()

        def pack(tensor):  # each storage counted once (the text context is saved by every block)
            st = tensor.untyped_storage()
            if st not in seen:
                seen[st] = True
                saved[(tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""))] += st.nbytes()
            return tensor

        with live, torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                out = call(x.to(dtype), t, ctx.to(dtype))
            after_forward = live.current
            loss = (out.float() - x).square().mean()
            loss.backward()
    return {"side": side, "weights": weights, "after_forward": after_forward - weights,
            "peak": live.peak - weights, "saved": saved}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="1.3B", choices=list(PRESETS))
    p.add_argument("--grid", type=int, nargs=3, default=[5, 30, 52], metavar=("F", "H", "W"),
                   help="latent grid (tokens = F*H*W/4); default 1950 tokens")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--sides", default="ours,diffusers")
    p.add_argument("--segments", type=int, default=0,
                   help="ours with --gradient_checkpointing_segments N (0: one checkpoint per block)")
    a = p.parse_args(argv)
    tokens = a.grid[0] * a.grid[1] * a.grid[2] // 4
    print(f"{a.model}, {tokens} tokens, {a.dtype} weights, LoRA rank {a.rank}, gradient checkpointing"
          + (f" (ours: {a.segments} segments)" if a.segments else ""))
    rows = [measure(side, a) for side in a.sides.split(",")]
    mib = 2**20
    print("| side | weights MiB | saved after forward MiB | peak above weights MiB | peak total MiB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['side']} | {r['weights'] / mib:.0f} | {r['after_forward'] / mib:.1f} | {r['peak'] / mib:.1f} | "
              f"{(r['weights'] + r['peak']) / mib:.0f} |")
    for r in rows:
        print(f"\n{r['side']}: saved for backward outside the recomputed blocks (bytes by shape, dtype)")
        for (shape, dt), n in r["saved"].most_common(8):
            print(f"  {n / mib:9.1f} MiB  {list(shape)} {dt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
