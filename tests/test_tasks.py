"""The task table against the official configs (Wan2.2 wan/configs/*, Wan2.1 generate.py)."""

import pytest

from wanlora.tasks import DEFAULT_NEGATIVE_PROMPT, TASKS, get_task


def test_all_tasks_present():
    assert set(TASKS) == {"t2v-A14B", "i2v-A14B", "ti2v-5B", "t2v-1.3B", "t2v-14B"}


@pytest.mark.parametrize(
    "name, boundary, shift, guide_low, guide_high, steps, fps, frames, vae, z, cin, cout",
    [
        ("t2v-A14B", 0.875, 12.0, 3.0, 4.0, 40, 16, 81, "wan2.1", 16, 16, 16),
        ("i2v-A14B", 0.900, 5.0, 3.5, 3.5, 40, 16, 81, "wan2.1", 16, 36, 16),
        ("ti2v-5B", None, 5.0, 5.0, None, 50, 24, 121, "wan2.2", 48, 48, 48),
        ("t2v-14B", None, 5.0, 5.0, None, 50, 16, 81, "wan2.1", 16, 16, 16),
        ("t2v-1.3B", None, 5.0, 5.0, None, 50, 16, 81, "wan2.1", 16, 16, 16),
    ],
)
def test_official_defaults(name, boundary, shift, guide_low, guide_high, steps, fps, frames, vae,
                           z, cin, cout):
    t = get_task(name)
    assert (t.boundary, t.flow_shift, t.guidance_scale, t.guidance_scale_high_noise) == (
        boundary, shift, guide_low, guide_high)
    assert (t.sample_steps, t.fps, t.frame_num, t.vae, t.latent_channels) == (
        steps, fps, frames, vae, z)
    assert (t.in_channels, t.out_channels) == (cin, cout)
    assert t.dim // t.num_heads == 128
    assert t.negative_prompt == DEFAULT_NEGATIVE_PROMPT


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
