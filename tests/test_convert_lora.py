"""wanlora-convert-lora: file naming, pairs, metadata after folding, round trips through files."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from wanlora.commands.convert_lora import main
from wanlora.lora.convert import plan_outputs
from wanlora.io_utils import save_safetensors
from wanlora.lora.layouts import delta_weights, detect_layout, from_default, load_lora_file
from wanlora.lora.metadata import build_lora_metadata

from test_lora_formats import assert_same_deltas, make_lora


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _write_lora(path, alpha=2.0, expert="high_noise", seed=0, pair_file=""):
    sd = make_lora(alpha=alpha, seed=seed)
    md = build_lora_metadata("t2v-A14B", network_dim=4, network_alpha=alpha, expert=expert,
                             pair_file=pair_file)
    save_safetensors(sd, path, metadata=md)
    return sd


def test_default_to_comfy_to_default_through_files(tmp_path):
    sd = _write_lora(tmp_path / "style.safetensors", expert="both")
    assert main(["--input", str(tmp_path / "style.safetensors"), "--target", "comfy"]) == 0
    comfy = tmp_path / "style_comfy.safetensors"
    tensors, md = _read(comfy)
    assert detect_layout(tensors) == "comfy"
    assert all(k.startswith("diffusion_model.blocks.") for k in tensors)
    assert not any(k.endswith(".alpha") for k in tensors)
    assert md["wan.key_format"] == "comfy" and md["wan.alpha_folded"] == "true"
    assert md["ss_network_alpha"] == "4" == md["ss_network_dim"], "never claim a folded alpha"
    assert md["wan.task"] == "t2v-A14B", "the rest of the metadata is kept"
    assert_same_deltas(sd, tensors)

    assert main(["--input", str(comfy), "--target", "default", "--output", str(tmp_path / "back.safetensors")]) == 0
    back, md2 = load_lora_file(tmp_path / "back.safetensors")
    assert md2["wan.key_format"] == "default" and md2["wan.alpha_folded"] == "true"
    assert_same_deltas(sd, back)


def test_diffusers_target_and_dtype(tmp_path):
    sd = _write_lora(tmp_path / "s.safetensors", alpha=3.0)
    out = tmp_path / "d.safetensors"
    assert main(["--input", str(tmp_path / "s.safetensors"), "--target", "diffusers",
                 "--output", str(out), "--dtype", "fp32", "--no_pair"]) == 0
    tensors, md = _read(out)
    assert detect_layout(tensors) == "diffusers"
    assert "transformer.blocks.1.attn2.to_out.0.lora_B.weight" in tensors
    assert "transformer.blocks.0.ffn.net.0.proj.lora_A.weight" in tensors
    assert not any("alpha" in k for k in tensors)
    assert md["format"] == "pt" and md["wan.alpha_folded"] == "true"
    assert_same_deltas(sd, load_lora_file(out)[0])
    # bf16 output: weights cast after the float32 fold
    out16 = tmp_path / "d16.safetensors"
    assert main(["--input", str(tmp_path / "s.safetensors"), "--target", "comfy", "--output", str(out16),
                 "--dtype", "bf16"]) == 0
    assert all(v.dtype == torch.bfloat16 for v in _read(out16)[0].values())


def test_keep_alpha_comfy(tmp_path):
    sd = _write_lora(tmp_path / "s.safetensors", alpha=2.0, expert="both")
    assert main(["--input", str(tmp_path / "s.safetensors"), "--target", "comfy", "--keep_alpha"]) == 0
    tensors, md = _read(tmp_path / "s_comfy.safetensors")
    assert tensors["diffusion_model.blocks.0.ffn.2.alpha"].item() == 2.0
    assert md["wan.alpha_folded"] == "false" and md["ss_network_alpha"] == "2"
    assert_same_deltas(sd, tensors)


def test_pair_input_finds_its_partner_and_keeps_the_suffixes(tmp_path):
    hi = _write_lora(tmp_path / "x_high_noise.safetensors", expert="high_noise", seed=1,
                     pair_file="x_low_noise.safetensors")
    lo = _write_lora(tmp_path / "x_low_noise.safetensors", expert="low_noise", seed=2,
                     pair_file="x_high_noise.safetensors")
    # default names: the target goes before the expert suffix
    assert main(["--input", str(tmp_path / "x_high_noise.safetensors"), "--target", "comfy"]) == 0
    for name, ref, partner in (("x_comfy_high_noise", hi, "x_comfy_low_noise"),
                               ("x_comfy_low_noise", lo, "x_comfy_high_noise")):
        tensors, md = _read(tmp_path / f"{name}.safetensors")
        assert md["wan.pair_file"] == f"{partner}.safetensors"
        assert_same_deltas(ref, tensors)
    # --output Y.safetensors with a pair: Y_high_noise / Y_low_noise
    out = tmp_path / "o" / "y_low_noise.safetensors"
    assert main(["--input", str(tmp_path / "x_low_noise.safetensors"), "--target", "diffusers",
                 "--output", str(out)]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["y_high_noise.safetensors", "y_low_noise.safetensors"]
    assert _read(out.parent / "y_high_noise.safetensors")[1]["wan.expert"] == "high_noise"
    # a folder as output keeps the input names
    plan = plan_outputs([str(tmp_path / "x_high_noise.safetensors")], str(tmp_path / "conv"), "comfy")
    assert [(s.name, d.name) for s, d in plan] == [("x_high_noise.safetensors", "x_high_noise.safetensors"),
                                                     ("x_low_noise.safetensors", "x_low_noise.safetensors")]
    # --no_pair converts only the file given
    plan = plan_outputs([str(tmp_path / "x_high_noise.safetensors")], None, "comfy", pair=False)
    assert len(plan) == 1


def test_pair_and_naming_errors(tmp_path, capsys):
    _write_lora(tmp_path / "a.safetensors", expert="both")
    _write_lora(tmp_path / "b.safetensors", expert="both")
    with pytest.raises(ValueError, match="only valid for one input or one expert pair"):
        plan_outputs([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")],
                     str(tmp_path / "c.safetensors"), "comfy")
    with pytest.raises(ValueError, match="overwrite the input"):
        plan_outputs([str(tmp_path / "a.safetensors")], str(tmp_path), "comfy")
    assert main(["--input", str(tmp_path / "nope.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_lycoris_to_diffusers_refused_by_the_cli(tmp_path, capsys):
    f = tmp_path / "lokr.safetensors"
    save_file({"lora_unet_blocks_0_ffn_0.lokr_w1": torch.zeros(2, 2),
               "lora_unet_blocks_0_ffn_0.lokr_w2": torch.zeros(2, 2)}, str(f))
    assert main(["--input", str(f), "--target", "diffusers"]) == 2
    err = capsys.readouterr().err
    assert "lokr.safetensors" in err and "diffusers loads neither LoHa nor LoKr" in err and "comfy" in err
    assert not (tmp_path / "lokr_diffusers.safetensors").exists()


def test_partial_lora_to_default_warns(tmp_path, caplog):
    sd = make_lora(blocks=[1])
    save_file(from_default(sd, "comfy"), str(tmp_path / "p.safetensors"))
    assert main(["--input", str(tmp_path / "p.safetensors"), "--target", "default"]) == 0
    assert "diffusers' loader refuses" in caplog.text
    assert delta_weights(load_lora_file(tmp_path / "p_default.safetensors")[0]).keys() == delta_weights(sd).keys()


def test_folder_input_converts_every_file_and_pairs_name_each_other(tmp_path):
    src = tmp_path / "in"
    hi = _write_lora(src / "p_high_noise.safetensors", expert="high_noise", seed=3)
    lo = _write_lora(src / "p_low_noise.safetensors", expert="low_noise", seed=4)
    assert main(["--input", str(src), "--target", "diffusers", "--output", str(tmp_path / "out")]) == 0
    for name, ref, partner in (("p_high_noise", hi, "p_low_noise"), ("p_low_noise", lo, "p_high_noise")):
        tensors, md = _read(tmp_path / "out" / f"{name}.safetensors")
        assert detect_layout(tensors) == "diffusers" and md["wan.pair_file"] == f"{partner}.safetensors"
        assert_same_deltas(ref, tensors)
