"""The generation pipeline: sizes, noise, conditioning, and end-to-end parity with diffusers' WanPipeline."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from dit_oracle import diffusers_transformer

from wanlora.conditioning import best_output_size, i2v_mask, i2v_size, ti2v_image
from wanlora.inference.pipeline import GenerationRequest, WanPipeline, initial_noise
from wanlora.inference.sampling import make_schedule

torch.set_num_threads(1)


# --- sizes ---------------------------------------------------------------------------------------


def test_i2v_size_official_examples():
    # 1280*720 area: a 16:9 landscape image gives 720x1280, a 9:16 portrait one 1280x720 (H, W)
    assert i2v_size(1920, 1080, 1280 * 720) == (720, 1280)
    assert i2v_size(1080, 1920, 1280 * 720) == (1280, 720)
    # a 3:4 portrait at 832*480: lat = 2*floor(floor(sqrt(A*ar)/8)/2)
    h, w = i2v_size(600, 800, 832 * 480)
    assert (h, w) == (720, 544) and h % 16 == 0 and w % 16 == 0


def test_ti2v_best_output_size():
    assert best_output_size(1280, 704, 32, 32, 1280 * 704) == (1280, 704)
    ow, oh = best_output_size(704, 1280, 32, 32, 1280 * 704)
    assert (ow, oh) == (704, 1280)
    # square image: both candidates (928x960, 960x928) are equally far; the tie goes to height-first
    assert best_output_size(1000, 1000, 32, 32, 1280 * 704) == (960, 928)


def test_too_small_area_is_a_value_error():
    """An area too small for the image's aspect ratio is a user error, not a ZeroDivisionError or an
    empty latent; where only one of the two TI2V candidates is empty, the other one is used."""
    with pytest.raises(ValueError, match="too small"):
        i2v_size(100, 100, 8 * 8)
    with pytest.raises(ValueError, match="too small"):
        i2v_size(4000, 1, 480 * 832)  # 4000:1 -- the short side rounds to 0
    with pytest.raises(ValueError, match="too small"):
        best_output_size(100, 100, 32, 32, 16 * 16)
    # A = 1500, ratio 2.646: the height-first candidate has height 0, the width-first one is 32x32
    assert best_output_size(2646, 1000, 32, 32, 1500) == (32, 32)


def test_ti2v_image_resize_and_center_crop():
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    x, (oh, ow) = ti2v_image(img, 64 * 64, 32)
    assert x.shape == (3, oh, ow) and (ow, oh) == best_output_size(300, 100, 32, 32, 64 * 64)
    assert x[0].min() == 1.0 and x[1].max() == -1.0  # red in [-1, 1]


def test_initial_noise_is_one_randn_call():
    g = torch.Generator().manual_seed(7)
    ref = torch.randn(16, 2, 4, 6, generator=g, dtype=torch.float32)
    assert torch.equal(initial_noise((16, 2, 4, 6), 7), ref)
    assert torch.equal(initial_noise((16, 2, 4, 6), 7, cpu_noise=True), ref)


# --- pipeline on tiny models ---------------------------------------------------------------------


def _tiny_models(tiny_dir, task):
    from wanlora.models import load_dit, load_vae

    d = tiny_dir(task)
    flags = json.loads((d / "manifest.json").read_text())["flags"]
    if "--dit_high_noise" in flags:
        dits = {"low_noise": load_dit(flags["--dit"], task), "high_noise": load_dit(flags["--dit_high_noise"], task)}
    else:
        dits = {None: load_dit(flags["--dit"], task)}
    return dits, load_vae(flags["--vae"]), flags


def _ctx(d, seed, rows):
    return [torch.randn(rows, d, generator=torch.Generator().manual_seed(seed))]


class _Counting(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.timesteps = inner, []

    def forward(self, x, timestep, context, y=None):
        self.timesteps.append(timestep.flatten()[-1].item())
        return self.inner(x, timestep, context, y=y)


def test_two_expert_switch_and_batched_cfg(tiny_dir):
    dits, _, _ = _tiny_models(tiny_dir, "t2v-A14B")
    d = dits["low_noise"].config.text_dim
    wrapped = {k: _Counting(v) for k, v in dits.items()}
    pipe = WanPipeline("t2v-A14B", wrapped)
    req = GenerationRequest("x", height=32, width=32, frames=5, steps=8, seed=1)
    p = pipe.prepare(req, _ctx(d, 0, 5), _ctx(d, 1, 9))
    a = pipe.denoise(p)
    sched = make_schedule(8, 12.0)
    high = [int(t) for t in sched.timesteps if t >= 875]
    assert wrapped["high_noise"].timesteps == high and len(high) == 6
    assert wrapped["low_noise"].timesteps == [int(t) for t in sched.timesteps if t < 875]
    p.request.cfg_batched = False
    b = pipe.denoise(p)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_ti2v_first_frame_kept_and_timestep_zero(tiny_dir):
    dits, vae, _ = _tiny_models(tiny_dir, "ti2v-5B")
    inner = dits[None]
    seen = []

    def model(x, timestep, context, y=None):
        seen.append(timestep.clone())
        return inner(x, timestep, context, y=y)

    pipe = WanPipeline("ti2v-5B", model, vae=vae)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 50, 3), dtype=np.uint8))
    d = inner.config.text_dim
    p = pipe.prepare(GenerationRequest("x", height=64, width=64, frames=5, steps=3, image=img),
                     _ctx(d, 0, 4), _ctx(d, 1, 4))
    lat = pipe.denoise(p)
    assert torch.equal(lat[:, :1], p.first_latent)
    assert all(t.shape == (2, 2) and (t[:, 0] == 0).all() and (t[:, 1] > 0).all() for t in seen)


def test_i2v_conditioning(tiny_dir):
    dits, vae, _ = _tiny_models(tiny_dir, "i2v-A14B")
    pipe = WanPipeline("i2v-A14B", dits, vae=vae)
    img = Image.new("RGB", (30, 40), (10, 200, 30))
    d = dits["low_noise"].config.text_dim
    p = pipe.prepare(GenerationRequest("x", height=64, width=64, frames=5, steps=2, image=img),
                     _ctx(d, 0, 4), _ctx(d, 1, 4))
    r = p.request
    assert (r.height, r.width) == i2v_size(30, 40, 64 * 64)
    assert p.y.shape == (20, 2, r.height // 8, r.width // 8)
    assert torch.equal(p.y[:4], i2v_mask(5, r.height // 8, r.width // 8))
    with pytest.raises(ValueError, match="image_path"):
        pipe.prepare(GenerationRequest("x", frames=5), _ctx(d, 0, 4), _ctx(d, 1, 4))


# --- end to end against diffusers ---------------------------------------------------------------


def _diffusers_transformer(dit):
    return diffusers_transformer(dit.config, dit.state_dict())


def _official_unipc(shift: float):
    """diffusers' UniPC (bh2, order 2, flow sigmas, final sigma 0) on the official base schedule
    ``linspace(float32(0.999), 0)`` instead of its own ``linspace(1, 1/1000)``."""
    from diffusers import UniPCMultistepScheduler

    class OfficialSigmas(UniPCMultistepScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None):
            base = np.linspace(float(np.float32(0.999)), 0.0, num_inference_steps + 1)[:-1].copy()
            return super().set_timesteps(device=device, sigmas=base)

    return OfficialSigmas(num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction",
                          use_flow_sigmas=True, flow_shift=shift, final_sigmas_type="zero")


def _pad512(ctx):
    """``[[L, d]]`` -> ``[1, 512, d]``, zero rows appended as the official text encoder pads."""
    return torch.nn.functional.pad(ctx[0], (0, 0, 0, 512 - ctx[0].shape[0]))[None]


def test_t2v_a14b_matches_diffusers_wan_pipeline(tiny_dir):
    """Two-expert T2V against diffusers' WanPipeline on the same tiny weights, text embeddings and
    initial latents.

    diffusers' pipeline follows the official loop (int64 timesteps to the model, float32 sigmas in
    the UniPC update, ``t >= boundary·1000`` picks ``transformer`` = high noise with
    ``guidance_scale``). What differs, and is aligned here:
    * its default flow schedule is ``linspace(1, 1/1000)`` (σ_0 = 1 − 1e-6) instead of the
      official ``linspace(0.999, 0)``: its scheduler is given the official base sigmas;
    * its prompt embeddings are used as given (no zero padding to 512): they are padded here as
      the official text encoder pads them;
    * its transformer's float32 timestep sinusoid: replaced by the official float64 one.
    With those aligned the two loops agree bit for bit on the development machine (relative
    difference 0.0 after 8 steps with the switch after step 6); the assertion allows 1e-6 for the
    two DiT implementations' float32 rounding on other BLAS builds.
    """
    from diffusers import WanPipeline as DiffusersWanPipeline

    dits, _, _ = _tiny_models(tiny_dir, "t2v-A14B")
    steps, shift, frames, size = 8, 12.0, 5, 32

    sched = _official_unipc(shift)
    ref_pipe = DiffusersWanPipeline(
        tokenizer=None, text_encoder=None, vae=None, scheduler=sched,
        transformer=_diffusers_transformer(dits["high_noise"]),
        transformer_2=_diffusers_transformer(dits["low_noise"]), boundary_ratio=0.875,
    )
    d = dits["low_noise"].config.text_dim
    ctx, null = _ctx(d, 0, 6), _ctx(d, 1, 11)
    ours = WanPipeline("t2v-A14B", dits)
    p = ours.prepare(GenerationRequest("x", height=size, width=size, frames=frames, steps=steps,
                                       flow_shift=shift, seed=5, cfg_batched=False), ctx, null)
    with torch.no_grad():
        ref = ref_pipe(prompt_embeds=_pad512(ctx), negative_prompt_embeds=_pad512(null), height=size, width=size,
                       num_frames=frames, num_inference_steps=steps, guidance_scale=4.0, guidance_scale_2=3.0,
                       latents=p.noise[None].clone(), output_type="latent").frames[0]
    assert torch.equal(ref_pipe.scheduler.timesteps, make_schedule(steps, shift).timesteps)
    got = ours.denoise(p)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 1e-6, rel
    # and the guidance really differs per expert: a single scale gives another result
    p.request.guidance_scale_high_noise = 3.0
    assert ((ours.denoise(p) - ref).norm() / ref.norm()).item() > 1e-3


def test_same_seed_same_latent_and_cpu_noise(tiny_dir):
    dits, _, _ = _tiny_models(tiny_dir, "t2v-A14B")
    d = dits["low_noise"].config.text_dim
    pipe = WanPipeline("t2v-A14B", dits)
    req = GenerationRequest("x", height=32, width=32, frames=5, steps=3, seed=11)
    a = pipe.denoise(pipe.prepare(req, _ctx(d, 0, 3), _ctx(d, 1, 3)))
    state = torch.get_rng_state()
    random.random()
    b = pipe.denoise(pipe.prepare(req, _ctx(d, 0, 3), _ctx(d, 1, 3)))
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)  # the pipeline draws nothing from the global RNG


def test_i2v_a14b_matches_diffusers_i2v_pipeline(tiny_dir):
    """I2V-A14B against diffusers' WanImageToVideoPipeline (boundary 0.9, no CLIP) on the same tiny
    DiT and VAE weights, embeddings, initial latents and first frame.

    Aligned as in the T2V test (official base sigmas, 512-row padded embeddings, float64 timestep
    sinusoid). The first frame is given to diffusers already resized by the official rule (bicubic
    tensor interpolation, §5.2) because its own preprocessing resizes with PIL. What remains: the
    two VAE implementations (diffusers' posterior mean normalized with ``·(1/std)``, ours with
    ``/std``) and the two DiTs, float32 rounding -- measured 6e-7 relative on the final latents (6
    steps, switch included); asserted below 1e-5."""
    import diffusers
    from diffusers import WanImageToVideoPipeline
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from wanlora.conditioning import i2v_image

    dits, vae, _ = _tiny_models(tiny_dir, "i2v-A14B")
    steps, shift, frames = 6, 5.0, 5
    cfg = vae.model.config
    dvae = diffusers.AutoencoderKLWan(base_dim=cfg["dim"], z_dim=cfg["z_dim"])
    dvae.load_state_dict(convert_wan_vae_to_diffusers(vae.model.state_dict()), strict=True)

    sched = _official_unipc(shift)
    ref_pipe = WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=dvae.eval(), scheduler=sched, image_processor=None,
        image_encoder=None, transformer=_diffusers_transformer(dits["high_noise"]),
        transformer_2=_diffusers_transformer(dits["low_noise"]), boundary_ratio=0.9,
    )
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 40, 3), dtype=np.uint8))
    d = dits["low_noise"].config.text_dim
    ctx, null = _ctx(d, 2, 5), _ctx(d, 3, 8)
    ours = WanPipeline("i2v-A14B", dits, vae=vae)
    p = ours.prepare(GenerationRequest("x", height=64, width=64, frames=frames, steps=steps, flow_shift=shift,
                                       guidance_scale=3.5, seed=9, image=img, cfg_batched=False), ctx, null)
    H, W = p.request.height, p.request.width
    with torch.no_grad():
        ref = ref_pipe(image=i2v_image(img, H, W)[None], prompt_embeds=_pad512(ctx), negative_prompt_embeds=_pad512(null),
                       height=H, width=W, num_frames=frames, num_inference_steps=steps, guidance_scale=3.5,
                       guidance_scale_2=3.5, latents=p.noise[None].clone(), output_type="latent").frames[0]
    got = ours.denoise(p)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 1e-5, rel


def test_ti2v_text_to_video_matches_diffusers(tiny_dir):
    """TI2V-5B text-to-video (per-token timesteps, ``expand_timesteps``) against diffusers'
    WanPipeline on the same tiny weights, aligned as in the T2V test. Our ``[1, T]`` per-frame
    timestep equals diffusers' ``[1, seq_len]`` per-token one here (all tokens at t)."""
    from diffusers import WanPipeline as DiffusersWanPipeline

    dits, _, _ = _tiny_models(tiny_dir, "ti2v-5B")
    dit = dits[None]
    steps, shift = 4, 5.0

    sched = _official_unipc(shift)
    ref_pipe = DiffusersWanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=sched,
                                    transformer=_diffusers_transformer(dit), expand_timesteps=True)
    ref_pipe.vae_scale_factor_spatial = 16
    d = dit.config.text_dim
    ctx, null = _ctx(d, 4, 5), _ctx(d, 5, 6)
    ours = WanPipeline("ti2v-5B", dit)
    p = ours.prepare(GenerationRequest("x", height=64, width=64, frames=5, steps=steps, seed=2, cfg_batched=False),
                     ctx, null)
    with torch.no_grad():
        ref = ref_pipe(prompt_embeds=_pad512(ctx), negative_prompt_embeds=_pad512(null), height=64, width=64,
                       num_frames=5, num_inference_steps=steps, guidance_scale=5.0,
                       latents=p.noise[None].clone(), output_type="latent").frames[0]
    got = ours.denoise(p)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-6


