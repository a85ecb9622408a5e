"""The Wan diffusion transformer (DiT): one implementation for every Wan2.1/Wan2.2 task.

Matches the official ``wan/modules/model.py: WanModel`` (Wan-Video/Wan2.2) formula by formula;
``reference/wan_numerics.md`` §2–§4 lists the facts. The Wan2.1 I2V-14B / FLF2V-14B image branch
(``img_emb``, ``k_img``/``v_img``/``norm_k_img``; Wan-Video/Wan2.1 ``wan/modules/model.py``) is
built when the checkpoint has it (``reference/wan21_image_models.md``). The module tree *is* the checkpoint: attribute
names equal the official key names (``blocks.N.self_attn.q.weight``, ``head.modulation``, ...), so
official shards and ComfyUI's repackaged files load without renaming.

Differences from the official code, none of which changes a number (float32, same inputs):

* a batch shares one latent grid, so tokens are never padded and self-attention needs no mask;
* the time embedding and modulation are computed once per sample (``timestep [B]``) or once per
  latent frame (``timestep [B, F]``, TI2V-5B with frame 0 at t=0) and broadcast to the frame's
  tokens, instead of the official per-token ``[B, L, 6, D]`` tensor (numerically identical, a
  fraction of the memory);
* a 1-D timestep works for B > 1 (the official ``t.expand(B, seq_len)`` only works for B == 1);
* RoPE cos/sin tables are computed in float64, cached per grid, and applied in float32 (the
  official rotates in complex128 and casts to float32; the two differ by about one float32 ulp);
* attention goes through :mod:`wanlora.models.attention` (SDPA by default, no hard flash-attn);
* the CLIP image tokens reach the cross-attention as their own tensor instead of being
  prepended to the text context and split off again at ``length − 512``; FLF2V's ``emb_pos`` is
  added to ``clip_fea [B, 514, 1280]`` directly (the official reshape only works for B = 1).

Precision policy (the official inference keeps fp32 weights and runs under bf16 autocast): the
residual stream, norms, modulation, time embedding, RoPE and the head run in float32; the Linear
layers of attention and FFN, the text embedding and the patch embedding run in the dtype of the
weights (:attr:`WanDiT.dtype`, e.g. bfloat16). The output is float32.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from wanlora.models.activation_offload import offloaded_checkpoint
from wanlora.models.attention import attention, check_attn_mode

__all__ = ["WanDiTConfig", "WanDiT", "sinusoidal_embedding", "rope_tables", "apply_rope", "MLPProj",
           "ImageCrossAttention"]


@dataclass
class WanDiTConfig:
    """Architecture of one Wan DiT (``wan/modules/model.py: WanModel.__init__`` arguments).

    Attributes:
        dim: model width D (5120 for A14B/14B, 3072 for TI2V-5B, 1536 for 1.3B).
        ffn_dim: FFN hidden width.
        num_heads: attention heads; head dim ``dim // num_heads`` must be even (128 in releases).
        num_layers: transformer blocks.
        in_channels: input channels (16 T2V, 36 I2V-A14B = 16 latent + 20 conditioning, 48 TI2V).
        out_channels: output channels (16, or 48 for TI2V-5B).
        text_dim: umT5 width (4096).
        freq_dim: sinusoidal timestep width (256).
        patch_size: (time, height, width) patch, (1, 2, 2) in every release.
        text_len: text rows after zero padding (512).
        eps: epsilon of every LayerNorm / RMSNorm (1e-6).
        image_dim: width of the CLIP image features (1280) for the Wan2.1 I2V-14B / FLF2V-14B
            image branch (``img_emb`` and the ``k_img``/``v_img`` cross-attention), ``None``
            for models without it.
        image_pos_len: rows of FLF2V's learned ``img_emb.emb_pos`` (514 = 2 x 257 CLIP tokens),
            ``None`` for I2V-14B and the models without an image branch.
    """

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_channels: int
    out_channels: int
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    eps: float = 1e-6
    image_dim: int | None = None
    image_pos_len: int | None = None

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(
                f"WanDiTConfig: dim {self.dim} / num_heads {self.num_heads} must give an even "
                "head dim (128 in every released Wan model)"
            )

    @property
    def head_dim(self) -> int:
        """Per-head width ``d = dim // num_heads`` (128 in every release, 32 in the tiny sets)."""
        return self.dim // self.num_heads

    def to_dict(self) -> dict:
        """The fields as a plain dict (``patch_size`` as a tuple)."""
        return asdict(self)


