"""Samplers: the official schedule, solver parity with diffusers, CFG batching, skip modes, switch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wanlora.inference.sampling import (
    CFG_SKIP_MODES,
    DPMPP2MSolver,
    EulerSolver,
    UniPCSolver,
    cfg_apply_pattern,
    expert_for_timestep,
    expert_steps,
    guided_velocity,
    make_schedule,
    make_solver,
)
from wanlora.tasks import get_task

torch.set_num_threads(1)


def _model_fn(seed: int = 0):
    """A fixed nonlinear 'model' v(x, t) on [B, 4, T, h, w] latents that depends on t."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 4, generator=g) / 2

    def f(x: torch.Tensor, t) -> torch.Tensor:
        return torch.tanh(torch.einsum("ij,bj...->bi...", w, x)) * (1.0 + float(t) / 1000.0) - 0.3 * x

    return f


def _x(seed=1):
    return torch.randn(1, 4, 3, 6, 5, generator=torch.Generator().manual_seed(seed))


def _unshifted(steps: int) -> np.ndarray:
    """The official base sigmas ``linspace(float32(0.999), 0, N+1)[:N]`` (§9.1)."""
    smax = float(np.float32(0.999))
    return np.linspace(smax, 0.0, steps + 1)[:-1].copy()


# --- schedule -------------------------------------------------------------------------------


def test_t2v_a14b_schedule_and_switch():
    task = get_task("t2v-A14B")
    s = make_schedule(task.sample_steps, task.flow_shift)
    assert s.timesteps.dtype == torch.int64 and s.sigmas.dtype == torch.float32
    assert s.timesteps[:4].tolist() == [999, 997, 995, 993]
    assert len(s) == 40 and s.sigmas.shape == (41,) and s.sigmas[-1].item() == 0.0
    experts = expert_steps(s, task.boundary)
    assert experts.count("high_noise") == 26 and experts[:26] == ["high_noise"] * 26
    assert s.timesteps[26].item() == 865 and experts[26] == "low_noise"


def test_i2v_a14b_switch():
    task = get_task("i2v-A14B")
    s = make_schedule(task.sample_steps, task.flow_shift)
    experts = expert_steps(s, task.boundary)
    assert experts.count("high_noise") == 15 and s.timesteps[15].item() == 892


def test_schedule_formula():
    """Timesteps are the truncated shifted sigmas ×1000; update sigmas are fp32, not truncated."""
    steps, shift = 13, 7.0
    base = _unshifted(steps)
    shifted = shift * base / (1 + (shift - 1) * base)
    s = make_schedule(steps, shift)
    assert s.timesteps.tolist() == [int(v) for v in shifted * 1000]  # int() truncates
    assert torch.equal(s.sigmas[:-1], torch.from_numpy(shifted.astype(np.float32)))
    # dpm++ (official get_sampling_sigmas) starts at sigma 1 -> first timestep 1000
    assert make_schedule(steps, shift, "dpm++").timesteps[0].item() == 1000


def test_switch_compares_integer_timestep():
    assert expert_for_timestep(875, 0.875) == "high_noise"
    assert expert_for_timestep(874, 0.875) == "low_noise"
    assert expert_for_timestep(torch.tensor(900), 0.9) == "high_noise"
    assert expert_for_timestep(500, None) is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="infer_steps"):
        make_schedule(0, 5.0)
    with pytest.raises(ValueError, match="sample_solver"):
        make_solver("heun", make_schedule(4, 5.0))
    with pytest.raises(ValueError, match="cfg_skip_mode"):
        cfg_apply_pattern(10, "sometimes", 0.5)


# --- solvers against diffusers ---------------------------------------------------------------


def _run(solver, sched, f, x):
    for t in sched.timesteps:
        x = solver.step(f(x, int(t)), x)
    return x


@pytest.mark.parametrize("steps,shift", [(40, 12.0), (12, 5.0), (2, 3.0), (1, 5.0)])
def test_unipc_equals_diffusers(steps, shift):
    """Full loop equals diffusers' UniPCMultistepScheduler configured for flow prediction with the
    official base sigmas: diffusers then computes the same shifted sigmas and int64 timesteps, and
    the same bh2 / order-2 / predict-x0 / lower-order-final update -- bit for bit."""
    from diffusers import UniPCMultistepScheduler

    ref = UniPCMultistepScheduler(
        num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction",
        use_flow_sigmas=True, flow_shift=shift, predict_x0=True, solver_type="bh2",
        lower_order_final=True, final_sigmas_type="zero",
    )
    ref.set_timesteps(sigmas=_unshifted(steps))
    sched = make_schedule(steps, shift)
    assert torch.equal(ref.timesteps, sched.timesteps)
    assert torch.equal(ref.sigmas, sched.sigmas)

    f = _model_fn()
    x_ref = _x()
    for t in ref.timesteps:
        x_ref = ref.step(f(x_ref, int(t)), t, x_ref, return_dict=False)[0]
    x = _run(UniPCSolver(sched), sched, f, _x())
    assert torch.equal(x, x_ref), (x - x_ref).abs().max()


def test_unipc_last_step_returns_x0():
    sched = make_schedule(5, 5.0)
    sol = UniPCSolver(sched)
    f = _model_fn()
    x = _x()
    for t in sched.timesteps[:-1]:
        x = sol.step(f(x, int(t)), x)
    v = f(x, int(sched.timesteps[-1]))
    assert torch.equal(sol.step(v, x), x - sched.sigmas[-2] * v)