class _FixedClipEncoder(torch.nn.Module):
    """Stands in for diffusers' ``image_encoder`` (a ``CLIPVisionModel``): returns our CLIP features
    as the next-to-last hidden state, so both pipelines condition on the very same ``clip_fea``."""

    def __init__(self, features):
        super().__init__()
        self.features = features
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives diffusers a device and dtype to read

    @property
    def device(self):
        return self.anchor.device

    @property
    def dtype(self):
        return self.anchor.dtype

    def forward(self, pixel_values=None, output_hidden_states=True):
        from types import SimpleNamespace

        return SimpleNamespace(hidden_states=(self.features, None))


class _NoProcessor:
    def __call__(self, images=None, return_tensors="pt"):
        from transformers import BatchFeature

        return BatchFeature({"pixel_values": torch.zeros(1)})


@pytest.mark.parametrize("task", ["i2v-14B", "flf2v-14B"])
def test_wan21_image_models_match_diffusers_i2v_pipeline(tiny_dir, task):
    """Wan2.1 I2V-14B and FLF2V-14B against diffusers' WanImageToVideoPipeline (Wan2.1 branch:
    ``image_dim`` set, no boundary) on the same tiny DiT and VAE weights, embeddings, initial latents,
    first (and last) frame and CLIP features; aligned as the I2V-A14B test. diffusers builds the FLF2V
    mask and ``[first, zeros, last]`` video itself (``last_image``) and hands its image embeddings to
    both CFG passes, so this checks the mask, ``y``, the ``clip_fea`` path and the image
    cross-attention in the loop."""
    import diffusers
    from diffusers import WanImageToVideoPipeline
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from wanlora.conditioning import i2v_image
    from wanlora.models import load_clip

    dits, vae, flags = _tiny_models(tiny_dir, task)
    clip = load_clip(flags["--clip"])
    steps, shift, frames = 5, 5.0, 9
    cfg = vae.model.config
    dvae = diffusers.AutoencoderKLWan(base_dim=cfg["dim"], z_dim=cfg["z_dim"])
    dvae.load_state_dict(convert_wan_vae_to_diffusers(vae.model.state_dict()), strict=True)
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    last = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)) if task == "flf2v-14B" else None
    d = dits[None].config.text_dim
    ctx, null = _ctx(d, 4, 5), _ctx(d, 5, 9)
    ours = WanPipeline(task, dits, vae=vae, clip=clip)
    p = ours.prepare(GenerationRequest("x", height=64, width=96, frames=frames, steps=steps, flow_shift=shift,
                                       guidance_scale=5.0, seed=3, image=img, end_image=last, cfg_batched=False),
                     ctx, null)
    H, W = p.request.height, p.request.width
    n = 2 if last is not None else 1
    ref_pipe = WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=dvae.eval(), scheduler=_official_unipc(shift),
        image_processor=_NoProcessor(), image_encoder=_FixedClipEncoder(p.clip_fea.view(n, -1, clip.dim)),
        transformer=_diffusers_transformer(dits[None]), transformer_2=None, boundary_ratio=None,
    )
    # the last frame has the first frame's size, so flf2v_last_frame keeps it as it is
    kw = {} if last is None else {"last_image": i2v_image(last, H, W)[None]}
    with torch.no_grad():
        ref = ref_pipe(image=i2v_image(img, H, W)[None], prompt_embeds=_pad512(ctx), negative_prompt_embeds=_pad512(null),
                       height=H, width=W, num_frames=frames, num_inference_steps=steps, guidance_scale=5.0,
                       latents=p.noise[None].clone(), output_type="latent", **kw).frames[0]
    got = ours.denoise(p)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 1e-5, rel
