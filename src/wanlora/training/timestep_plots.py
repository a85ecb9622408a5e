"""Pictures of the training timestep distribution (``wanlora-train --show_timesteps``).

Draws as the trainer draws (:class:`wanlora.training.flow.TimestepDistribution`; with an expert
boundary, the expert first with its probability, then a timestep inside its range) and shows them as
a text histogram or a PNG plot with the analytic density on top.
"""

from __future__ import annotations

from pathlib import Path

import torch

from wanlora.training.flow import NUM_TRAIN_TIMESTEPS, TimestepDistribution

__all__ = ["format_timestep_histogram", "plot_timestep_distribution", "describe_timesteps"]


def _boundary_timestep(boundary: float | None) -> float | None:
    if boundary is None:
        return None
    return float(boundary) * NUM_TRAIN_TIMESTEPS if float(boundary) <= 1.0 else float(boundary)


def _display_draw(sampler: TimestepDistribution, n: int, seed: int, boundary: float | None):
    """``n`` draws as the trainer makes them: ``[(label, timesteps)]`` per expert (or one part)."""
    g = torch.Generator().manual_seed(seed)
    bt = _boundary_timestep(boundary)
    if bt is None:
        return [("samples", sampler.sample(n, g))], None
    p_high = sampler.mass(bt, NUM_TRAIN_TIMESTEPS)
    n_high = int((torch.rand(n, generator=g) < p_high).sum())
    parts = []
    if n_high:
        parts.append((f"high_noise (p={p_high:.3f})", sampler.sample(n_high, g, lo=bt)))
    if n - n_high:
        parts.append((f"low_noise (p={1 - p_high:.3f})", sampler.sample(n - n_high, g, hi=bt)))
    return parts, bt


def format_timestep_histogram(sampler: TimestepDistribution, boundary: float | None = None,
                              n: int = 100_000, seed: int = 0, bins: int = 20, width: int = 50) -> str:
    """A text histogram of ``n`` sampled timesteps (``--show_timesteps console``).

    One line per bin of 0..1000: range, percentage, bar; with ``boundary`` (timesteps or a
    fraction) the bar shows high-noise draws as ``#`` and low-noise draws as ``=`` and a header
    gives each expert's probability.
    """
    parts, bt = _display_draw(sampler, n, seed, boundary)
    edges = torch.linspace(0, NUM_TRAIN_TIMESTEPS, bins + 1, dtype=torch.float64)
    counts = [torch.histogram(p[1].double(), bins=edges).hist for p in parts]
    total = sum(counts)
    peak = float(total.max()) or 1.0
    lines = [sampler.describe()]
    if bt is not None:
        lines.append(f"boundary {bt:g}: " + ", ".join(p[0] for p in parts))
    chars = ["#", "="] if bt is not None and parts[0][0].startswith("high") else ["=", "#"]
    for i in range(bins):
        bar = "".join(chars[j] * round(float(c[i]) / peak * width) for j, c in enumerate(counts))
        lines.append(f"{edges[i]:6.0f}-{edges[i + 1]:<6.0f} {100 * float(total[i]) / n:5.1f}% {bar}")
    return "\n".join(lines)


def plot_timestep_distribution(sampler: TimestepDistribution, path: str | Path, boundary: float | None = None,
                               n: int = 100_000, seed: int = 0, bins: int = 100) -> Path:
    """Write a PNG histogram of ``n`` sampled timesteps with the analytic density on top.

    Args:
        sampler: the configured law.
        path: PNG destination (written atomically).
        boundary: expert boundary in timesteps (875) or as a fraction (0.875); when given, the
            samples are drawn as the two-expert trainer draws them (expert with probability
            ``mass``, then within its range) and each expert's share is coloured.
        n, seed, bins: sample count, CPU generator seed, histogram bins over 0..1000.
    Returns:
        ``path``.
    Raises:
        ImportError: matplotlib is not installed (a wanlora dependency; the message names the
            pip command, and the CLIs print it as one line).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("--show_timesteps image needs matplotlib: pip install matplotlib "
                          "(or use --show_timesteps console)") from e
    from wanlora.io_utils import atomic_path

    parts, bt = _display_draw(sampler, n, seed, boundary)
    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    edges = torch.linspace(0, NUM_TRAIN_TIMESTEPS, bins + 1).tolist()
    ax.hist([p[1].numpy() for p in parts], bins=edges, stacked=True, label=[p[0] for p in parts],
            weights=[torch.full_like(p[1], 1.0 / n).numpy() for p in parts])
    if bt is not None:
        ax.axvline(bt, color="k", linestyle=":", linewidth=1)
    grid = torch.linspace(0, NUM_TRAIN_TIMESTEPS, 1001, dtype=torch.float64)
    width = NUM_TRAIN_TIMESTEPS / bins
    ax.plot(grid.numpy(), (sampler.pdf(grid) * width).numpy(), color="C3", label="density")
    ax.set_xlabel("timestep (0 = clean, 1000 = noise)")
    ax.set_ylabel("fraction per bin")
    ax.set_title(sampler.describe())
    ax.legend()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def describe_timesteps(distribution: TimestepDistribution, plan, mode: str, image_path: str | Path) -> str:
    """What ``--show_timesteps`` shows for a run: with ``mode == "console"`` each expert's range and
    probability and a text histogram (:func:`format_timestep_histogram`); with ``"image"`` the plot
    written to ``image_path`` (:func:`plot_timestep_distribution`). Returns the text to print.

    Args:
        plan: the run's :class:`wanlora.training.experts.ExpertPlan` (both experts: the draw by
            expert, split at its boundary).
    Raises:
        ValueError: ``flux_shift``, whose law depends on the latent size of each batch.
    """
    if distribution.method == "flux_shift":
        raise ValueError("--show_timesteps: flux_shift sampling depends on each batch's latent size, so it "
                         "has no one distribution to show; try --timestep_sampling shift with a "
                         "--discrete_flow_shift near your resolution's")
    b = plan.boundary if plan.mode in ("separate", "shared") else None
    if mode == "image":
        plot_timestep_distribution(distribution, image_path, boundary=b)
        return f"timestep distribution written to {image_path}"
    lines = [f"timestep distribution: {distribution.describe()}"]
    for e, (lo, hi) in plan.ranges.items():
        lines.append(f"  {e or 'model'}: range {lo:g}..{hi:g}, probability {distribution.mass(lo, hi):.4f}")
    lines.append(format_timestep_histogram(distribution, boundary=b).split("\n", 1)[1])  # minus describe()
    return "\n".join(lines)
