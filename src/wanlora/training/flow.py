"""Flow matching for training: noisy inputs, targets, timestep sampling and loss weighting.

The relation (``reference/wan_numerics.md`` §9.10, implied by the official sampler's
``add_noise``/``convert_model_output`` in ``wan/utils/fm_solvers_unipc.py``): for a clean latent
``x0`` and Gaussian noise ``eps`` at noise level ``sigma`` in [0, 1],

    x_t = (1 - sigma) * x0 + sigma * eps        target v = eps - x0        timestep t = 1000 * sigma

(musubi-tuner feeds the model ``1000*sigma + 1``; we feed ``1000*sigma`` as the official
inference does with its truncated ``int(1000*sigma)``.)

Timestep sampling (``--timestep_sampling``; the musubi-tuner names and parameters users know).
Every method but ``uniform`` is a *logit-normal* law — ``logit(sigma) ~ N(m, s^2)`` — so each
has an exact CDF and inverse CDF, which this module uses for sampling, range restriction and
expert probabilities:

================  ================================================  ===========================
method            sampled as                                        logit-normal (m, s)
================  ================================================  ===========================
``uniform``       sigma ~ U(0, 1); density 1                        —
``sigmoid``       sigmoid(sigmoid_scale * z), z ~ N(0,1)            (0, sigmoid_scale)
``logit_normal``  sigmoid(logit_mean + logit_std * z)               (logit_mean, logit_std)
``shift``         sigmoid(sigmoid_scale*z), then the shift          (log shift, sigmoid_scale)
                  ``s*sigma / (1 + (s-1)*sigma)``,
                  s = ``discrete_flow_shift`` (musubi's ``shift``)
``flux_shift``    as ``shift`` with s = exp(mu), mu linear in the   (mu, sigmoid_scale)
                  token count ``(h//2)*(w//2)``: 0.5 at 256, 1.15
                  at 4096 (musubi's ``flux_shift``)
``logsnr``        sigma = sigmoid(-logsnr/2), logsnr ~              (-logit_mean/2, logit_std/2)
                  N(logit_mean, logit_std^2)
================  ================================================  ===========================

The shift of a sigmoid sample is again a sigmoid: ``shift(sigmoid(y)) = sigmoid(y + log s)``.
Logit-normal density: ``p(sigma) = phi((logit(sigma) - m)/s) / (s * sigma * (1 - sigma))``,
CDF ``Phi((logit(sigma) - m)/s)``.

Range (``--min_timestep``/``--max_timestep`` = ``[a, b]`` on 0..1000):

- default (musubi): *rescale* — ``t = a + (b - a) * t_unrestricted``; the density is squeezed
  into the range, its shape kept relative to the range.
- ``preserve_distribution_shape``: *restrict* — the distribution conditioned on ``[a, b]``
  (musubi does it by rejection; here by the exact inverse CDF, same law, no loops).

:meth:`TimestepDistribution.sample` ``(lo, hi)`` restricts the configured law further (one expert's
range); :meth:`TimestepDistribution.mass` ``(lo, hi)`` is its probability, so choosing the high-noise
expert with probability ``mass(boundary, 1000)`` and sampling inside the chosen expert's range
reproduces the configured law exactly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "TIMESTEP_SAMPLING_METHODS",
    "MUSUBI_ONLY_METHODS",
    "WEIGHTING_SCHEMES",
    "sigma_to_timestep",
    "timestep_to_sigma",
    "add_noise",
    "flow_target",
    "shift_sigma",
    "flux_shift_mu",
    "loss_weighting",
    "TimestepDistribution",
]

NUM_TRAIN_TIMESTEPS = 1000
TIMESTEP_SAMPLING_METHODS = ("uniform", "sigmoid", "logit_normal", "shift", "flux_shift", "logsnr")
#: musubi-tuner ``--timestep_sampling`` values we do not have -> the closest law here (the message).
MUSUBI_ONLY_METHODS = {
    "sigma": "use 'shift' with --discrete_flow_shift (musubi's 'sigma' draws the shifted scheduler sigmas; "
             "with --weighting_scheme logit_normal use 'logit_normal')",
    "mode": "use 'logit_normal' ('mode' is a density of musubi's 'sigma' sampling that, like logit_normal, "
            "favours mid-range timesteps)",
    "qwen_shift": "use 'flux_shift' (the same resolution-dependent shift with other constants)",
    "qinglong_flux": "use 'flux_shift' (most of qinglong_flux's draws are flux_shift draws)",
    "qinglong_qwen": "use 'flux_shift' (most of qinglong_qwen's draws are resolution-shifted draws)",
}
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")


# --------------------------------------------------------------------------------------------
# the flow-matching relation
# --------------------------------------------------------------------------------------------
def sigma_to_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """Model timestep ``t = 1000 * sigma`` (wan_numerics §9.10); sigma in [0, 1] -> t in 0..1000."""
    return sigma * NUM_TRAIN_TIMESTEPS


def timestep_to_sigma(timesteps: torch.Tensor) -> torch.Tensor:
    """Noise level ``sigma = t / 1000`` (wan_numerics §9.10); t in 0..1000 -> sigma in [0, 1]."""
    return timesteps / NUM_TRAIN_TIMESTEPS


def _per_sample(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """sigma [B] (or scalar) -> [B, 1, ..., 1] broadcastable against ``like`` [B, ...]."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=like.device)
    if s.ndim == 1:
        s = s.view(-1, *([1] * (like.ndim - 1)))
    return s


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """The noisy model input ``x_t = (1 - sigma) * x0 + sigma * eps`` (wan_numerics §9.10;
    the official ``FlowUniPCMultistepScheduler.add_noise``).

    Args:
        x0: clean latents ``[B, C, F, H, W]`` (any shape with batch first).
        noise: ``eps ~ N(0, I)``, same shape.
        sigma: ``[B]`` per-sample noise level in [0, 1] (``timesteps / 1000``), or a scalar.
    Returns:
        ``x_t``, same shape, in ``x0``'s dtype (computed in float32).
    """
    s = _per_sample(sigma, x0)
    return ((1.0 - s) * x0.float() + s * noise.float()).to(x0.dtype)


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The regression target ``v = eps - x0`` (the velocity the Wan DiT predicts; wan_numerics
    §9.10, musubi's ``noise - latents``). Same shape as ``x0``, float32."""
    return noise.float() - x0.float()


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow shift ``s * sigma / (1 + (s - 1) * sigma)`` (wan_numerics §9.1; identity at s=1)."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def flux_shift_mu(latent_h: int, latent_w: int) -> float:
    """musubi's ``flux_shift`` mu: linear in ``(h//2)*(w//2)`` tokens, 0.5 at 256, 1.15 at 4096;
    the shift is ``exp(mu)``."""
    tokens = (latent_h // 2) * (latent_w // 2)
    return 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)


def loss_weighting(scheme: str | None, sigma: torch.Tensor) -> torch.Tensor | None:
    """Per-sample loss weights of ``--weighting_scheme`` (SD3 paper, musubi semantics).

    Args:
        scheme: ``none`` / ``logit_normal`` / ``mode`` -> ``None`` (weight 1; in musubi those two
            only shape its ``sigma`` timestep sampling), ``sigma_sqrt`` -> ``sigma**-2``,
            ``cosmap`` -> ``2 / (pi * (1 - 2 sigma + 2 sigma^2))``.
        sigma: ``[B]`` noise levels in [0, 1]; clamped below at 1e-3 (one timestep) for
            ``sigma_sqrt`` so t = 0 gives a finite weight.
    Returns:
        ``[B]`` float32 weights, or None for uniform weighting.
    Raises:
        ValueError: an unknown scheme.
    """
    if scheme is None or scheme in ("none", "logit_normal", "mode"):
        return None
    s = sigma.float()
    if scheme == "sigma_sqrt":
        return s.clamp(min=1.0 / NUM_TRAIN_TIMESTEPS) ** -2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * s + 2.0 * s**2))
    raise ValueError(f"--weighting_scheme {scheme!r}: use one of {', '.join(WEIGHTING_SCHEMES)}")


