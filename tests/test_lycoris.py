"""LyCORIS LoKr / LoHa through lycoris-lora (``--network_module lycoris.kohya``): training both A14B
experts on a tiny model, the files, our delta against LyCORIS's own, conversion to ComfyUI's names,
merging, generation with the file equal to generation with the merged DiT, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fixed_batches import FixedBatches
from wanlora.commands.train import parse_config
from wanlora.lora.algebra import module_delta
from wanlora.lora.layouts import delta_weights, load_lora_file, lora_modules
from wanlora.training.trainer import train

lycoris_kohya = pytest.importorskip("lycoris.kohya", reason="lycoris-lora is a dev dependency (pip install -e .[dev])")

TASK = "t2v-A14B"
#: algo -> --network_args; LoKr factor=4 on the 64-wide tiny layers: w1 [4, 4] whole, w2 = w2_a @ w2_b of rank 4
ALGOS = {"lokr": ["algo=lokr", "factor=4"], "loha": ["algo=loha"]}
COMFY_SUFFIXES = {  # the tensor names ComfyUI's weight adapters read (comfy/weight_adapter/lokr.py, loha.py)
    "lokr": {"lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"},
}


pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # conftest: one thread, accelerate reset after


_Batches = FixedBatches  # tests/fixed_batches.py


def _flags(tiny_dir) -> dict:
    return json.loads((tiny_dir(TASK) / "manifest.json").read_text())["flags"]


def _train_argv(flags, out: Path, algo_args, *extra) -> list[str]:
    return ["--task", TASK, "--dit", flags["--dit"], "--dit_high_noise", flags["--dit_high_noise"],
            "--dataset_config", "unused.toml", "--output_dir", str(out), "--output_name", "lyco",
            "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "5e-3", "--seed", "3",
            "--max_data_loader_n_workers", "0", "--max_train_steps", "4", "--timestep_sampling", "uniform",
            "--timestep_boundary", "0.5",  # with seed 3 the steps go to high, low, low, high
            "--network_module", "lycoris.kohya", "--network_args", *algo_args, *extra]


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """``trained(algo)`` -> (output folder, train state): both A14B experts, 4 steps, made once."""
    made = {}

    def get(algo):
        if algo not in made:
            from accelerate.state import AcceleratorState

            out = tmp_path_factory.mktemp(f"lyco-{algo}")
            torch.set_num_threads(1)
            made[algo] = out, train(parse_config(_train_argv(_flags(tiny_dir), out, ALGOS[algo])), dataset=_Batches())
            AcceleratorState._reset_state(reset_partial_state=True)
        return made[algo]

    return get


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_training_both_experts_writes_one_lycoris_file_per_expert(trained, algo):
    out, state = trained(algo)
    assert state.global_step == 4
    losses = [x[2] for x in state.losses]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert {x[1] for x in state.losses} == {"high_noise", "low_noise"}
    deltas = {}
    for expert in ("high_noise", "low_noise"):
        f = out / f"lyco_{expert}.safetensors"
        with safe_open(str(f), "pt") as h:
            md, keys = h.metadata(), list(h.keys())
        assert md["wan.expert"] == expert and md["ss_network_module"] == "lycoris.kohya"
        assert json.loads(md["ss_network_args"])["algo"] == algo
        mods = lora_modules(load_file(f))
        assert len(mods) == 2 * 10 and {m["kind"] for m in mods.values()} == {algo}  # 10 Linear layers a block
        suffixes = {k.split(".", 1)[1] for k in keys}
        assert suffixes <= COMFY_SUFFIXES[algo] and all(k.startswith("lora_unet_blocks_") for k in keys)
        if algo == "lokr":
            assert {"lokr_w1", "lokr_w2_a", "lokr_w2_b"} <= suffixes  # decomposed: alpha / rank applies
        deltas[expert] = delta_weights(load_file(f))
        # LyCORIS starts every module at ΔW = 0 (one factor zero): training moved every one of them
        assert all(d.abs().max() > 0 for d in deltas[expert].values())
    assert any(not torch.equal(deltas["high_noise"][k], deltas["low_noise"][k]) for k in deltas["low_noise"])


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_our_delta_equals_lycoris_own(trained, tiny_dir, algo):
    """For the trained files: ΔW of wanlora.lora.algebra equals the update LyCORIS adds in its forward
    (``get_weight``) for every module; with alpha = rank (scale 1) also the weights after LyCORIS's
    own ``merge_to``. (lycoris-lora 4.1.3 multiplies ``alpha / rank`` twice in ``merge_to``, so for
    any other alpha its merge disagrees with its own forward, with ComfyUI and with us.)"""
    from wanlora.models import load_dit

    out, _ = trained(algo)
    f = out / "lyco_low_noise.safetensors"
    sd = load_file(f)
    ours = delta_weights(sd)
    dit = load_dit(_flags(tiny_dir)["--dit"], TASK)
    net, _ = lycoris_kohya.create_network_from_weights(1.0, str(f), None, None, dit, weights_sd=sd)
    assert len(net.unet_loras) == len(ours)
    for m in net.unet_loras:
        path = next(p for p in ours if m.lora_name == "lora_unet_" + p.replace(".", "_"))
        torch.testing.assert_close(m.get_weight(m.shape).detach().float(), ours[path], atol=1e-6, rtol=0)

    # alpha = rank: LyCORIS's merge_to changes each weight by exactly our ΔW
    sd1 = {k: (torch.tensor(4.0) if k.endswith(".alpha") else v) for k, v in sd.items()}
    net, _ = lycoris_kohya.create_network_from_weights(1.0, None, None, None, dit, weights_sd=sd1)
    before = {n: p.detach().clone() for n, p in dit.named_parameters()}
    net.merge_to(None, dit, sd1, torch.float32, "cpu")
    for path, d in delta_weights(sd1).items():
        torch.testing.assert_close(dict(dit.named_parameters())[path + ".weight"] - before[path + ".weight"], d,
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs", [
    dict(algo="lokr", factor=8, decompose_both=True), dict(algo="lokr", factor=-1, full_matrix=True),
    dict(algo="lokr", factor=4, rs_lora=True), dict(algo="loha", use_scalar=True), dict(algo="loha", rs_lora=True),
])
def test_delta_matches_lycoris_forward_for_its_variants(kwargs):
    """Saved files of LyCORIS's LoKr/LoHa variants (both factors decomposed, whole factors, rs_lora,
    a trained scalar) apply as LyCORIS's forward does: y = x Wᵀ + x ΔWᵀ with our ΔW."""
    torch.manual_seed(0)
    module_cls = {"lokr": lycoris_kohya.LokrModule, "loha": lycoris_kohya.LohaModule}[kwargs.pop("algo")]
    base = nn.Linear(64, 96, bias=False)
    m = module_cls("lora_unet_blocks_0_ffn_0", base, 1.0, 4, 3.0, **kwargs)
    m.apply_to()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    sd = {f"lora_unet_blocks_0_ffn_0.{k}": v.detach() for k, v in m.state_dict().items()}
    x = torch.randn(5, 64)
    with torch.no_grad():
        lyco = m(x) - x @ base.weight.T
    mod = lora_modules(sd)["blocks.0.ffn.0"]
    torch.testing.assert_close(x @ module_delta(mod).T, lyco, atol=2e-5, rtol=1e-5)


