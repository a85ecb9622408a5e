"""Layers shared by the Wan2.1 and Wan2.2 causal video VAEs, streamed chunk by chunk.

Matches the building blocks of the official ``wan/modules/vae2_1.py`` and ``vae2_2.py``
(``CausalConv3d``, ``RMS_norm``, ``ResidualBlock``, ``AttentionBlock``, ``Resample``,
``AvgDown3D``, ``DupUp3D``, ``patchify``). Attribute names equal the official checkpoint keys
(``residual.0.gamma``, ``residual.2.weight``, ``resample.1.weight``, ``time_conv.weight``, ...),
so official files load without renaming.

Streaming. The VAEs run a clip through the network a few frames at a time (encoder: 1, 4, 4, ...
pixel frames; decoder: one latent frame per chunk). Every temporal layer keeps what it needs from
the previous chunk in a :class:`StreamCache` (a dict keyed by the layer), which replaces the
official ``feat_cache``/``feat_idx`` lists. Running the chunks in order gives exactly the result
of the official chunked code; memory depends on the frame size, never on the clip length.

Tensors are ``[B, C, T, H, W]`` (batch, channels, frames, height, width) throughout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "StreamCache",
    "CausalConv3d",
    "RMSNorm",
    "ResidualBlock",
    "AttentionBlock",
    "Resample",
    "AvgDown3D",
    "DupUp3D",
    "patchify",
    "unpatchify",
    "Encoder3d",
    "Decoder3d",
    "StreamingVAE",
]


class StreamCache(dict):
    """Per-clip state of the temporal layers while a clip streams through in chunks.

    Keys are the layer modules; values are the tensors (or flags) each layer carries over to the
    next chunk. A fresh cache starts every encode/decode call, so a model holds no state.
    ``first`` is true while the clip's first chunk runs (the Wan2.2 ``DupUp3D`` needs it).
    """

    first: bool = True


class CausalConv3d(nn.Conv3d):
    """3D convolution that pads time only in front (causal), streaming across chunks.

    A kernel of temporal size ``k`` with ``padding=(p, ph, pw)`` pads ``2p`` frames in front
    (official ``CausalConv3d``; every cached conv has ``k = 3``, ``p = 1``) and ``ph``/``pw``
    symmetrically in space. With a cache, the last ``2p`` input frames of the clip seen so far are
    kept and placed in front of the next chunk instead of zeros.

    Input ``[B, C_in, T, H, W]`` -> output ``[B, C_out, T', H', W']``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        p = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        self.time_pad = 2 * p[0]
        self.space_pad = (p[2], p[2], p[1], p[1])

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        front = self.time_pad
        if front and cache is not None:
            past = cache.get(self)
            if past is not None:
                x = torch.cat([past.to(x.dtype), x], dim=2)
                front -= past.shape[2]
            # Keep the last `time_pad` frames of the clip so far (fewer while the clip is short).
            cache[self] = x[:, :, -self.time_pad:].clone()
        x = F.pad(x, (*self.space_pad, front, 0))
        return super().forward(x)


class RMSNorm(nn.Module):
    """Channel L2 normalization (eps 1e-12) times ``sqrt(C)`` times a learned ``gamma``.

    Official ``RMS_norm`` (channel-first): it is *not* mean-square + eps. ``gamma`` has shape
    ``[C, 1, 1, 1]`` for video tensors (``images=False``) and ``[C, 1, 1]`` for per-frame images,
    as in the checkpoints.
    """

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = math.sqrt(dim)
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """``RMS -> SiLU -> conv3 -> RMS -> SiLU -> (dropout) -> conv3`` plus a shortcut.

    ``residual`` keeps the official ``nn.Sequential`` indices (0 norm, 2 conv, 3 norm, 6 conv) so
    keys match; the shortcut is a 1x1x1 conv when the channel count changes.
    Input ``[B, in_dim, T, H, W]`` -> ``[B, out_dim, T, H, W]``.
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim),
            nn.SiLU(),
            nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        r = self.residual
        h = r[2](F.silu(r[0](x)), cache)
        h = r[6](r[5](F.silu(r[3](h))), cache)
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention within each frame, plus the input (residual).

    Scale ``1/sqrt(C)``; ``to_qkv`` and ``proj`` are 1x1 ``Conv2d`` (official ``AttentionBlock``).
    Frames are independent, so no cache is needed. ``[B, C, T, H, W]`` -> same shape.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(frames)).reshape(b * t, 3 * c, h * w).transpose(1, 2)
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # each [bt, 1, hw, c]
        a = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # [bt, hw, c]
        a = self.proj(a.transpose(1, 2).reshape(b * t, c, h, w))
        return x + a.reshape(b, t, c, h, w).transpose(1, 2)


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D ``fn`` to every frame of ``[B, C, T, H, W]``."""
    b, _, t = x.shape[:3]
    y = fn(x.transpose(1, 2).flatten(0, 1))
    return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)


