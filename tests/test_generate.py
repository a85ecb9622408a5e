"""wanlora-generate end to end on tiny models and real media; LoRA routing; the training sampler."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from wanlora.commands.generate import main, parse_args
from wanlora.io_utils import save_safetensors

torch.set_num_threads(1)


def _flags(tiny_dir, task) -> list[str]:
    flags = json.loads((tiny_dir(task) / "manifest.json").read_text())["flags"]
    out = []
    for k, v in flags.items():
        out += [k, v]
    return out


def _decode(path: Path):
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
        return np.stack(frames), float(s.average_rate), dict(c.metadata)


def _only(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def _random_lora(path: Path, dit, expert: str | None, rank: int = 2, seed: int = 0) -> Path:
    """A random nonzero LoRA on every q/k/v/o/ffn layer of ``dit`` (default layout)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in dit.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("blocks."):
            key = "lora_unet_" + name.replace(".", "_")
            sd[f"{key}.lora_down.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.5
            sd[f"{key}.lora_up.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.5
            sd[f"{key}.alpha"] = torch.tensor(float(rank))
    save_safetensors(sd, path, metadata={"wan.expert": expert} if expert else None)
    return path


def test_aliases_and_errors():
    base = ["--task", "t2v-1.3B", "--dit", "d", "--vae", "v", "--t5", "t", "--prompt", "p"]
    a = parse_args(base + ["--size", "832*480", "--frame_num", "9", "--sample_steps", "7",
                           "--sample_guide_scale", "2.5", "--sample_shift", "3"])
    r = a.request
    assert r.video_size == (480, 832) and r.video_length == 9 and r.infer_steps == 7
    assert r.guidance_scale == 2.5 and r.flow_shift == 3.0
    assert parse_args(base + ["--image", "x.png", "--base_seed", "4"]).request.image_path == "x.png"
    from wanlora.commands.generate import request_defaults
    from wanlora.inference.prompts import PromptSpec
    from wanlora.inference.session import requests_for

    seeded = request_defaults(parse_args(base + ["--base_seed", "-1"]))  # the official default: a random seed
    reqs = requests_for([PromptSpec("a"), PromptSpec("b", seed=5), PromptSpec("c", seed=-1)], seeded)
    assert 0 <= reqs[0].seed < 2**31 and reqs[1].seed == 5 and 0 <= reqs[2].seed < 2**31
    with pytest.raises(SystemExit):
        parse_args(base + ["--size", "832x"])
    with pytest.raises(SystemExit):  # A14B needs the second expert
        parse_args(["--task", "t2v-A14B", "--dit", "d", "--vae", "v", "--t5", "t", "--prompt", "p"])
    with pytest.raises(SystemExit):  # exactly one prompt source
        parse_args(base + ["--interactive"])


def test_prompt_options_win_over_the_flags(media_dir, tmp_path):
    """A prompt line's inline options override the flags one field at a time; what a line cannot
    set (high-noise guidance, solver, CFG batching) comes from the flags; images are read here."""
    from wanlora.commands.generate import request_defaults
    from wanlora.inference.prompts import parse_prompt_line
    from wanlora.inference.session import requests_for
    from wanlora.video_io import MediaError

    image = media_dir / "cat_sunglasses.jpg"
    flags = request_defaults(parse_args([
        "--task", "t2v-A14B", "--dit", "d", "--dit_high_noise", "h", "--vae", "v", "--t5", "t", "--prompt", "p",
        "--video_size", "480", "832", "--video_length", "33", "--seed", "7", "--infer_steps", "12",
        "--guidance_scale", "4", "--guidance_scale_high_noise", "3", "--flow_shift", "5", "--sample_solver", "euler",
        "--negative_prompt", "blurry", "--image_path", str(image), "--cfg_separate"]))
    line = parse_prompt_line(f"a cat --w 64 --f 9 --d 11 --g 0 --n ugly --i {image}")
    plain, inline = requests_for([parse_prompt_line("a dog"), line], flags)
    assert (plain.prompt, plain.width, plain.height, plain.frames, plain.seed, plain.steps) == ("a dog", 832, 480,
                                                                                                33, 7, 12)
    assert (plain.guidance_scale, plain.flow_shift, plain.negative_prompt) == (4.0, 5.0, "blurry")
    assert plain.image is not None and plain.image.size == (832, 1104) and plain.image_path == str(image)
    assert (inline.width, inline.height, inline.frames, inline.seed, inline.steps) == (64, 480, 9, 11, 12)
    assert inline.guidance_scale == 0.0 and inline.negative_prompt == "ugly"  # 0 and text set, not defaulted
    for r in (plain, inline):
        assert (r.guidance_scale_high_noise, r.solver, r.cfg_batched) == (3.0, "euler", False)
    with pytest.raises(MediaError, match="no_such.png"):
        requests_for([parse_prompt_line(f"x --i {tmp_path / 'no_such.png'}")], flags)
    with pytest.raises(MediaError, match="control video not found"):
        requests_for([parse_prompt_line(f"x --cn {tmp_path / 'no_such.mp4'}")], flags)


def test_i2v_real_image_portrait_mp4_seed_and_lora(tiny_dir, media_dir, tmp_path):
    """I2V from a real portrait photo: portrait size, an MP4 with the asked frames and fps, the same
    video for the same seed, the base video for LoRA multiplier 0, another one for a real LoRA."""
    from wanlora.models import load_dit

    task = "i2v-A14B"
    flags = _flags(tiny_dir, task)
    image = media_dir / "cat_sunglasses.jpg"  # 832x1104, portrait
    common = flags + ["--prompt", "a cat wearing sunglasses", "--image_path", str(image),
                      "--video_size", "64", "64", "--video_length", "9", "--infer_steps", "3",
                      "--fps", "12", "--seed", "123"]

    def run(name, extra=()):
        out = tmp_path / name
        assert main(common + ["--save_path", str(out), *extra]) == 0
        return _decode(_only(out, "*.mp4")), json.loads(_only(out, "*.json").read_text())

    (frames, fps, meta), side = run("a")
    assert frames.shape == (9, 64, 48, 3)  # H > W: the image's portrait aspect at a 64*64 area
    assert fps == 12
    assert meta.get("prompt") == "a cat wearing sunglasses" and meta.get("seed") == "123"
    assert side["seed"] == 123 and side["height"] == 64 and side["width"] == 48
    (again, _, _), _ = run("b")
    assert np.array_equal(frames, again)

    dit = load_dit(json.loads((tiny_dir(task) / "manifest.json").read_text())["flags"]["--dit"], task)
    lora = _random_lora(tmp_path / "lora.safetensors", dit, "both")
    (zero, _, _), side0 = run("c", ["--lora_weight", str(lora), "--lora_multiplier", "0"])
    assert np.array_equal(frames, zero)
    assert {e["expert"] for e in side0["loras"]} == {"high_noise", "low_noise"}
    (withlora, _, _), _ = run("d", ["--lora_weight", str(lora), "--lora_multiplier", "1.0"])
    assert np.abs(withlora.astype(int) - frames.astype(int)).mean() > 1.0
    (dyn, _, _), _ = run("e", ["--lora_weight", str(lora), "--lora_multiplier", "1.0", "--lora_dynamic"])
    assert np.abs(dyn.astype(int) - withlora.astype(int)).max() <= 2  # merged == hooked up to rounding


def test_from_file_latent_and_image_outputs(tiny_dir, tmp_path, capsys, monkeypatch):
    from safetensors import safe_open

    flags = _flags(tiny_dir, "t2v-1.3B")
    pf = tmp_path / "prompts.txt"
    pf.write_text("# two prompts\nfirst --w 32 --h 48 --f 5 --d 1 --s 2\nsecond --f 1 --d 2 --s 2 --g 1\n",
                  encoding="utf-8")
    out = tmp_path / "o"
    assert main(flags + ["--from_file", str(pf), "--video_size", "32", "32", "--save_path", str(out),
                         "--output_type", "both"]) == 0
    lat = _only(out, "*_000_1.safetensors")
    with safe_open(str(lat), "pt") as f:
        assert f.get_tensor("latent").shape == (16, 2, 6, 4)  # 48x32 pixels, 5 frames
    assert _decode(_only(out, "*_000_1.mp4"))[0].shape == (5, 48, 32, 3)
    assert _only(out, "*_001_2.png").exists()  # one frame: text-to-image

    bad = tmp_path / "bad.txt"
    bad.write_text("ok\nnot ok --zz 3\n", encoding="utf-8")
    capsys.readouterr()
    monkeypatch.delenv("WANLORA_TRACEBACK", raising=False)
    assert main(flags + ["--from_file", str(bad), "--save_path", str(out)]) == 2  # before any model loads
    assert f"wanlora-generate: error: {bad}:2: unknown inline option --zz" in capsys.readouterr().err
    bad.write_text("ok\nno image --i missing.png\n", encoding="utf-8")
    monkeypatch.setattr("wanlora.commands.generate.load_pipeline", lambda *a, **k: pytest.fail("loaded models first"))
    assert main(flags + ["--from_file", str(bad), "--save_path", str(out)]) == 2  # images read before models
    assert "missing.png: file not found" in capsys.readouterr().err


def test_lora_metadata_routes_expert(tiny_dir, tmp_path, caplog):
    from wanlora.lora.apply import filter_lora_state_dict, plan_loras
    from wanlora.models import load_dit
    from wanlora.tasks import get_task

    task = "t2v-A14B"
    dit = load_dit(json.loads((tiny_dir(task) / "manifest.json").read_text())["flags"]["--dit"], task)
    hi = _random_lora(tmp_path / "hi.safetensors", dit, "high_noise")
    plain = _random_lora(tmp_path / "plain.safetensors", dit, None)
    with caplog.at_level("INFO"):
        plans = plan_loras(get_task(task), [str(hi), str(plain)], [0.5], [str(plain)], [])
    assert [p.experts for p in plans] == [("high_noise",), ("low_noise",), ("high_noise",)]
    assert [p.multiplier for p in plans] == [0.5, 0.5, 1.0]
    assert "goes to the high_noise expert" in caplog.text
    # musubi-tuner writes no wan.expert, only the trained timestep range (T2V A14B boundary 875)
    musubi = _random_lora(tmp_path / "musubi.safetensors", dit, None)
    save_safetensors(load_file(musubi), musubi, metadata={"ss_network_module": "networks.lora_wan",
                                                          "modelspec.timestep_range": "875,1000"})
    with caplog.at_level("INFO"):
        plans_m = plan_loras(get_task(task), [str(musubi)], [])
    assert plans_m[0].experts == ("high_noise",) and "modelspec.timestep_range=875,1000" in plans_m[0].reason
    save_safetensors(load_file(musubi), musubi, metadata={"modelspec.timestep_range": "0,1000"})
    assert plan_loras(get_task(task), [str(musubi)], [])[0].experts == ("low_noise",)  # both ranges: the flag's
    sd = plans[0].state_dict
    # training's rule: full match on dotted paths; block 0 dropped except its cross-attention
    kept = filter_lora_state_dict(sd, r"blocks\.0\.cross_attn\..*", r"blocks\.0\..*")
    names = {k.split(".")[0] for k in kept}
    all_names = {k.split(".")[0] for k in sd}
    assert names == {n for n in all_names if not n.startswith("lora_unet_blocks_0_") or "_cross_attn_" in n}
    assert any(n.startswith("lora_unet_blocks_0_cross_attn") for n in names) and len(names) < len(all_names)
    with pytest.raises(ValueError, match="--lora_multiplier"):
        plan_loras(get_task(task), [str(hi), str(plain)], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="--exclude_patterns .* not a valid regular expression"):
        plan_loras(get_task(task), [str(hi)], [], exclude=["blocks_(0"])


def test_validation_sampler_files_rng_and_modes(tiny_dir, tmp_path):
    from wanlora.models import load_dit
    from wanlora.training.validation import ValidationSampler

    task = "t2v-A14B"
    flags = json.loads((tiny_dir(task) / "manifest.json").read_text())["flags"]
    pf = tmp_path / "sample_prompts.txt"
    pf.write_text("a red ball --d 7 --s 2\na blue cube --w 48 --s 2\n", encoding="utf-8")
    sampler = ValidationSampler(task, pf, flags["--vae"], flags["--t5"], flags["--t5_tokenizer"],
                                output_dir=tmp_path, output_name="mylora", width=32, height=32, frames=5,
                                device="cpu")
    dits = {"low_noise": load_dit(flags["--dit"], task), "high_noise": load_dit(flags["--dit_high_noise"], task)}
    for d in dits.values():
        d.train()
    expected = _global_draws(0)
    samples = sampler.sample(250, dits, epoch=3)
    assert _same_draws(expected)
    assert all(d.training for d in dits.values())
    names = sorted(p.name for p in (tmp_path / "sample").glob("*.mp4"))
    assert names[:2] == ["mylora_000250_00_7.mp4", "mylora_000250_01_42.mp4"]
    assert samples[1].frames.shape == (5, 32, 48, 3) and samples[1].video_tensor().shape == (1, 5, 3, 32, 48)
    again = sampler.sample(251, dits)
    assert np.array_equal(again[0].frames, samples[0].frames)  # fixed seeds: comparable over training


def _global_draws(seed: int):
    """One draw from each global stream (torch, Python, NumPy) after seeding them with ``seed``;
    the streams are seeded again on return, so the next draws repeat these."""
    def seed_all():
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)

    seed_all()
    draws = (torch.rand(3), random.random(), np.random.rand())
    seed_all()
    return draws


def _same_draws(expected) -> bool:
    return torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1] and np.random.rand() == expected[2]