def test_hooks_add_the_update_and_come_off():
    """LycorisHooks: the hooked layer computes (W + ΔW) x to rounding, for LoKr and LoHa at once;
    detach() gives the base output back bit for bit."""
    from wanlora.lora.lycoris_hooks import LycorisHooks

    torch.manual_seed(1)
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Module()])
    model.blocks[0].ffn = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64))
    k = "lora_unet_blocks_0_ffn_0"
    sd = {f"{k}.lokr_w1": torch.randn(4, 4), f"{k}.lokr_w2_a": torch.randn(24, 2),
          f"{k}.lokr_w2_b": torch.randn(2, 16), f"{k}.alpha": torch.tensor(1.0)}
    sd.update({f"lora_unet_blocks_0_ffn_2.hada_w{i}_{ab}": torch.randn(*((64, 3) if ab == "a" else (3, 96)))
               for i in (1, 2) for ab in "ab"})
    mods = lora_modules(sd)
    x = torch.randn(7, 64)
    base = model.blocks[0].ffn(x)
    hooks = LycorisHooks(model, mods, multiplier=0.7)
    hooks.attach()
    hooked = model.blocks[0].ffn(x)
    lin0, lin2 = model.blocks[0].ffn[0], model.blocks[0].ffn[2]
    h = nn.functional.gelu(x @ (lin0.weight + module_delta(mods["blocks.0.ffn.0"], 0.7)).T + lin0.bias)
    ref = h @ (lin2.weight + module_delta(mods["blocks.0.ffn.2"], 0.7)).T + lin2.bias
    torch.testing.assert_close(hooked, ref, atol=1e-4, rtol=1e-5)
    hooks.detach()
    assert torch.equal(model.blocks[0].ffn(x), base)
    wrong = {"blocks.0.ffn.2": mods["blocks.0.ffn.0"]}
    with pytest.raises(ValueError, match=r"updates a \(96, 64\) weight, the model's is \(64, 96\)"):
        LycorisHooks(model, wrong, source="x.safetensors")


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_convert_to_comfy_keeps_the_update_under_comfyui_names(trained, tiny_dir, algo, tmp_path):
    """``wanlora-convert-lora --target comfy``: every key is ``diffusion_model.<weight of the DiT>.<a
    tensor ComfyUI's adapter reads>`` (ComfyUI maps ``diffusion_model.<P>`` to the model weight
    ``<P>.weight``, reference/lora_formats.md §5.2); the update is unchanged; back to default too."""
    from wanlora.commands.convert_lora import main
    from wanlora.models import load_dit

    out, _ = trained(algo)
    src = out / "lyco_high_noise.safetensors"
    assert main(["--input", str(src), "--target", "comfy", "--output", str(tmp_path), "--no_pair"]) == 0
    conv = tmp_path / src.name
    sd = load_file(conv)
    weights = {n[: -len(".weight")] for n, _ in load_dit(_flags(tiny_dir)["--dit_high_noise"], TASK).named_parameters()
               if n.endswith(".weight")}
    for k in sd:
        prefix, module, suffix = k.split(".", 1)[0], k.rsplit(".", 1)[0], k.rsplit(".", 1)[1]
        assert prefix == "diffusion_model" and module[len("diffusion_model."):] in weights
        assert suffix in COMFY_SUFFIXES[algo]
    before, after = delta_weights(load_file(src)), delta_weights(load_lora_file(conv)[0])
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k])
    with safe_open(str(conv), "pt") as h:
        assert h.metadata()["wan.key_format"] == "comfy" and h.metadata()["wan.expert"] == "high_noise"
    back = tmp_path / "back.safetensors"
    assert main(["--input", str(conv), "--target", "default", "--output", str(back)]) == 0
    assert load_file(back).keys() == load_file(src).keys()