# --------------------------------------------------------------------------------------------
# embeddings and RoPE


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``[cos(t·ω_i), sin(t·ω_i)]`` with ``ω_i = 10000^(-i/(dim/2))``, computed in float64.

    Matches ``model.py: sinusoidal_embedding_1d`` (cos first; t on the 0..1000 scale, not divided).

    Args:
        t: timesteps of any shape ``[...]``, 0..1000.
        dim: embedding width (even).

    Returns:
        ``[..., dim]`` float32.
    """
    half = dim // 2
    t = t.to(torch.float64)
    omega = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t[..., None] * omega
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).float()


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Real dims of the (time, height, width) RoPE parts: ``d − 4⌊d/6⌋, 2⌊d/6⌋, 2⌊d/6⌋``
    (44/42/42 for d=128; ``model.py: WanModel.__init__`` freqs)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_tables(grid: tuple[int, int, int], head_dim: int, device=None, theta: float = 10000.0):
    """cos/sin of the 3-axis rotary embedding for a ``(F, H, W)`` token grid.

    Each axis has its own frequency ladder ``θ_j = theta^(−2j/part)`` over its part of the head
    dim (``model.py: rope_params``); token ``(f, h, w)`` (row-major order) gets angles
    ``f·θ^t``, ``h·θ^h``, ``w·θ^w`` concatenated. Angles are computed in float64.

    Args:
        grid: ``(F, H, W)`` token grid (latent frames, latent height / 2, latent width / 2).
        head_dim: ``d``, split by :func:`rope_split`.
        device: where the tables go (built on the CPU).
        theta: base of the frequency ladders (10000 in every release).

    Returns:
        ``(cos, sin)``, each ``[F·H·W, 1, head_dim/2]`` float32 (the 1 broadcasts over heads).

    Raises:
        ValueError: an axis longer than 1024 (the official table's limit).
    """
    if max(grid) > 1024:
        raise ValueError(f"token grid {tuple(grid)} exceeds the RoPE table's 1024 positions per axis")
    angles = []
    for n, part in zip(grid, rope_split(head_dim)):
        theta_j = 1.0 / torch.pow(theta, torch.arange(0, part, 2, dtype=torch.float64) / part)
        angles.append(torch.outer(torch.arange(n, dtype=torch.float64), theta_j))
    f, h, w = grid
    a = torch.cat(
        [
            angles[0][:, None, None].expand(f, h, w, -1),
            angles[1][None, :, None].expand(f, h, w, -1),
            angles[2][None, None, :].expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, 1, -1)
    return torch.cos(a).float().to(device), torch.sin(a).float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs ``(x[2i], x[2i+1])`` as complex numbers (``model.py: rope_apply``).

    Args:
        x: ``[B, L, N, d]``.
        cos, sin: ``[L, 1, d/2]`` from :func:`rope_tables`.

    Returns:
        ``[B, L, N, d]`` float32.
    """
    xr, xi = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([xr * cos - xi * sin, xr * sin + xi * cos], dim=-1).flatten(-2)


# --------------------------------------------------------------------------------------------
# layers


def _linear32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear evaluated in float32 whatever its weights' dtype or an enclosing autocast (the
    official code's fp32 autocast regions)."""
    bias = None if layer.bias is None else layer.bias.float()
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), layer.weight.float(), bias)


class RMSNorm(nn.Module):
    """``w · x / sqrt(mean(x²) + eps)`` over the last dim, in float32 (``model.py: WanRMSNorm``).
    Returns float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()


class LayerNorm32(nn.LayerNorm):
    """LayerNorm in float32, returns float32 (``model.py: WanLayerNorm``; affine only for norm3)."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


