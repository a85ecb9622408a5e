"""The Wan VAEs: parity with diffusers' AutoencoderKLWan, streaming memory, tiling, loading.

Parity runs in float32 on tiny random weights (every tensor randomized, including the attention
output projection the official init zeroes) against diffusers 0.42.1, an independent
implementation: Wan2.1 keys go through diffusers' own converter, Wan2.2 keys through the map
below (diffusers has none for them).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from wanlora.io_utils import save_safetensors
from wanlora.models import load_vae
from wanlora.models.loading import CheckpointError
from wanlora.models.vae import (
    LATENT_MEAN,
    LATENT_STD,
    Tiling,
    WanVAE,
    build_vae,
    save_vae_pth,
)

torch.set_num_threads(1)

# Tiny sizes: (kind, build kwargs, frame H, W) — non-square, multiples of the spatial stride.
TINY = {
    "wan2.1": (dict(dim=8), 24, 40),
    "wan2.2": (dict(dim=8, dec_dim=12), 32, 48),
}


def randomize(model: torch.nn.Module, seed: int = 0, head_scale: float = 1.0) -> torch.nn.Module:
    """Every tensor random (norm gains near 1, biases small, weights ~ 1/sqrt(fan_in))."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in model.state_dict().items():
            r = torch.randn(p.shape, generator=g)
            if k.endswith("gamma"):
                p.copy_(1 + 0.1 * r)
            elif p.dim() == 1:
                p.copy_(0.1 * r)
            else:
                p.copy_(r / p[0].numel() ** 0.5)
        # keep the decoded video inside (-1, 1) so the final clamp does not hide differences
        model.decoder.head[2].weight.mul_(head_scale)
        model.decoder.head[2].bias.mul_(head_scale)
    return model


def tiny_vae(kind: str, seed: int = 0) -> WanVAE:
    kw, _, _ = TINY[kind]
    return WanVAE(randomize(build_vae(kind, **kw), seed, head_scale=0.1))


def video(f: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(1, 3, f, h, w, generator=g) * 2 - 1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------
# diffusers oracle


def diffusers_22_key(k: str) -> str:
    """Official Wan2.2 VAE key -> diffusers AutoencoderKLWan(is_residual=True) key."""
    res = {"residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.", "residual.6.": "conv2.",
           "shortcut.": "conv_shortcut."}

    def resnet(rest: str) -> str:
        for a, b in res.items():
            if rest.startswith(a):
                return b + rest[len(a):]
        raise KeyError(rest)

    fixed = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv.", "encoder.conv1.": "encoder.conv_in.",
             "decoder.conv1.": "decoder.conv_in.", "encoder.head.0.": "encoder.norm_out.",
             "encoder.head.2.": "encoder.conv_out.", "decoder.head.0.": "decoder.norm_out.",
             "decoder.head.2.": "decoder.conv_out."}
    for a, b in fixed.items():
        if k.startswith(a) and (a.count(".") > 1 or k.count(".") == 1):
            return b + k[len(a):]
    m = re.match(r"(encoder|decoder)\.middle\.(\d)\.(.*)", k)
    if m:
        part, i, rest = m.groups()
        if i == "1":
            return f"{part}.mid_block.attentions.0.{rest}"
        return f"{part}.mid_block.resnets.{int(i) // 2}.{resnet(rest)}"
    # encoder.downsamples.I.downsamples.J.* / decoder.upsamples.I.upsamples.J.*
    m = re.match(r"(encoder\.down|decoder\.up)samples\.(\d+)\.(?:down|up)samples\.(\d+)\.(.*)", k)
    if m:
        stage, i, j, rest = m.groups()
        if rest.startswith(("resample.", "time_conv.")):
            return f"{stage}_blocks.{i}.{stage.split('.')[1]}sampler.{rest}"
        return f"{stage}_blocks.{i}.resnets.{j}.{resnet(rest)}"
    raise KeyError(k)


