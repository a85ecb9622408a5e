"""How far fp8 base weights move LoRA training and generation from bf16, measured.

One random-weight DiT (default: the Wan2.1 1.3B block widths, dim 1536 / FFN 8960 / 12 heads, 4
blocks) is saved as a bf16 checkpoint and loaded four ways — bf16, ``--fp8_base``,
``--fp8_scaled`` (computing in bf16) and ``--fp8_compute`` (fp8 matmuls with per-row scales, on the
CPU through PyTorch's reference ``torch._scaled_mm``). Then:

* **LoRA gradients**: a rank-16 LoRA (``lora_up`` initialized non-zero so every adapter is active)
  gets one flow-matching step on the same batch (latent ``--grid``, timesteps 100..900); the
  flattened gradients of each fp8 model are compared with the bf16 model's (cosine similarity,
  relative error ``|g8 − g16| / |g16|``), averaged over ``--batches`` batches;
* **generation**: ``--steps`` UniPC steps (shift 5, no guidance) from the same noise; the final
  latents are compared (relative error, cosine).

The random-weight numbers are a stand-in for the released weights (their scale and outliers
differ). For reference, the bf16-vs-float32 figures of the same quantities are printed too:
the fp8 error is meaningful next to what bf16 itself costs.

    python benchmarks/fp8_error.py [--dim 1536 --ffn_dim 8960 --heads 12 --layers 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def _stats(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return {"cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
            "rel_error": float((a - b).norm() / b.norm())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="fp8 vs bf16: LoRA gradients and generated latents")
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--ffn_dim", type=int, default=8960)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--grid", type=int, nargs=3, default=(3, 16, 16))
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json")
    a = p.parse_args(argv)

    from wanlora.inference.sampling import make_schedule, make_solver
    from wanlora.io_utils import save_safetensors
    from wanlora.models import load_dit
    from wanlora.models.dit import WanDiT, WanDiTConfig
    from wanlora.models.fp8 import set_fp8_compute
    from wanlora.networks.lora_wan import create_network

    cfg = WanDiTConfig(dim=a.dim, ffn_dim=a.ffn_dim, num_heads=a.heads, num_layers=a.layers,
                       in_channels=16, out_channels=16)
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanDiT(cfg).state_dict().items()}
    sd = {}
    for k, s in shapes.items():
        std = (s[1] if len(s) > 1 else 50) ** -0.5
        sd[k] = (torch.ones(s) if k.endswith(("norm3.weight", "norm_q.weight", "norm_k.weight"))
                 else torch.randn(s, generator=g) * std).to(torch.bfloat16)
    tmp = Path(tempfile.mkdtemp())
    path = tmp / "dit_bf16.safetensors"
    save_safetensors(sd, path, metadata={"num_heads": str(a.heads)})
    del sd

    variants = {"fp32": ("fp32", None), "bf16": ("bf16", None), "fp8_base": ("bf16", "base"),
                "fp8_scaled": ("bf16", "scaled"), "fp8_compute": ("bf16", "scaled")}
    models = {}
    for name, (dtype, fp8) in variants.items():
        m = load_dit(path, "t2v-1.3B" if a.dim == 1536 else "t2v-A14B", dtype=dtype, fp8=fp8)
        if name == "fp8_compute":  # the CPU's torch._scaled_mm: the same math as the GPU kernels
            set_fp8_compute(m)
        torch.manual_seed(1)
        net = create_network(1.0, 16, 16, None, None, m)
        net.apply_to(None, m)
        gg = torch.Generator().manual_seed(2)
        for n, q in net.named_parameters():
            if "lora_up" in n:
                q.data = torch.randn(q.shape, generator=gg) * 0.01
        net.requires_grad_(True)
        m.set_gradient_checkpointing(True)
        models[name] = (m, net)

    f, h, w = a.grid
    grads = {k: [] for k in models}
    for b in range(a.batches):
        gb = torch.Generator().manual_seed(100 + b)
        x0 = torch.randn(1, 16, f, h, w, generator=gb)
        noise = torch.randn(1, 16, f, h, w, generator=gb)
        ctx = [torch.randn(40, 4096, generator=gb) * 0.5]
        t = torch.tensor([100.0 + 800.0 * b / max(1, a.batches - 1)])
        sigma = t / 1000.0
        x_t = (1 - sigma) * x0 + sigma * noise
        for name, (m, net) in models.items():
            net.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(m(x_t, t, ctx).float(), noise - x0)
            loss.backward()
            grads[name].append(torch.cat([q.grad.reshape(-1).float() for q in net.parameters()]))
    res = {"config": vars(a), "gradients": {}, "latents": {}}
    for name in ("fp8_base", "fp8_scaled", "fp8_compute", "bf16"):
        ref = "fp32" if name == "bf16" else "bf16"
        per = [_stats(x, y) for x, y in zip(grads[name], grads[ref])]
        res["gradients"][f"{name} vs {ref}"] = {k: sum(d[k] for d in per) / len(per) for k in per[0]}

    sched = make_schedule(a.steps, 5.0, "unipc")
    gn = torch.Generator().manual_seed(7)
    start = torch.randn(1, 16, f, h, w, generator=gn)
    ctx = [torch.randn(40, 4096, generator=gn) * 0.5]
    finals = {}
    with torch.no_grad():
        for name, (m, _) in models.items():
            solver = make_solver("unipc", sched)
            x = start.clone()
            for i in range(len(sched)):
                v = m(x, sched.timesteps[i : i + 1].float(), ctx).float()
                x = solver.step(v, x)
            finals[name] = x
    for name in ("fp8_base", "fp8_scaled", "fp8_compute", "bf16"):
        ref = "fp32" if name == "bf16" else "bf16"
        res["latents"][f"{name} vs {ref}"] = _stats(finals[name], finals[ref])
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
