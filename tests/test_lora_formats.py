"""LoRA key layouts: detection, module names, conversion round trips, metadata."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from wanlora.lora.layouts import (
    BLOCK_LINEARS,
    LoraFormatError,
    delta_weights,
    detect_layout,
    diffusers_to_wan_path,
    from_default,
    key_to_module,
    load_lora_file,
    module_to_key,
    to_default,
    wan_to_diffusers_path,
)
from wanlora.lora.metadata import (
    build_lora_metadata,
    check_lora_for_task,
    coverage_warnings,
    expert_file_name,
    partner_path,
    read_lora_metadata,
    split_expert_name,
)

DIM, FFN, LAYERS = 8, 16, 2


def _shape(layer: str) -> tuple[int, int]:
    return {"ffn.0": (FFN, DIM), "ffn.2": (DIM, FFN)}.get(layer, (DIM, DIM))


def make_lora(rank=4, alpha=2.0, layers=BLOCK_LINEARS, blocks=range(LAYERS), seed=0, with_alpha=True):
    """A random default-layout LoRA: nonzero up so every delta is nonzero."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in blocks:
        for layer in layers:
            out, inp = _shape(layer)
            name = module_to_key(f"blocks.{i}.{layer}")
            sd[f"{name}.lora_down.weight"] = torch.randn(rank, inp, generator=g)
            sd[f"{name}.lora_up.weight"] = torch.randn(out, rank, generator=g)
            if with_alpha:
                sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


def assert_same_deltas(a, b, tol=1e-6):
    da, db = delta_weights(a), delta_weights(b)
    assert da.keys() == db.keys()
    for k in da:
        torch.testing.assert_close(db[k], da[k], atol=tol, rtol=tol)


def test_module_names_map_both_ways_through_known_wan_names():
    for i in (0, 7, 39):
        for layer in BLOCK_LINEARS + ("cross_attn.k_img", "cross_attn.v_img"):
            path = f"blocks.{i}.{layer}"
            assert key_to_module(module_to_key(path) + ".lora_down.weight") == path
            assert diffusers_to_wan_path(wan_to_diffusers_path(path)) == path
    assert module_to_key("blocks.3.self_attn.q") == "lora_unet_blocks_3_self_attn_q"
    assert key_to_module("lora_unet_blocks_0_ffn_0.alpha") == "blocks.0.ffn.0"
    assert key_to_module("lora_unet_time_projection_1") == "time_projection.1"
    assert key_to_module("lora_unet__blocks_1_cross_attn_o") == "blocks.1.cross_attn.o"  # VideoX-Fun
    assert wan_to_diffusers_path("blocks.2.self_attn.o") == "blocks.2.attn1.to_out.0"
    assert wan_to_diffusers_path("blocks.2.ffn.0") == "blocks.2.ffn.net.0.proj"
    assert wan_to_diffusers_path("head.head") == "proj_out"
    with pytest.raises(LoraFormatError, match="not a Linear layer"):
        key_to_module("lora_unet_blocks_0_self_attn_norm_q")


@pytest.mark.parametrize("target", ["default", "comfy", "diffusers"])
def test_detect_layout_on_each_layout(target):
    sd = from_default(make_lora(), target)
    assert detect_layout(sd) == target


def test_detect_layout_variants():
    sd = make_lora()
    comfy_kept_alpha = from_default(sd, "comfy", fold_alpha=False)
    assert any(k.endswith(".alpha") for k in comfy_kept_alpha)
    assert detect_layout(comfy_kept_alpha) == "comfy"
    # kohya-dotted: diffusion_model.* with lora_down/lora_up
    dotted = {k.replace("lora_A", "lora_down").replace("lora_B", "lora_up"): v
              for k, v in comfy_kept_alpha.items()}
    assert detect_layout(dotted) == "comfy"
    assert_same_deltas(sd, to_default(dotted))
    # musubi --diffusers_prefix transformer: Wan names behind transformer.
    wan_tr = {k.replace("diffusion_model.", "transformer."): v for k, v in comfy_kept_alpha.items()}
    assert detect_layout(wan_tr) == "comfy"
    assert_same_deltas(sd, to_default(wan_tr))
    with pytest.raises(LoraFormatError, match="unknown LoRA key layout"):
        detect_layout({"foo.bar.weight": torch.zeros(1)})


