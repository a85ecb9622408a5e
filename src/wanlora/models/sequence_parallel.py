"""Ulysses sequence parallelism for the Wan DiT: each sample's tokens split across the ranks of a group.

DeepSpeed-Ulysses (Jacobs et al. 2023, arXiv:2309.14509), as the official Wan2.2 code applies it to
the DiT (``wan/distributed/sequence_parallel.py: sp_dit_forward, sp_attn_forward`` and
``wan/distributed/ulysses.py: distributed_attention``): the P ranks of a sequence group hold one
contiguous chunk of ``Lc = ceil(L / P)`` tokens each (the sequence zero-padded to ``P·Lc``).
Everything in a block is per-token (norms, modulation, q/k/v/o and FFN Linears, cross-attention
to the replicated text) except self-attention, which needs every token: there one all-to-all turns
``[B, Lc, N, d]`` (all heads, own tokens) into ``[B, P·Lc, N/P, d]`` (own heads, all tokens), the
padding rows are dropped, attention runs unmasked over the true ``L`` tokens, and a second
all-to-all brings the output back. The head's output is all-gathered and unpadded.

What differs from the official code (same numbers): padding is removed before attention instead
of masked with ``k_lens``; RoPE tables and the per-frame modulation are sliced to each chunk's true
token positions (``rope_tables`` rows ``r·Lc ..``, frame ``t // (H·W)``), so a chunk that starts
or ends inside a frame still uses that frame's timestep embedding.

Gradients: the collectives are torch's differentiable functional collectives
(``torch.distributed._functional_collectives.*_autograd``, the replacement torch 2.13 names for the
deprecated ``torch.distributed.nn.functional``). The all-to-all's adjoint is the reverse
all-to-all; the output all-gather's adjoint sums the ranks' gradients (reduce-scatter). Every rank of a group computes the same loss on the gathered
output, so the summed objective is ``P · loss`` and each rank's LoRA gradient holds its tokens'
share of ``P · ∇loss``: averaging the gradients over all ``dp · P`` ranks (what DDP and FSDP do)
gives the data-parallel mean of ``∇loss`` exactly.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
import torch.nn.functional as F

from wanlora.models.attention import attention

__all__ = ["SequenceParallel", "check_ulysses_heads"]


def check_ulysses_heads(num_heads: int, ulysses_size: int) -> None:
    """Raise ``ValueError`` (one line) unless ``ulysses_size`` divides the attention head count.

    Ulysses gives each rank of a sequence group ``num_heads / ulysses_size`` whole heads
    (the official ``wan/distributed/ulysses.py`` has the same requirement).
    """
    if ulysses_size < 1 or num_heads % ulysses_size:
        fits = [str(n) for n in range(1, min(num_heads, 16) + 1) if num_heads % n == 0]
        raise ValueError(f"--ulysses_size {ulysses_size} must divide the DiT's {num_heads} attention heads; "
                         f"use one of {', '.join(fits)}")


class SequenceParallel:
    """One sequence group: the ranks that share a sample and split its tokens (Ulysses).

    Args:
        group: the ``torch.distributed`` process group of the P ranks (consecutive global ranks,
            e.g. ``DeviceMesh.get_group("sp")``). P = 1 is allowed and changes nothing.

    The DiT calls, in order: :meth:`chunk` (how many tokens each rank holds), :meth:`shard`
    (the rank's tokens, RoPE rows and modulation), :meth:`attention` inside every self-attention,
    and :meth:`gather` on the head's output.
    """

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def __repr__(self) -> str:
        return f"SequenceParallel(size={self.size}, rank={self.rank})"

    def chunk(self, length: int) -> int:
        """Tokens per rank, ``Lc = ceil(length / P)``; the sequence is padded to ``P·Lc``."""
        return -(-length // self.size)

    # ---- inputs

    def _rows(self, t: torch.Tensor, length: int, fill: float = 0.0, dim: int = 1) -> torch.Tensor:
        """This rank's rows ``[r·Lc, (r+1)·Lc)`` of ``t`` along ``dim`` (length ``length``), the
        rows past ``length`` filled with ``fill``."""
        lc = self.chunk(length)
        start = self.rank * lc
        own = t.narrow(dim, start, max(0, min(lc, length - start)))
        if own.shape[dim] == lc:
            return own
        pad_shape = list(t.shape)
        pad_shape[dim] = lc - own.shape[dim]
        return torch.cat([own, t.new_full(pad_shape, fill)], dim=dim)

    def shard(self, tokens: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], e: torch.Tensor,
              e0: torch.Tensor, frame_tokens: int):
        """This rank's share of the DiT's block inputs.

        Args:
            tokens: ``[B, L, D]`` embedded patches of the whole sample (frame-major).
            rope: ``(cos, sin)``, each ``[L, 1, d/2]`` (:func:`wanlora.models.dit.rope_tables`).
            e: ``[B, T', D]`` head modulation input, T' = 1 or the latent frame count.
            e0: ``[B, T', 6, D]`` block modulation input.
            frame_tokens: tokens per latent frame ``H·W`` (after patching).

        Returns:
            ``(tokens [B, Lc, D], rope ([Lc, 1, d/2] ×2), e [B, G, D], e0 [B, G, 6, D])``. With T' = 1
            the modulation is returned as given; with per-frame modulation the ``Lc`` local tokens
            are cut into ``G = Lc / s`` runs of ``s = gcd(H·W, Lc)`` tokens, each inside one frame
            (chunk starts ``r·Lc`` and frame starts are both multiples of s), and each run gets its
            frame's row — so ``_modulate``'s equal-group broadcast applies unchanged. Padding
            tokens take the last frame's row and RoPE angle 0; they never reach attention.
        """
        length = tokens.shape[1]
        lc = self.chunk(length)
        tokens = self._rows(tokens, length)
        cos, sin = (self._rows(t, length, fill, dim=0) for t, fill in zip(rope, (1.0, 0.0)))
        frames = e.shape[1]
        if frames > 1:
            s = math.gcd(frame_tokens, lc)
            first = self.rank * lc + torch.arange(0, lc, s, device=e.device)
            idx = (first // frame_tokens).clamp(max=frames - 1)
            e, e0 = e[:, idx], e0[:, idx]
        return tokens, (cos, sin), e, e0

    # ---- collectives

    def _to_heads(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, Lc, N, d]`` (own tokens, all heads) -> ``[B, P·Lc, N/P, d]`` (all tokens, own heads)."""
        b, lc, n, d = t.shape
        p = self.size
        send = t.reshape(b, lc, p, n // p, d).permute(2, 0, 1, 3, 4).contiguous()
        recv = fc.all_to_all_single_autograd(send, None, None, self.group)
        return recv.permute(1, 0, 2, 3, 4).reshape(b, p * lc, n // p, d)

    def _to_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`_to_heads`: ``[B, P·Lc, N/P, d]`` -> ``[B, Lc, N, d]``."""
        b, lpad, h, d = t.shape
        p = self.size
        send = t.reshape(b, p, lpad // p, h, d).transpose(0, 1).contiguous()
        recv = fc.all_to_all_single_autograd(send, None, None, self.group)
        return recv.permute(1, 2, 0, 3, 4).reshape(b, lpad // p, p * h, d)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str = "sdpa", *,
                  length: int) -> torch.Tensor:
        """Self-attention over the whole sequence from each rank's chunk (Ulysses).

        Args:
            q, k, v: ``[B, Lc, N, d]`` this rank's tokens, all N heads (RoPE already applied).
            mode: attention backend (:func:`wanlora.models.attention.attention`).
            length: the true sequence length L (rows ``L ..`` of the padded sequence are dropped).

        Returns:
            ``[B, Lc, N, d]``: the attention output of this rank's tokens, all heads.

        Raises:
            ValueError: N not divisible by P (:func:`check_ulysses_heads`).
        """
        if self.size == 1:
            return attention(q, k, v, mode)
        check_ulysses_heads(q.shape[2], self.size)
        q, k, v = (self._to_heads(t)[:, :length] for t in (q, k, v))
        out = attention(q, k, v, mode)
        out = F.pad(out, (0, 0, 0, 0, 0, self.chunk(length) * self.size - length))
        return self._to_tokens(out)

    def gather(self, local: torch.Tensor, length: int) -> torch.Tensor:
        """All ranks' chunks ``[B, Lc, C]`` -> the whole sequence ``[B, L, C]`` (padding dropped).

        Differentiable: the backward pass sums the ranks' gradients of their chunk (see the
        module docstring for why that makes the averaged LoRA gradient exact).
        """
        if self.size == 1:
            return local[:, :length]
        return fc.all_gather_single_autograd(local.contiguous(), 1, self.group)[:, :length]