def test_merge_then_generate_equals_generate_with_the_files(trained, tiny_dir, tmp_path):
    """wanlora-merge-lora puts each expert's LoKr into its DiT (weights = W + ΔW); wanlora-generate with
    the two LoKr files gives the same latents as with the two merged DiTs (merged: to 1e-6; hooked
    with --lora_dynamic: to rounding), and other latents than without them."""
    from wanlora.commands import generate, merge_lora

    out, _ = trained("lokr")
    flags = _flags(tiny_dir)
    merged = {}
    for expert, dit in (("high_noise", flags["--dit_high_noise"]), ("low_noise", flags["--dit"])):
        merged[expert] = tmp_path / f"merged_{expert}.safetensors"
        assert merge_lora.main(["--dit", dit, "--task", TASK, "--lora_weight", str(out / f"lyco_{expert}.safetensors"),
                                "--save_merged_model", str(merged[expert]), "--save_dtype", "fp32"]) == 0

    def latent(name, dit, dit_high, *extra):
        folder = tmp_path / name
        argv = ["--task", TASK, "--dit", str(dit), "--dit_high_noise", str(dit_high), "--vae", flags["--vae"],
                "--t5", flags["--t5"], "--t5_tokenizer", flags["--t5_tokenizer"], "--prompt", "a red kite",
                "--video_size", "32", "32", "--video_length", "5", "--infer_steps", "4", "--seed", "3",
                "--output_type", "latent", "--save_path", str(folder), *extra]
        assert generate.main(argv) == 0
        (f,) = folder.glob("*.safetensors")
        return load_file(f)["latent"]

    with_files = latent("files", flags["--dit"], flags["--dit_high_noise"],
                        "--lora_weight", str(out / "lyco_low_noise.safetensors"),
                        "--lora_weight_high_noise", str(out / "lyco_high_noise.safetensors"))
    with_merged = latent("merged", merged["low_noise"], merged["high_noise"])
    hooked = latent("hooked", flags["--dit"], flags["--dit_high_noise"], "--lora_dynamic",
                    "--lora_weight", str(out / "lyco_low_noise.safetensors"),
                    "--lora_weight_high_noise", str(out / "lyco_high_noise.safetensors"))
    base = latent("base", flags["--dit"], flags["--dit_high_noise"])
    torch.testing.assert_close(with_files, with_merged, atol=1e-6, rtol=0)
    torch.testing.assert_close(hooked, with_merged, atol=1e-4, rtol=1e-4)  # W x + ΔW x vs (W + ΔW) x
    assert (with_files - base).abs().max() > 1e-3