@pytest.mark.parametrize("steps,shift", [(20, 5.0), (3, 12.0)])
def test_euler_equals_diffusers(steps, shift):
    """Equals diffusers' FlowMatchEulerDiscreteScheduler given the same (already shifted) sigmas.

    Difference stated: diffusers' own model timesteps are float ``1000·σ`` (e.g. 999.0001 where
    ours is the integer 999, always < 1 apart); the model here is fed our integer timesteps in both
    loops, so only the update is compared, and it is exact."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = make_schedule(steps, shift)
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    ref.set_timesteps(sigmas=sched.sigmas[:-1].numpy())
    assert torch.equal(ref.sigmas, sched.sigmas)
    assert ((ref.timesteps - sched.timesteps.float()).abs() < 1).all()
    f = _model_fn()
    x_ref = _x()
    for t_ref, t in zip(ref.timesteps, sched.timesteps):
        x_ref = ref.step(f(x_ref, int(t)), t_ref, x_ref, return_dict=False)[0]
    x = _run(EulerSolver(sched), sched, f, _x())
    assert torch.equal(x, x_ref), (x - x_ref).abs().max()


def test_dpmpp_equals_diffusers():
    """DPM++ 2M equals diffusers' DPMSolverMultistepScheduler (dpmsolver++, midpoint, flow sigmas).

    Difference stated: the official dpm++ schedule starts at σ = 1 (α = 0, λ = −∞), where diffusers'
    flow schedule starts at 1 − 1e-6 (``linspace(1, 1/1000)``); so both are given the same schedule
    without σ = 1 (the UniPC one), and then agree bit for bit."""
    from diffusers import DPMSolverMultistepScheduler

    steps, shift = 10, 5.0
    sched = make_schedule(steps, shift)  # σ_0 < 1
    ref = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction",
        algorithm_type="dpmsolver++", solver_type="midpoint", use_flow_sigmas=True, flow_shift=shift,
        lower_order_final=True, final_sigmas_type="zero",
    )
    ref.set_timesteps(steps)  # its own flow schedule starts at σ = 1 − 1e-6; give it ours instead
    ref.sigmas, ref.timesteps = sched.sigmas.clone(), sched.timesteps.clone()
    f = _model_fn()
    x_ref = _x()
    for t in ref.timesteps:
        x_ref = ref.step(f(x_ref, int(t)), t, x_ref, return_dict=False)[0]
    x = _run(DPMPP2MSolver(sched), sched, f, _x())
    assert torch.equal(x, x_ref), (x - x_ref).abs().max()


def test_dpmpp_official_schedule_is_finite():
    sched = make_schedule(8, 5.0, "dpm++")
    x = _run(DPMPP2MSolver(sched), sched, _model_fn(), _x())
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("name", ["unipc", "euler", "dpm++"])
def test_solvers_recover_x0_of_exact_velocity(name):
    """With the true velocity of a straight path (v = noise − x0) every solver lands on x0."""
    x0 = _x(5)
    noise = _x(6)
    sched = make_schedule(6, 3.0, name)
    sol = make_solver(name, sched)
    x = (1 - sched.sigmas[0]) * x0 + sched.sigmas[0] * noise
    for _ in sched.timesteps:
        x = sol.step(noise - x0, x)
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-5)


# --- CFG -------------------------------------------------------------------------------------


class _TinyTextModel(torch.nn.Module):
    """A model with the DiT call signature whose output depends on x, t, context and y."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = torch.nn.Parameter(torch.randn(4, 4 + 2, generator=g))
        self.c = torch.nn.Parameter(torch.randn(8, 4, generator=g))

    def forward(self, x, timestep, context, y=None):
        if isinstance(context, list):
            context = torch.stack([c.mean(0) for c in context])
        else:
            context = context.mean(1)
        inp = torch.cat([x, y], 1) if y is not None else torch.cat([x, x[:, :2]], 1)
        out = torch.einsum("ij,bj...->bi...", self.w, inp)
        bias = (context @ self.c)[:, :, None, None, None]
        return torch.tanh(out + bias) * timestep.float().view(-1, 1, 1, 1, 1) / 1000


def test_batched_cfg_equals_separate_passes():
    m = _TinyTextModel()
    x = _x()
    y = torch.randn(1, 2, 3, 6, 5)
    t = torch.tensor([937])
    ctx = [torch.randn(7, 8)]
    null = [torch.randn(11, 8)]  # different lengths: batched as a list
    with torch.no_grad():
        a = guided_velocity(m, x, t, ctx, null, 4.0, y=y, batched=True)
        b = guided_velocity(m, x, t, ctx, null, 4.0, y=y, batched=False)
        ref = m(x, t, null, y=y) + 4.0 * (m(x, t, ctx, y=y) - m(x, t, null, y=y))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b, ref, rtol=0, atol=0)
    with torch.no_grad():
        cond_only = guided_velocity(m, x, t, ctx, null, 4.0, y=y, apply_cfg=False)
    assert torch.equal(cond_only, m(x, t, ctx, y=y).detach())


@pytest.mark.parametrize(
    "mode,pattern",
    [
        ("none", "AAAAAAAAAA"),
        ("early", "SSSSAAAAAA"),
        ("late", "AAAAAASSSS"),
        ("middle", "AAASSSSAAA"),
        ("early_late", "SSAAAAAASS"),
        ("alternate", "SASASAASAS"),
    ],
)
def test_cfg_skip_patterns_match_reference_table(mode, pattern):
    """The reference trainer's documented table (10 steps, --cfg_apply_ratio 0.6)."""
    got = "".join("A" if a else "S" for a in cfg_apply_pattern(10, mode, 0.6))
    assert got == pattern


def test_cfg_apply_ratio_counts():
    for mode in CFG_SKIP_MODES[1:]:
        for n in (7, 40):
            pat = cfg_apply_pattern(n, mode, 0.5)
            assert len(pat) == n
            if mode != "alternate":
                assert sum(pat) == int(n * 0.5)
