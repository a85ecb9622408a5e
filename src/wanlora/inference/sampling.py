"""Flow-matching samplers: the official schedule, UniPC / Euler / DPM++ 2M, CFG, expert switching.

The denoising loop of every Wan pipeline (``wan/text2video.py``, ``image2video.py``,
``textimage2video.py`` of the official Wan2.2 release) reduces to three pieces that live here:

* :func:`make_schedule` -- the model timesteps (integers on 0..1000) and the update sigmas
  (float32, ending in 0) of ``FlowUniPCMultistepScheduler.set_timesteps``
  (``wan/utils/fm_solvers_unipc.py``) or, for ``dpm++``, of ``get_sampling_sigmas``
  (``wan/utils/fm_solvers.py``);
* a solver object (:class:`UniPCSolver`, :class:`EulerSolver`, :class:`DPMPP2MSolver`) whose
  ``step(v, x)`` turns the guided velocity at step ``i`` into the sample at step ``i+1``;
* :func:`guided_velocity` (classifier-free guidance, the two passes batched into one forward or
  run separately), :func:`cfg_apply_pattern` (``--cfg_skip_mode``) and :func:`expert_for_timestep`
  (the Wan2.2 high-noise -> low-noise switch).

Conventions: latents ``x`` are float32 ``[B, C, T, h, w]`` (any shape works for the solvers); the
model predicts the velocity ``v = noise - x0``; ``x_sigma = (1 - sigma) x0 + sigma noise``; so
``x0 = x - sigma v``. The solvers are deterministic (no generator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

__all__ = [
    "SOLVERS",
    "CFG_SKIP_MODES",
    "Schedule",
    "make_schedule",
    "shift_sigmas",
    "UniPCSolver",
    "EulerSolver",
    "DPMPP2MSolver",
    "make_solver",
    "guided_velocity",
    "cfg_apply_pattern",
    "expert_for_timestep",
    "expert_steps",
    "NUM_TRAIN_TIMESTEPS",
]

NUM_TRAIN_TIMESTEPS = 1000
SOLVERS = ("unipc", "euler", "dpm++")
CFG_SKIP_MODES = ("none", "early", "late", "middle", "early_late", "alternate")


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """The flow shift ``s·σ / (1 + (s−1)·σ)`` (float64 in, float64 out), as ``set_timesteps`` does."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


@dataclass(frozen=True)
class Schedule:
    """One sampling schedule.

    Attributes:
        timesteps: int64 ``[N]``, what the DiT is fed (0..1000, truncated ``1000·σ'``).
        sigmas: float32 ``[N+1]``, the shifted sigmas used by the update, ending in 0.
    """

    timesteps: torch.Tensor
    sigmas: torch.Tensor

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])


def _unipc_sigma_max() -> float:
    # FlowUniPCMultistepScheduler.__init__: base sigmas 1 - linspace(1, 1/1000, 1000)[::-1] kept in
    # float32; set_timesteps starts its linspace at that float32 value (0.99900001...), not 0.999.
    alphas = np.linspace(1, 1 / NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS)[::-1].copy()
    return torch.from_numpy(1.0 - alphas).to(torch.float32)[0].item()


_UNIPC_SIGMA_MAX = _unipc_sigma_max()


