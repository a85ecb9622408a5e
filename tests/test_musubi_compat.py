"""musubi-tuner users switch without edits: its command lines parse, its spellings mean the same,
and each musubi feature we lack is refused in one line naming our equivalent."""

from __future__ import annotations

import shlex

import pytest

from wanlora.commands import cache_latents, cache_text, generate, train
from wanlora.commands.musubi import ACCEPTED, NOT_SUPPORTED, SPELLINGS, _NotSupported

# musubi-tuner's documented commands (its Wan docs), flags as written there after the script name
MUSUBI_CACHE_LATENTS = "--dataset_config path/to/toml --vae path/to/wan_2.1_vae.safetensors"
MUSUBI_CACHE_TEXT = ("--dataset_config path/to/toml --t5 path/to/models_t5_umt5-xxl-enc-bf16.pth --batch_size 16 "
                     "--fp8_t5")
MUSUBI_TRAIN = ("--task t2v-1.3B --dit path/to/wan2.1_xxx_bf16.safetensors --dataset_config path/to/toml --sdpa "
                "--mixed_precision bf16 --optimizer_type adamw8bit --learning_rate 2e-4 --gradient_checkpointing "
                "--max_data_loader_n_workers 2 --persistent_data_loader_workers --network_module networks.lora_wan "
                "--network_dim 32 --timestep_sampling shift --discrete_flow_shift 3.0 --max_train_epochs 16 "
                "--save_every_n_epochs 1 --seed 42 --output_dir path/to/output_dir --output_name name-of-lora "
                "--vae path/to/wan_2.1_vae.safetensors --t5 path/to/models_t5_umt5-xxl-enc-bf16.pth "
                "--sample_prompts /path/to/prompt_file.txt --sample_every_n_epochs 1 --sample_every_n_steps 1000")
# Wan2.2 high-noise expert, musubi style (one expert, its timestep range)
MUSUBI_TRAIN_HIGH = ("--task t2v-A14B --dit path/to/wan2.2_t2v_high_noise_14B_fp16.safetensors --dataset_config d.toml "
                     "--xformers --mixed_precision fp16 --network_module networks.lora_wan --network_dim 32 "
                     "--network_alpha 32 --timestep_sampling shift --discrete_flow_shift 1.0 --max_train_epochs 500 "
                     "--optimizer_args weight_decay=0.1 --max_grad_norm 0 --lr_scheduler cosine --lr_warmup_steps 500 "
                     "--output_dir out --output_name high --preserve_distribution_shape --min_timestep 875 "
                     "--max_timestep 1000 --guidance_scale 1.0 --vae_dtype bfloat16")


def _ns(module, argv):
    return module.command_line().parse_namespace(shlex.split(argv))


def test_musubi_caching_commands_parse_unchanged(caplog):
    ns = _ns(cache_latents, MUSUBI_CACHE_LATENTS)
    assert str(ns.dataset_config) == "path/to/toml" and str(ns.vae).endswith("wan_2.1_vae.safetensors")
    ns = _ns(cache_text, MUSUBI_CACHE_TEXT)
    assert ns.batch_size == 16 and ns.fp8_t5
    with caplog.at_level("INFO"):
        ns = _ns(cache_text, MUSUBI_CACHE_TEXT + " --num_workers 4 --keep_cache")
    assert "--num_workers: accepted for musubi-tuner command lines, no effect" in caplog.text
    assert "--keep_cache" in caplog.text and not any(k.startswith("_musubi") for k in vars(ns))
    assert _ns(cache_latents, MUSUBI_CACHE_LATENTS + " --keep_cache").vae is not None


def test_musubi_training_commands_parse_unchanged(caplog):
    config = train.parse_config(shlex.split(MUSUBI_TRAIN))
    assert config.model.attn_mode == "sdpa" and config.network.network_dim == 32
    assert config.timesteps.timestep_sampling == "shift" and config.optimization.max_train_epochs == 16
    with caplog.at_level("INFO"):
        config = train.parse_config(shlex.split(MUSUBI_TRAIN_HIGH))
    assert config.model.attn_mode == "xformers" and config.timesteps.min_timestep == 875
    assert "--vae_dtype: accepted" in caplog.text and "--guidance_scale: accepted" in caplog.text


@pytest.mark.parametrize("flag,mode", [("--sdpa", "sdpa"), ("--flash_attn", "flash"), ("--flash3", "flash3"),
                                       ("--xformers", "xformers"), ("--sage_attn", "sage")])
def test_attention_spellings_set_attn_mode(flag, mode):
    assert SPELLINGS[flag] == ("attn_mode", mode)
    ns = _ns(generate, f"--task t2v-1.3B --dit d --vae v --t5 t --prompt p {flag}")
    assert ns.attn_mode == mode
    # the last one given wins, as with any flag
    assert _ns(generate, f"--task t2v-1.3B {flag} --attn_mode cudnn").attn_mode == "cudnn"


def test_not_supported_is_one_line_naming_the_equivalent(capsys):
    cases = [(train, MUSUBI_TRAIN, flag) for flag in NOT_SUPPORTED["wanlora-train"]]
    cases += [(cache_latents, MUSUBI_CACHE_LATENTS, "--vae_cache_cpu"), (generate, "--task t2v-1.3B", "--fp8")]
    tried = 0
    for module, base, flag in cases:
        if not isinstance(module.build_parser()._option_string_actions.get(flag), _NotSupported):
            continue  # the feature has landed since: its own flag wins
        tried += 1
        with pytest.raises(SystemExit) as e:
            _ns(module, f"{base} {flag} 3")
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].split(": error: ")[1].startswith(f"not supported: {flag} (musubi-tuner) — "), err
        assert "unrecognized" not in "\n".join(err)
    assert tried >= 5
    assert "batch_size = 1" in NOT_SUPPORTED["wanlora-train"]["--split_attn"]


def test_our_own_flags_are_never_shadowed():
    """A spelling is added only where the command lacks that option string, so a flag a command
    declares keeps its own meaning (generate's --guidance_scale, cache-latents' --num_workers)."""
    p = generate.build_parser()
    assert p._option_string_actions["--guidance_scale"].dest == "guidance_scale"
    p = cache_latents.build_parser()
    assert p._option_string_actions["--num_workers"].dest == "num_workers"
    assert _ns(cache_latents, MUSUBI_CACHE_LATENTS + " --num_workers 3").num_workers == 3
    for prog, table in ACCEPTED.items():
        for flag in table:
            assert flag not in NOT_SUPPORTED.get(prog, {})