# --------------------------------------------------------------------------------------------
# timestep sampling
# --------------------------------------------------------------------------------------------
def _ndtr(x: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtr(x)


@dataclass(frozen=True)
class TimestepDistribution:
    """The training timestep distribution on 0..1000 (see the module docstring for each law).

    Fields mirror the flags: ``method`` (``--timestep_sampling``), ``sigmoid_scale``,
    ``logit_mean``, ``logit_std``, ``discrete_flow_shift``, ``min_timestep``/``max_timestep``
    (None -> 0/1000), ``preserve_distribution_shape``; ``latent_size`` ``(h, w)`` is needed by
    ``flux_shift`` only (see :meth:`with_latent_size`).

    Raises:
        ValueError: an unknown method, a non-positive scale/std/shift, or a bad range.
    """

    method: str = "uniform"
    sigmoid_scale: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    discrete_flow_shift: float = 1.0
    min_timestep: float | None = None
    max_timestep: float | None = None
    preserve_distribution_shape: bool = False
    latent_size: tuple[int, int] | None = None

    def __post_init__(self):
        if self.method in MUSUBI_ONLY_METHODS:
            raise ValueError(f"--timestep_sampling {self.method}: not supported (a musubi-tuner method); "
                             f"{MUSUBI_ONLY_METHODS[self.method]}")
        if self.method not in TIMESTEP_SAMPLING_METHODS:
            raise ValueError(
                f"--timestep_sampling {self.method!r}: use one of {', '.join(TIMESTEP_SAMPLING_METHODS)}")
        for field in ("sigmoid_scale", "logit_std", "discrete_flow_shift"):
            if not getattr(self, field) > 0:
                raise ValueError(f"--{field} must be > 0, got {getattr(self, field)}")
        lo, hi = self.range
        if not 0.0 <= lo < hi <= NUM_TRAIN_TIMESTEPS:
            raise ValueError(
                f"--min_timestep {self.min_timestep} / --max_timestep {self.max_timestep}: need "
                f"0 <= min < max <= 1000")

    @classmethod
    def from_config(cls, config) -> "TimestepDistribution":
        """The law a :class:`wanlora.training.config.TimestepConfig` (the ``--timestep_sampling``
        flags) describes."""
        return cls(method=config.timestep_sampling, sigmoid_scale=config.sigmoid_scale,
                   logit_mean=config.logit_mean, logit_std=config.logit_std,
                   discrete_flow_shift=config.discrete_flow_shift, min_timestep=config.min_timestep,
                   max_timestep=config.max_timestep,
                   preserve_distribution_shape=config.preserve_distribution_shape)

    def with_latent_size(self, latent_h: int, latent_w: int) -> "TimestepDistribution":
        """A copy for latents of spatial size ``h x w`` (``flux_shift`` depends on it)."""
        return dataclasses.replace(self, latent_size=(int(latent_h), int(latent_w)))

    @property
    def range(self) -> tuple[float, float]:
        """The configured ``(min_timestep, max_timestep)`` on 0..1000."""
        lo = 0.0 if self.min_timestep is None else float(self.min_timestep)
        hi = float(NUM_TRAIN_TIMESTEPS) if self.max_timestep is None else float(self.max_timestep)
        return lo, hi

    # -- the unrestricted law on sigma in [0, 1] ------------------------------------------------
    def _logit_normal_params(self) -> tuple[float, float] | None:
        m = self.method
        if m == "uniform":
            return None
        if m == "sigmoid":
            return 0.0, self.sigmoid_scale
        if m == "logit_normal":
            return self.logit_mean, self.logit_std
        if m == "shift":
            return math.log(self.discrete_flow_shift), self.sigmoid_scale
        if m == "flux_shift":
            if self.latent_size is None:
                raise ValueError("timestep_sampling flux_shift depends on the latent size; use "
                                 "sampler.with_latent_size(h, w) per batch")
            return flux_shift_mu(*self.latent_size), self.sigmoid_scale
        return -self.logit_mean / 2.0, self.logit_std / 2.0  # logsnr

    def _base_cdf(self, s: torch.Tensor) -> torch.Tensor:
        s = s.clamp(0.0, 1.0)
        p = self._logit_normal_params()
        if p is None:
            return s
        m, sd = p
        return _ndtr((torch.logit(s) - m) / sd)

    def _base_quantile(self, q: torch.Tensor) -> torch.Tensor:
        p = self._logit_normal_params()
        if p is None:
            return q.clamp(0.0, 1.0)
        m, sd = p
        return torch.sigmoid(m + sd * torch.special.ndtri(q.clamp(0.0, 1.0)))

    def _base_pdf(self, s: torch.Tensor) -> torch.Tensor:
        p = self._logit_normal_params()
        inside = (s >= 0) & (s <= 1)
        if p is None:
            return inside.to(s.dtype)
        m, sd = p
        sc = s.clamp(1e-300, 1 - 1e-16)
        z = (torch.logit(sc) - m) / sd
        dens = torch.exp(-0.5 * z**2) / (math.sqrt(2 * math.pi) * sd * sc * (1 - sc))
        return torch.where(inside & (s > 0) & (s < 1), dens, torch.zeros_like(s))

    # -- the configured law (range applied), in sigma units ---------------------------------
    def _cdf_sigma(self, s: torch.Tensor) -> torch.Tensor:
        a, b = (x / NUM_TRAIN_TIMESTEPS for x in self.range)
        if self.preserve_distribution_shape:
            fa, fb = self._base_cdf(_t(a)), self._base_cdf(_t(b))
            return ((self._base_cdf(s.clamp(a, b)) - fa) / (fb - fa)).clamp(0.0, 1.0)
        return self._base_cdf(((s - a) / (b - a)).clamp(0.0, 1.0))

    def _quantile_sigma(self, q: torch.Tensor) -> torch.Tensor:
        a, b = (x / NUM_TRAIN_TIMESTEPS for x in self.range)
        if self.preserve_distribution_shape:
            fa, fb = self._base_cdf(_t(a)), self._base_cdf(_t(b))
            return self._base_quantile(fa + q * (fb - fa)).clamp(a, b)
        return (a + (b - a) * self._base_quantile(q)).clamp(a, b)

    # -- public, in timestep units (0..1000) ------------------------------------------------
    def cdf(self, t) -> torch.Tensor:
        """P(T <= t) of the configured law; ``t`` tensor/float on 0..1000; float64."""
        return self._cdf_sigma(_t(t) / NUM_TRAIN_TIMESTEPS)

    def pdf(self, t) -> torch.Tensor:
        """Density of the configured law per timestep unit at ``t`` (0..1000); float64."""
        s = _t(t) / NUM_TRAIN_TIMESTEPS
        a, b = (x / NUM_TRAIN_TIMESTEPS for x in self.range)
        inside = ((s >= a) & (s <= b)).to(s.dtype)
        if self.preserve_distribution_shape:
            z = self._base_cdf(_t(b)) - self._base_cdf(_t(a))
            d = self._base_pdf(s) / z
        else:
            d = self._base_pdf((s - a) / (b - a)) / (b - a)
        return d * inside / NUM_TRAIN_TIMESTEPS

    def quantile(self, q) -> torch.Tensor:
        """Inverse CDF of the configured law: ``q`` in [0, 1] -> timestep on 0..1000; float64."""
        return self._quantile_sigma(_t(q)) * NUM_TRAIN_TIMESTEPS

    def mass(self, lo: float | None = None, hi: float | None = None) -> float:
        """Probability the configured law puts in ``[lo, hi)`` (timesteps; None = 0 / 1000).

        The two-expert trainer picks the high-noise expert with ``mass(boundary, 1000)``.
        """
        lo = 0.0 if lo is None else float(lo)
        hi = float(NUM_TRAIN_TIMESTEPS) if hi is None else float(hi)
        if hi <= lo:
            return 0.0
        return float(self.cdf(hi) - self.cdf(lo))

    def sample(self, n: int, generator: torch.Generator | None = None, lo: float | None = None,
               hi: float | None = None, device=None) -> torch.Tensor:
        """Draw ``n`` timesteps from the configured law restricted to ``[lo, hi)``.

        Exact inverse-CDF sampling: ``t = Q(F(lo) + u (F(hi) - F(lo)))``, ``u ~ U(0,1)`` drawn
        with ``generator`` (a CPU generator; float64). ``lo``/``hi`` (None = the configured
        range) narrow the range further, e.g. one expert's ``Task.timestep_range``. When ``hi``
        cuts the configured range the samples stay strictly below ``hi`` also after the cast to
        float32, so a low-noise sample never reaches the boundary the official pipeline routes
        to the high-noise expert (wan_numerics §9.4).

        Returns:
            float32 ``[n]`` on ``device``, in ``[max(lo, min_timestep), min(hi, max_timestep)]``.
        Raises:
            ValueError: the law puts no probability in ``[lo, hi)``.
        """
        a, b = self.range
        lo_eff = a if lo is None else max(a, float(lo))
        hi_eff = b if hi is None else min(b, float(hi))
        pl, ph = self.cdf(lo_eff), self.cdf(hi_eff)
        if not float(ph - pl) > 0:
            raise ValueError(
                f"the timestep distribution ({self.method}, range {a:g}..{b:g}) puts no probability "
                f"in [{lo_eff:g}, {hi_eff:g}); widen --min_timestep/--max_timestep or move the "
                f"expert boundary")
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        t = self.quantile(pl + u * (ph - pl)).clamp(lo_eff, hi_eff).to(torch.float32)
        lo32 = torch.tensor(lo_eff, dtype=torch.float32)
        if lo32.item() < lo_eff:
            lo32 = torch.nextafter(lo32, torch.tensor(math.inf))
        hi32 = torch.tensor(hi_eff, dtype=torch.float32)
        if hi32.item() > hi_eff or (hi_eff < b and hi32.item() == hi_eff):
            hi32 = torch.nextafter(hi32, torch.tensor(-math.inf))  # half-open [lo, hi) when hi cuts
        t = torch.maximum(torch.minimum(t, hi32), lo32)
        return t.to(device) if device is not None else t

    def describe(self) -> str:
        """One line for logs: method, parameters and range."""
        p = {"uniform": "", "sigmoid": f"scale={self.sigmoid_scale:g}",
             "logit_normal": f"mean={self.logit_mean:g}, std={self.logit_std:g}",
             "shift": f"shift={self.discrete_flow_shift:g}, scale={self.sigmoid_scale:g}",
             "flux_shift": f"scale={self.sigmoid_scale:g}, latent={self.latent_size}",
             "logsnr": f"mean={self.logit_mean:g}, std={self.logit_std:g}"}[self.method]
        a, b = self.range
        mode = "restricted" if self.preserve_distribution_shape else "rescaled"
        return f"{self.method}({p}) on [{a:g}, {b:g}] {mode}"


def _t(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)
