"""diffusers-format checkpoints load as the official ones: a tiny Wan2.2 T2V-A14B set and a tiny
TI2V-5B set are written with diffusers' own ``WanPipeline.save_pretrained`` (``transformer/``,
``transformer_2/``, ``vae/`` as ``AutoencoderKLWan``, ``text_encoder/`` as transformers'
``UMT5EncoderModel``, ``tokenizer/``, ``model_index.json``) from the official-layout tiny weights,
and every model loaded from them equals the one loaded from the official files: same tensors,
bit-identical outputs — by folder, by ``--ckpt_dir`` folder and by repo id from a Hub cache."""

from __future__ import annotations

import pytest
import torch

from hf_fixtures import fill_hf_cache
from wanlora.models import load_dit, load_text_encoder, load_vae
from wanlora.models.checkpoints import resolve_ckpt_dir, roles_for
from wanlora.models.loading import dit_config_from_state_dict, load_state_dict

diffusers = pytest.importorskip("diffusers")


def _transformer(folder):
    from dit_oracle import diffusers_transformer

    sd = load_state_dict(folder)
    heads = __import__("json").loads((folder / "config.json").read_text())["num_heads"]
    return diffusers_transformer(dit_config_from_state_dict(sd, num_heads=heads), sd, float64_sinusoid=False)


def _write_diffusers_set(official, task: str, out):
    """The official tiny set of ``task`` re-saved by ``WanPipeline.save_pretrained``."""
    from test_vae import diffusers_twin  # the VAE oracle: diffusers' converter (Wan2.1), the Wan2.2 map

    te = load_text_encoder(official / "models_t5_umt5-xxl-enc-bf16.pth")
    vae_file = "Wan2.1_VAE.pth" if task != "ti2v-5B" else "Wan2.2_VAE.pth"
    vae, _, _ = diffusers_twin(load_vae(official / vae_file))
    experts = task.endswith("A14B")
    pipe = diffusers.WanPipeline(
        tokenizer=te.tokenizer, text_encoder=te.model, vae=vae,
        scheduler=diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True),
        transformer=_transformer(official / ("high_noise_model" if experts else "")),
        transformer_2=_transformer(official / "low_noise_model") if experts else None,
        boundary_ratio=0.875 if experts else None, expand_timesteps=not experts)
    pipe.save_pretrained(out, max_shard_size="100KB")  # shards and index files, as the big repos have
    return out


@pytest.fixture(scope="module")
def sets(tiny_dir, tmp_path_factory):
    made = {}

    def get(task):
        if task not in made:
            made[task] = (tiny_dir(task), _write_diffusers_set(tiny_dir(task), task,
                                                               tmp_path_factory.mktemp(f"diffusers-{task}")))
        return made[task]

    return get


