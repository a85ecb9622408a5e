"""The task table against the official configs, read from ``tests/data/official_configs.json``
(values as written in Wan-Video/Wan2.2 and Wan-Video/Wan2.1: ``wan/configs/*.py``, ``generate.py``
defaults, the VAE wrappers' ``z_dim``; each entry names its file and the commit read)."""

import json
from pathlib import Path

import pytest

from wanlora.tasks import DEFAULT_NEGATIVE_PROMPT, TASKS, get_task
from wanlora.training.flow import NUM_TRAIN_TIMESTEPS

OFFICIAL = json.loads((Path(__file__).parent / "data" / "official_configs.json").read_text(encoding="utf-8"))


def _official(name: str) -> dict:
    """The task's config with the shared config underneath (as ``cfg.update(wan_shared_cfg)`` then
    the task's own assignments), plus the VAE's ``z_dim`` and the ``generate.py`` defaults."""
    entry = OFFICIAL["tasks"][name]
    base = OFFICIAL["tasks"][entry["same_as"]] if "same_as" in entry else {}  # flf2v_14B = deepcopy(i2v_14B)
    cfg = {**OFFICIAL["shared"][entry["source"]], **base, **entry}
    cfg.update(cfg.get("generate_py", {}))  # the entry's own, else the copied config's
    cfg["z_dim"] = OFFICIAL["vae"][cfg["vae_checkpoint"]]["z_dim"]
    return cfg


def test_every_task_has_its_official_config():
    assert set(TASKS) <= set(OFFICIAL["tasks"]), "add the official values of a new task to tests/data/official_configs.json"
    assert {"t2v-A14B", "i2v-A14B", "ti2v-5B", "t2v-1.3B", "t2v-14B", "i2v-14B", "flf2v-14B"} <= set(TASKS)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_table_equals_official_config(name):
    t, cfg = get_task(name), _official(name)
    # sampling defaults
    assert t.flow_shift == cfg["sample_shift"]
    assert t.flow_shift_480p == cfg.get("sample_shift_480p")
    assert t.sample_steps == cfg["sample_steps"]
    guide = cfg["sample_guide_scale"]
    if isinstance(guide, list):  # (low noise, high noise)
        assert (t.guidance_scale, t.guidance_scale_high_noise) == tuple(guide)
    else:
        assert t.guidance_scale == guide and t.guidance_scale_high_noise is None
    assert t.boundary == cfg.get("boundary")
    assert t.fps == cfg["sample_fps"] and t.frame_num == cfg["frame_num"]
    assert "%d*%d" % t.size in cfg["supported_sizes"]
    assert t.negative_prompt == cfg["sample_neg_prompt"]
    # architecture and VAE
    assert list(t.vae_stride) == cfg["vae_stride"] and list(t.patch_size) == cfg["patch_size"]
    assert (t.dim, t.ffn_dim, t.freq_dim, t.num_heads, t.num_layers) == (
        cfg["dim"], cfg["ffn_dim"], cfg["freq_dim"], cfg["num_heads"], cfg["num_layers"])
    assert t.vae == {"Wan2.1_VAE.pth": "wan2.1", "Wan2.2_VAE.pth": "wan2.2"}[cfg["vae_checkpoint"]]
    assert t.latent_channels == cfg["z_dim"] and t.out_channels == cfg["z_dim"]
    assert t.text_len == cfg["text_len"] and NUM_TRAIN_TIMESTEPS == cfg["num_train_timesteps"]
    assert t.family == cfg["source"]
    assert t.in_channels == cfg.get("in_dim", t.in_channels)
    # the CLIP image encoder (Wan2.1 I2V / FLF2V / I2V-FC; the T2V Fun-Control models have the
    # image branch but get zero features, no encoder)
    from wanlora.conditioning import conditioning_for
    from wanlora.models.clip import CLIP_CHECKPOINT_NAME

    assert cfg.get("clip_checkpoint") == (CLIP_CHECKPOINT_NAME if conditioning_for(t).uses_clip else None)


def test_default_negative_prompt_is_the_shared_one():
    shared = {OFFICIAL["shared"][s]["sample_neg_prompt"] for s in ("wan2.1", "wan2.2")}
    assert shared == {DEFAULT_NEGATIVE_PROMPT}


@pytest.mark.parametrize(
    "name, shift, shift_480p, steps, cond, clip_frames, neg_prefix",
    [
        # Wan2.1 generate.py: 40 steps only for names containing "i2v"; shift 3.0 for i2v at
        # 480P, 16 for flf2v; wan/configs: the negative prompts' prefixes.
        ("i2v-14B", 5.0, 3.0, 40, "i2v_clip", 1, "镜头晃动，"),
        ("flf2v-14B", 16.0, 16.0, 50, "flf2v", 2, "镜头切换，镜头晃动，"),
    ],
)
def test_wan21_image_tasks(name, shift, shift_480p, steps, cond, clip_frames, neg_prefix):
    t = get_task(name)
    assert (t.family, t.vae, t.boundary, t.in_channels, t.out_channels) == ("wan2.1", "wan2.1", None, 36, 16)
    assert (t.dim, t.ffn_dim, t.num_heads, t.num_layers) == (5120, 13824, 40, 40)
    assert (t.guidance_scale, t.sample_steps, t.fps, t.frame_num, t.size) == (5.0, steps, 16, 81, (1280, 720))
    assert (t.conditioning, t.clip_frames, t.uses_clip) == (cond, clip_frames, True)
    assert t.default_flow_shift(1280, 720) == shift == t.default_flow_shift()
    assert t.default_flow_shift(832, 480) == t.default_flow_shift(480, 832) == shift_480p
    assert t.negative_prompt == neg_prefix + DEFAULT_NEGATIVE_PROMPT


def test_expert_ranges_and_units():
    t2v = get_task("t2v-A14B")
    assert t2v.experts == ("high_noise", "low_noise")
    assert t2v.timestep_range("high_noise") == (875.0, 1000.0)
    assert t2v.timestep_range("low_noise") == (0.0, 875.0)
    assert get_task("i2v-A14B").timestep_range("low_noise") == (0.0, 900.0)
    assert t2v.guidance_for("high_noise") == 4.0 and t2v.guidance_for("low_noise") == 3.0
    assert t2v.pixel_unit == 16 and get_task("ti2v-5B").pixel_unit == 32
    assert t2v.latent_shape(81, 720, 1280) == (16, 21, 90, 160)
    assert get_task("ti2v-5B").latent_shape(121, 704, 1280) == (48, 31, 44, 80)
    with pytest.raises(ValueError, match="single model"):
        get_task("ti2v-5B").timestep_range("high_noise")


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match="t2v-A14B"):
        get_task("t2v-A13B")
