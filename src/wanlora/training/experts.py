"""Wan2.2 A14B experts in training: which LoRAs train, on which timesteps, and weight swapping.

The A14B models are two DiTs of identical shape: the high-noise expert serves timesteps
``t >= boundary·1000`` and the low-noise expert the rest (T2V boundary 0.875, I2V 0.9;
``reference/wan_numerics.md`` §9.4). A run trains one of these layouts (:func:`plan_experts`):

=============  ===================================  ===============================================
mode           flags                                what trains
=============  ===================================  ===============================================
``single``     TI2V-5B / Wan2.1 ``--dit``           one LoRA, all timesteps of the configured law
``one``        A14B ``--dit`` + ``--expert``        one LoRA inside that expert's range
               (or a path naming the expert)
``separate``   ``--dit LOW --dit_high_noise HIGH``  two LoRAs, one per expert (the default)
``shared``     ... ``--expert_lora shared``         one LoRA used by both experts
=============  ===================================  ===============================================

With both experts each optimizer step (or each ``--expert_switch_every`` group of steps) draws
one expert with probability equal to the configured timestep law's mass on its side of the
boundary, then samples the batch's timesteps inside that expert's range, so over the run the
timesteps follow exactly the configured law (:class:`ExpertSchedule`). The draw depends only
on the seed and the group index (and, under ``flux_shift``, whose law depends on the latent
size, on the step's batch size), so every process draws the same expert and a resumed run
draws what the uninterrupted one would have.

Both experts share one ``WanDiT`` module on the accelerator; :class:`ExpertWeights` swaps the
base weights in place (rebinding on the device, or exchanging them with the one parked copy in
pinned CPU memory with ``--offload_inactive_dit``). The LoRA adapters hook the module's Linear layers; the inactive
expert's LoRA is disabled, so it neither changes the output nor receives gradients.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from wanlora.tasks import EXPERTS, Task, expert_from_path  # noqa: F401 (re-exported)
from wanlora.training import seeds

__all__ = [
    "ONE_MODEL",
    "ONE_LORA",
    "ExpertPlan",
    "plan_experts",
    "expert_from_path",
    "normalize_expert",
    "boundary_timestep",
    "ExpertSchedule",
    "expert_schedule",
    "expert_of_step",
    "ExpertWeights",
    "ExpertView",
    "base_tensors",
]

log = logging.getLogger(__name__)

#: The expert key of a single-model run (TI2V-5B, Wan2.1): its one DiT and its timestep range.
ONE_MODEL = "model"
#: The LoRA key of a run that trains one LoRA for a single model or shared by both experts.
ONE_LORA = "lora"


def normalize_expert(name: str | None) -> str | None:
    """``high``/``high_noise`` -> ``high_noise``, ``low``/``low_noise`` -> ``low_noise``, None -> None.

    Raises:
        ValueError: any other name.
    """
    if name is None:
        return None
    key = name.lower().replace("-", "_")
    if key in ("high", "high_noise"):
        return "high_noise"
    if key in ("low", "low_noise"):
        return "low_noise"
    raise ValueError(f"--expert {name!r}: use high or low")


def boundary_timestep(task: Task, override: float | None) -> float | None:
    """The expert boundary on 0..1000: ``--timestep_boundary`` (0..1 as a fraction, above 1 as
    a timestep) or the task's (875 / 900); None for single-model tasks.

    Raises:
        ValueError: an override for a single-model task, or outside (0, 1000).
    """
    if override is None:
        return task.boundary_timestep
    if not task.has_experts:
        raise ValueError(f"--timestep_boundary: task {task.name} has no experts; leave it out")
    b = float(override) * 1000.0 if float(override) <= 1.0 else float(override)
    if not 0.0 < b < 1000.0:
        raise ValueError(f"--timestep_boundary {override}: give 0..1 (0.875) or 0..1000 (875), inside the ends")
    return b


@dataclass
class ExpertPlan:
    """What a run trains (module docstring table).

    Attributes:
        mode: ``single`` | ``one`` | ``separate`` | ``shared``.
        dit_paths: ``{expert: checkpoint}`` of the DiTs to load (key :data:`ONE_MODEL` for ``single``).
        loras: the trained LoRAs as ``{lora_key: experts it serves}``; lora_key is an expert
            name (``one``/``separate``) or :data:`ONE_LORA` (``single``/``shared``).
        ranges: ``{expert: (lo, hi)}`` timesteps on 0..1000 each expert trains on (key
            :data:`ONE_MODEL` for ``single``: the whole law).
        boundary: the boundary timestep (None for single-model tasks).
        notes: messages for the log at INFO level (the expert detected from the path).
        warnings: messages for the log at WARNING level (``--expert`` and the path disagree).
    """

    mode: str
    dit_paths: dict
    loras: dict
    ranges: dict
    boundary: float | None = None
    notes: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    @property
    def experts(self) -> list:
        """The experts (DiT keys) this run uses, in the sampler's order."""
        return list(self.dit_paths)

    def lora_for(self, expert: str) -> str:
        """The LoRA key trained when ``expert`` is active."""
        for key, served in self.loras.items():
            if expert in served:
                return key
        raise KeyError(expert)

    def file_suffix(self, lora_key) -> str:
        """``_high_noise`` / ``_low_noise`` for the two-LoRA layout, else ``""``."""
        return f"_{lora_key}" if self.mode == "separate" else ""

    def metadata_expert(self, lora_key) -> str | None:
        """``wan.expert`` for a LoRA: its expert, ``both`` (shared), None (single-model task)."""
        if self.mode in ("one", "separate"):
            return lora_key
        return "both" if self.mode == "shared" else None


