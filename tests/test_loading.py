"""load_dit: every checkpoint form loads to the same model; wrong files get messages that say
what they are and what to pass; peak RAM stays near one copy of the weights."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from wanlora.io_utils import save_safetensors, write_json
from wanlora.models import load_dit
from wanlora.models.dit import WanDiT, WanDiTConfig
from wanlora.models.loading import CheckpointError, check_dit_task, read_config_json

torch.set_num_threads(1)

TINY = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32)


def make_sd(in_ch=16, out_ch=16, seed=0, dtype=torch.float32, **over):
    """A random official-key DiT state dict (every tensor random)."""
    cfg = WanDiTConfig(**{**TINY, **over}, in_channels=in_ch, out_channels=out_ch)
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanDiT(cfg).state_dict().items()}
    sd = {k: torch.randn(s, generator=g) / math.sqrt(math.prod(s[1:]) if len(s) > 1 else 4) for k, s in shapes.items()}
    return {k: v.to(dtype) for k, v in sd.items()}, cfg


def reference_output(sd, cfg):
    m = WanDiT(cfg)
    m.load_state_dict({k: v.float() for k, v in sd.items()})
    return _run(m, cfg)


def _close(a, b):
    # Weights assigned from the memory-mapped file are bit-identical (checked in
    # test_stored_dtypes_are_cast) but may sit at other memory alignments than freshly allocated
    # ones, and CPU matmul kernels then round differently in the last float32 bits.
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _run(m, cfg):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, cfg.in_channels, 2, 4, 4, generator=g)
    with torch.no_grad():
        return m(x, torch.tensor([400.0]), torch.randn(1, 3, cfg.text_dim, generator=g))


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model."])
def test_single_file_with_and_without_prefix(tmp_path, prefix):
    sd, cfg = make_sd()
    path = tmp_path / "dit.safetensors"
    save_safetensors({prefix + k: v for k, v in sd.items()}, path, metadata={"num_heads": "2"})
    m = load_dit(path, "t2v-A14B")
    assert m.config == cfg
    assert not any(p.requires_grad for p in m.parameters())
    _close(_run(m, cfg), reference_output(sd, cfg))


def test_in_place_weight_edits_never_reach_the_file(tmp_path):
    # Same-dtype CPU weights stay memory-mapped; the mapping is copy-on-write, so merging a LoRA
    # into the loaded weights must leave the checkpoint as it was.
    sd, _ = make_sd()
    path = tmp_path / "dit.safetensors"
    save_safetensors(sd, path, metadata={"num_heads": "2"})
    before = path.read_bytes()
    m = load_dit(path, "t2v-A14B")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    assert path.read_bytes() == before
    torch.testing.assert_close(m.blocks[0].ffn[0].weight, sd["blocks.0.ffn.0.weight"] + 1.0)


def _write_shards(folder, sd, n=2, index=True, config=True):
    keys = sorted(sd)
    weight_map = {}
    for i in range(n):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = keys[i::n]
        save_safetensors({k: sd[k] for k in part}, folder / name)
        weight_map.update({k: name for k in part})
    if index:
        write_json(folder / "diffusion_pytorch_model.safetensors.index.json",
                   {"metadata": {}, "weight_map": weight_map})
    if config:
        write_json(folder / "config.json", {"_class_name": "WanModel", "dim": 64, "num_heads": 2,
                                            "in_dim": 16, "out_dim": 16, "model_type": "t2v"})


def test_shard_folder_and_index_json(tmp_path):
    sd, cfg = make_sd()
    folder = tmp_path / "high_noise_model"
    folder.mkdir()
    _write_shards(folder, sd)
    ref = reference_output(sd, cfg)
    for p in (folder, folder / "diffusion_pytorch_model.safetensors.index.json"):
        _close(_run(load_dit(p, "t2v-A14B"), cfg), ref)


def test_num_heads_from_config_json_then_metadata(tmp_path):
    sd, _ = make_sd()
    folder = tmp_path / "m"
    folder.mkdir()
    _write_shards(folder, sd, index=False, config=False)
    with pytest.raises(CheckpointError, match="num_heads"):
        load_dit(folder, "t2v-A14B")  # dim 64: dim // 128 does not work, nothing says the heads
    write_json(folder / "config.json", {"dim": 64, "num_heads": 4})
    assert load_dit(folder, "t2v-A14B").config.num_heads == 4
    assert read_config_json(folder) == {"dim": 64, "num_heads": 4}
    single = tmp_path / "one.safetensors"
    save_safetensors(sd, single, metadata={"num_heads": "1"})
    assert load_dit(single, "t2v-A14B").config.num_heads == 1


def test_broken_config_json_is_named_and_ignored(tmp_path, caplog):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"num_heads": 4,', encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="wanlora.models.loading"):
        assert read_config_json(folder / "x.safetensors") == {}
    assert "config.json: ignored" in caplog.text and "fix or delete it" in caplog.text
    (folder / "config.json").write_text("[64, 4]", encoding="utf-8")
    assert read_config_json(folder) == {}  # valid JSON, but not the object of an official config


def test_pth(tmp_path):
    sd, cfg = make_sd()
    path = tmp_path / "dit.pth"
    torch.save({"model.diffusion_model." + k: v for k, v in sd.items()}, path)
    (tmp_path / "config.json").write_text(json.dumps({"dim": 64, "num_heads": 2}))
    _close(_run(load_dit(path, "t2v-1.3B"), cfg), reference_output(sd, cfg))


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_stored_dtypes_are_cast(tmp_path, stored):
    sd, cfg = make_sd(dtype=stored)
    path = tmp_path / "dit.safetensors"
    save_safetensors(sd, path, metadata={"num_heads": "2"})
    m = load_dit(path, "t2v-A14B", dtype=torch.float32)
    for k, p in m.state_dict().items():
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, sd[k].float(), rtol=0, atol=0)
    _close(_run(m, cfg), reference_output(sd, cfg))
    mb = load_dit(path, "t2v-A14B", dtype="bf16")
    assert mb.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert mb.dtype == torch.bfloat16
    # fp32 islands (the official code runs these in float32)
    for k in ("blocks.0.modulation", "time_projection.1.weight", "head.head.weight", "blocks.1.norm3.weight"):
        assert mb.state_dict()[k].dtype == torch.float32, k


def test_cast_dit_gives_load_dits_precision(tmp_path):
    """A DiT built in code (benchmarks) and cast with cast_dit has load_dit's dtypes, parameter by
    parameter, and computes the same output."""
    from wanlora.models.loading import cast_dit

    sd, cfg = make_sd()
    path = tmp_path / "dit.safetensors"
    save_safetensors(sd, path, metadata={"num_heads": "2"})
    loaded = load_dit(path, "t2v-A14B", dtype="bf16").state_dict()
    m = WanDiT(cfg)
    m.load_state_dict(sd)
    cast = cast_dit(m, torch.bfloat16).state_dict()
    assert {k: v.dtype for k, v in cast.items()} == {k: v.dtype for k, v in loaded.items()}
    assert {v.dtype for v in cast.values()} == {torch.float32, torch.bfloat16}
    _close(_run(m, cfg), _run(load_dit(path, "t2v-A14B", dtype="bf16"), cfg))


def test_comfy_scaled_fp8(tmp_path):
    sd, cfg = make_sd()
    packed = {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2:
            scale = v.abs().max() / 448.0
            packed[k] = (v / scale).to(torch.float8_e4m3fn)
            packed[k[: -len("weight")] + "scale_weight"] = scale.reshape(1)
        else:
            packed[k] = v
    packed["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    path = tmp_path / "dit_fp8_scaled.safetensors"
    save_safetensors(packed, path, metadata={"num_heads": "2"})
    m = load_dit(path, "t2v-A14B")
    q = m.blocks[0].self_attn.q.weight
    want = sd["blocks.0.self_attn.q.weight"]
    assert ((q - want).norm() / want.norm()) < 0.05  # fp8 rounding, but the scale is applied


def test_i2v_and_ti2v_layouts_load_for_their_tasks(tmp_path):
    for task, (i, o) in {"i2v-A14B": (36, 16), "ti2v-5B": (48, 48)}.items():
        sd, cfg = make_sd(in_ch=i, out_ch=o)
        path = tmp_path / f"{task}.safetensors"
        save_safetensors(sd, path, metadata={"num_heads": "2"})
        assert load_dit(path, task).config == cfg


@pytest.mark.parametrize("task, pos_len", [("i2v-14B", None), ("flf2v-14B", 34)])
def test_wan21_image_models_load_with_their_image_branch(tmp_path, task, pos_len):
    """Official key names of the Wan2.1 image branch (ComfyUI prefix too) load as they are; the
    CLIP width and FLF2V's emb_pos rows come from the weights; the LayerNorms of img_emb and
    emb_pos stay float32 like the other norms."""
    sd, cfg = make_sd(in_ch=36, image_dim=40, image_pos_len=pos_len)
    path = tmp_path / f"{task}.safetensors"
    save_safetensors({"model.diffusion_model." + k: v.to(torch.bfloat16) for k, v in sd.items()}, path,
                     metadata={"num_heads": "2"})
    m = load_dit(path, task, dtype=torch.bfloat16)
    assert m.config == cfg
    assert m.img_emb.proj[0].weight.dtype == m.img_emb.proj[4].bias.dtype == torch.float32
    assert m.img_emb.proj[1].weight.dtype == m.blocks[0].cross_attn.k_img.weight.dtype == torch.bfloat16
    assert m.blocks[1].cross_attn.norm_k_img.weight.dtype == torch.float32
    assert (getattr(m.img_emb, "emb_pos", None) is None) == (pos_len is None)


def test_wan21_image_dits_given_for_other_tasks():
    i2v = _official(A14B, 36, 16)
    i2v.image_dim = 1280
    with pytest.raises(CheckpointError, match=r"I2V-14B DiT .*CLIP image branch.*pass --task i2v-14B"):
        check_dit_task(i2v, "i2v-A14B")
    with pytest.raises(CheckpointError, match=r"pass --task i2v-14B"):
        check_dit_task(i2v, "flf2v-14B")
    i2v.image_pos_len = 514
    with pytest.raises(CheckpointError, match=r"FLF2V-14B DiT.*pass --task flf2v-14B"):
        check_dit_task(i2v, "i2v-14B")
    check_dit_task(i2v, "flf2v-14B")
    with pytest.raises(CheckpointError, match=r"I2V-A14B expert.*pass --task i2v-A14B"):
        check_dit_task(_official(A14B, 36, 16), "i2v-14B")


def test_smaller_model_of_the_family_is_accepted_with_a_notice(tmp_path, caplog):
    sd, _ = make_sd()
    path = tmp_path / "tiny.safetensors"
    save_safetensors(sd, path, metadata={"num_heads": "2"})
    with caplog.at_level(logging.INFO, logger="wanlora.models.loading"):
        load_dit(path, "t2v-A14B")
    assert "smaller than the official t2v-A14B" in caplog.text


# ---- wrong files


def _official(task_dims, in_ch, out_ch):
    dim, ffn, heads, layers = task_dims
    return WanDiTConfig(dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=layers, in_channels=in_ch,
                        out_channels=out_ch)


A14B, FIVE_B, ONE_3B = (5120, 13824, 40, 40), (3072, 14336, 24, 30), (1536, 8960, 12, 30)


def test_official_i2v_expert_given_as_t2v():
    with pytest.raises(CheckpointError, match=r"Wan2\.2 I2V-A14B expert DiT .*36 input.*pass --task i2v-A14B"):
        check_dit_task(_official(A14B, 36, 16), "t2v-A14B")
    check_dit_task(_official(A14B, 36, 16), "i2v-A14B")


def test_official_5b_given_as_t2v_a14b():
    with pytest.raises(CheckpointError, match=r"Wan2\.2 TI2V-5B DiT.*pass --task ti2v-5B"):
        check_dit_task(_official(FIVE_B, 48, 48), "t2v-A14B")


def test_official_1_3b_given_as_a14b_names_its_task():
    with pytest.raises(CheckpointError, match=r"T2V-1\.3B.*pass --task t2v-1\.3B"):
        check_dit_task(_official(ONE_3B, 16, 16), "t2v-A14B")
    check_dit_task(_official(A14B, 16, 16), "t2v-14B")  # same architecture as the A14B experts


def test_tiny_i2v_file_given_as_t2v(tmp_path):
    sd, _ = make_sd(in_ch=36)
    path = tmp_path / "i2v.safetensors"
    save_safetensors(sd, path, metadata={"num_heads": "2"})
    with pytest.raises(CheckpointError, match=r"36 input / 16 output.*pass --task i2v-A14B"):
        load_dit(path, "t2v-A14B")


@pytest.mark.parametrize(
    "keys, match",
    [
        ({"encoder.conv1.weight": (96, 3, 3, 3, 3), "decoder.conv1.weight": (384, 16, 3, 3, 3),
          "conv1.weight": (32, 32, 1, 1, 1), "conv2.weight": (16, 16, 1, 1, 1)}, r"Wan2\.1 VAE.*pass it as --vae"),
        ({"encoder.conv1.weight": (160, 12, 3, 3, 3), "decoder.conv1.weight": (1024, 48, 3, 3, 3),
          "conv2.weight": (48, 48, 1, 1, 1)}, r"Wan2\.2 VAE.*--vae"),
        ({"token_embedding.weight": (10, 4), "blocks.0.attn.q.weight": (4, 4)}, r"umT5.*--t5"),
        # a full encoder-decoder T5 (encoder.* and decoder.* keys) is not taken for a VAE
        ({"shared.weight": (10, 4), "encoder.block.0.layer.0.SelfAttention.q.weight": (4, 4),
          "decoder.block.0.layer.2.DenseReluDense.wo.weight": (4, 4)}, r"umT5.*--t5"),
        ({"lora_unet_blocks_0_self_attn_q.lora_down.weight": (4, 64)}, r"LoRA file"),
        # diffusers names are renamed to official ones (test_diffusers_layouts.py); a set without
        # the patch embedding and head is still no DiT
        ({"blocks.0.attn1.to_q.weight": (4, 4), "condition_embedder.time_proj.weight": (4, 4)},
         r"not a Wan DiT \(no patch_embedding"),
        ({"visual.transformer.0.attn.to_qkv.weight": (12, 4), "log_scale": ()}, r"CLIP image encoder.*--clip"),
    ],
)
def test_non_dit_files_say_what_they_are(tmp_path, keys, match):
    path = tmp_path / "wrong.safetensors"
    save_safetensors({k: torch.zeros(s) for k, s in keys.items()}, path)
    with pytest.raises(CheckpointError, match=match):
        load_dit(path, "t2v-A14B")


def test_vae_pth_given_as_dit(tmp_path):
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save({"encoder.conv1.weight": torch.zeros(96, 3, 3, 3, 3),
                "decoder.conv1.weight": torch.zeros(384, 16, 3, 3, 3),
                "conv2.weight": torch.zeros(16, 16, 1, 1, 1)}, path)
    with pytest.raises(CheckpointError, match=r"Wan2\.1_VAE\.pth.*--vae"):
        load_dit(path, "i2v-A14B")


def test_truncated_file(tmp_path):
    sd, _ = make_sd()
    path = tmp_path / "dit.safetensors"
    save_safetensors(sd, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.*download it again"):
        load_dit(path, "t2v-A14B")


def test_missing_shard_and_unexpected_keys(tmp_path):
    sd, _ = make_sd()
    folder = tmp_path / "m"
    folder.mkdir()
    _write_shards(folder, sd, n=3, index=False)
    next(folder.glob("*-00003-of-00003.safetensors")).unlink()
    with pytest.raises(CheckpointError, match=r"(lacks|missing keys).*incomplete \(a shard missing"):
        load_dit(folder, "t2v-A14B")
    partial = {k: v for k, v in sd.items() if not k.startswith("blocks.1.cross_attn.")}
    save_safetensors(partial, tmp_path / "partial.safetensors", metadata={"num_heads": "2"})
    with pytest.raises(CheckpointError, match=r"10 missing keys \(e\.g\. \['blocks\.1\.cross_attn\..*incomplete"):
        load_dit(tmp_path / "partial.safetensors", "t2v-A14B")
    extra = tmp_path / "extra.safetensors"
    save_safetensors({**sd, "blocks.0.self_attn.extra.weight": torch.zeros(2)}, extra, metadata={"num_heads": "2"})
    with pytest.raises(CheckpointError, match=r"1 unexpected keys \(e\.g\. \['blocks\.0\.self_attn\.extra\.weight'\]"):
        load_dit(extra, "t2v-A14B")


# ---- peak RAM


_RSS_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    torch.set_num_threads(1)
    from wanlora.models import load_dit
    from wanlora.models.dit import WanDiT, WanDiTConfig
    with torch.device("meta"):  # one-time import cost of meta-device construction (~70 MB)
        WanDiT(WanDiTConfig(dim=64, ffn_dim=64, num_heads=1, num_layers=1, in_channels=16, out_channels=16))
    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    base = rss_mb()
    m = load_dit(sys.argv[1], "t2v-A14B", dtype=getattr(torch, sys.argv[2]))
    total = sum(float(p.sum()) for p in m.parameters())  # touch every weight
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forked parent (pytest's
    # RSS), while VmHWM is this process image's own high-water mark.
    with open("/proc/self/status") as f:
        peak = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
    print(peak - base)
    """
)


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """~280 MB bf16 DiT checkpoint (dim 1024, 8 blocks), every tensor random."""
    cfg = WanDiTConfig(dim=1024, ffn_dim=4096, num_heads=8, num_layers=8, in_channels=16, out_channels=16)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanDiT(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items()}
    path = tmp_path_factory.mktemp("big") / "dit_bf16.safetensors"
    save_safetensors(sd, path, metadata={"num_heads": "8"})
    del sd
    return path, path.stat().st_size / 2**20