def test_refusals_before_any_model_loads(tiny_dir, tmp_path):
    """Unsupported LyCORIS algorithms and options fail in one line before the DiT loads."""
    for args, match in ((["algo=ia3"], "algo=ia3: not supported.*algo=lokr or algo=loha"),
                        (["algo=boft"], "algo=boft: not supported"),
                        (["algo=lokr", "dora_wd=True"], "dora_wd=True: not supported"),
                        (["algo=loha", "exclude_patterns=['.*ffn.*']"], "LyCORIS ignores it.*preset=")):
        with pytest.raises(ValueError, match=match):
            train(parse_config(_train_argv(_flags(tiny_dir), tmp_path / "x", args)), dataset=_Batches(),
                  load_dit=lambda *a, **k: pytest.fail("loaded the DiT"))


def test_resume_and_network_weights(tiny_dir, tmp_path):
    """A LoKr run resumed from its state at step 2 ends with the files of the run that never stopped;
    ``--network_weights`` starts a LoKr run from a LoKr file (same rank and factor)."""
    from accelerate.state import AcceleratorState

    flags = _flags(tiny_dir)
    full = train(parse_config(_train_argv(flags, tmp_path / "a", ALGOS["lokr"], "--save_every_n_steps", "2",
                                          "--save_state")), dataset=_Batches())
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = train(parse_config(_train_argv(flags, tmp_path / "b", ALGOS["lokr"], "--resume",
                                             str(tmp_path / "a" / "lyco-step00000002-state"))), dataset=_Batches())
    assert [tuple(x) for x in resumed.losses] == [tuple(x) for x in full.losses]
    for e in ("high_noise", "low_noise"):
        wa = load_file(tmp_path / "a" / f"lyco_{e}.safetensors")
        wb = load_file(tmp_path / "b" / f"lyco_{e}.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), e
    AcceleratorState._reset_state(reset_partial_state=True)
    start = tmp_path / "a" / "lyco_low_noise.safetensors"
    argv = _train_argv(flags, tmp_path / "c", ALGOS["lokr"], "--expert", "low", "--network_weights", str(start),
                       "--max_train_steps", "1")
    i = argv.index("--dit_high_noise")
    began = delta_weights(load_file(start))
    for extra in ([], ["--dim_from_weights"]):  # shaped by the flags, or by LyCORIS from the file
        AcceleratorState._reset_state(reset_partial_state=True)
        train(parse_config(argv[:i] + argv[i + 2:] + extra), dataset=_Batches())  # one expert
        moved = delta_weights(load_file(tmp_path / "c" / "lyco.safetensors"))
        assert moved.keys() == began.keys()
        assert all(torch.allclose(moved[k], began[k], atol=0.05) for k in began)  # one small step from the file
        assert any(not torch.equal(moved[k], began[k]) for k in began)


def test_samples_and_ema_with_a_lokr_run(trained, tiny_dir, tmp_path):
    """Samples during a LoKr run (first step, every 2 steps) leave the LoKr files bit-identical to the
    run without them; --ema_decay writes one NAME_ema LoKr file per expert beside the raw ones."""
    out, _ = trained("lokr")
    flags = _flags(tiny_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball --w 32 --h 32 --f 5 --s 2 --d 1\n")
    run = tmp_path / "run"
    train(parse_config(_train_argv(flags, run, ALGOS["lokr"], "--sample_prompts", str(prompts),
                                   "--sample_every_n_steps", "2", "--sample_at_first", "--vae", flags["--vae"],
                                   "--t5", flags["--t5"], "--t5_tokenizer", flags["--t5_tokenizer"],
                                   "--ema_decay", "0.9")), dataset=_Batches())
    steps = sorted({int(p.name.split("_")[1]) for p in (run / "sample").iterdir() if p.suffix == ".mp4"})
    assert steps == [0, 2, 4]
    for expert in ("high_noise", "low_noise"):
        a, b = load_file(out / f"lyco_{expert}.safetensors"), load_file(run / f"lyco_{expert}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), expert
        ema, _ = load_lora_file(run / f"lyco_ema_{expert}.safetensors")
        assert {m["kind"] for m in lora_modules(ema).values()} == {"lokr"}
        raw, avg = delta_weights(b), delta_weights(ema)
        assert raw.keys() == avg.keys() and any(not torch.equal(raw[k], avg[k]) for k in raw)


def test_sample_lora_stacks_a_lokr_file_on_the_samples(trained, tiny_dir, tmp_path):
    """--sample_lora with a LoKr file: the samples change, the LoRA being trained does not."""
    from wanlora.video_io import probe_video, read_video_frames

    lokr = trained("lokr")[0] / "lyco_low_noise.safetensors"
    flags = _flags(tiny_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball --w 32 --h 32 --f 5 --s 2 --d 3\n")

    def run(name, *extra):
        out = tmp_path / name
        argv = _train_argv(flags, out, ALGOS["loha"], "--expert", "low", "--max_train_steps", "2",
                           "--sample_prompts", str(prompts), "--sample_at_first", "--vae", flags["--vae"],
                           "--t5", flags["--t5"], "--t5_tokenizer", flags["--t5_tokenizer"], *extra)
        i = argv.index("--dit_high_noise")
        train(parse_config(argv[:i] + argv[i + 2:]), dataset=_Batches())
        (video,) = (out / "sample").glob("lyco_000000_*.mp4")  # the sample at step 0
        return load_file(out / "lyco.safetensors"), read_video_frames(video, range(probe_video(video).frame_count))

    (plain_w, plain_v), (stacked_w, stacked_v) = run("plain"), run("stacked", "--sample_lora", f"{lokr}:2")
    assert abs(plain_v.astype(float) - stacked_v.astype(float)).mean() > 1.0
    assert plain_w.keys() == stacked_w.keys() and all(torch.equal(plain_w[k], stacked_w[k]) for k in plain_w)
