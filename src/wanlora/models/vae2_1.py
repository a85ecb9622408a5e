"""The Wan2.1 video VAE (z = 16, stride 4x8x8), used by every Wan2.1 task and Wan2.2 A14B.

Matches the official ``wan/modules/vae2_1.py`` (``WanVAE_`` built by ``_video_vae``): the module
tree equals the checkpoint keys of ``Wan2.1_VAE.pth`` (and ComfyUI's ``wan_2.1_vae.safetensors``),
``encoder.*``, ``conv1.*``, ``conv2.*``, ``decoder.*``. Released config: ``dim=96``, ``z_dim=16``,
``dim_mult=(1, 2, 4, 4)``, ``num_res_blocks=2``, temporal downsampling in stages 2 and 3.
Smaller ``dim`` gives the tiny test models.
"""

from __future__ import annotations

from torch import nn

from wanlora.models.vae_blocks import CausalConv3d, Decoder3d, Encoder3d, Resample, ResidualBlock, StreamingVAE

__all__ = ["WanVAE21Model"]


class WanVAE21Model(StreamingVAE):
    """Wan2.1 causal video autoencoder on raw latents (see :class:`StreamingVAE`).

    ``encode_raw``: ``[B, 3, 1+4n, H, W]`` pixels in [-1, 1] -> posterior mean
    ``[B, z_dim, 1+n, H/8, W/8]``; ``decode_raw`` inverts (unclamped). ``H``, ``W`` multiples of 8.

    Args:
        dim: base channel width (96 released; any multiple of 2 works, e.g. 8 for tests).
        z_dim: latent channels (16 released; the DiT expects 16).
        dim_mult: per-stage width multipliers.
        num_res_blocks: residual blocks per encoder stage (the decoder has one more).
        temporal_downsample: which of the first ``len(dim_mult) - 1`` stages halve time.
    """

    kind = "wan2.1"
    patch = 1

    def __init__(self, dim: int = 96, z_dim: int = 16, dim_mult=(1, 2, 4, 4), num_res_blocks: int = 2,
                 temporal_downsample=(False, True, True), dropout: float = 0.0):
        super().__init__()
        self.dim, self.z_dim = dim, z_dim
        self.config = dict(dim=dim, z_dim=z_dim, dim_mult=tuple(dim_mult), num_res_blocks=num_res_blocks,
                           temporal_downsample=tuple(temporal_downsample))
        n = len(dim_mult)
        s = 2 ** (n - 1)
        self.stride = (2 ** sum(temporal_downsample), s, s)

        dims = [dim * m for m in (1, *dim_mult)]
        down: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                down.append(ResidualBlock(cin, cout, dropout))
                cin = cout
            if i < n - 1:
                down.append(Resample(cout, "downsample3d" if temporal_downsample[i] else "downsample2d"))
        self.encoder = Encoder3d(3, dims[0], dims[-1], 2 * z_dim, down)
        self.conv1 = CausalConv3d(2 * z_dim, 2 * z_dim, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)

        temporal_upsample = tuple(temporal_downsample)[::-1]
        dims = [dim * m for m in (dim_mult[-1], *dim_mult[::-1])]
        up: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                cin //= 2  # the previous stage's upsample conv halved the channels
            for _ in range(num_res_blocks + 1):
                up.append(ResidualBlock(cin, cout, dropout))
                cin = cout
            if i < n - 1:
                mode = "upsample3d" if temporal_upsample[i] else "upsample2d"
                up.append(Resample(cout, mode, out_dim=cout // 2))
        self.decoder = Decoder3d(z_dim, dims[0], dims[-1], 3, up)

