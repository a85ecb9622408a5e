"""Tiny model sets: official file formats, loaders accept them, deterministic, fast, and a
17-frame 64x64 clip goes through T5 -> DiT -> VAE in seconds on a CPU."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import wanlora.models.loading as loading
from wanlora.conditioning import blank_clip_features, conditioning_for
from wanlora.models.loading import load_state_dict, read_config_json
from wanlora.tasks import TASKS, get_task
from wanlora.tools.tiny import TINY_DIT, TINY_T5, main, make_tiny

torch.set_num_threads(1)

OFFICIAL_CONFIG_FIELDS = {"_class_name", "dim", "eps", "ffn_dim", "freq_dim", "in_dim", "model_type",
                          "num_heads", "num_layers", "out_dim", "text_len"}


def file_digests(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def check_dit_folder(folder: Path, task: str):
    t = get_task(task)
    cfg = json.loads((folder / "config.json").read_text())
    assert OFFICIAL_CONFIG_FIELDS <= cfg.keys() and cfg["_class_name"] == "WanModel"
    assert (cfg["dim"], cfg["num_heads"], cfg["ffn_dim"], cfg["num_layers"]) == (64, 2, 128, 2)
    assert (cfg["in_dim"], cfg["out_dim"], cfg["text_len"]) == (t.in_channels, t.out_channels, 512)
    assert cfg["model_type"] == {"t2v-A14B": "t2v", "i2v-A14B": "i2v", "ti2v-5B": "ti2v", "t2v-14B": "t2v",
                                 "t2v-1.3B": "t2v", "i2v-14B": "i2v", "flf2v-14B": "flf2v",
                                 # Fun-Control: VideoX-Fun's "i2v" (the CLIP image branch)
                                 "t2v-1.3B-FC": "i2v", "t2v-14B-FC": "i2v", "i2v-14B-FC": "i2v"}[t.name]
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if task in ("t2v-1.3B", "t2v-1.3B-FC"):  # released as one file
        assert not index.exists() and (folder / "diffusion_pytorch_model.safetensors").is_file()
        return
    idx = json.loads(index.read_text())
    shards = sorted(set(idx["weight_map"].values()))
    assert shards == ["diffusion_pytorch_model-00001-of-00002.safetensors",
                      "diffusion_pytorch_model-00002-of-00002.safetensors"]
    total = 0
    for s in shards:
        with safe_open(str(folder / s), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for k in f.keys():
                assert idx["weight_map"][k] == s
                t_ = f.get_tensor(k)
                assert t_.dtype == torch.float32
                total += t_.numel() * 4
    assert idx["metadata"]["total_size"] == total


@pytest.mark.parametrize("task", sorted(TASKS))
def test_tiny_set_formats(task, tmp_path):
    import sentencepiece  # noqa: F401  (imports are not part of the timing)
    import wanlora.models.dit  # noqa: F401
    import wanlora.models.vae  # noqa: F401

    with torch.device("meta"):  # the imports torch makes on its first meta-device ops are not timed either
        wanlora.models.dit.WanDiT(wanlora.models.dit.WanDiTConfig(
            dim=64, ffn_dim=8, num_heads=2, num_layers=1, in_channels=4, out_channels=4, image_dim=8))
    start = time.perf_counter()
    m = make_tiny(task, tmp_path / "set")
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"making the {task} set took {elapsed:.1f} s"
    t = get_task(task)
    out = (tmp_path / "set").resolve()
    assert json.loads((out / "manifest.json").read_text()) == m
    assert m["task"] == task and m["flags"]["--task"] == task
    for path in list(m["files"].values()) + [v for k, v in m["flags"].items() if k != "--task"]:
        assert Path(path).is_absolute() and Path(path).exists(), path
    # VAE and T5: official names, .pth readable with weights_only
    assert Path(m["flags"]["--vae"]).name == ("Wan2.2_VAE.pth" if t.vae == "wan2.2" else "Wan2.1_VAE.pth")
    t5 = torch.load(m["flags"]["--t5"], weights_only=True)
    assert Path(m["flags"]["--t5"]).name == "models_t5_umt5-xxl-enc-bf16.pth"
    assert {v.dtype for v in t5.values()} == {torch.bfloat16}
    assert "token_embedding.weight" in t5 and "blocks.1.pos_embedding.embedding.weight" in t5
    assert t5["token_embedding.weight"].shape == (m["sizes"]["t5"]["vocab_size"], TINY_T5["d_model"])
    vae = torch.load(m["flags"]["--vae"], weights_only=True)
    assert "encoder.conv1.weight" in vae and "decoder.head.2.weight" in vae
    tok = Path(m["flags"]["--t5_tokenizer"])
    assert tok == out / "google" / "umt5-xxl"
    assert {p.name for p in tok.iterdir()} >= {"spiece.model", "tokenizer_config.json"}
    # DiT: expert folders for A14B, one model otherwise
    if t.experts:
        assert m["flags"]["--dit"] == str(out / "low_noise_model")
        assert m["flags"]["--dit_high_noise"] == str(out / "high_noise_model")
        for e in ("high_noise_model", "low_noise_model"):
            check_dit_folder(out / e, task)
        hi = load_state_dict(out / "high_noise_model")
        lo = load_state_dict(out / "low_noise_model")
        assert hi.keys() == lo.keys() and not torch.equal(hi["blocks.0.self_attn.q.weight"],
                                                          lo["blocks.0.self_attn.q.weight"])
    else:
        assert "--dit_high_noise" not in m["flags"]
        check_dit_folder(out, task)
    sd = load_state_dict(m["flags"]["--dit"])
    assert sd["patch_embedding.weight"].shape[:2] == (TINY_DIT["dim"], t.in_channels)
    assert sd["text_embedding.0.weight"].shape == (TINY_DIT["dim"], TINY_T5["d_model"])
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in sd.values())  # no zero init
    assert read_config_json(m["flags"]["--dit"])["num_heads"] == 2
    # Wan2.1 I2V-14B / FLF2V-14B: the image branch and both CLIP files (official .pth, ComfyUI)
    # (the T2V Fun-Control models have the branch but read zero features: no CLIP files)
    assert ("img_emb.proj.0.weight" in sd) == t.uses_clip
    assert ("--clip" in m["flags"]) == conditioning_for(t).uses_clip
    assert ("img_emb.emb_pos" in sd) == (t.clip_frames == 2)
    if t.uses_clip and not conditioning_for(t).uses_clip:
        assert sd["img_emb.proj.0.weight"].shape == (blank_clip_features(1).shape[-1],)
    elif t.uses_clip:
        from wanlora.models import load_clip

        clip = torch.load(m["flags"]["--clip"], weights_only=True)
        assert Path(m["flags"]["--clip"]).name == "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
        assert {"visual.transformer.1.attn.to_qkv.weight", "visual.cls_embedding", "log_scale"} <= clip.keys()
        assert any(k.startswith("textual.") for k in clip)
        assert Path(m["files"]["clip_comfyui"]).name == "clip_vision_h.safetensors"
        with safe_open(m["files"]["clip_comfyui"], "pt") as f:
            assert "vision_model.encoder.layers.1.self_attn.q_proj.weight" in f.keys()
            assert f.get_tensor("vision_model.embeddings.class_embedding").dtype == torch.float16
        a, b = load_clip(m["flags"]["--clip"]), load_clip(m["files"]["clip_comfyui"])
        assert a.identity == b.identity and (a.num_tokens, a.dim) == (257, 160)
        assert sd["img_emb.proj.0.weight"].shape == (a.dim,)
        if t.clip_frames == 2:
            assert sd["img_emb.emb_pos"].shape == (1, 2 * 257, a.dim)


def test_deterministic_for_a_seed(tmp_path):
    a = make_tiny("t2v-A14B", tmp_path / "a", seed=3)
    make_tiny("t2v-A14B", tmp_path / "b", seed=3)
    make_tiny("t2v-A14B", tmp_path / "c", seed=4)
    da, db, dc = (file_digests(tmp_path / n) for n in "abc")
    assert da == db
    weights = [k for k in da if k.endswith((".safetensors", ".pth"))]
    assert len(weights) == 6 and all(da[k] != dc[k] for k in weights)
    assert a["seed"] == 3


def test_cli_writes_the_same_set(tmp_path, capsys):
    assert main(["--task", "ti2v-5B", "--out", str(tmp_path / "cli"), "--seed", "0"]) == 0
    assert "--dit" in capsys.readouterr().out
    make_tiny("ti2v-5B", tmp_path / "api")
    assert file_digests(tmp_path / "cli") == file_digests(tmp_path / "api")


def test_tokenizer_is_a_real_umt5_style_sentencepiece(tiny_dir):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder = tiny_dir("t2v-1.3B") / "google" / "umt5-xxl"
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    neg = get_task("t2v-1.3B").negative_prompt
    for text in ["A white cat wearing orange sunglasses on a surfboard.", neg]:
        ids = tok(text).input_ids
        assert ids == sp.encode(text) + [1]  # the HF tokenizer is the sentencepiece model + </s>
    assert 2 not in tok(neg).input_ids  # every character of the default negative prompt is known
    assert len(tok) == sp.get_piece_size() > 300


def test_t5_loads_with_and_without_tokenizer_flag(tiny_dir):
    from wanlora.models import load_text_encoder

    d = tiny_dir("t2v-1.3B")
    m = json.loads((d / "manifest.json").read_text())
    a = load_text_encoder(m["flags"]["--t5"], tokenizer=m["flags"]["--t5_tokenizer"])
    b = load_text_encoder(m["flags"]["--t5"])  # found beside the .pth as in the official release
    assert a.identity == b.identity and a.d_model == TINY_T5["d_model"]
    (ea,), (eb,) = a.encode(["a cat"]), b.encode(["a cat"])
    assert torch.equal(ea, eb) and ea.shape == (3, 32)  # ▁a, ▁cat, </s>


@pytest.mark.parametrize("task", sorted(TASKS))
def test_17_frame_64px_clip_runs_in_seconds(task, tiny_dir):
    """T5 -> DiT (every expert) -> VAE on a 17-frame 64x64 clip, through the public loaders."""
    from wanlora.models import load_text_encoder, load_vae

    load_dit = getattr(loading, "load_dit", None)
    if load_dit is None:
        pytest.skip("wanlora.models.loading.load_dit (stream A) has not landed yet")
    t = get_task(task)
    d = tiny_dir(task)
    m = json.loads((d / "manifest.json").read_text())
    start = time.perf_counter()
    te = load_text_encoder(m["flags"]["--t5"], tokenizer=m["flags"]["--t5_tokenizer"])
    vae = load_vae(m["flags"]["--vae"])
    assert vae.kind == t.vae
    video = torch.rand(1, 3, 17, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = vae.encode(video)
    assert z.shape == (1, t.latent_channels, 5, 64 // t.vae_stride[1], 64 // t.vae_stride[2])
    context = te.encode(["a cat on a surfboard"])
    y = torch.randn(1, t.in_channels - t.out_channels, *z.shape[2:]) if t.in_channels > t.out_channels else None
    clip_fea = None
    if t.uses_clip and not conditioning_for(t).uses_clip:  # T2V Fun-Control: zero features, official shape
        clip_fea = blank_clip_features(1)
    elif t.uses_clip:  # the CLIP features of the first (and last) frame, [1, 257 * frames, width]
        from wanlora.models import load_clip

        clip = load_clip(m["flags"]["--clip"])
        frames = video[0, :, [0, -1][: t.clip_frames]].transpose(0, 1)  # [frames, 3, H, W]
        clip_fea = clip.encode(frames).reshape(1, -1, clip.dim)
        assert clip_fea.shape == (1, 257 * t.clip_frames, 160)
    paths = [m["flags"]["--dit"]] + ([m["flags"]["--dit_high_noise"]] if t.experts else [])
    for path in paths:
        dit = load_dit(path, task)
        assert dit.config.num_heads == 2 and dit.config.text_dim == 32
        with torch.no_grad():
            v = dit(z, torch.tensor([500.0]), context, y=y, clip_fea=clip_fea)
        assert v.shape == z.shape and torch.isfinite(v).all()
    out = vae.decode(z)
    assert out.shape == video.shape
    assert time.perf_counter() - start < 20.0
