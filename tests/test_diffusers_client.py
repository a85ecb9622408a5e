"""The real client: diffusers' WanPipeline loads our LoRA files (all three layouts) into both
Wan2.2 experts with no key unused, and its fused weights and output equal our merged model's.

Oracle: diffusers 0.42.1 + peft (``load_lora_weights`` needs the PEFT backend). The base weights
are one random official-key state dict per expert; diffusers gets them through its own converter
(``convert_wan_transformer_to_diffusers``), our side through ``wanlora-merge-lora`` and
``wanlora.models.dit.WanDiT``.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft (dev extra)")
diffusers = pytest.importorskip("diffusers")

from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers  # noqa: E402

from dit_oracle import Float64Sinusoid, diffusers_transformer, random_dit_state_dict  # noqa: E402

from wanlora.lora.convert import convert_lora_file  # noqa: E402
from wanlora.io_utils import save_safetensors  # noqa: E402
from wanlora.lora.layouts import BLOCK_LINEARS, from_default, module_to_key  # noqa: E402
from wanlora.lora.metadata import build_lora_metadata, coverage_warnings  # noqa: E402
from wanlora.lora.merge import merge_loras  # noqa: E402
from wanlora.models.dit import WanDiT, WanDiTConfig  # noqa: E402

CFG = WanDiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_channels=16, out_channels=16,
                   text_dim=32)
SHAPES = {"ffn.0": (CFG.ffn_dim, CFG.dim), "ffn.2": (CFG.dim, CFG.ffn_dim)}


def _base_state_dict(seed):
    return random_dit_state_dict(CFG, seed)


def _lora(seed, rank, alpha, layers=BLOCK_LINEARS, blocks=range(CFG.num_layers)):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in blocks:
        for layer in layers:
            out, inp = SHAPES.get(layer, (CFG.dim, CFG.dim))
            n = module_to_key(f"blocks.{i}.{layer}")
            sd[f"{n}.lora_down.weight"] = torch.randn(rank, inp, generator=g) / math.sqrt(inp)
            sd[f"{n}.lora_up.weight"] = 0.5 * torch.randn(out, rank, generator=g) / math.sqrt(rank)
            sd[f"{n}.alpha"] = torch.tensor(float(alpha))
    return sd


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("client")
    out = {}
    for expert, seed, rank, alpha in (("high_noise", 1, 4, 2.0), ("low_noise", 2, 8, 3.0)):
        save_safetensors(_base_state_dict(seed), d / f"dit_{expert}.safetensors")
        md = build_lora_metadata("t2v-A14B", network_dim=rank, network_alpha=alpha, expert=expert)
        default = d / f"lora_{expert}.safetensors"
        save_safetensors(_lora(seed + 10, rank, alpha), default, metadata=md)
        out[("default", expert)] = default
        for target in ("comfy", "diffusers"):
            dst = d / f"lora_{target}_{expert}.safetensors"
            convert_lora_file(default, dst, target)
            out[(target, expert)] = dst
        merged = d / f"merged_{expert}.safetensors"
        merge_loras(d / f"dit_{expert}.safetensors", [(default, 1.0)], merged, "t2v-A14B", expert=expert)
        out[("merged", expert)] = merged
        out[("base", expert)] = d / f"dit_{expert}.safetensors"
    out["dir"] = d
    return out


def _diffusers_transformer(official_sd):
    return diffusers_transformer(CFG, official_sd, float64_sinusoid=False)


def _pipeline(files):
    return WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
        transformer=_diffusers_transformer(load_file(files[("base", "high_noise")])),
        transformer_2=_diffusers_transformer(load_file(files[("base", "low_noise")])),
        boundary_ratio=0.875,
    )


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _n_adapters(model):
    return sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("layout", ["default", "comfy", "diffusers"])
def test_pipeline_loads_both_experts_and_fuses_to_our_merge(files, layout):
    torch.manual_seed(0)
    pipe = _pipeline(files)
    rec = _Records()
    dlog = logging.getLogger("diffusers")
    dlog.addHandler(rec)
    try:
        pipe.load_lora_weights(str(files[(layout, "high_noise")]), adapter_name="high")
        pipe.load_lora_weights(str(files[(layout, "low_noise")]), adapter_name="low",
                               load_into_transformer_2=True)
    finally:
        dlog.removeHandler(rec)
    bad = [m for m in rec.messages if "unexpected" in m.lower() or "no lora keys" in m.lower()
           or "not found" in m.lower()]
    assert not bad, bad
    n_modules = CFG.num_layers * len(BLOCK_LINEARS)
    assert _n_adapters(pipe.transformer) == n_modules == _n_adapters(pipe.transformer_2)

    pipe.fuse_lora(components=["transformer", "transformer_2"], lora_scale=1.0)
    pipe.unload_lora_weights()
    for expert, model in (("high_noise", pipe.transformer), ("low_noise", pipe.transformer_2)):
        merged = load_file(files[("merged", expert)])
        expected = convert_wan_transformer_to_diffusers(dict(merged))
        got = model.state_dict()
        assert got.keys() == expected.keys()
        base = convert_wan_transformer_to_diffusers(dict(load_file(files[("base", expert)])))
        changed = [k for k in got if not torch.equal(base[k], expected[k])]
        assert len(changed) == n_modules, "the merge touched exactly the LoRA's weights"
        for k in got:
            torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=1e-5, msg=k)

        # the fused diffusers model and our merged WanDiT give the same output
        ours = WanDiT(CFG)
        ours.load_state_dict(merged, strict=True)
        model.condition_embedder.timesteps_proj = Float64Sinusoid(CFG.freq_dim)
        g = torch.Generator().manual_seed(3)
        x = torch.randn(1, 16, 2, 4, 4, generator=g)
        ctx = torch.randn(1, 7, CFG.text_dim, generator=g)
        t = torch.tensor([950.0 if expert == "high_noise" else 400.0])
        with torch.no_grad():
            a = ours(x, t, ctx)
            b = model(x, t, F.pad(ctx, (0, 0, 0, CFG.text_len - 7)), return_dict=False)[0]
        assert _rel(a, b) < 1e-5


def test_partial_default_lora_warns_and_diffusers_refuses_it_but_takes_comfy(files, tmp_path):
    attn_only = _lora(5, 4, 4.0, layers=BLOCK_LINEARS[:8])
    (warning,) = coverage_warnings(attn_only, CFG.num_layers, emit=False)
    assert "diffusers' loader refuses" in warning and "--target comfy" in warning
    f = tmp_path / "attn_default.safetensors"
    save_safetensors(attn_only, f)
    pipe = _pipeline(files)
    with pytest.raises(KeyError):
        pipe.load_lora_weights(str(f))
    g = tmp_path / "attn_comfy.safetensors"
    save_safetensors(from_default(attn_only, "comfy"), g)
    pipe = _pipeline(files)
    pipe.load_lora_weights(str(g))
    assert _n_adapters(pipe.transformer) == CFG.num_layers * 8