def test_preserve_rng_state_restores_every_global_stream():
    from wanlora.training.validation import preserve_rng_state

    expected = _global_draws(3)
    with preserve_rng_state():
        torch.rand(5), random.random(), np.random.rand(4)  # what sampling might draw
    assert _same_draws(expected)
    expected = _global_draws(3)
    np.random.rand()  # a draw outside preserve_rng_state moves a stream, and the check sees it
    assert not _same_draws(expected)


def test_user_errors_one_line_exit_2(tiny_dir, tmp_path, capsys, monkeypatch):
    """A bad prompt line or a file given to the wrong flag: one line ``wanlora-generate: error: ...``,
    exit 2, no traceback (``WANLORA_TRACEBACK=1`` raises instead)."""
    monkeypatch.delenv("WANLORA_TRACEBACK", raising=False)
    flags = json.loads((tiny_dir("ti2v-5B") / "manifest.json").read_text())["flags"]
    base = ["--task", "ti2v-5B", "--vae", flags["--vae"], "--t5", flags["--t5"],
            "--t5_tokenizer", flags["--t5_tokenizer"], "--save_path", str(tmp_path), "--attn_mode", "torch"]
    bad = tmp_path / "prompts.txt"
    bad.write_text("a cat --zz 3\n")
    assert main(base + ["--dit", flags["--dit"], "--from_file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err == f"wanlora-generate: error: {bad}:1: unknown inline option --zz; the options are: " \
                  "--w --h --f --d --s --g --l --fs --i --ei --cn --n\n"
    assert main(base + ["--dit", flags["--vae"], "--prompt", "a cat"]) == 2  # the VAE given as the DiT
    err = capsys.readouterr().err
    assert err.startswith("wanlora-generate: error: ") and "pass it as --vae" in err and "Traceback" not in err
    assert err.count("\n") == 1
    monkeypatch.setenv("WANLORA_TRACEBACK", "1")
    with pytest.raises(ValueError, match="unknown inline option"):
        main(base + ["--dit", flags["--dit"], "--from_file", str(bad)])


def test_samples_reach_tensorboard_without_moviepy(tmp_path, monkeypatch):
    """A sample video is an animated GIF in TensorBoard (Pillow, not moviepy); an image an image."""
    import io
    import sys

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from wanlora.training.validation import ValidationSample, log_samples

    monkeypatch.setitem(sys.modules, "moviepy", None)  # importing it fails
    colors = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 0, 0]], dtype=np.uint8)
    video = np.broadcast_to(colors[:, None, None, :], (5, 24, 32, 3)).copy()
    image = np.full((1, 16, 20, 3), 200, dtype=np.uint8)
    samples = [ValidationSample(0, "a", 1, tmp_path / "a.mp4", video, 16),
               ValidationSample(1, "b", 2, tmp_path / "b.png", image, 16)]
    with SummaryWriter(str(tmp_path / "tb")) as writer:
        log_samples(writer, samples, 7)
    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    ea.Reload()
    (gif_event,) = ea.Images("sample/00")
    assert gif_event.step == 7 and (gif_event.width, gif_event.height) == (32, 24)
    gif = Image.open(io.BytesIO(gif_event.encoded_image_string))
    assert gif.format == "GIF" and gif.n_frames == 5
    assert abs(gif.info["duration"] - 1000 / 16) <= 10  # GIF delays are in 1/100 s
    for i, c in enumerate(colors):
        gif.seek(i)
        assert np.array_equal(np.asarray(gif.convert("RGB"))[3, 4], c), i
    (png_event,) = ea.Images("sample/01")
    png = Image.open(io.BytesIO(png_event.encoded_image_string))
    assert png.size == (20, 16) and np.asarray(png.convert("RGB"))[0, 0].tolist() == [200, 200, 200]