def plan_experts(task: Task, dit: str, dit_high_noise: str | None = None, expert: str | None = None,
                 expert_lora: str = "separate", timestep_boundary: float | None = None) -> ExpertPlan:
    """Decide the layout of a run from the flags (module docstring).

    Raises:
        ValueError: expert flags on a single-model task; an A14B ``--dit`` alone whose expert is
            neither given nor in its path; ``--expert`` together with ``--dit_high_noise``.
    """
    b = boundary_timestep(task, timestep_boundary)
    if not task.has_experts:
        if dit_high_noise or expert:
            raise ValueError(f"task {task.name} is a single model: leave out --dit_high_noise and --expert")
        return ExpertPlan("single", {ONE_MODEL: dit}, {ONE_LORA: (ONE_MODEL,)}, {ONE_MODEL: (0.0, 1000.0)})
    ranges = {"high_noise": (b, 1000.0), "low_noise": (0.0, b)}
    if dit_high_noise:
        if expert:
            raise ValueError("--expert picks one expert; with --dit_high_noise both train. Drop one of them")
        paths = {"high_noise": dit_high_noise, "low_noise": dit}
        if expert_lora == "shared":
            return ExpertPlan("shared", paths, {ONE_LORA: tuple(EXPERTS)}, ranges, b)
        return ExpertPlan("separate", paths, {e: (e,) for e in EXPERTS}, ranges, b)
    notes, warnings = [], []
    e = normalize_expert(expert)
    if e is None:
        e = expert_from_path(dit)
        if e is None:
            raise ValueError(
                f"task {task.name} has two experts and --dit {dit} names neither: add --expert high "
                "or --expert low (or --dit_high_noise HIGH to train both)")
        notes.append(f"expert {e} detected from the --dit path {dit}")
    elif expert_from_path(dit) not in (None, e):
        warnings.append(f"--expert {e} but the --dit path {dit} names {expert_from_path(dit)}: the flag "
                        f"wins; check that the file is the {e} expert")
    return ExpertPlan("one", {e: dit}, {e: (e,)}, {e: ranges[e]}, b, notes, warnings)


class ExpertSchedule:
    """Which expert trains on each optimizer step (both-experts runs).

    The expert of step ``s`` is drawn once per group ``s // switch_every``: ``u ~ U(0, 1)`` from the
    generator of ``(seed, group)`` (:func:`wanlora.training.seeds.stream_generator`, stream
    ``EXPERT``), high-noise when ``u < p_high`` — stateless, the same on every process and after a
    resume.

    Args:
        p_high: probability of the high-noise expert in [0, 1] (``sampler.mass(boundary, 1000)``),
            or None when it depends on the batch (``flux_shift``: the law depends on the latent
            size) and is given to :meth:`expert_at` per step instead.
        switch_every: optimizer steps per draw (>= 1).
        seed: the run's seed.
    Raises:
        ValueError: ``switch_every < 1``.
    """

    def __init__(self, p_high: float | None, switch_every: int = 1, seed: int = 0):
        if switch_every < 1:
            raise ValueError(f"--expert_switch_every must be >= 1, got {switch_every}")
        self.p_high = None if p_high is None else float(p_high)
        self.switch_every = int(switch_every)
        self.seed = int(seed)

    def expert_at(self, step: int, p_high: float | None = None) -> str:
        """The expert of optimizer step ``step`` (0-based); ``p_high`` overrides the schedule's
        (required when it was built with None). A group keeps one ``u``, so with a per-step
        ``p_high`` the expert can still change inside a group."""
        p = self.p_high if p_high is None else p_high
        if p is None:
            raise ValueError("ExpertSchedule(p_high=None): give p_high for each step")
        group = step // self.switch_every
        g = seeds.stream_generator(self.seed, seeds.EXPERT, group)
        return "high_noise" if torch.rand((), generator=g).item() < p else "low_noise"


