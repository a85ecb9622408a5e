"""The Wan2.2 video VAE (z = 48, stride 4x16x16), used by TI2V-5B.

Matches the official ``wan/modules/vae2_2.py`` (``WanVAE_`` as built by ``Wan2_2_VAE``): a 2x2
pixel patchify (3 -> 12 channels), encoder stages with an ``AvgDown3D`` shortcut, decoder stages
with a ``DupUp3D`` shortcut, upsample convs that keep their width, and a decoder wider than the
encoder. Released config: encoder ``dim=160``, decoder ``dec_dim=256``, ``z_dim=48``,
``dim_mult=(1, 2, 4, 4)``, ``num_res_blocks=2``, temporal downsampling in stages 2 and 3.
The module tree equals the keys of ``Wan2.2_VAE.pth``
(``encoder.downsamples.{i}.downsamples.{j}.*``, ``decoder.upsamples.{i}.upsamples.{j}.*``).
"""

from __future__ import annotations

import torch
from torch import nn

from wanlora.models.vae_blocks import (
    AvgDown3D,
    CausalConv3d,
    Decoder3d,
    DupUp3D,
    Encoder3d,
    Resample,
    ResidualBlock,
    StreamCache,
    StreamingVAE,
)

__all__ = ["WanVAE22Model", "DownBlock", "UpBlock"]


class DownBlock(nn.Module):
    """One encoder stage: residual blocks (+ ``Resample``) plus an ``AvgDown3D`` shortcut
    (official ``Down_ResidualBlock``). ``[B, cin, T, H, W]`` -> ``[B, cout, T/ft, H/fs, W/fs]``."""

    def __init__(self, cin: int, cout: int, num_res_blocks: int, temporal: bool, down: bool, dropout=0.0):
        super().__init__()
        self.avg_shortcut = AvgDown3D(cin, cout, factor_t=2 if temporal else 1, factor_s=2 if down else 1)
        layers: list[nn.Module] = []
        for _ in range(num_res_blocks):
            layers.append(ResidualBlock(cin, cout, dropout))
            cin = cout
        if down:
            layers.append(Resample(cout, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        h = x
        for layer in self.downsamples:
            h = layer(h, cache)
        return h + self.avg_shortcut(x)


class UpBlock(nn.Module):
    """One decoder stage: residual blocks (+ width-keeping ``Resample``) plus a ``DupUp3D``
    shortcut when the stage upsamples (official ``Up_ResidualBlock``)."""

    def __init__(self, cin: int, cout: int, num_res_blocks: int, temporal: bool, up: bool, dropout=0.0):
        super().__init__()
        self.avg_shortcut = DupUp3D(cin, cout, factor_t=2 if temporal else 1, factor_s=2) if up else None
        layers: list[nn.Module] = []
        for _ in range(num_res_blocks):
            layers.append(ResidualBlock(cin, cout, dropout))
            cin = cout
        if up:
            layers.append(Resample(cout, "upsample3d" if temporal else "upsample2d", out_dim=cout))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        h = x
        for layer in self.upsamples:
            h = layer(h, cache)
        if self.avg_shortcut is None:
            return h
        return h + self.avg_shortcut(x, first_chunk=cache.first)


class WanVAE22Model(StreamingVAE):
    """Wan2.2 causal video autoencoder on raw latents (see :class:`StreamingVAE`).

    ``encode_raw``: ``[B, 3, 1+4n, H, W]`` pixels in [-1, 1] -> posterior mean
    ``[B, z_dim, 1+n, H/16, W/16]``; ``decode_raw`` inverts (unclamped). ``H``, ``W`` multiples of 16.

    Args:
        dim: encoder base width (160 released).
        dec_dim: decoder base width (256 released; defaults to 256 like the official ``WanVAE_``,
            pass a small value for tiny models).
        z_dim: latent channels (48 released; the TI2V-5B DiT expects 48).
        dim_mult, num_res_blocks, temporal_downsample: as in ``WanVAE21Model``.
    """

    kind = "wan2.2"
    patch = 2

    def __init__(self, dim: int = 160, dec_dim: int = 256, z_dim: int = 48, dim_mult=(1, 2, 4, 4),
                 num_res_blocks: int = 2, temporal_downsample=(False, True, True), dropout: float = 0.0):
        super().__init__()
        self.dim, self.dec_dim, self.z_dim = dim, dec_dim, z_dim
        self.config = dict(dim=dim, dec_dim=dec_dim, z_dim=z_dim, dim_mult=tuple(dim_mult),
                           num_res_blocks=num_res_blocks, temporal_downsample=tuple(temporal_downsample))
        n = len(dim_mult)
        s = self.patch * 2 ** (n - 1)
        self.stride = (2 ** sum(temporal_downsample), s, s)
        tdown = tuple(temporal_downsample) + (False,) * n
        tup = tuple(temporal_downsample)[::-1] + (False,) * n

        dims = [dim * m for m in (1, *dim_mult)]
        down = [DownBlock(cin, cout, num_res_blocks, tdown[i], i < n - 1, dropout)
                for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:]))]
        self.encoder = Encoder3d(3 * self.patch ** 2, dims[0], dims[-1], 2 * z_dim, down)
        self.conv1 = CausalConv3d(2 * z_dim, 2 * z_dim, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)

        dims = [dec_dim * m for m in (dim_mult[-1], *dim_mult[::-1])]
        up = [UpBlock(cin, cout, num_res_blocks + 1, tup[i] and i < n - 1, i < n - 1, dropout)
              for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:]))]
        self.decoder = Decoder3d(z_dim, dims[0], dims[-1], 3 * self.patch ** 2, up)