@pytest.mark.parametrize("target", ["comfy", "diffusers"])
@pytest.mark.parametrize("alpha", [2.0, 3.3, 4.0])
def test_round_trip_keeps_the_weight_update(target, alpha):
    sd = make_lora(alpha=alpha)
    conv = from_default(sd, target)
    assert not any(k.endswith(".alpha") for k in conv), "alpha is folded"
    back = to_default(conv)
    assert_same_deltas(sd, conv)
    assert_same_deltas(sd, back)
    # after folding the alpha read back equals the rank (scale 1)
    assert all(back[k].item() == 4.0 for k in back if k.endswith(".alpha"))


def test_no_alpha_means_scale_one():
    sd = make_lora(with_alpha=False)
    back = to_default(sd)
    assert all(back[k].item() == 4.0 for k in back if k.endswith(".alpha"))
    d = delta_weights(sd)["blocks.0.self_attn.q"]
    n = module_to_key("blocks.0.self_attn.q")
    torch.testing.assert_close(d, sd[f"{n}.lora_up.weight"] @ sd[f"{n}.lora_down.weight"])


def test_fold_is_computed_in_float32_then_cast():
    sd = make_lora(alpha=3.3)
    conv = from_default(sd, "comfy", dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in conv.values())
    d0, d1 = delta_weights(sd), delta_weights(conv)
    for k in d0:  # bf16 rounding only
        assert (d1[k] - d0[k]).abs().max() <= 2e-2 * d0[k].abs().max()


@pytest.mark.parametrize("suffix, match", [
    (".hada_t1", "Tucker factors"), (".lokr_t2", "Tucker factors"), (".on_input", "IA3 is not supported"),
    (".oft_blocks", "OFT/BOFT is not supported"),
])
def test_unsupported_lycoris_pieces_are_refused_by_name(suffix, match):
    """LoHa/LoKr are read (tests/test_lycoris.py); the LyCORIS pieces no Wan target has are named."""
    sd = {"lora_unet_blocks_0_self_attn_q.hada_w1_a": torch.zeros(2, 2),
          "lora_unet_blocks_0_self_attn_q" + suffix: torch.zeros(2, 2)}
    with pytest.raises(LoraFormatError, match=match):
        detect_layout(sd)


def test_diffusers_layout_refuses_alpha_and_unknown_keys():
    conv = from_default(make_lora(), "diffusers")
    conv["transformer.blocks.0.attn1.to_q.alpha"] = torch.tensor(4.0)
    with pytest.raises(LoraFormatError, match="no .alpha keys"):
        to_default(conv)
    sd = make_lora()
    sd["lora_unet_blocks_0_self_attn_q.dora_scale"] = torch.ones(1, DIM)
    with pytest.raises(LoraFormatError, match="DoRA"):
        to_default(sd)


@pytest.mark.parametrize("target", ["default", "comfy", "diffusers"])
@pytest.mark.parametrize("with_alpha", [True, False])
def test_load_lora_file_every_layout(tmp_path, target, with_alpha):
    sd = make_lora(alpha=2.0, with_alpha=with_alpha)
    conv = from_default(sd, target, fold_alpha=target != "default")
    f = tmp_path / "x.safetensors"
    save_file(conv, str(f), metadata={"ss_network_dim": "4"})
    got, md = load_lora_file(f)
    assert md == {"ss_network_dim": "4"}
    assert detect_layout(got) == "default"
    assert all(k.startswith("lora_unet_") for k in got)
    assert all(got[k].ndim == 0 and got[k].dtype == torch.float32 for k in got if k.endswith(".alpha"))
    assert_same_deltas(sd, got)


