"""Flow matching (wanlora.training.flow): the x_t / target / timestep relation and the timestep laws.

Every law is checked against an independent construction: scipy's analytic CDF written here
from the definitions, and the forward recipe (sigmoid of a scaled normal, then the shift) that
musubi-tuner samples with.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

stats = pytest.importorskip("scipy.stats")

from wanlora.training.config import TimestepConfig  # noqa: E402
from wanlora.training.flow import (  # noqa: E402
    TimestepDistribution,
    add_noise,
    flow_target,
    flux_shift_mu,
    loss_weighting,
    shift_sigma,
    sigma_to_timestep,
    timestep_to_sigma,
)

from wanlora.training.timestep_plots import format_timestep_histogram, plot_timestep_distribution  # noqa: E402

torch.set_num_threads(1)
N = 20_000


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _logit(s):
    s = np.clip(np.asarray(s, dtype=np.float64), 1e-300, 1 - 1e-16)
    return np.log(s) - np.log1p(-s)


# analytic CDFs on sigma in [0, 1], written from the definitions
def cdf_uniform(s):
    return np.clip(s, 0, 1)


def cdf_logit_normal(m, sd):
    return lambda s: stats.norm.cdf((_logit(s) - m) / sd)


def test_flow_relation():
    g = _gen()
    x0, eps = torch.randn(2, 4, 3, 5, 5, generator=g), torch.randn(2, 4, 3, 5, 5, generator=g)
    sigma = torch.tensor([0.0, 1.0])
    xt = add_noise(x0, eps, sigma)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], eps[1])
    sigma = torch.tensor([0.3, 0.875])
    xt, v = add_noise(x0, eps, sigma), flow_target(x0, eps)
    s = sigma.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(xt, (1 - s) * x0 + s * eps)
    torch.testing.assert_close(v, eps - x0)
    # the sampler's x0 prediction (wan_numerics §9.2) inverts it: x0 = x_t - sigma v
    torch.testing.assert_close(xt - s * v, x0, rtol=0, atol=1e-6)
    # and dx_t/dsigma = v (the velocity)
    torch.testing.assert_close((add_noise(x0, eps, sigma + 1e-3) - xt) / 1e-3, v, rtol=0, atol=1e-3)
    t = sigma_to_timestep(sigma)
    torch.testing.assert_close(t, torch.tensor([300.0, 875.0]))
    torch.testing.assert_close(timestep_to_sigma(t), sigma)


def test_shift_sigma_matches_official_schedule():
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(shift_sigma(s, 1.0), s)
    torch.testing.assert_close(shift_sigma(s, 5.0), 5 * s / (1 + 4 * s))
    # the shift of a sigmoid is a sigmoid shifted by log(s)
    y = torch.linspace(-4, 4, 9, dtype=torch.float64)
    torch.testing.assert_close(shift_sigma(torch.sigmoid(y), 12.0), torch.sigmoid(y + math.log(12.0)))


LAWS = [
    ("uniform", {}, cdf_uniform, lambda g, n: torch.rand(n, generator=g, dtype=torch.float64)),
    ("sigmoid", {"sigmoid_scale": 1.5}, cdf_logit_normal(0, 1.5),
     lambda g, n: torch.sigmoid(1.5 * torch.randn(n, generator=g, dtype=torch.float64))),
    ("logit_normal", {"logit_mean": -0.5, "logit_std": 0.8}, cdf_logit_normal(-0.5, 0.8),
     lambda g, n: torch.sigmoid(-0.5 + 0.8 * torch.randn(n, generator=g, dtype=torch.float64))),
    ("shift", {"discrete_flow_shift": 3.0}, cdf_logit_normal(math.log(3.0), 1.0),
     lambda g, n: shift_sigma(torch.sigmoid(torch.randn(n, generator=g, dtype=torch.float64)), 3.0)),
    ("shift", {"discrete_flow_shift": 5.0, "sigmoid_scale": 2.0}, cdf_logit_normal(math.log(5.0), 2.0),
     lambda g, n: shift_sigma(torch.sigmoid(2 * torch.randn(n, generator=g, dtype=torch.float64)), 5.0)),
    ("logsnr", {"logit_mean": -1.0, "logit_std": 2.0}, cdf_logit_normal(0.5, 1.0),
     lambda g, n: torch.sigmoid(-(-1.0 + 2.0 * torch.randn(n, generator=g, dtype=torch.float64)) / 2)),
]


@pytest.mark.parametrize("method, kw, cdf, forward", LAWS, ids=[f"{m}-{i}" for i, (m, *_ ) in enumerate(LAWS)])
def test_each_law_matches_its_definition(method, kw, cdf, forward):
    sampler = TimestepDistribution(method, **kw)
    t = sampler.sample(N, _gen(1))
    assert t.dtype == torch.float32 and t.shape == (N,) and 0 <= t.min() and t.max() <= 1000
    s = t.double().numpy() / 1000
    assert stats.kstest(s, cdf).pvalue > 0.01
    # against the forward recipe users know (musubi's sampling code path)
    assert stats.ks_2samp(s, forward(_gen(2), N).numpy()).pvalue > 0.01
    # the sampler's own CDF and density agree with the definition
    grid = np.linspace(0.001, 0.999, 199)
    np.testing.assert_allclose(sampler.cdf(grid * 1000).numpy(), cdf(grid), atol=1e-9)
    tg = torch.linspace(0, 1000, 20001, dtype=torch.float64)
    assert torch.trapezoid(sampler.pdf(tg), tg).item() == pytest.approx(1.0, abs=2e-3)
    mid = torch.tensor([200.0, 500.0, 800.0], dtype=torch.float64)
    dcdf = (sampler.cdf(mid + 0.01) - sampler.cdf(mid - 0.01)) / 0.02
    torch.testing.assert_close(sampler.pdf(mid), dcdf, rtol=1e-5, atol=1e-9)


def test_flux_shift_uses_the_latent_size():
    with pytest.raises(ValueError, match="with_latent_size"):
        TimestepDistribution("flux_shift").sample(4, _gen())
    assert flux_shift_mu(32, 32) == pytest.approx(0.5) and flux_shift_mu(128, 128) == pytest.approx(1.15)
    s = TimestepDistribution("flux_shift").with_latent_size(60, 104)
    ref = TimestepDistribution("shift", discrete_flow_shift=math.exp(flux_shift_mu(60, 104)))
    t = np.linspace(1, 999, 50)
    np.testing.assert_allclose(s.cdf(t).numpy(), ref.cdf(t).numpy(), atol=1e-12)


def test_rescale_squeezes_the_whole_law_into_the_range():
    kw = {"discrete_flow_shift": 3.0}
    s = TimestepDistribution("shift", min_timestep=200, max_timestep=600, **kw)
    t = s.sample(N, _gen(3)).double().numpy()
    assert t.min() >= 200 and t.max() <= 600
    u = (t - 200) / 400  # back on [0, 1]: the unrestricted law
    assert stats.kstest(u, cdf_logit_normal(math.log(3.0), 1.0)).pvalue > 0.01
    assert s.mass(200, 600) == pytest.approx(1.0) and s.mass(0, 200) == 0.0


def test_preserve_shape_restricts_the_law_to_the_range():
    kw = {"discrete_flow_shift": 3.0}
    s = TimestepDistribution("shift", min_timestep=200, max_timestep=600, preserve_distribution_shape=True, **kw)
    t = s.sample(N, _gen(4)).double().numpy()
    assert t.min() >= 200 and t.max() <= 600
    F = cdf_logit_normal(math.log(3.0), 1.0)
    fa, fb = F(0.2), F(0.6)
    assert stats.kstest(t / 1000, lambda x: (F(np.clip(x, 0.2, 0.6)) - fa) / (fb - fa)).pvalue > 0.01
    # musubi's rejection sampling gives the same law
    raw = shift_sigma(torch.sigmoid(torch.randn(5 * N, generator=_gen(5), dtype=torch.float64)), 3.0)
    rej = raw[(raw >= 0.2) & (raw <= 0.6)].numpy()
    assert stats.ks_2samp(t / 1000, rej).pvalue > 0.01
    # shapes differ between the two modes on the same range
    r = TimestepDistribution("shift", min_timestep=200, max_timestep=600, **kw).sample(N, _gen(4)).numpy()
    assert stats.ks_2samp(t, r).pvalue < 1e-6


@pytest.mark.parametrize("kw", [
    {"method": "shift", "discrete_flow_shift": 12.0},
    {"method": "uniform"},
    {"method": "logit_normal", "min_timestep": 100, "max_timestep": 950, "preserve_distribution_shape": True},
    {"method": "sigmoid", "min_timestep": 50, "max_timestep": 1000},
])
def test_two_expert_split_reproduces_the_configured_law(kw):
    sampler = TimestepDistribution(**kw)
    boundary = 875.0
    p_high = sampler.mass(boundary, 1000)
    assert p_high + sampler.mass(0, boundary) == pytest.approx(1.0)
    g = _gen(6)
    pick_high = torch.rand(N, generator=g) < p_high
    n_high = int(pick_high.sum())
    high = sampler.sample(n_high, g, lo=boundary, hi=1000)
    low = sampler.sample(N - n_high, g, lo=0, hi=boundary)
    assert high.min() >= boundary and high.max() <= 1000
    assert low.max() < boundary and low.min() >= sampler.range[0]
    union = torch.cat([high, low]).double().numpy()
    assert stats.kstest(union, lambda t: sampler.cdf(t).numpy()).pvalue > 0.01
    # and the same law as drawing from the configured sampler directly
    direct = sampler.sample(N, _gen(7)).double().numpy()
    assert stats.ks_2samp(union, direct).pvalue > 0.01
    assert (direct >= boundary).mean() == pytest.approx(p_high, abs=0.015)


def test_low_expert_samples_stay_below_the_boundary_in_float32():
    # a law concentrated near the boundary: float32 rounding must not reach 875.0
    s = TimestepDistribution("logit_normal", logit_mean=math.log(0.875 / 0.125), logit_std=1e-4)
    t = s.sample(50_000, _gen(8), hi=875.0)
    assert t.max() < 875.0
    t = s.sample(50_000, _gen(9), lo=875.0)
    assert t.min() >= 875.0


def test_errors():
    with pytest.raises(ValueError, match="timestep_sampling"):
        TimestepDistribution("sigmaa")
    with pytest.raises(ValueError, match="min_timestep"):
        TimestepDistribution(min_timestep=900, max_timestep=100)
    with pytest.raises(ValueError, match="discrete_flow_shift"):
        TimestepDistribution("shift", discrete_flow_shift=0)
    with pytest.raises(ValueError, match="no probability"):
        TimestepDistribution(min_timestep=0, max_timestep=500).sample(3, _gen(), lo=875)


def test_from_config():
    c = TimestepConfig(timestep_sampling="shift", discrete_flow_shift=3.0, sigmoid_scale=1.0,
                       min_timestep=None, max_timestep=875, preserve_distribution_shape=True,
                       logit_mean=0.0, logit_std=1.0, weighting_scheme="none")
    s = TimestepDistribution.from_config(c)
    assert (s.method, s.discrete_flow_shift, s.range, s.preserve_distribution_shape) == (
        "shift", 3.0, (0.0, 875.0), True)


def test_loss_weighting():
    sigma = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert loss_weighting("none", sigma) is None and loss_weighting(None, sigma) is None
    assert loss_weighting("logit_normal", sigma) is None
    torch.testing.assert_close(loss_weighting("sigma_sqrt", sigma), torch.tensor([1e6, 16.0, 4.0, 1.0]))
    cos = loss_weighting("cosmap", sigma)
    torch.testing.assert_close(cos, 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2)))
    assert cos[2] == pytest.approx(4 / math.pi)
    with pytest.raises(ValueError, match="weighting_scheme"):
        loss_weighting("bogus", sigma)


def test_plot_timestep_distribution(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    s = TimestepDistribution("shift", discrete_flow_shift=5.0)
    p = plot_timestep_distribution(s, tmp_path / "t.png", boundary=0.875, n=2000)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    p = plot_timestep_distribution(s, tmp_path / "u.png", n=2000)
    assert p.stat().st_size > 1000
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):  # printed in one line by wanlora.commands.cli
        plot_timestep_distribution(s, tmp_path / "v.png", n=10)


def test_console_histogram_shows_each_expert_share():
    s = TimestepDistribution("shift", discrete_flow_shift=12.0)
    text = format_timestep_histogram(s, boundary=875, n=20_000, bins=8)
    lines = text.splitlines()
    assert lines[0] == s.describe() and len(lines) == 2 + 8
    p = s.mass(875, 1000)
    assert f"high_noise (p={p:.3f})" in lines[1]
    pct = [float(line.split("%")[0].split()[-1]) for line in lines[2:]]
    assert sum(pct) == pytest.approx(100, abs=0.5)
    assert "=" not in lines[-1].split("%")[1] and "#" not in lines[2].split("%")[1]
    plain = format_timestep_histogram(TimestepDistribution(), n=1000, bins=4).splitlines()
    assert len(plain) == 1 + 4


@pytest.mark.parametrize("method,closest", [("sigma", "'shift'"), ("mode", "'logit_normal'"),
                                            ("qinglong_flux", "'flux_shift'"), ("qinglong_qwen", "'flux_shift'"),
                                            ("qwen_shift", "'flux_shift'")])
def test_musubi_only_timestep_methods_name_the_closest_one(method, closest):
    with pytest.raises(ValueError, match=f"--timestep_sampling {method}: not supported") as e:
        TimestepDistribution(method=method)
    assert f"use {closest}" in str(e.value) and str(e.value).count("\n") == 0
