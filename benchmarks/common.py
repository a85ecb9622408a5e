"""What the precision benchmarks share: the random DiT's size flags, a LoRA with every adapter
active, the flow-matching batches, the flattened LoRA gradient, how two results are compared,
and the JSON report.

The benchmarks that import it (``activation_offload.py``, ``fp8_error.py``, ``real_size.py``) run
as scripts (``python benchmarks/NAME.py``), so this folder is first on ``sys.path``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def add_model_args(p: argparse.ArgumentParser, dim: int, ffn_dim: int, heads: int, layers: int,
                   grid=(3, 16, 16)) -> None:
    """Add ``--dim --ffn_dim --heads --layers`` (the random DiT's widths, with these defaults),
    ``--grid F H W`` (the latent frames, height, width) and ``--batches``."""
    p.add_argument("--dim", type=int, default=dim)
    p.add_argument("--ffn_dim", type=int, default=ffn_dim)
    p.add_argument("--heads", type=int, default=heads)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--grid", type=int, nargs=3, default=grid, help="latent frames, height, width")
    p.add_argument("--batches", type=int, default=3)


def dit_config(a: argparse.Namespace):
    """The :class:`~wanlora.models.dit.WanDiTConfig` of :func:`add_model_args`' flags (16 latent
    channels in and out, the other fields at their defaults)."""
    from wanlora.models.dit import WanDiTConfig

    return WanDiTConfig(dim=a.dim, ffn_dim=a.ffn_dim, num_heads=a.heads, num_layers=a.layers,
                        in_channels=16, out_channels=16)


def active_lora(model, rank: int = 16):
    """A rank-``rank`` LoRA (alpha = rank) applied to ``model``, trainable, with ``lora_up``
    drawn from N(0, 0.01²) instead of zeros so every adapter gets a gradient.

    The draws are seeded (``lora_down`` from the global seed 1, ``lora_up`` from seed 2), so every
    model given the same architecture gets the same LoRA.
    """
    from wanlora.networks.lora_wan import create_network

    torch.manual_seed(1)
    net = create_network(1.0, rank, rank, None, None, model)
    net.apply_to(None, model)
    g = torch.Generator().manual_seed(2)
    for n, q in net.named_parameters():
        if "lora_up" in n:
            q.data = torch.randn(q.shape, generator=g) * 0.01
    net.requires_grad_(True)
    return net


def flow_batch(index: int, batches: int, grid) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Batch ``index`` of ``batches``: ``(x_t [1, 16, F, H, W], t [1], context [[40, 4096]],
    target [1, 16, F, H, W])`` for a flow-matching step (:func:`wanlora.training.flow.add_noise`,
    :func:`~wanlora.training.flow.flow_target`), all float32.

    The latents, noise and text context are drawn from seed ``100 + index``; the timesteps are
    spread evenly over 100..900 across the batches (one batch: 100).
    """
    from wanlora.training.flow import add_noise, flow_target, timestep_to_sigma

    f, h, w = grid
    g = torch.Generator().manual_seed(100 + index)
    x0 = torch.randn(1, 16, f, h, w, generator=g)
    noise = torch.randn(1, 16, f, h, w, generator=g)
    ctx = [torch.randn(40, 4096, generator=g) * 0.5]
    t = torch.tensor([100.0 + 800.0 * index / max(1, batches - 1)])
    return add_noise(x0, noise, timestep_to_sigma(t)), t, ctx, flow_target(x0, noise)


def flow_loss(model, batch) -> torch.Tensor:
    """The flow-matching MSE of ``model`` (a :class:`~wanlora.models.dit.WanDiT`) on a
    :func:`flow_batch` (a float32 scalar)."""
    x_t, t, ctx, target = batch
    return torch.nn.functional.mse_loss(model(x_t, t, ctx).float(), target)


def lora_gradient(net) -> torch.Tensor:
    """Every LoRA parameter's gradient, flattened and concatenated in parameter order (float32)."""
    return torch.cat([q.grad.reshape(-1).float() for q in net.parameters()])


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    """``{"cosine", "rel_error"}`` of ``a`` against the reference ``b`` (any equal shapes, taken
    flat in float64): their cosine similarity and ``|a − b| / |b|``."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return {"cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
            "rel_error": float((a - b).norm() / b.norm())}


def mean_compare(xs, refs) -> dict:
    """:func:`compare` of each ``xs[i]`` against ``refs[i]``, averaged over the pairs."""
    per = [compare(x, y) for x, y in zip(xs, refs)]
    return {k: sum(d[k] for d in per) / len(per) for k in per[0]}


def report(res: dict, path: str | None) -> None:
    """Print ``res`` as indented JSON and, when ``path`` is given, write the same text there."""
    text = json.dumps(res, indent=1)
    print(text)
    if path:
        Path(path).write_text(text)