def _same_dit(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.config == b.config
    # The loaders keep float32 weights memory-mapped from the files; a tensor's byte offset in its
    # file (its alignment) can change which CPU matmul kernel runs and so the last bits of a sum.
    # Equal weights in fresh memory must give bit-identical outputs.
    for m in (a, b):
        for p in m.parameters():
            p.data = p.data.clone()
    g = torch.Generator().manual_seed(0)
    c = a.config
    x = torch.randn(1, c.in_channels, 2, 4, 4, generator=g)
    ctx = torch.randn(1, 5, c.text_dim, generator=g)
    t = torch.tensor([700.0])
    with torch.no_grad():
        assert torch.equal(a(x, t, ctx), b(x, t, ctx))


@pytest.mark.parametrize("task", ["t2v-A14B", "ti2v-5B"])
def test_folders_load_as_the_official_files(sets, task):
    official, diff = sets(task)
    if task == "t2v-A14B":  # transformer = high-noise expert, transformer_2 = low-noise (WanPipeline)
        _same_dit(load_dit(diff / "transformer", task), load_dit(official / "high_noise_model", task))
        _same_dit(load_dit(diff / "transformer_2", task), load_dit(official / "low_noise_model", task))
    else:
        _same_dit(load_dit(diff / "transformer", task), load_dit(official, task))

    vae_file = "Wan2.1_VAE.pth" if task != "ti2v-5B" else "Wan2.2_VAE.pth"
    va, vb = load_vae(diff / "vae"), load_vae(official / vae_file)
    assert va.kind == vb.kind and va.identity == vb.identity
    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = vb.encode(video)
    assert torch.equal(va.encode(video), z) and torch.equal(va.decode(z), vb.decode(z))

    ta = load_text_encoder(diff / "text_encoder", tokenizer=diff / "tokenizer")
    tb = load_text_encoder(official / "models_t5_umt5-xxl-enc-bf16.pth")
    assert ta.identity == tb.identity  # same weights and tokenizer: text caches stay valid
    prompts = ["a red ball bounces across a wooden floor", "一只猫 &amp; a dog"]
    assert all(torch.equal(p, q) for p, q in zip(ta.encode(prompts), tb.encode(prompts)))


def test_ckpt_dir_diffusers_folder_and_repo_id(sets, tmp_path, monkeypatch):
    from huggingface_hub import constants

    official, diff = sets("t2v-A14B")
    roles = roles_for("t2v-A14B")
    by_folder = resolve_ckpt_dir(diff, "t2v-A14B", roles)
    assert by_folder.layout == "diffusers"
    assert by_folder.paths == {"dit_high_noise": diff / "transformer", "dit_low_noise": diff / "transformer_2",
                               "vae": diff / "vae" / "diffusion_pytorch_model.safetensors.index.json",
                               "t5": diff / "text_encoder", "t5_tokenizer": diff / "tokenizer"}

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
    snap = fill_hf_cache(tmp_path / "hub", repo, diff)
    by_repo = resolve_ckpt_dir(repo, "t2v-A14B", roles)
    assert by_repo.layout == "diffusers" and by_repo.paths == {
        r: snap / p.relative_to(diff) for r, p in by_folder.paths.items()}
    _same_dit(load_dit(by_repo.paths["dit_low_noise"], "t2v-A14B"), load_dit(official / "low_noise_model", "t2v-A14B"))
    te = load_text_encoder(by_repo.paths["t5"], tokenizer=by_repo.paths["t5_tokenizer"])
    assert te.identity == load_text_encoder(official / "models_t5_umt5-xxl-enc-bf16.pth").identity


def test_merge_into_diffusers_transformer_equals_official(sets, tmp_path):
    """A LoRA (official module names) merges into a diffusers transformer/ under its diffusers names;
    the merged model loads to the same weights as the official checkpoint merged with it."""
    from wanlora.io_utils import save_safetensors
    from wanlora.lora.merge import merge_loras

    official, diff = sets("t2v-A14B")
    dit = load_dit(official / "low_noise_model", "t2v-A14B")
    g = torch.Generator().manual_seed(0)
    lora = {}
    for name in ("blocks.0.self_attn.q", "blocks.1.cross_attn.o", "blocks.0.ffn.2"):
        m = dit.get_submodule(name)
        key = "lora_unet_" + name.replace(".", "_")
        lora[f"{key}.lora_down.weight"] = torch.randn(2, m.in_features, generator=g)
        lora[f"{key}.lora_up.weight"] = torch.randn(m.out_features, 2, generator=g)
        lora[f"{key}.alpha"] = torch.tensor(2.0)
    save_safetensors(lora, tmp_path / "l.safetensors")
    for src, out in ((official / "low_noise_model", "official.safetensors"), (diff / "transformer_2", "diff.safetensors")):
        summary = merge_loras(src, [(tmp_path / "l.safetensors", 1.0)], tmp_path / out, "t2v-A14B", expert="low_noise")
        assert summary["merged_modules"] == 3
    a = load_dit(tmp_path / "diff.safetensors", "t2v-A14B").state_dict()
    b = load_dit(tmp_path / "official.safetensors", "t2v-A14B").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(b["blocks.0.self_attn.q.weight"], dit.state_dict()["blocks.0.self_attn.q.weight"])