def make_schedule(steps: int, shift: float, solver: str = "unipc") -> Schedule:
    """The official sampling schedule for ``steps`` steps and flow ``shift``.

    ``unipc`` and ``euler``: ``σ_k = linspace(σ_max, 0, N+1)[:N]`` in float64 with
    ``σ_max = float32(0.999)``, shifted (:func:`shift_sigmas`), timesteps ``int64(1000·σ'_k)``
    (truncated), update sigmas ``[σ'_0..σ'_{N-1}, 0]`` in float32 -- exactly
    ``FlowUniPCMultistepScheduler(shift=1).set_timesteps(N, shift=s)``.
    ``dpm++``: the official ``get_sampling_sigmas`` start at σ = 1 instead
    (``linspace(1, 0, N+1)[:N]``, shifted), so its first model timestep is 1000.

    Raises:
        ValueError: ``steps < 1``, ``shift <= 0`` or an unknown solver.
    """
    if steps < 1:
        raise ValueError(f"--infer_steps must be at least 1, got {steps}")
    if not shift > 0:
        raise ValueError(f"--flow_shift must be positive, got {shift}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown --sample_solver {solver!r}; use one of {', '.join(SOLVERS)}")
    start = 1.0 if solver == "dpm++" else _UNIPC_SIGMA_MAX
    sig = shift_sigmas(np.linspace(start, 0.0, steps + 1)[:-1].copy(), shift)
    timesteps = torch.from_numpy(sig * NUM_TRAIN_TIMESTEPS).to(torch.int64)
    sigmas = torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))
    return Schedule(timesteps=timesteps, sigmas=sigmas)


def _lam(sigma: torch.Tensor) -> torch.Tensor:
    """Half log-SNR ``λ = log(α) − log(σ)`` with ``α = 1 − σ`` (0-d float32)."""
    return torch.log(1 - sigma) - torch.log(sigma)


