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
import tempfile
from pathlib import Path

import torch

from common import (active_lora, add_model_args, compare, dit_config, flow_batch, flow_loss, lora_gradient,
                    mean_compare, report)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="fp8 vs bf16: LoRA gradients and generated latents")
    add_model_args(p, dim=1536, ffn_dim=8960, heads=12, layers=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json")
    a = p.parse_args(argv)

    from wanlora.inference.sampling import make_schedule, make_solver
    from wanlora.io_utils import save_safetensors
    from wanlora.models import load_dit
    from wanlora.models.dit import WanDiT
    from wanlora.models.fp8 import set_fp8_compute

    cfg = dit_config(a)
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
        net = active_lora(m)
        m.set_gradient_checkpointing(True)
        models[name] = (m, net)

    f, h, w = a.grid
    grads = {k: [] for k in models}
    for b in range(a.batches):
        batch = flow_batch(b, a.batches, a.grid)
        for name, (m, net) in models.items():
            net.zero_grad(set_to_none=True)
            flow_loss(m, batch).backward()
            grads[name].append(lora_gradient(net))
    res = {"config": vars(a), "gradients": {}, "latents": {}}
    for name in ("fp8_base", "fp8_scaled", "fp8_compute", "bf16"):
        ref = "fp32" if name == "bf16" else "bf16"
        res["gradients"][f"{name} vs {ref}"] = mean_compare(grads[name], grads[ref])

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
        res["latents"][f"{name} vs {ref}"] = compare(finals[name], finals[ref])
    report(res, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