def test_load_diffusers_file_reads_lora_alpha_from_adapter_metadata(tmp_path):
    sd = make_lora(alpha=4.0)  # scale 1
    conv = from_default(sd, "diffusers")
    f = tmp_path / "d.safetensors"
    save_file(conv, str(f), metadata={"lora_adapter_metadata": json.dumps(
        {"transformer.r": 4, "transformer.lora_alpha": 8})})
    got, _ = load_lora_file(f)
    for k, v in delta_weights(got).items():
        torch.testing.assert_close(v, 2 * delta_weights(sd)[k])


def test_load_lora_file_errors_name_the_file(tmp_path):
    f = tmp_path / "loha.safetensors"
    save_file({"lora_unet_blocks_0_ffn_0.hada_w1_a": torch.zeros(2, 2)}, str(f))
    with pytest.raises(LoraFormatError, match="loha.safetensors.*LoHa"):
        load_lora_file(f)
    with pytest.raises(FileNotFoundError):
        load_lora_file(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------------------ metadata


def test_build_metadata_for_an_expert():
    md = build_lora_metadata("t2v-A14B", network_dim=16, network_alpha=8, expert="high_noise",
                             network_args={"exclude_patterns": ["x"]}, pair_file="a_low_noise.safetensors",
                             base_model_hash="quick-sha256:00", extra={"ss_seed": 42, "ss_learning_rate": 1e-4})
    assert all(isinstance(v, str) for v in md.values())
    assert md["ss_network_module"] == "networks.lora_wan"
    assert md["ss_network_dim"] == "16" and md["ss_network_alpha"] == "8"
    assert json.loads(md["ss_network_args"]) == {"exclude_patterns": ["x"]}
    assert md["modelspec.architecture"] == "wan-2_2-text2video-14b/lora"
    assert md["modelspec.implementation"].endswith("Wan2.2")
    assert md["modelspec.timestep_range"] == "875,1000" == md["wan.timestep_range"]
    assert md["wan.expert"] == "high_noise" and md["wan.boundary"] == "0.875"
    assert md["wan.task"] == "t2v-A14B" and md["wan.key_format"] == "default"
    assert md["wan.alpha_folded"] == "false" and md["ss_seed"] == "42"
    info = read_lora_metadata(md)
    assert (info.task, info.expert, info.rank, info.alpha) == ("t2v-A14B", "high_noise", 16, 8.0)
    assert info.timestep_range == (875.0, 1000.0)
    low = build_lora_metadata("i2v-A14B", network_dim=4, network_alpha=1, expert="low_noise")
    assert low["modelspec.timestep_range"] == "0,900"
    single = build_lora_metadata("ti2v-5B", network_dim=4, network_alpha=1)
    assert single["wan.expert"] == "" and single["wan.boundary"] == ""
    with pytest.raises(ValueError, match="single model"):
        build_lora_metadata("ti2v-5B", network_dim=4, network_alpha=1, expert="high_noise")


def test_musubi_metadata_expert_inferred_from_timestep_range():
    info = read_lora_metadata({"wan.task": "i2v-A14B", "modelspec.timestep_range": "900,1000"})
    assert info.expert == "high_noise"
    assert read_lora_metadata({}).task is None


# what musubi-tuner writes for a Wan2.2 expert LoRA: ss_* and modelspec.* keys, no wan.*
MUSUBI_HIGH = {"ss_network_module": "networks.lora_wan", "ss_network_dim": "4", "ss_network_alpha": "4",
               "ss_base_model_version": "wan", "modelspec.sai_model_spec": "1.0.0",
               "modelspec.architecture": "wan2.2-t2v-a14b", "modelspec.timestep_range": "875,1000"}


@pytest.mark.parametrize("task,rng,expert", [
    ("t2v-A14B", "875,1000", "high_noise"), ("t2v-A14B", "0,875", "low_noise"),
    ("t2v-A14B", "900,1000", "high_noise"), ("t2v-A14B", "0,900", None),  # I2V's low range crosses T2V's boundary
    ("i2v-A14B", "900,1000", "high_noise"), ("i2v-A14B", "875,1000", None), ("i2v-A14B", "0,900", "low_noise"),
    ("t2v-A14B", "0,1000", None), ("ti2v-5B", "875,1000", None), ("t2v-A14B", "", None),
])
def test_musubi_file_without_wan_keys_gets_its_expert_from_the_task(task, rng, expert):
    info = read_lora_metadata({**MUSUBI_HIGH, "modelspec.timestep_range": rng}, task)
    assert info.expert == expert and info.task is None
    assert read_lora_metadata({**MUSUBI_HIGH, "modelspec.timestep_range": rng}).expert is None  # no task given
    # a file's own wan.task wins over the task given; wan.expert over the range
    assert read_lora_metadata({**MUSUBI_HIGH, "wan.task": "i2v-A14B"}, "t2v-A14B").expert is None
    assert read_lora_metadata({**MUSUBI_HIGH, "wan.expert": "both"}, "t2v-A14B").expert == "both"


def test_coverage_warning_for_partial_default_files(caplog):
    full = make_lora()
    assert coverage_warnings(full, LAYERS) == []
    attn_only = make_lora(layers=BLOCK_LINEARS[:8])
    (w,) = coverage_warnings(attn_only, LAYERS)
    assert "ffn.0" in w and "diffusers" in w and "--target comfy" in w
    assert "diffusers' loader refuses" in caplog.text
    (w,) = coverage_warnings(make_lora(blocks=[1]), LAYERS, emit=False)
    assert "blocks without LoRA: 0" in w


def test_wan21_i2v_modules_refused_for_wan22():
    sd = make_lora(layers=BLOCK_LINEARS + ("cross_attn.k_img",))
    with pytest.raises(ValueError, match="k_img.*i2v-A14B"):
        check_lora_for_task(sd, "i2v-A14B")
    check_lora_for_task(make_lora(), "i2v-A14B")
    check_lora_for_task(sd, "i2v-14B")  # the Wan2.1 image models have them
    check_lora_for_task(sd, "flf2v-14B")


def test_expert_file_names(tmp_path):
    assert split_expert_name(tmp_path / "a_b_high_noise.safetensors") == (str(tmp_path / "a_b"), "high_noise")
    assert split_expert_name("x.safetensors") == ("x", None)
    assert partner_path("d/x_low_noise.safetensors").name == "x_high_noise.safetensors"
    assert partner_path("d/x.safetensors") is None
    assert expert_file_name("d/y", "low_noise").name == "y_low_noise.safetensors"


def test_checkpoint_quick_hash_identifies_the_weights(tmp_path):
    from wanlora.io_utils import save_safetensors
    from wanlora.lora.metadata import checkpoint_quick_hash

    save_safetensors({"a": torch.zeros(4, 4)}, tmp_path / "a.safetensors")
    save_safetensors({"a": torch.zeros(4, 4)}, tmp_path / "b.safetensors")
    save_safetensors({"a": torch.ones(4, 4)}, tmp_path / "c.safetensors")
    ha, hb, hc = (checkpoint_quick_hash(tmp_path / f"{x}.safetensors") for x in "abc")
    assert ha == hb != hc and ha.startswith("quick-sha256:")


def test_a_lora_with_nan_or_inf_weights_is_refused(tmp_path):
    """A diverged training's LoRA would render a black video with exit status 0: refused on read,
    by every command (generate, merge, convert, --network_weights)."""
    from wanlora.io_utils import save_safetensors
    from wanlora.lora.layouts import LoraFormatError, load_lora_file

    sd = {"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(4, 8),
          "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.zeros(8, 4),
          "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(4.0)}
    sd["lora_unet_blocks_0_self_attn_q.lora_up.weight"][3, 1] = float("inf")
    save_safetensors(sd, tmp_path / "bad.safetensors")
    with pytest.raises(LoraFormatError) as e:
        load_lora_file(tmp_path / "bad.safetensors")
    assert str(e.value) == (f"{tmp_path / 'bad.safetensors'}: 1 of 3 tensors hold NaN or Inf values (first: "
                            "lora_unet_blocks_0_self_attn_q.lora_up.weight); the training that made it diverged — "
                            "use an earlier save, or retrain with a lower --learning_rate or --max_grad_norm 1.0")