class _NearestUp2x(nn.Module):
    """Nearest-exact ×2 spatial upsampling of ``[N, C, H, W]`` (official ``Upsample``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


class Resample(nn.Module):
    """Spatial ×2 down/up sampling, optionally with causal temporal ×2 (official ``Resample``).

    Modes:

    * ``downsample2d``: pad right/bottom by 1, 3x3 conv stride 2 (per frame).
    * ``downsample3d``: the same, then in time: the first chunk passes through; later chunks are
      prefixed by the previous chunk's last frame and run a kernel-3, stride-2 ``time_conv``
      (T -> T/2 for the 4- and 2-frame encoder chunks).
    * ``upsample2d``: nearest ×2, 3x3 conv to ``out_dim`` channels.
    * ``upsample3d``: first a causal ``time_conv`` ``dim -> 2·dim`` whose two channel halves
      become two consecutive frames (T -> 2T), skipped on the clip's first chunk (one frame stays
      one frame); then as ``upsample2d``.

    ``out_dim`` is ``dim // 2`` in Wan2.1 and ``dim`` in Wan2.2.
    """

    def __init__(self, dim: int, mode: str, out_dim: int | None = None):
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(_NearestUp2x(), nn.Conv2d(dim, out_dim or dim, 3, padding=1))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            raise ValueError(f"Resample: unknown mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        if self.mode == "upsample3d" and cache is not None:
            if self in cache:  # not the clip's first chunk
                b, c, t, h, w = x.shape
                y = self.time_conv(x, cache)  # [B, 2C, T, H, W]
                x = y.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
            else:
                cache[self] = True
        x = _per_frame(self.resample, x)
        if self.mode == "downsample3d" and cache is not None:
            last = x[:, :, -1:].clone()
            if self in cache:
                x = self.time_conv(torch.cat([cache[self].to(x.dtype), x], dim=2))
            cache[self] = last
        return x


class AvgDown3D(nn.Module):
    """Parameter-free shortcut of the Wan2.2 encoder stages: space/time-to-channel, group mean.

    Pads time in front with zeros to a multiple of ``factor_t``, folds ``factor_t × factor_s ×
    factor_s`` neighbours into channels (channel index ``c·f + (dt·s + dh)·s + dw``) and averages
    consecutive groups of ``in·f/out`` channels (official ``AvgDown3D``). Stateless per chunk.
    ``[B, in, T, H, W]`` -> ``[B, out, ceil(T/ft), H/fs, W/fs]``.
    """

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1):
        super().__init__()
        self.out_channels, self.ft, self.fs = out_channels, factor_t, factor_s
        self.group = in_channels * factor_t * factor_s * factor_s // out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.ft, self.fs
        x = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % ft, 0))
        b, c, t, h, w = x.shape
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(b, self.out_channels, self.group, t // ft, h // fs, w // fs)
        return x.mean(dim=2)


class DupUp3D(nn.Module):
    """Parameter-free shortcut of the Wan2.2 decoder stages: channel-to-space/time duplication.

    Repeats every channel ``out·f/in`` times, then unfolds ``factor_t × factor_s × factor_s``
    channel groups into time and space (official ``DupUp3D``). On the clip's first chunk the first
    ``factor_t - 1`` frames are dropped (one latent frame makes one frame).
    ``[B, in, T, H, W]`` -> ``[B, out, T·ft, H·fs, W·fs]``.
    """

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1):
        super().__init__()
        self.out_channels, self.ft, self.fs = out_channels, factor_t, factor_s
        self.repeats = out_channels * factor_t * factor_s * factor_s // in_channels

    def forward(self, x: torch.Tensor, first_chunk: bool = False) -> torch.Tensor:
        ft, fs = self.ft, self.fs
        b, _, t, h, w = x.shape
        x = x.repeat_interleave(self.repeats, dim=1)
        x = x.view(b, self.out_channels, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.reshape(b, self.out_channels, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1:] if first_chunk else x


def patchify(x: torch.Tensor, p: int = 2) -> torch.Tensor:
    """``[B, C, F, H, W] -> [B, C·p·p, F, H/p, W/p]``; channel ``c·p² + r·p + q`` holds the pixel at
    w-offset ``r`` and h-offset ``q`` (official ``patchify``: the w-offset is the slower index)."""
    b, c, f, h, w = x.shape
    x = x.view(b, c, f, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, c * p * p, f, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Exact inverse of :func:`patchify`: ``[B, C·p·p, F, h, w] -> [B, C, F, h·p, w·p]``."""
    b, cpp, f, h, w = x.shape
    x = x.view(b, cpp // (p * p), p, p, f, h, w).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(b, cpp // (p * p), f, h * p, w * p)


def _middle(c: int) -> nn.Sequential:
    """The middle block of both halves: residual, attention, residual (keys ``middle.{0,1,2}``)."""
    return nn.Sequential(ResidualBlock(c, c), AttentionBlock(c), ResidualBlock(c, c))


class Encoder3d(nn.Module):
    """``conv1 -> downsamples -> middle (res, attention, res) -> head (RMS, SiLU, conv)``.

    ``downsamples`` is the version's stage list (Wan2.1: flat residual blocks and ``Resample``;
    Wan2.2: one ``DownBlock`` per stage). ``[B, in_channels, T, H, W]`` ->
    ``[B, 2·z_dim, T', H', W']`` for one chunk, streaming through ``cache``.
    """

    def __init__(self, in_channels: int, dim: int, out_dim: int, z2: int, downsamples: list[nn.Module]):
        super().__init__()
        self.conv1 = CausalConv3d(in_channels, dim, 3, padding=1)
        self.downsamples = nn.Sequential(*downsamples)
        self.middle = _middle(out_dim)
        self.head = nn.Sequential(RMSNorm(out_dim), nn.SiLU(), CausalConv3d(out_dim, z2, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in (*self.downsamples, *self.middle):
            x = layer(x, cache)
        return self.head[2](F.silu(self.head[0](x)), cache)


class Decoder3d(nn.Module):
    """``conv1 -> middle (res, attention, res) -> upsamples -> head (RMS, SiLU, conv)``.

    ``[B, z_dim, 1, h, w]`` (one latent frame) -> ``[B, out_channels, 1 or 4, H, W]``, streaming
    through ``cache``.
    """

    def __init__(self, z_dim: int, top_dim: int, out_dim: int, out_channels: int, upsamples: list[nn.Module]):
        super().__init__()
        self.conv1 = CausalConv3d(z_dim, top_dim, 3, padding=1)
        self.middle = _middle(top_dim)
        self.upsamples = nn.Sequential(*upsamples)
        self.head = nn.Sequential(RMSNorm(out_dim), nn.SiLU(), CausalConv3d(out_dim, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in (*self.middle, *self.upsamples):
            x = layer(x, cache)
        return self.head[2](F.silu(self.head[0](x)), cache)


class StreamingVAE(nn.Module):
    """The chunk loops shared by both Wan VAEs (official ``WanVAE_.encode`` / ``decode``).

    Subclasses set ``encoder``, ``conv1`` (``2z -> 2z``, 1x1x1), ``conv2`` (``z -> z``), ``decoder``,
    ``z_dim``, ``patch`` (pixel patchify factor, 1 or 2) and ``stride`` ``(4, s, s)``.
    These methods work on raw (unnormalized) latents; ``wanlora.models.vae.WanVAE`` adds the
    official normalization, checks and clamping.
    """

    z_dim: int
    patch: int = 1

    def encode_raw(self, video: torch.Tensor) -> torch.Tensor:
        """Posterior mean ``mu`` of ``video [B, 3, 1+4n, H, W]`` -> ``[B, z, 1+n, H/s, W/s]``.

        Chunks of 1, 4, 4, ... pixel frames; frame counts are checked by the caller.
        """
        x = patchify(video, self.patch) if self.patch > 1 else video
        cache = StreamCache()
        outs = []
        for start, stop in [(0, 1)] + [(i, i + 4) for i in range(1, x.shape[2], 4)]:
            cache.first = start == 0
            outs.append(self.encoder(x[:, :, start:stop], cache))
        del cache
        mu, _log_var = self.conv1(torch.cat(outs, dim=2)).chunk(2, dim=1)
        return mu

    def decode_raw(self, mu: torch.Tensor) -> torch.Tensor:
        """Unclamped reconstruction of raw latents ``[B, z, T, h, w]`` -> ``[B, 3, 1+4(T-1), H, W]``.

        One latent frame per chunk: the first gives 1 pixel frame, every later one 4.
        """
        x = self.conv2(mu)
        cache = StreamCache()
        out = None
        t0 = 0
        for i in range(x.shape[2]):
            cache.first = i == 0
            y = self.decoder(x[:, :, i:i + 1], cache)
            if out is None:  # the video is written in place: no second copy from a final cat
                frames = y.shape[2] + (x.shape[2] - 1) * self.stride[0]
                out = y.new_empty(*y.shape[:2], frames, *y.shape[3:])
            out[:, :, t0:t0 + y.shape[2]] = y
            t0 += y.shape[2]
        del cache
        return unpatchify(out, self.patch) if self.patch > 1 else out