def _modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x·(1+scale) + shift`` with per-sample or per-frame modulation broadcast to tokens.

    x: ``[B, L, D]`` float32; scale, shift: ``[B, T', D]`` with T' = 1 or the latent frame count
    (tokens are frame-major, so frame f owns the contiguous rows ``f·L/T' ..``)."""
    b, n, d = x.shape
    g = scale.shape[1]
    x = x.view(b, g, n // g, d) * (1 + scale[:, :, None]) + shift[:, :, None]
    return x.view(b, n, d)


def _gate(y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``y · gate`` in float32, gate ``[B, T', D]`` broadcast to the frame's tokens."""
    b, n, d = y.shape
    g = gate.shape[1]
    return (y.float().view(b, g, n // g, d) * gate[:, :, None]).view(b, n, d)


class SelfAttention(nn.Module):
    """Self-attention with full-width q/k RMSNorm and 3-axis RoPE (``model.py: WanSelfAttention``).

    ``q, k, v, o`` are plain ``nn.Linear`` (with bias) called through their forward: the LoRA
    targets. q/k are normalized over the full width D before the split into heads."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, L, D] -> [B, L, N, d]``."""
        return t.unflatten(-1, (self.num_heads, self.head_dim))

    def _attend(self, q, k, v, dtype, mode) -> torch.Tensor:
        """Attention over heads, then the output projection ``o``: ``[B, L, D]`` in ``dtype``."""
        return self.o(attention(q, k, v, mode).flatten(2).to(dtype))

    def forward(self, x, rope, dtype, mode):
        """x: ``[B, L, D]``; rope: ``(cos, sin)`` for the tokens, or ``(cos, sin, attend)`` under
        sequence parallelism, ``attend(q, k, v, mode)`` being the Ulysses attention of this forward
        (:meth:`wanlora.models.sequence_parallel.SequenceParallel.attention`). Returns ``[B, L, D]``
        in ``dtype``."""
        x = x.to(dtype)
        q = apply_rope(self._heads(self.norm_q(self.q(x))), *rope[:2])
        k = apply_rope(self._heads(self.norm_k(self.k(x))), *rope[:2])
        if len(rope) > 2:
            return self.o(rope[2](q, k, self._heads(self.v(x)), mode).flatten(2).to(dtype))
        return self._attend(q, k, self._heads(self.v(x)), dtype, mode)


class CrossAttention(SelfAttention):
    """Text cross-attention, no RoPE, no mask (``model.py: WanCrossAttention``, §2.2)."""

    def forward(self, x, context, dtype, mode):
        """x: ``[B, L, D]``; context: ``[B, 512, D]`` (embedded). Returns ``[B, L, D]`` in ``dtype``."""
        x = x.to(dtype)
        q = self._heads(self.norm_q(self.q(x)))
        k = self._heads(self.norm_k(self.k(context)))
        return self._attend(q, k, self._heads(self.v(context)), dtype, mode)


class ImageCrossAttention(CrossAttention):
    """Text + CLIP-image cross-attention of Wan2.1 I2V-14B / FLF2V-14B (Wan2.1 ``model.py:
    WanI2VCrossAttention``).

    The normed text query attends to the text keys and, separately, to the image keys
    ``norm_k_img(k_img(ctx_img))`` (RMSNorm over the full width, eps 1e-6) and values
    ``v_img(ctx_img)``; neither is masked. The two attention outputs are summed before the one
    output projection ``o`` (its bias counted once). ``k_img``, ``v_img`` are plain ``nn.Linear``
    (LoRA targets like q/k/v/o)."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__(dim, num_heads, eps)
        self.k_img = nn.Linear(dim, dim)
        self.v_img = nn.Linear(dim, dim)
        self.norm_k_img = RMSNorm(dim, eps)

    def forward(self, x, context, dtype, mode, context_img=None):
        """x: ``[B, L, D]``; context: ``[B, 512, D]`` embedded text; context_img: ``[B, L_img, D]``
        embedded image tokens (257, or 514 for FLF2V). Returns ``[B, L, D]`` in ``dtype``.

        Raises:
            ValueError: no image tokens (the model takes ``clip_fea``).
        """
        if context_img is None:
            raise ValueError("WanDiT: this model has the CLIP image branch (Wan2.1 I2V/FLF2V); pass clip_fea")
        x = x.to(dtype)
        q = self._heads(self.norm_q(self.q(x)))
        k = self._heads(self.norm_k(self.k(context)))
        k_img = self._heads(self.norm_k_img(self.k_img(context_img)))
        out = attention(q, k, self._heads(self.v(context)), mode).to(dtype)
        out_img = attention(q, k_img, self._heads(self.v_img(context_img)), mode).to(dtype)
        return self.o((out + out_img).flatten(2))


class MLPProj(nn.Module):
    """The CLIP-feature projection ``img_emb`` (Wan2.1 ``model.py: MLPProj``): ``proj`` =
    LayerNorm(C) → Linear(C, C) → GELU (exact) → Linear(C, D) → LayerNorm(D), both LayerNorms
    affine with eps 1e-5 (the torch defaults), computed in float32; FLF2V first adds the learned
    ``emb_pos [1, 514, C]`` to the raw features."""

    def __init__(self, in_dim: int, out_dim: int, pos_len: int | None = None):
        super().__init__()
        self.proj = nn.Sequential(
            LayerNorm32(in_dim, 1e-5, elementwise_affine=True), nn.Linear(in_dim, in_dim), nn.GELU(),
            nn.Linear(in_dim, out_dim), LayerNorm32(out_dim, 1e-5, elementwise_affine=True),
        )
        if pos_len is not None:
            self.emb_pos = nn.Parameter(torch.zeros(1, pos_len, in_dim))

    def forward(self, clip_fea: torch.Tensor, dtype) -> torch.Tensor:
        """clip_fea: ``[B, L_img, C]``. Returns ``[B, L_img, D]`` in ``dtype``.

        Raises:
            ValueError: a feature width other than C, or (FLF2V) a token count other than
                ``emb_pos``'s rows.
        """
        c = self.proj[0].normalized_shape[0]
        pos = getattr(self, "emb_pos", None)
        if clip_fea.ndim != 3 or clip_fea.shape[-1] != c or (pos is not None and clip_fea.shape[1] != pos.shape[1]):
            want = f"[B, {pos.shape[1]}, {c}] (first and last frame, 2 x {pos.shape[1] // 2} tokens)" if pos is not None else f"[B, L, {c}]"
            raise ValueError(f"WanDiT: clip_fea of shape {tuple(clip_fea.shape)}; this model takes {want} "
                             "(the CLIP image encoder's output, load_clip(...).encode)")
        x = clip_fea.float()
        if pos is not None:
            x = x + pos.float()
        x = self.proj[2](self.proj[1](self.proj[0](x).to(dtype)))
        return self.proj[4](self.proj[3](x)).to(dtype)


class WanAttentionBlock(nn.Module):
    """One transformer block (``model.py: WanAttentionBlock``), with ``(c0..c5) = modulation + e0``:

    ``x += SelfAttn(LN(x)(1+c1)+c0)·c2``; ``x += CrossAttn(norm3(x), ctx)``;
    ``x += FFN(LN(x)(1+c4)+c3)·c5``. With ``image=True`` the cross-attention also attends to the
    CLIP image tokens (:class:`ImageCrossAttention`).

    The class keeps the official name on purpose: LyCORIS (``--network_module lycoris.kohya``)
    and its presets choose the Wan layers to adapt by this class name, as for musubi-tuner's DiT.
    """

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float = 1e-6, image: bool = False):
        super().__init__()
        self.norm1 = LayerNorm32(dim, eps)
        self.self_attn = SelfAttention(dim, num_heads, eps)
        self.norm3 = LayerNorm32(dim, eps, elementwise_affine=True)
        self.cross_attn = (ImageCrossAttention if image else CrossAttention)(dim, num_heads, eps)
        self.norm2 = LayerNorm32(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, e0, context, rope, dtype, mode, context_img=None):
        """x: ``[B, L, D]`` float32 residual stream; e0: ``[B, T', 6, D]`` float32 (T' = 1 or
        frames); context: ``[B, 512, D]``; context_img: ``[B, L_img, D]`` embedded CLIP tokens
        (image models only). Returns ``[B, L, D]`` float32."""
        c = (self.modulation.float().unsqueeze(0) + e0).unbind(2)
        x = x + _gate(self.self_attn(_modulate(self.norm1(x), c[1], c[0]), rope, dtype, mode), c[2])
        if context_img is None:
            x = x + self.cross_attn(self.norm3(x), context, dtype, mode).float()
        else:
            x = x + self.cross_attn(self.norm3(x), context, dtype, mode, context_img).float()
        y = self.ffn(_modulate(self.norm2(x), c[4], c[3]).to(dtype))
        return x + _gate(y, c[5])


WanBlock = WanAttentionBlock  # the former name


class Head(nn.Module):
    """Output head (``model.py: Head``): ``Linear(LN(x)(1+scale) + shift)`` with
    ``(shift, scale) = modulation + e`` (e: the time embedding before ``time_projection``)."""

    def __init__(self, dim: int, out_channels: int, patch_size, eps: float = 1e-6):
        super().__init__()
        self.norm = LayerNorm32(dim, eps)
        self.head = nn.Linear(dim, math.prod(patch_size) * out_channels)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x, e):
        """x: ``[B, L, D]``; e: ``[B, T', D]``. Returns ``[B, L, prod(patch)·C_out]`` float32."""
        shift, scale = (self.modulation.float().unsqueeze(0) + e.unsqueeze(2)).unbind(2)
        return _linear32(self.head, _modulate(self.norm(x), scale, shift))


# --------------------------------------------------------------------------------------------
# the model


def check_checkpoint_segments(segments: int, num_layers: int, cpu_offload: bool = False) -> None:
    """Refuse a ``--gradient_checkpointing_segments`` value a ``num_layers``-block DiT cannot use.

    Raises:
        ValueError: ``segments`` outside ``0 .. num_layers``, or non-zero with ``cpu_offload``.
    """
    if not 0 <= segments <= num_layers:
        raise ValueError(f"--gradient_checkpointing_segments {segments}: give 0 (off) .. {num_layers} for this "
                         f"{num_layers}-block DiT (fewest kept block inputs near {round(math.sqrt(num_layers))})")
    if segments and cpu_offload:
        raise ValueError("--gradient_checkpointing_segments with --gradient_checkpointing_cpu_offload: choose one "
                         "(the offload already keeps no block input on the GPU)")


def _split(blocks: nn.ModuleList, n: int) -> list[tuple[nn.Module, ...]]:
    """``blocks`` cut into ``n`` consecutive segments whose sizes differ by at most one."""
    size, extra = divmod(len(blocks), n)
    bounds = [i * size + min(i, extra) for i in range(n + 1)]
    return [tuple(blocks[a:b]) for a, b in zip(bounds, bounds[1:])]


class WanDiT(nn.Module):
    """The Wan DiT (``wan/modules/model.py: WanModel``) for T2V, I2V-A14B, TI2V-5B and (with
    ``config.image_dim``) Wan2.1 I2V-14B / FLF2V-14B.

    Args:
        config: the architecture (:class:`WanDiTConfig`).
        attn_mode: attention backend, one of :data:`wanlora.models.attention.ATTN_MODES`.

    Raises:
        ImportError: the attention backend's package is missing (names the pip package).
    """

    def __init__(self, config: WanDiTConfig, attn_mode: str = "sdpa"):
        super().__init__()
        check_attn_mode(attn_mode)
        self.config = config
        self.attn_mode = attn_mode
        self.gradient_checkpointing = False
        self.compiled_blocks: dict | None = None  # compile_blocks() options once compiled
        self.checkpoint_offload = False
        self.checkpoint_stash_dtype: torch.dtype | None = None
        self.checkpoint_segments = 0
        d = config.dim
        self.patch_embedding = nn.Conv3d(config.in_channels, d, config.patch_size, config.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d)
        )
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        image = config.image_dim is not None
        self.blocks = nn.ModuleList(
            WanAttentionBlock(d, config.ffn_dim, config.num_heads, config.eps, image) for _ in range(config.num_layers)
        )
        self.head = Head(d, config.out_channels, config.patch_size, config.eps)
        if image:
            self.img_emb = MLPProj(config.image_dim, d, config.image_pos_len)
        self._rope_cache: dict = {}
        self.sequence_parallel = None

    # ---- switches

    def set_gradient_checkpointing(self, enabled: bool = True, cpu_offload: bool = False,
                                   stash_dtype: torch.dtype | None = None, segments: int = 0) -> None:
        """Recompute each block in the backward pass (saves activation memory).

        Args:
            enabled: checkpoint every block.
            cpu_offload: keep the checkpointed block inputs in (pinned) host memory
                (:mod:`wanlora.models.activation_offload`, ``--gradient_checkpointing_cpu_offload``).
            stash_dtype: with ``cpu_offload``, store them in this dtype (``None``: float32, exact).
            segments: two-level checkpointing (``--gradient_checkpointing_segments``; 0: off). The
                blocks are cut into this many consecutive segments and only the segment inputs are
                kept through the forward; in the backward each segment is run forward once more,
                keeping its block inputs, and each block is then recomputed as usual. The float32
                block inputs held at once drop from ``L`` to ``segments + ceil(L / segments)``
                (fewest near ``sqrt(L)``) for ``L − segments`` more block forwards per step (the
                segment recomputation stops after rebuilding its last block's input); gradients equal
                plain checkpointing bit for bit (the recomputation runs the same operators).
                Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost".

        Raises:
            ValueError: ``segments`` negative or above the block count, or with ``cpu_offload``.
        """
        check_checkpoint_segments(segments, len(self.blocks), cpu_offload)
        self.gradient_checkpointing = bool(enabled)
        self.checkpoint_offload = bool(enabled and cpu_offload)
        self.checkpoint_stash_dtype = stash_dtype
        self.checkpoint_segments = segments if enabled else 0

    def set_sequence_parallel(self, sp) -> None:
        """Split each sample's tokens across a sequence group (Ulysses), or ``None`` to stop.

        Args:
            sp: a :class:`wanlora.models.sequence_parallel.SequenceParallel` (every rank of its
                group must run the same forward calls with the same inputs), or None.

        Raises:
            ValueError: the group size does not divide ``num_heads`` (one line, with the sizes
                that fit).
        """
        if sp is not None:
            from wanlora.models.sequence_parallel import check_ulysses_heads

            check_ulysses_heads(self.config.num_heads, sp.size)
        self.sequence_parallel = sp

    def compile_blocks(self, backend: str = "inductor", mode: str | None = None, dynamic: bool | None = None,
                       fullgraph: bool = False, recompile_limit: int = 32) -> None:
        """Regional compilation: ``torch.compile`` each transformer block in place.

        Every block runs the same code, so one compiled graph serves all of them (parameters are
        graph inputs, not constants): compile time does not grow with depth, and module names,
        ``state_dict`` keys and the LoRA hooks on the Linear layers stay as they are (the hooks are
        traced into the graph). Two graphs per input shape family are expected: block 0, whose
        input needs no gradient, and the others.

        Args:
            backend: a ``torch.compile`` backend (``"inductor"``; ``"eager"`` / ``"aot_eager"`` to
                debug).
            mode: inductor mode (``None``/``"default"``, ``"reduce-overhead"``,
                ``"max-autotune-no-cudagraphs"``, ``"max-autotune"``).
            dynamic: ``None`` (auto): the token-count dimensions (sequence of the residual stream,
                RoPE tables, per-frame modulation) are marked dynamic, so a new bucket shape reuses
                the graph instead of compiling another; ``True``: every dimension symbolic;
                ``False``: one graph per distinct shape (fastest kernels, one compile per bucket,
                at most ``torch._dynamo.config.recompile_limit`` of them).
            fullgraph: make a graph break inside a block an error.
            recompile_limit: raise ``torch._dynamo.config.recompile_limit`` (8 by default) to at
                least this: the block's code object holds every graph (block 0 and the rest, with
                and without gradient, each active LoRA of a two-expert run), and past the limit
                PyTorch silently runs the block eagerly.

        Numerics: the compiled block computes the same formulas; with float32 on the CPU the
        output equals eager to ~1e-6 (fused kernels change the summation order).
        """
        opts = {"backend": backend, "mode": None if mode in (None, "default") else mode,
                "dynamic": dynamic, "fullgraph": fullgraph}
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, recompile_limit)
        for block in self.blocks:
            block.compile(**opts)
        self.compiled_blocks = opts

    def set_attn_mode(self, mode: str) -> None:
        """Switch the attention backend. Raises ValueError/ImportError as :func:`check_attn_mode`."""
        check_attn_mode(mode)
        self.attn_mode = mode

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the Linear layers (the patch embedding's weight dtype)."""
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        """Device of the weights (the patch embedding's)."""
        return self.patch_embedding.weight.device

    # ---- pieces of forward

    def _rope(self, grid: tuple[int, int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`rope_tables` of ``grid``, built once per (grid, device) and kept (16 at most):
        a training run sees a handful of bucket grids, so the tables are not rebuilt per step."""
        key = (grid, str(device))
        if key not in self._rope_cache:
            if len(self._rope_cache) >= 16:
                self._rope_cache.clear()
            # Normal tensors even when the first call runs under torch.inference_mode (sampling):
            # inference tensors in the cache would break a later training step on the same grid.
            with torch.inference_mode(False):
                self._rope_cache[key] = rope_tables(grid, self.config.head_dim, device)
        return self._rope_cache[key]

    def _context(self, context, batch: int) -> torch.Tensor:
        """Zero-pad each text context to ``text_len`` rows, stack, cast: ``[B, 512, text_dim]``
        (``model.py: WanModel.forward``, block "# context"; exact zeros, never masked, §2).

        Raises:
            ValueError: a context count other than ``batch``, a row width other than
                ``text_dim``, or more than ``text_len`` rows.
        """
        cfg = self.config
        rows = list(context) if isinstance(context, (list, tuple)) else list(context.unbind(0))
        if len(rows) != batch:
            raise ValueError(f"WanDiT: {len(rows)} text contexts for a batch of {batch} latents; "
                             "pass one context per sample (a list of [L_i, text_dim] or [B, L, text_dim])")
        out = []
        for u in rows:
            if u.ndim != 2 or u.shape[-1] != cfg.text_dim:
                raise ValueError(
                    f"WanDiT: a text context has shape {tuple(u.shape)}; expected [L, {cfg.text_dim}] "
                    "(umT5 output of the matching text encoder)"
                )
            if u.shape[0] > cfg.text_len:
                raise ValueError(
                    f"WanDiT: text context of {u.shape[0]} rows exceeds text_len {cfg.text_len}; pass "
                    "the trimmed umT5 output (TextEncoder.encode gives at most 512 rows per prompt)"
                )
            out.append(F.pad(u, (0, 0, 0, cfg.text_len - u.shape[0])))
        return torch.stack(out).to(self.device, self.dtype)

    def _time(self, timestep: torch.Tensor, batch: int, frames: int):
        """Time embedding ``e [B, T', D]`` and projection ``e0 [B, T', 6, D]`` (float32), T' = 1 for
        a ``[B]`` (or scalar) timestep, T' = latent frames for ``[B, F]`` (``model.py:
        WanModel.forward``, block "# time embeddings", per frame instead of per token).

        Raises:
            ValueError: any other timestep shape (the message gives the two accepted ones).
        """
        t = torch.as_tensor(timestep, device=self.device)
        given = tuple(t.shape)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.ndim == 1:
            t = t[:, None]
        if t.ndim != 2 or t.shape[0] != batch or t.shape[1] not in (1, frames):
            raise ValueError(
                f"WanDiT: timestep of shape {given}; expected [B]={batch} or "
                f"[B, F]=[{batch}, {frames}] (one timestep per latent frame)"
            )
        s = sinusoidal_embedding(t, self.config.freq_dim)
        e = _linear32(self.time_embedding[2], F.silu(_linear32(self.time_embedding[0], s)))
        e0 = _linear32(self.time_projection[1], F.silu(e)).unflatten(-1, (6, self.config.dim))
        return e, e0

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context, y: torch.Tensor | None = None,
                clip_fea: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the flow velocity (``noise − x0``) (``model.py: WanModel.forward``).

        Args:
            x: ``[B, C_x, F, H, W]`` latents (latent units; H, W divisible by the patch).
            timestep: ``[B]`` or ``[B, F]`` on 0..1000 (float or int); ``[B, F]`` gives each latent
                frame its own timestep (TI2V-5B: frame 0 at t=0).
            context: ``[B, L, text_dim]`` (L <= 512) or a list of B ``[L_i, text_dim]``; zero-padded
                to 512 rows inside, never masked.
            y: ``[B, C_y, F, H, W]`` I2V conditioning (mask 4 + image latent 16), concatenated
                after x on channels; ``C_x + C_y`` must equal ``config.in_channels``.
            clip_fea: CLIP image features for the Wan2.1 image models (``load_clip(...).encode``):
                ``[B, 257, 1280]`` for I2V-14B, ``[B, 514, 1280]`` for FLF2V-14B (first-frame
                tokens, then last-frame tokens). Required by them, rejected by the others.

        Returns:
            ``[B, C_out, F, H, W]`` float32.

        Raises:
            ValueError: channel count, grid, timestep, context or clip_fea shapes that do not fit.
        """
        cfg = self.config
        if (clip_fea is None) != (cfg.image_dim is None):
            raise ValueError(
                "WanDiT: this model has the CLIP image branch (Wan2.1 I2V-14B / FLF2V-14B) and needs "
                "clip_fea (--clip)" if clip_fea is None else
                "WanDiT: clip_fea given to a model without the CLIP image branch (only the Wan2.1 "
                "I2V-14B / FLF2V-14B DiTs take it)"
            )
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            hint = ""
            if y is None and cfg.in_channels == 36:
                hint = " — I2V models need y (4 mask + 16 image-latent channels)"
            raise ValueError(
                f"WanDiT: input has shape {tuple(x.shape)} (x and y concatenated on channels); this "
                f"model takes [B, {cfg.in_channels}, F, H, W]{hint}"
            )
        b, _, f, h, w = x.shape
        pt, ph, pw = cfg.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(
                f"WanDiT: latent size {(f, h, w)} (F, H, W) is not divisible by the patch {cfg.patch_size}; "
                "crop or resize the video so its pixel size is a multiple of 2x the VAE stride "
                "(16 px for the Wan2.1 VAE, 32 px for the Wan2.2 VAE)"
            )
        grid = (f // pt, h // ph, w // pw)
        dtype, mode = self.dtype, self.attn_mode

        tokens = self.patch_embedding(x.to(self.device, dtype)).flatten(2).transpose(1, 2).float().contiguous()
        e, e0 = self._time(timestep, b, grid[0])
        ctx = self.text_embedding(self._context(context, b))
        ctx_img = None
        if clip_fea is not None:
            if clip_fea.shape[0] != b:
                raise ValueError(f"WanDiT: clip_fea for {clip_fea.shape[0]} images, a batch of {b} latents")
            ctx_img = self.img_emb(clip_fea.to(self.device), dtype)
        rope = self._rope(grid, tokens.device)
        sp, length = self.sequence_parallel, tokens.shape[1]
        if sp is not None:  # this rank's tokens only, until the head's output is gathered
            tokens, rope, e, e0 = sp.shard(tokens, rope, e, e0, grid[1] * grid[2])
            rope = (*rope, partial(sp.attention, length=length))

        # compile_blocks(dynamic=None): one graph for every bucket, the token count is symbolic
        mark = self.compiled_blocks is not None and self.compiled_blocks["dynamic"] is None
        if mark:
            for t, dim in ((rope[0], 0), (rope[1], 0)) + (((e0, 1),) if e0.shape[1] > 1 else ()):
                torch._dynamo.maybe_mark_dynamic(t, dim)
        args = (e0, ctx, rope, dtype, mode, ctx_img)
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        if ckpt and self.checkpoint_segments:
            for segment in _split(self.blocks, self.checkpoint_segments):
                tokens = checkpoint(self._run_blocks, tokens, segment, args, mark, True, use_reentrant=False)
        else:
            tokens = self._run_blocks(tokens, self.blocks, args, mark, ckpt)

        out = self.head(tokens, e)
        if sp is not None:
            out = sp.gather(out, length)
        return self.unpatchify(out, grid)

    def _run_blocks(self, tokens: torch.Tensor, blocks, args: tuple, mark: bool, ckpt: bool) -> torch.Tensor:
        """Run ``blocks`` in order on ``tokens`` (``[B, L, D]`` float32), each checkpointed when
        ``ckpt`` (on the host with ``cpu_offload``); ``args`` = ``(e0, ctx, rope, dtype, mode, ctx_img)``."""
        for block in blocks:
            if mark:
                torch._dynamo.maybe_mark_dynamic(tokens, 1)
            if ckpt and self.checkpoint_offload:
                tokens = offloaded_checkpoint(block, tokens, *args, stash_dtype=self.checkpoint_stash_dtype)
            elif ckpt:
                tokens = checkpoint(block, tokens, *args, use_reentrant=False)
            else:
                tokens = block(tokens, *args)
        return tokens

    def unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """``[B, L, pt·ph·pw·C]`` (per token ordered (pt, ph, pw, c), c fastest) to
        ``[B, C, F, H, W]`` (``model.py: WanModel.unpatchify``)."""
        b = out.shape[0]
        pt, ph, pw = self.config.patch_size
        c = self.config.out_channels
        u = out.view(b, *grid, pt, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return u.reshape(b, c, grid[0] * pt, grid[1] * ph, grid[2] * pw)