def expert_schedule(plan: ExpertPlan, timesteps, switch_every: int, seed: int) -> ExpertSchedule | None:
    """Both experts: the per-step expert draw with ``P(high) = timesteps.mass(boundary, 1000)``, so
    that sampling each step's timesteps inside its expert's range reproduces the law; None for one
    expert or a single model. ``flux_shift`` (the law depends on the latent size) leaves ``p_high``
    to each step's batch (:func:`expert_of_step`).

    Args:
        timesteps: the run's :class:`wanlora.training.flow.TimestepDistribution`.
    Raises:
        ValueError: two LoRAs (``separate``) while ``--min_timestep``/``--max_timestep`` leave one
            expert no timesteps, so its LoRA would never train.
    """
    if plan.mode not in ("separate", "shared"):
        return None
    lo, hi = timesteps.range
    starved = "high_noise" if hi <= plan.boundary else "low_noise" if lo >= plan.boundary else None
    if starved:
        msg = (f"--min_timestep/--max_timestep {lo:g}..{hi:g} lie on one side of the expert boundary "
               f"{plan.boundary:g}: the {starved} expert gets no timesteps")
        if plan.mode == "separate":
            raise ValueError(f"{msg} and its LoRA would never train; train one expert (--expert, "
                             "without --dit_high_noise) or widen the range")
        log.warning("%s; the shared LoRA trains on the other expert only", msg)
    if timesteps.method == "flux_shift":
        log.info("experts: high_noise with probability = the flux_shift law's mass above %g for each "
                 "step's latent size, drawn every %d step(s)", plan.boundary, switch_every)
        return ExpertSchedule(None, switch_every, seed)
    p_high = timesteps.mass(plan.boundary, 1000.0)
    log.info("experts: high_noise with probability %.4f, low_noise %.4f (%s), drawn every %d step(s)",
             p_high, 1 - p_high, timesteps.describe(), switch_every)
    return ExpertSchedule(p_high, switch_every, seed)


def expert_of_step(schedule: ExpertSchedule | None, plan: ExpertPlan, timesteps, step: int, batch: dict,
                   mean_over_processes=None) -> str:
    """The expert optimizer step ``step`` trains: the schedule's draw, or the run's only one.

    Under ``flux_shift`` ``p_high`` is the law's mass above the boundary at the latent size of the
    step's first batch (``latents [B, C, F, h, w]``), averaged by ``mean_over_processes``
    (``float -> float``, the same on every process) so that all processes train the same expert.
    """
    if schedule is None:
        return plan.experts[0]
    if schedule.p_high is not None:
        return schedule.expert_at(step)
    h, w = batch["latents"].shape[-2:]
    p = timesteps.with_latent_size(h, w).mass(plan.boundary, 1000.0)
    return schedule.expert_at(step, mean_over_processes(p) if mean_over_processes else p)