def diffusers_twin(vae: WanVAE):
    """An AutoencoderKLWan holding the same weights, and its (mean, std) for normalization."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    sd = vae.model.state_dict()
    cfg = vae.model.config
    if vae.kind == "wan2.1":
        d = diffusers.AutoencoderKLWan(base_dim=cfg["dim"], z_dim=cfg["z_dim"])
        dsd = convert_wan_vae_to_diffusers(sd)
        mean, std = d.config.latents_mean, d.config.latents_std  # diffusers' copy of the constants
    else:
        d = diffusers.AutoencoderKLWan(
            base_dim=cfg["dim"], decoder_base_dim=cfg["dec_dim"], z_dim=cfg["z_dim"], is_residual=True,
            in_channels=12, out_channels=12, patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
            latents_mean=LATENT_MEAN["wan2.2"], latents_std=LATENT_STD["wan2.2"])
        dsd = {diffusers_22_key(k): v for k, v in sd.items()}
        mean, std = d.config.latents_mean, d.config.latents_std
    d.load_state_dict(dsd, strict=True)  # every key mapped, none left over
    shape = (1, -1, 1, 1, 1)
    return d.eval(), torch.tensor(mean).view(shape), torch.tensor(std).view(shape)


@pytest.mark.parametrize("kind", ["wan2.1", "wan2.2"])
def test_parity_with_diffusers(kind):
    vae = tiny_vae(kind)
    d, mean, std = diffusers_twin(vae)
    _, h, w = TINY[kind]
    with torch.no_grad():
        for f in (1, 5, 17):
            x = video(f, h, w, seed=f)
            ours = vae.encode(x)
            ref = (d.encode(x).latent_dist.mean - mean) / std
            assert ours.shape == (1, vae.z_dim, 1 + (f - 1) // 4, h // vae.stride[1], w // vae.stride[2])
            assert rel(ours, ref) < 1e-4, (f, rel(ours, ref))
        for t in (1, 2, 5):
            g = torch.Generator().manual_seed(t)
            z = torch.randn(1, vae.z_dim, t, h // vae.stride[1], w // vae.stride[2], generator=g)
            ours = vae.decode(z)
            ref = d.decode(z * std + mean).sample
            assert ref.abs().max() < 1, "decoded values saturate: the clamp would hide differences"
            assert ours.shape == (1, 3, 1 + 4 * (t - 1), h, w)
            assert rel(ours, ref) < 1e-4, (t, rel(ours, ref))


def test_latent_constants_match_reference():
    # diffusers' default config carries the Wan2.1 constants; both lists hold 16 / 48 channels.
    import inspect

    diffusers = pytest.importorskip("diffusers")
    defaults = inspect.signature(diffusers.AutoencoderKLWan.__init__).parameters
    assert LATENT_MEAN["wan2.1"] == defaults["latents_mean"].default
    assert LATENT_STD["wan2.1"] == defaults["latents_std"].default
    assert len(LATENT_MEAN["wan2.2"]) == len(LATENT_STD["wan2.2"]) == 48


def test_normalization_multiplies_by_float32_reciprocal_std_as_official():
    # Official wrappers: scale = [mean, 1.0 / std] (float32); encode (mu - mean) * scale[1],
    # decode z / scale[1] + mean (wan_numerics.md §7.3, §8.5) — bit for bit, not just close.
    vae = tiny_vae("wan2.2")
    _, h, w = TINY["wan2.2"]
    x = video(5, h, w)
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(LATENT_MEAN["wan2.2"]).view(shape)
    inv_std = (1.0 / torch.tensor(LATENT_STD["wan2.2"])).view(shape)
    with torch.no_grad():
        z = vae.encode(x)
        assert torch.equal(z, (vae.model.encode_raw(x) - mean) * inv_std)
        assert torch.equal(vae.decode(z), vae.model.decode_raw(z / inv_std + mean).clamp(-1, 1))


# ---------------------------------------------------------------------------------------------
# streaming: causality and memory


@pytest.mark.parametrize("kind", ["wan2.1", "wan2.2"])
def test_causal_prefix_and_first_frame_latent(kind):
    vae = tiny_vae(kind)
    _, h, w = TINY[kind]
    x = video(9, h, w)
    z9, z5, z1 = vae.encode(x), vae.encode(x[:, :, :5]), vae.encode(x[:, :, :1])
    torch.testing.assert_close(z5, z9[:, :, :2], rtol=1e-5, atol=1e-5)
    # the first latent frame IS the image latent of the first frame (TI2V conditioning relies on it)
    torch.testing.assert_close(z1, z9[:, :, :1], rtol=1e-5, atol=1e-5)


def largest_activation(vae: WanVAE, fn) -> int:
    """Largest tensor (elements) any submodule returns while ``fn`` runs."""
    biggest = [0]

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            biggest[0] = max(biggest[0], out.numel())

    handles = [m.register_forward_hook(hook) for m in vae.model.modules() if m is not vae.model]
    try:
        fn()
    finally:
        for hd in handles:
            hd.remove()
    return biggest[0]


@pytest.mark.parametrize("kind", ["wan2.1", "wan2.2"])
def test_activations_do_not_grow_with_clip_length(kind):
    vae = tiny_vae(kind)
    _, h, w = TINY[kind]
    enc = [largest_activation(vae, lambda f=f: vae.encode(video(f, h, w))) for f in (17, 33)]
    z = [torch.zeros(1, vae.z_dim, t, h // vae.stride[1], w // vae.stride[2]) for t in (5, 9)]
    dec = [largest_activation(vae, lambda z=zz: vae.decode(z)) for zz in z]
    assert enc[0] == enc[1] and dec[0] == dec[1], (enc, dec)


_RSS_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from wanlora.models.vae import WanVAE, build_vae
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith(("VmHWM", "VmRSS")):
                yield line.split()[0], int(line.split()[1])
    vae = WanVAE(build_vae("wan2.1", dim=16))
    vae.encode(torch.zeros(1, 3, 5, 64, 64))  # first-call allocations (kernels, pools) out of the way
    out = {}
    for f in (17, 33):
        x = torch.rand(1, 3, f, 64, 64) * 2 - 1
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
        base = dict(hwm())["VmRSS:"]
        vae.encode(x)
        out[f] = dict(hwm())["VmHWM:"] - base
        del x
    print(json.dumps(out))
""")


