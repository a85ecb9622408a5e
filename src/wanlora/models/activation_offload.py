"""Gradient checkpointing with the checkpoints in host memory (``--gradient_checkpointing_cpu_offload``).

With plain gradient checkpointing the input of every block stays on the device until the
backward pass reaches it: ``[B, L, D]`` float32 (the residual stream's official precision) per
block — 40 × 672 MB = 26.8 GB for an A14B expert at 832x480x81 (L = 32,760 tokens). Here each
block's input is copied to (pinned, on CUDA) host memory as the forward pass leaves the block, and
copied back when the backward pass recomputes it, so the device holds one block's activations.

The block runs without autograd in the forward pass; the backward pass restores the input, the
random-number state and the autocast state of the forward, recomputes the block with autograd and
back-propagates through it (reentrant checkpointing, as ``torch.utils.checkpoint`` with
``use_reentrant=True``, with the stash on the host). Gradients therefore equal plain checkpointing
bit for bit when the stash keeps the input's dtype. ``stash_dtype=torch.bfloat16`` halves the host
memory at the cost of a rounded recomputation (opt-in; its error is measured in
``benchmarks/activation_offload.py`` and ``docs/benchmarks.md``).

Only the first argument (the residual stream) receives a gradient: the other tensors a Wan block
takes (time modulation, text context, RoPE tables) come from frozen layers in LoRA training and
must not require one (a ValueError says so otherwise).
"""

from __future__ import annotations

import torch

__all__ = ["offloaded_checkpoint"]


def _stash(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A host copy of ``x`` (pinned and asynchronous from CUDA; in ``dtype`` when given)."""
    src = x.detach() if dtype is None else x.detach().to(dtype)
    if src.device.type == "cuda":
        host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        host.copy_(src, non_blocking=True)  # stream-ordered: src is not reused before the copy ran
        return host
    return src  # already host memory


class _OffloadedBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, stash_dtype, x, *args):
        ctx.fn, ctx.args = fn, args
        ctx.device, ctx.dtype = x.device, x.dtype
        ctx.autocast = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
                        for d in {"cpu", x.device.type}]
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.device.type == "cuda" else None
        ctx.host = _stash(x, stash_dtype)
        with torch.no_grad():
            return fn(x, *args)

    @staticmethod
    def backward(ctx, grad_out):
        x = ctx.host.to(ctx.device, non_blocking=True).to(ctx.dtype).requires_grad_(True)
        ctx.host = None
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            with torch.enable_grad():
                managers = [torch.autocast(d, enabled=on, dtype=dt) for d, on, dt in ctx.autocast]
                for m in managers:
                    m.__enter__()
                try:
                    out = ctx.fn(x, *ctx.args)
                finally:
                    for m in reversed(managers):
                        m.__exit__(None, None, None)
        torch.autograd.backward(out, grad_out)
        return (None, None, x.grad) + (None,) * len(ctx.args)


def offloaded_checkpoint(fn, x: torch.Tensor, *args, stash_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``fn(x, *args)`` checkpointed with ``x`` kept in host memory until the backward pass.

    Args:
        fn: the block (any callable; module hooks such as block swap's run in both passes).
        x: ``[B, L, D]`` the residual stream (the only input that gets a gradient).
        args: further inputs (tensors must not require grad; tuples of tensors pass through).
        stash_dtype: keep the host copy in this dtype (``None``: ``x``'s own, exact).

    Returns:
        ``fn``'s output; its backward recomputes ``fn`` and accumulates the parameters' gradients.

    Raises:
        ValueError: a tensor in ``args`` requires grad.
    """
    for a in args:
        for t in (a if isinstance(a, (tuple, list)) else (a,)):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise ValueError("gradient_checkpointing_cpu_offload: only the block's first input may "
                                 "require grad (the others come from frozen layers)")
    if not torch.is_grad_enabled():
        return fn(x, *args)
    if not x.requires_grad:  # the first block: its parameters (LoRA) still need the backward
        x = x.detach().requires_grad_(True)
    return _OffloadedBlock.apply(fn, stash_dtype, x, *args)