def base_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of a DiT's parameters and buffers (the frozen base weights, fp8 scales
    included) — what an expert swap exchanges."""
    out = dict(module.named_parameters())
    out.update(dict(module.named_buffers()))
    return out


class ExpertWeights:
    """Several experts' frozen base weights behind one ``WanDiT`` module.

    Args:
        module: the DiT (its tensors currently hold ``first``'s weights, on ``device``).
        first: the expert whose weights the module holds.
        others: ``{expert: state_dict}`` of the other experts (same keys, shapes; any device).
            The dicts are consumed (emptied) so that no second host copy outlives its transfer.
        offload: ``--offload_inactive_dit``: the inactive expert's weights wait in (pinned, on
            CUDA) host memory — one expert's worth, never both; otherwise every expert stays
            on the device and swapping only rebinds tensors.
        swap: the module's :class:`~wanlora.models.block_swap.BlockSwap`, if any. The blocks it
            moves are in host memory for every expert anyway: switching experts only points the
            swap at the other expert's host copies (no copy); the rest follows ``offload``.

    :meth:`activate` swaps in place: parameter objects (and the LoRA hooks on their modules)
    stay the same, only their data changes. With ``offload`` each tensor is exchanged through
    its one host buffer: the incoming expert's tensor is copied host→device, then the outgoing
    one device→host into the same buffer (in stream order), so the host holds one expert and the
    device one tensor extra at most.

    Raises:
        ValueError: a state dict with missing/extra keys or other shapes (listed).
    """

    def __init__(self, module: torch.nn.Module, first: str | None, others: dict, offload: bool = False,
                 swap=None):
        self.module = module
        self.active = first
        self.offload = offload
        self.swap = swap
        own = base_tensors(module)
        self.device = next(iter(own.values())).device
        if swap is not None:
            self.device = swap.device
        swapped = self._swapped_names()
        self._own = {k: t for k, t in own.items() if k not in swapped}
        self.pin = torch.cuda.is_available() and self.device.type == "cuda"
        self.store: dict = {}  # {expert: {name: tensor}} of the experts NOT active
        self.swap_host: dict = {}  # {expert: BlockSwap host dict}
        if swap is not None and first is not None:
            self.swap_host[first] = swap.host_weights()
        for name, sd in others.items():
            bad = sorted(set(sd) ^ set(own)) + [k for k in own if k in sd and sd[k].shape != own[k].shape]
            if bad:
                raise ValueError(f"expert {name}: its DiT does not match the other expert's "
                                 f"({len(bad)} keys differ, e.g. {bad[:3]}); both must be the same task")
            if swap is not None:
                self.swap_host[name] = {
                    j: {n: swap.to_host(sd.pop(f"blocks.{j}.{n}").to(t.dtype)) for n, t in host.items()}
                    for j, host in swap.host_weights().items()}
            self.store[name] = {k: self._park(sd.pop(k).to(self._own[k].dtype)) for k in self._own}

    def _swapped_names(self) -> set[str]:
        if self.swap is None:
            return set()
        return {f"blocks.{j}.{n}" for j in self.swap.host_weights() for n in self.swap.names}

    def _park(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if not self.offload:
            return t.to(self.device)
        t = t.to("cpu", copy=True).contiguous()
        return t.pin_memory() if self.pin else t

    def parked_bytes(self) -> int:
        """Bytes of expert weights held outside the module (host with ``offload``, else device),
        not counting block-swap host copies."""
        return sum(t.numel() * t.element_size() for sd in self.store.values() for t in sd.values())

    def activate(self, expert: str | None) -> bool:
        """Make ``expert``'s weights the module's; returns True when weights were swapped."""
        if expert == self.active or expert not in self.store:
            return False
        incoming = self.store.pop(expert)
        outgoing = {}
        for k, t in self._own.items():
            src = incoming[k]
            if self.offload:
                new = src.to(self.device, non_blocking=True, copy=True)
                src.copy_(t.data, non_blocking=True)  # same stream: runs after the read above
                outgoing[k] = src
                t.data = new
            else:
                outgoing[k] = t.data
                t.data = src
        if self.swap is not None:
            self.swap.set_host_weights(self.swap_host[expert])
        if self.offload and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self.store[self.active] = outgoing
        self.active = expert
        return True


class ExpertView(torch.nn.Module):
    """One expert of a shared DiT module as a callable model (for the sampling pipeline).

    ``view(x, timestep, context, y)`` first calls ``activate(expert)`` (swap in the expert's
    weights, enable its LoRA), then runs the module. Holds no parameters of its own.
    """

    def __init__(self, module: torch.nn.Module, expert: str | None, activate):
        super().__init__()
        self._module = [module]  # not a submodule: eval()/train() on the view leave the DiT alone
        self.expert = expert
        self._activate = activate

    def forward(self, x, timestep, context, y=None):
        """Activate this view's expert, then ``module(x, timestep, context, y)`` (shapes as
        :class:`wanlora.models.dit.WanDiT`: ``x [B, C_in, F, H, W]``, ``timestep [B]`` or
        ``[B, F]`` on 0..1000, ``context`` list of ``[L_i, 4096]``); returns ``[B, C_out, F, H, W]``."""
        self._activate(self.expert)
        return self._module[0](x, timestep, context, y)