def test_peak_memory_flat_in_clip_length():
    """Peak RSS (kB) above the pre-encode level for 33 frames stays close to that for 17."""
    # a fixed mmap threshold makes glibc return large freed blocks at once, so RSS follows the
    # live tensors and each run's peak is its own
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "MALLOC_MMAP_THRESHOLD_": "131072"}
    r = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], capture_output=True, text=True, timeout=120, env=env)
    if r.returncode != 0 and "clear_refs" in r.stderr:
        pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
    assert r.returncode == 0, r.stderr
    peak = {int(k): v for k, v in json.loads(r.stdout).items()}
    # a non-streamed encode's activations grow with the frame count (~2x from 17 to 33 frames)
    assert peak[33] < 1.15 * peak[17] + 1024, peak


# ---------------------------------------------------------------------------------------------
# real media round trip


def test_round_trip_real_clip(media_dir):
    av = pytest.importorskip("av")
    frames = []
    with av.open(str(media_dir / "skeleton_dance.mp4")) as c:
        for fr in c.decode(video=0):
            frames.append(torch.from_numpy(fr.to_ndarray(format="rgb24")))
            if len(frames) == 5:
                break
    x = torch.stack(frames).permute(3, 0, 1, 2).float().div(127.5).sub(1)[None]  # [1, 3, 5, H, W]
    x = torch.nn.functional.interpolate(x[0].transpose(0, 1), size=(48, 64), mode="area").transpose(0, 1)[None]
    assert x.min() >= -1 and x.max() <= 1
    for kind in ("wan2.1", "wan2.2"):
        vae = tiny_vae(kind)
        z = vae.encode(x)
        s = vae.stride
        assert z.shape == (1, vae.z_dim, 2, 48 // s[1], 64 // s[2]) and z.dtype == torch.float32
        assert torch.isfinite(z).all()
        y = vae.decode(z)
        assert y.shape == x.shape and y.dtype == torch.float32
        assert y.min() >= -1 and y.max() <= 1 and torch.isfinite(y).all()


# ---------------------------------------------------------------------------------------------
# tiling


@pytest.mark.parametrize("kind", ["wan2.1", "wan2.2"])
def test_tiled_decode_exact_for_local_decoder(kind):
    """With the attention output projection zero (official init) the decoder is local, and with a
    margin beyond its receptive radius (~18 latent pixels) tiled == untiled to float rounding."""
    vae = tiny_vae(kind)
    for blk in (vae.model.decoder.middle[1],):
        torch.nn.init.zeros_(blk.proj.weight)
    s = vae.stride[1]
    z = torch.randn(1, vae.z_dim, 2, 1, 70, generator=torch.Generator().manual_seed(3))
    full = vae.decode(z)
    tiled = vae.decode(z, tiling=Tiling(tile=40 * s, overlap=24 * s, margin=10 * s))  # 3 tiles
    assert rel(tiled, full) < 1e-5
    if kind == "wan2.1":  # without the margin the cut's zero padding shows
        assert rel(vae.decode(z, tiling=Tiling(tile=40 * s, overlap=24 * s, margin=0)), full) > 1e-4


@pytest.mark.parametrize("kind", ["wan2.1", "wan2.2"])
def test_tiled_decode_single_tile_and_seams(kind):
    vae = tiny_vae(kind)
    s = vae.stride[1]
    z = torch.randn(1, vae.z_dim, 2, 8, 12, generator=torch.Generator().manual_seed(4))
    full = vae.decode(z)
    torch.testing.assert_close(vae.decode(z, tiling=Tiling(tile=16 * s, overlap=8 * s, margin=s)), full)
    # 2x2 tiles on random weights, whose global attention sees only its tile: the tiles land in
    # place (a misplaced or unweighted tile gives a relative error near 1; measured ~0.1)
    tiled = vae.decode(z, tiling=Tiling(tile=8 * s, overlap=4 * s, margin=s // 2))
    assert tiled.shape == full.shape
    assert rel(tiled, full) < 0.3, rel(tiled, full)


def test_tiling_rejects_bad_layout():
    vae = tiny_vae("wan2.1")
    z = torch.zeros(1, 16, 1, 4, 4)
    with pytest.raises(ValueError, match="multiples of the VAE's spatial stride 8"):
        vae.decode(z, tiling=Tiling(tile=100, overlap=24, margin=4))
    with pytest.raises(ValueError, match="2\\*margin < overlap < tile"):
        vae.decode(z, tiling=Tiling(tile=64, overlap=16, margin=8))
    # an int is a tile side in pixels with a fitting overlap and margin
    torch.testing.assert_close(vae.decode(z, tiling=64), vae.decode(z))


# ---------------------------------------------------------------------------------------------
# files: loading, detection, identity, errors


@pytest.mark.parametrize("kind", ["wan2.1", "wan2.2"])
def test_load_official_pth_and_comfy_safetensors(tmp_path, kind):
    vae = tiny_vae(kind)
    pth = tmp_path / ("Wan2.1_VAE.pth" if kind == "wan2.1" else "Wan2.2_VAE.pth")
    save_vae_pth(vae.model, pth)
    sft = tmp_path / "vae_bf16.safetensors"
    save_safetensors({k: v.to(torch.bfloat16) for k, v in vae.model.state_dict().items()}, sft)

    a = load_vae(pth)
    b = load_vae(sft)  # bf16 file, computed in float32
    assert a.kind == b.kind == kind and a.z_dim == vae.z_dim and a.stride == vae.stride
    assert a.dtype == b.dtype == torch.float32 and a.device.type == "cpu"
    assert a.identity == vae.identity == b.identity  # same weights, any storage precision
    assert a.identity.startswith(kind + "-")
    _, h, w = TINY[kind]
    x = video(5, h, w)
    torch.testing.assert_close(a.encode(x), vae.encode(x), rtol=0, atol=0)
    assert rel(b.encode(x), a.encode(x)) < 0.05

    other = WanVAE(randomize(build_vae(kind, **TINY[kind][0]), seed=7))
    assert other.identity != a.identity


def test_bf16_runs_and_stays_close():
    vae = tiny_vae("wan2.1")
    x = video(5, 24, 40)
    ref = vae.encode(x)
    half = WanVAE(build_vae("wan2.1", dim=8)).to(dtype=torch.bfloat16)
    half.model.load_state_dict(vae.model.state_dict())
    z = half.encode(x)
    assert half.dtype == torch.bfloat16 and z.dtype == torch.float32
    assert rel(z, ref) < 0.05
    assert half.decode(z).dtype == torch.float32


def test_bad_inputs_raise_clear_errors():
    vae = tiny_vae("wan2.1")
    with pytest.raises(ValueError, match="4n\\+1.*Trim the clip to 13 frames or pad it to 17"):
        vae.encode(video(16, 24, 40))
    with pytest.raises(ValueError, match="not a multiple of 8"):
        vae.encode(video(5, 24, 36))
    with pytest.raises(ValueError, match="unsqueeze"):
        vae.encode(torch.zeros(1, 3, 24, 40))
    with pytest.raises(ValueError, match="other VAE"):
        vae.decode(torch.zeros(1, 48, 1, 3, 5))


@pytest.mark.parametrize("keys, flag", [
    ({"patch_embedding.weight": (8, 16, 1, 2, 2), "blocks.0.self_attn.q.weight": (8, 8)}, "--dit"),
    ({"model.diffusion_model.blocks.0.self_attn.q.weight": (8, 8)}, "--dit"),
    ({"token_embedding.weight": (10, 8), "blocks.0.attn.q.weight": (8, 8)}, "--t5"),
    ({"encoder.conv_in.weight": (8, 3, 3, 3, 3), "quant_conv.weight": (32, 32, 1, 1, 1)}, "diffusers-format"),
    ({"foo": (1,)}, "not a Wan VAE"),
])
def test_wrong_file_as_vae_is_named(tmp_path, keys, flag):
    f = tmp_path / "wrong.safetensors"
    save_safetensors({k: torch.zeros(s) for k, s in keys.items()}, f)
    with pytest.raises(CheckpointError, match=re.escape(flag)):
        load_vae(f)


def test_truncated_vae_names_missing_keys(tmp_path):
    sd = build_vae("wan2.2", dim=8).state_dict()
    del sd["decoder.head.2.weight"]
    f = tmp_path / "broken.safetensors"
    save_safetensors(sd, f)
    with pytest.raises(CheckpointError, match="1 missing keys \\['decoder.head.2.weight'\\]"):
        load_vae(f)


def test_build_vae_released_shapes_without_allocating():
    with torch.device("meta"):
        v21, v22 = build_vae("wan2.1"), build_vae("wan2.2")
    assert v21.state_dict()["encoder.conv1.weight"].shape == (96, 3, 3, 3, 3)
    assert v21.state_dict()["decoder.conv1.weight"].shape == (384, 16, 3, 3, 3)
    assert v22.state_dict()["encoder.conv1.weight"].shape == (160, 12, 3, 3, 3)
    assert v22.state_dict()["decoder.conv1.weight"].shape == (1024, 48, 3, 3, 3)
    assert v21.stride == (4, 8, 8) and v22.stride == (4, 16, 16)
    n21 = sum(p.numel() for p in v21.parameters())
    n22 = sum(p.numel() for p in v22.parameters())
    assert 120e6 < n21 < 135e6 and 650e6 < n22 < 720e6, (n21, n22)


def test_wrapped_keys_are_unwrapped(tmp_path):
    model = build_vae("wan2.1", dim=8)
    f = tmp_path / "with_prefix.safetensors"
    save_safetensors({"first_stage_model." + k: v for k, v in model.state_dict().items()}, f)
    assert load_vae(f).identity == WanVAE(model).identity


def test_batch_equals_one_by_one():
    vae = tiny_vae("wan2.2")
    _, h, w = TINY["wan2.2"]
    x = torch.cat([video(5, h, w, seed=1), video(5, h, w, seed=2)])
    z = vae.encode(x)
    torch.testing.assert_close(z[1:], vae.encode(x[1:]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vae.decode(z)[:1], vae.decode(z[:1]), rtol=1e-5, atol=1e-5)