def _peak_mb(path, dtype):
    if not sys.platform.startswith("linux"):
        pytest.skip("peak RSS is read from /proc/self/status (Linux)")
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path), dtype], capture_output=True, text=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": ""}, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def test_peak_ram_stored_dtype(big_checkpoint):
    path, file_mb = big_checkpoint
    assert 250 < file_mb < 350
    peak = _peak_mb(path, "bfloat16")
    print(f"file {file_mb:.0f} MB, peak above baseline {peak:.0f} MB (bf16 -> bf16)")
    assert peak < 1.3 * file_mb


def test_peak_ram_with_cast(big_checkpoint):
    path, file_mb = big_checkpoint
    peak = _peak_mb(path, "float32")
    print(f"file {file_mb:.0f} MB, peak above baseline {peak:.0f} MB (bf16 -> fp32)")
    assert peak < file_mb + 2 * file_mb  # the brief's bound: file + the float32 weights
    assert peak < 1.3 * 2 * file_mb  # converted tensor by tensor: about one float32 copy


def test_refused_memory_map_reads_without_a_map(tmp_path, monkeypatch, caplog):
    """A file larger than RAM + swap: the kernel refuses safe_open's copy-on-write map. The file
    is intact, so it must load (plain reads) and never be called truncated; load_dit never maps."""
    import wanlora.models.loading as loading

    sd, cfg = make_sd()
    path = tmp_path / "wan2.1_t2v_14B_fp16.safetensors"
    save_safetensors(sd, path, metadata={"num_heads": "2"})

    def refuse(*a, **k):
        raise OSError(12, "Cannot allocate memory (os error 12)")

    monkeypatch.setattr(loading, "safe_open", refuse)
    with caplog.at_level(logging.WARNING):
        got = loading.load_state_dict(path)
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    assert "memory map refused" in caplog.text and "truncated" not in caplog.text
    m = load_dit(path, "t2v-A14B")  # never opens a map at all
    _close(_run(m, cfg), reference_output(sd, cfg))
    # a really truncated file still gets the truncation diagnosis, from our own length check
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.*download it again"):
        loading.load_state_dict(path)