class _Solver:
    """Shared bookkeeping: the schedule and the index of the step about to run."""

    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        self.sigmas = schedule.sigmas.cpu()
        self.index = 0

    @property
    def num_steps(self) -> int:
        """``N``, the number of model evaluations of the schedule."""
        return len(self.schedule)

    def x0(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The clean-sample estimate ``x − σ_i·v`` at the current step."""
        return x - self.sigmas[self.index] * v

    def step(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Velocity ``v`` at the current sample ``x`` -> the sample at ``σ_{i+1}``; advances ``index``."""
        raise NotImplementedError


class EulerSolver(_Solver):
    """First-order flow-matching Euler: ``x_{i+1} = x_i + (σ_{i+1} − σ_i)·v`` (float32).

    The update of diffusers' ``FlowMatchEulerDiscreteScheduler.step``; the schedule is the official
    UniPC one (integer model timesteps).
    """

    def step(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Velocity ``v`` at ``x`` (same shape, ``[B, ...]``) -> sample at ``σ_{i+1}`` (``v``'s dtype)."""
        i = self.index
        dt = self.sigmas[i + 1] - self.sigmas[i]
        out = x.float() + dt * v.float()
        self.index += 1
        return out.to(v.dtype)


class UniPCSolver(_Solver):
    """Multistep UniPC for flow matching, as the official release runs it.

    ``FlowUniPCMultistepScheduler`` with ``solver_order=2``, ``solver_type="bh2"``,
    ``predict_x0=True``, ``lower_order_final=True`` (``wan/utils/fm_solvers_unipc.py``):

    * step ``i`` converts the velocity to ``x0̂ = x_i − σ_i·v`` using the *incoming* sample;
    * from the second step on, the UniC corrector first refines ``x_i`` with the new ``x0̂``
      (using the sample the previous predictor started from);
    * the UniP predictor then goes to ``σ_{i+1}``; order 1 at the first step and at the last step,
      2 otherwise. The last step (``σ_N = 0``) returns ``x0̂`` exactly.

    The arithmetic follows the official order of operations in float32 so runs agree bit for bit.
    """

    order = 2

    def __init__(self, schedule: Schedule):
        super().__init__(schedule)
        self.history: list[torch.Tensor] = []  # x0 estimates, newest last (at most `order`)
        self.last_sample: torch.Tensor | None = None
        self.lower_order_nums = 0
        self.this_order = 1

    @staticmethod
    def _coeffs(sigma_t, sigma_s0):
        """``α_t``, ``h = λ_t − λ_s0``, ``hh = −h`` (predict-x0), ``h·φ_1 = expm1(hh)`` and the bh2
        ``B(h) = expm1(hh)`` of ``multistep_uni_{p,c}_bh_update`` (0-d float32)."""
        alpha_t = 1 - sigma_t
        h = _lam(sigma_t) - _lam(sigma_s0)
        hh = -h
        h_phi_1 = torch.expm1(hh)
        B_h = torch.expm1(hh)
        return alpha_t, h, hh, h_phi_1, B_h

    def _predict(self, x: torch.Tensor, order: int) -> torch.Tensor:
        """UniP-``order`` (``multistep_uni_p_bh_update``): from ``x`` at ``σ_i`` to ``σ_{i+1}``."""
        i = self.index
        sigma_t, sigma_s0 = self.sigmas[i + 1], self.sigmas[i]
        m0 = self.history[-1]
        alpha_t, h, _, h_phi_1, B_h = self._coeffs(sigma_t, sigma_s0)
        base = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        if order == 1:  # the official ``base − α_t·B(h)·0``; also the exact x0̂ when σ_{i+1} = 0
            return base.to(x.dtype)
        r = (_lam(self.sigmas[i - 1]) - _lam(sigma_s0)) / h
        d1 = (self.history[-2] - m0) / r
        rho = torch.tensor([0.5], dtype=x.dtype, device=x.device)
        res = torch.einsum("k,bkc...->bc...", rho, d1.unsqueeze(1))
        return (base - alpha_t * B_h * res).to(x.dtype)

    def _correct(self, x0_new: torch.Tensor, x: torch.Tensor, order: int) -> torch.Tensor:
        """UniC-``order`` (``multistep_uni_c_bh_update``): refine ``x`` (at ``σ_i``, predicted from
        ``last_sample`` at ``σ_{i−1}``) with the new estimate ``x0_new``."""
        i = self.index
        sigma_t, sigma_s0 = self.sigmas[i], self.sigmas[i - 1]
        m0 = self.history[-1]
        prev = self.last_sample
        alpha_t, h, hh, h_phi_1, B_h = self._coeffs(sigma_t, sigma_s0)
        base = sigma_t / sigma_s0 * prev - alpha_t * h_phi_1 * m0
        if order == 1:
            rhos = torch.tensor([0.5], dtype=x.dtype, device=x.device)
            corr = 0
        else:  # order 2: solve R·ρ = b with R = [[1, 1], [r, 1]], b_k = h·φ_k(h)·k!/B(h)
            r = (_lam(self.sigmas[i - 2]) - _lam(sigma_s0)) / h
            d1 = (self.history[-2] - m0) / r
            rks = torch.tensor([r, 1.0], device=x.device)
            # φ by the recurrence φ_{k+1} = φ_k/hh − 1/(k+1)!
            h_phi_k = h_phi_1 / hh - 1
            fact = 1
            R, b = [], []
            for k in range(1, order + 1):
                R.append(torch.pow(rks, k - 1))
                b.append(h_phi_k * fact / B_h)
                fact *= k + 1
                h_phi_k = h_phi_k / hh - 1 / fact
            rhos = torch.linalg.solve(torch.stack(R), torch.tensor(b, device=x.device)).to(x.dtype)
            corr = torch.einsum("k,bkc...->bc...", rhos[:-1], d1.unsqueeze(1))
        out = base - alpha_t * B_h * (corr + rhos[-1] * (x0_new - m0))
        return out.to(prev.dtype)

    def step(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One step: velocity ``v`` at the current step's sample ``x`` -> sample at ``σ_{i+1}``.

        ``v`` and ``x``: same shape, with a leading batch dimension (``[B, ...]``), float32.
        """
        i = self.index
        x0 = self.x0(v, x)
        if i > 0 and self.last_sample is not None:
            x = self._correct(x0, x, self.this_order)
        self.history = (self.history + [x0])[-self.order:]
        order = min(self.order, self.num_steps - i)  # lower_order_final
        self.this_order = min(order, self.lower_order_nums + 1)  # warm-up
        self.last_sample = x
        out = self._predict(x, self.this_order)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.order)
        self.index += 1
        return out


class DPMPP2MSolver(_Solver):
    """Multistep DPM-Solver++ (2M, midpoint) for flow matching.

    The official ``--sample_solver dpm++`` (``FlowDPMSolverMultistepScheduler`` with
    ``algorithm_type="dpmsolver++"``, ``solver_order=2``, ``final_sigmas_type="zero"``,
    ``wan/utils/fm_solvers.py``): first order at the first and the last step, second order between.
    """

    def __init__(self, schedule: Schedule):
        super().__init__(schedule)
        self.history: list[torch.Tensor] = []
        self.lower_order_nums = 0

    def step(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Velocity ``v`` at ``x`` (same shape, ``[B, ...]``) -> sample at ``σ_{i+1}``: first order
        (``dpm_solver_first_order_update``) at the first and last step, else 2M midpoint
        (``multistep_dpm_solver_second_order_update``)."""
        i = self.index
        m0 = self.x0(v, x)
        self.history = (self.history + [m0])[-2:]
        x = x.float()
        sigma_t, sigma_s0 = self.sigmas[i + 1], self.sigmas[i]
        alpha_t = 1 - sigma_t
        h = _lam(sigma_t) - _lam(sigma_s0)
        first = self.lower_order_nums < 1 or i == self.num_steps - 1
        if first:
            out = (sigma_t / sigma_s0) * x - (alpha_t * (torch.exp(-h) - 1.0)) * m0
        else:
            m1 = self.history[-2]
            r0 = (_lam(sigma_s0) - _lam(self.sigmas[i - 1])) / h
            d1 = (1.0 / r0) * (m0 - m1)
            out = (
                (sigma_t / sigma_s0) * x
                - (alpha_t * (torch.exp(-h) - 1.0)) * m0
                - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
            )
        self.lower_order_nums = min(self.lower_order_nums + 1, 2)
        self.index += 1
        return out.to(v.dtype)


def make_solver(name: str, schedule: Schedule) -> _Solver:
    """A fresh solver by ``--sample_solver`` name (``unipc``, ``euler``, ``dpm++``; ``dpmpp`` is an
    alias) for ``schedule``; each solver is stateful and runs one sampling once.

    Raises:
        ValueError: an unknown name.
    """
    table = {"unipc": UniPCSolver, "euler": EulerSolver, "dpm++": DPMPP2MSolver, "dpmpp": DPMPP2MSolver}
    if name not in table:
        raise ValueError(f"unknown --sample_solver {name!r}; use one of {', '.join(SOLVERS)}")
    return table[name](schedule)


# ----------------------------------------------------------------------------------------------
# guidance


def _cat_context(a, b):
    """Conditional then unconditional context as one batch of ``2B``: a ``[2B, L, d]`` tensor when
    both are tensors of one shape, else a list of ``2B`` ``[L_i, d]`` tensors."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape[1:] == b.shape[1:]:
        return torch.cat([a, b])
    la = list(a) if not isinstance(a, torch.Tensor) else list(a.unbind(0))
    lb = list(b) if not isinstance(b, torch.Tensor) else list(b.unbind(0))
    return la + lb


def guided_velocity(
    model: Callable,
    x: torch.Tensor,
    timestep: torch.Tensor,
    context,
    context_null,
    guidance_scale: float,
    y: torch.Tensor | None = None,
    apply_cfg: bool = True,
    batched: bool = True,
    clip_fea: torch.Tensor | None = None,
) -> torch.Tensor:
    """Classifier-free guided velocity ``v_u + g·(v_c − v_u)`` (``wan/text2video.py`` §9.5).

    Args:
        model: ``model(x, timestep, context, y=None[, clip_fea=...]) -> [B, C_out, T, h, w]`` (a
            ``WanDiT``).
        x: ``[B, C, T, h, w]`` latents.
        timestep: ``[B]`` or ``[B, T]`` (0..1000).
        context / context_null: conditional and unconditional text, each a ``[B, L, d]`` tensor or a
            list of ``B`` tensors ``[L_i, d]``.
        guidance_scale: ``g``; with ``g == 1`` or ``apply_cfg=False`` only the conditional pass runs
            (the result is then ``v_c``).
        y: ``[B, C_y, T, h, w]`` I2V conditioning, shared by both passes, or ``None``.
        batched: run the two passes as one forward of batch ``2B`` (default) or as two forwards.
            Both give the same result up to float32 rounding of the batched matmuls.
        clip_fea: ``[B, 257·n, 1280]`` CLIP image features (Wan2.1 I2V-14B / FLF2V-14B), shared
            by both passes as in the official ``arg_c`` / ``arg_null``, or ``None`` (not passed).

    Returns:
        float32 ``[B, C_out, T, h, w]``.
    """
    kw = {} if clip_fea is None else {"clip_fea": clip_fea}
    if not apply_cfg or guidance_scale == 1.0:
        return model(x, timestep, context, y=y, **kw).float()
    if batched:
        b = x.shape[0]
        kw2 = {k: torch.cat([v, v]) for k, v in kw.items()}
        out = model(
            torch.cat([x, x]),
            torch.cat([timestep, timestep]),
            _cat_context(context, context_null),
            y=None if y is None else torch.cat([y, y]),
            **kw2,
        ).float()
        v_c, v_u = out[:b], out[b:]
    else:
        v_c = model(x, timestep, context, y=y, **kw).float()
        v_u = model(x, timestep, context_null, y=y, **kw).float()
    return v_u + guidance_scale * (v_c - v_u)


def cfg_apply_pattern(num_steps: int, mode: str = "none", ratio: float | None = None) -> list[bool]:
    """Which steps run the unconditional pass (``--cfg_skip_mode``, ``--cfg_apply_ratio``).

    ``apply = int(num_steps·ratio)`` steps keep CFG: ``early`` skips the first steps, ``late`` the
    last, ``early_late`` both ends (the kept block centred at ``(N−apply)//2``), ``middle`` skips a
    block of ``N−apply`` steps starting at ``(N−(N−apply))//2``, ``alternate`` keeps a step when an
    accumulator of ``ratio`` reaches 1. For 10 steps and ratio 0.6: early ``SSSSAAAAAA``, late
    ``AAAAAASSSS``, middle ``AAASSSSAAA``, early_late ``SSAAAAAASS`` (the reference trainer's table).

    Raises:
        ValueError: an unknown mode, or a ratio outside [0, 1].
    """
    if mode not in CFG_SKIP_MODES:
        raise ValueError(f"unknown --cfg_skip_mode {mode!r}; use one of {', '.join(CFG_SKIP_MODES)}")
    if mode == "none":
        return [True] * num_steps
    if ratio is None:  # --cfg_apply_ratio not given
        ratio = 0.5
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"--cfg_apply_ratio must be in [0, 1], got {ratio}")
    keep = int(num_steps * ratio)
    out = []
    acc = 0.0
    for i in range(num_steps):
        if mode == "early":
            apply = i >= num_steps - keep
        elif mode == "late":
            apply = i < keep
        elif mode == "early_late":
            start = (num_steps - keep) // 2
            apply = start <= i < start + keep
        elif mode == "middle":
            skip = num_steps - keep
            start = (num_steps - skip) // 2
            apply = not (start <= i < start + skip)
        else:  # alternate
            acc += ratio
            apply = acc >= 1.0
            if apply:
                acc -= 1.0
        out.append(apply)
    return out


def expert_for_timestep(t: int | float | torch.Tensor, boundary: float | None) -> str | None:
    """``"high_noise"`` when the integer model timestep ``t >= boundary·1000``, else ``"low_noise"``.

    The comparison of ``_prepare_model_for_timestep`` (``wan/text2video.py``, ``image2video.py``);
    ``boundary`` is the fraction (0.875 / 0.9). ``None`` for single-model tasks.
    """
    if boundary is None:
        return None
    tv = t.item() if isinstance(t, torch.Tensor) else t
    return "high_noise" if tv >= boundary * NUM_TRAIN_TIMESTEPS else "low_noise"


def expert_steps(schedule: Schedule, boundary: float | None) -> list[str | None]:
    """The expert of every step of ``schedule`` (see :func:`expert_for_timestep`)."""
    return [expert_for_timestep(int(t), boundary) for t in schedule.timesteps]

