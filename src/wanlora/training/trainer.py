"""The training loop: LoRA on a Wan DiT with flow matching, on Accelerate.

Read :func:`train` top to bottom: setup (accelerator, experts, data, model, LoRAs, optimizers),
then the loop — per optimizer step pick the expert, per batch sample timesteps and noise,
predict the velocity, regress ``noise - x0``, step, log, save, sample — then the final save.

Facts the loop relies on:

* Flow matching (``reference/wan_numerics.md`` §9.10, :mod:`wanlora.training.flow`):
  ``x_t = (1-σ)·x0 + σ·ε``, target ``ε - x0``, the DiT is fed ``t = 1000·σ``. The loss is the
  mean squared error in float32, per sample weighted by ``--weighting_scheme``.
* I2V-A14B feeds the cached ``y`` (mask + image latent, §5), the same for every timestep.
  TI2V-5B image-to-video (``--ti2v_first_frame``): latent frame 0 of ``x_t`` is the clean latent,
  its timestep is 0 (a per-frame timestep ``[B, F]``, §6.3) and it is left out of the loss.
* Experts (:mod:`wanlora.training.experts`): each optimizer step trains one expert's LoRA on timesteps
  of that expert's range, the expert drawn with the law's mass above the boundary (under
  ``flux_shift``, whose law depends on the latent size, at the step's first batch's size); the
  other LoRA is disabled and its optimizer does not step, so its weights and optimizer state
  stay exactly as they were. A window of ``--gradient_accumulation_steps`` batches is one expert.
* Randomness is derived from ``(seed, step, micro-batch, process)`` at each use, so a resumed run
  draws the same noise, timesteps and experts as an uninterrupted one; ``--save_state`` writes
  optimizer, scheduler, RNG and data position (``accelerator.save_state`` plus
  ``train_state.json``), always to a temporary folder renamed into place.
* Multi-process (``accelerate launch --multi_gpu`` or ``torchrun``, gloo on CPU): each LoRA is
  wrapped in a small module whose forward calls the DiT, and that wrapper is what Accelerate
  prepares (DDP over the LoRA parameters only; the frozen DiT is never wrapped).
* ``--ulysses_size N`` / ``--dit_fsdp`` (:mod:`wanlora.models.distributed`, ``docs/distributed.md``):
  the processes form ``dp × N`` ranks; a sequence group of N ranks gets the same batches and the
  same random draws (its data-parallel index takes the process index's place) and splits each
  sample's tokens; FSDP2 shards the frozen DiT over all ranks. The LoRAs stay replicated under DDP:
  the gathered output's backward sums the group's gradients, so DDP's mean over all ranks is the
  data-parallel mean, exactly as without sequence parallelism.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from wanlora.conditioning import Conditioning, TextToVideo, conditioning_for, per_sample_mse
from wanlora.training import flow
from wanlora.training.experts import ExpertPlan, ExpertSchedule, ExpertView, ExpertWeights, plan_experts
from wanlora.io_utils import write_json
from wanlora.training.optim import build_lr_scheduler, build_optimizer, check_lr_scheduler, check_optimizer_type, parse_kv_args
from wanlora.tasks import Task, get_task
from wanlora.training.config import LoraSettings, TrainConfig

__all__ = ["train", "TrainState", "LoRAForward", "flow_matching_loss", "NonFiniteLossError",
           "step_generator", "plan_run"]

log = logging.getLogger("wanlora.train")


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row; the state was saved (path in the message)."""


@dataclass
class TrainState:
    """The loop's position, saved as ``train_state.json`` in every state folder.

    ``global_step`` counts optimizer steps taken; ``epoch`` is 0-based; ``batch_in_epoch`` is the
    number of this process's batches already consumed in that epoch.
    """

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    seed: int = 0
    nonfinite_in_row: int = 0
    losses: list = field(default_factory=list)  # (step, expert, loss of all processes, this process's)


class LoRAForward(nn.Module):
    """What Accelerate prepares: one LoRA network plus a forward that runs the (frozen) DiT.

    ``forward(dit, x, timestep, context, y)`` simply calls ``dit(x, timestep, context, y)``: the
    LoRA hooks inside the DiT add the adapters' deltas. Passing the DiT as an argument keeps it
    out of this module, so DDP synchronizes only the LoRA parameters and never copies the base.
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, dit, x, timestep, context, y=None, clip_fea=None):
        """``dit(x, timestep, context, y)`` (``clip_fea=`` for the Wan2.1 image models): shapes as
        :meth:`wanlora.models.dit.WanDiT.forward` (``x [B, C, F, H, W]``, ``timestep [B]`` or
        ``[B, F]`` on 0..1000); returns the velocity ``[B, C_out, F, H, W]`` float32."""
        if clip_fea is None:
            return dit(x, timestep, context, y)
        return dit(x, timestep, context, y, clip_fea=clip_fea)


def step_generator(seed: int, step: int, micro: int, process: int) -> torch.Generator:
    """The CPU generator of one micro-batch: seeded from (seed, optimizer step, micro-batch index,
    process index), so draws never depend on how the run got there (resume-exact)."""
    s = (seed * 1_000_003 + step * 10_007 + micro * 101 + process * 7 + 1) % (2**63)
    return torch.Generator().manual_seed(s)


def flow_matching_loss(model_fn, batch: dict, sampler: flow.TimestepDistribution, lo: float, hi: float,
                       generator: torch.Generator, device, weighting_scheme: str = "none",
                       conditioning: Conditioning = TextToVideo()):
    """One batch's flow-matching loss (module docstring).

    Args:
        model_fn: ``(x_t, timestep, context, y, clip_fea) -> v`` — the DiT with LoRA.
        batch: ``latents [B, C, F, h, w]``, ``context`` (list of ``[L_i, d]``), the conditioning's
            cached tensors (``y``, ``clip_fea``).
        sampler: the timestep law; ``lo``/``hi`` restrict it to the active expert's range.
        generator: CPU generator for noise, timesteps and the conditioning's draws (in that order).
        conditioning: the task's :class:`wanlora.conditioning.Conditioning` (``conditioning_for``):
            the model inputs from the batch and, for TI2V with ``first_frame_prob``, the clean
            first frame at timestep 0 masked out of the loss.
    Returns:
        ``(loss scalar float32, timesteps [B] float32 on CPU)``.
    """
    x0 = batch["latents"].to(device=device, dtype=torch.float32)
    b, _, f, h, w = x0.shape
    noise = torch.randn(x0.shape, generator=generator).to(device)
    if sampler.method == "flux_shift":
        sampler = sampler.with_latent_size(h, w)
    t = sampler.sample(b, generator, lo, hi)  # [B] on 0..1000, float32, CPU
    sigma = flow.timestep_to_sigma(t).to(device)
    x_t = flow.add_noise(x0, noise, sigma)
    target = flow.flow_target(x0, noise)
    inputs = conditioning.training_inputs(batch, x0, x_t, t.to(device), generator)
    pred = model_fn(inputs.x_t, inputs.timestep, batch["context"], inputs.y, inputs.clip_fea)
    per_sample = per_sample_mse((pred.float() - target) ** 2, inputs.loss_mask)
    weights = flow.loss_weighting(weighting_scheme, sigma)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean(), t


# ------------------------------------------------------------------------------------------
# setup helpers (each used once, in train())


def _dit_dtype(config: TrainConfig, mixed_precision: str) -> torch.dtype:
    """The frozen DiT's dtype: ``--dit_dtype``, else the autocast precision's, else float32."""
    if config.model.dit_dtype is not None:
        return config.model.dit_dtype
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


class EpochPositions(torch.utils.data.Sampler):
    """The positions of one epoch's batches: ``epoch * n + i`` for ``i < n`` (the training
    dataset's global positions, ``wanlora.dataset.TrainingDataset.__getitem__``). The sampler
    runs in the main process, so setting :attr:`epoch` also works with persistent workers."""

    def __init__(self, n: int):
        self.n, self.epoch = n, 0

    def __iter__(self):
        return iter(range(self.epoch * self.n, (self.epoch + 1) * self.n))

    def __len__(self) -> int:
        return self.n


def _build_dataloader(config: TrainConfig, task: Task, seed: int, dataset=None):
    """The batch dataset in a DataLoader of batch size 1 (its items are already batches).

    ``dataset`` defaults to ``wanlora.dataset.TrainingDataset(--dataset_config)``; any other
    must follow its contract: ``len(ds)`` batches per epoch and ``ds[epoch * len(ds) + i]`` =
    batch ``i`` of epoch ``epoch``, deterministic.
    """
    if dataset is None:
        from wanlora.dataset import TrainingDataset

        dataset = TrainingDataset(config.data.dataset_config, task=task, seed=seed)
    positions = EpochPositions(len(dataset))
    workers = config.data.max_data_loader_n_workers or 0
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=1, sampler=positions, collate_fn=_unbatch, num_workers=workers,
        persistent_workers=bool(config.data.persistent_data_loader_workers and workers > 0),
    )
    return positions, loader


def _unbatch(items):
    """collate_fn of the batch-size-1 DataLoader: the one item, already a batch."""
    return items[0]


def _load_dit_and_experts(config, task: Task, plan: ExpertPlan, device, dtype, load_dit=None):
    """One DiT module (first expert's weights, on ``device``) and the expert weight store."""
    if load_dit is None:
        from wanlora.models import load_dit
    experts = plan.experts
    first = "low_noise" if "low_noise" in experts else experts[0]
    t0 = time.perf_counter()
    dit = load_dit(plan.dit_paths[first], task=task.name, dtype=dtype, device=device, attn_mode=config.model.attn_mode)
    others = {}
    for e in experts:
        if e != first:
            other = load_dit(plan.dit_paths[e], task=task.name, dtype=dtype, device="cpu",
                             attn_mode=config.model.attn_mode)
            others[e] = {k: v.detach() for k, v in other.named_parameters()}
            del other
    weights = ExpertWeights(dit, first, others, offload=config.experts.offload_inactive_dit)
    dit.requires_grad_(False)
    dit.set_gradient_checkpointing(bool(config.model.gradient_checkpointing))
    dit.train()  # no dropout in Wan; train() for checkpointing
    log.info("DiT loaded in %.1fs (%s, %s)%s", time.perf_counter() - t0, dtype, ", ".join(
        f"{e or 'model'}: {plan.dit_paths[e]}" for e in experts),
        " — inactive expert offloaded to CPU" if others and config.experts.offload_inactive_dit else "")
    return dit, weights


def _build_network(config: TrainConfig, module, lora_key, dit, lora: LoraSettings):
    """Create one LoRA network (``module.create_network``, the kohya convention) on the DiT, hooked
    in by ``apply_to``, started from ``lora.weights`` when given."""
    net_kwargs = parse_kv_args(config.network.network_args, "--network_args")
    net_kwargs = {k: (v if isinstance(v, str) else str(v)) for k, v in net_kwargs.items()}
    weights_file, dim, alpha = lora.weights, lora.dim, lora.alpha
    if weights_file and config.network.dim_from_weights:
        network, sd = module.create_network_from_weights(1.0, weights_file, None, None, dit, **net_kwargs)
    else:
        network = module.create_network(1.0, dim, alpha, None, None, dit,
                                        neuron_dropout=config.network.network_dropout, **net_kwargs)
    network.apply_to(None, dit, apply_text_encoder=False, apply_unet=True)
    if weights_file:
        network.load_weights(weights_file)
        log.info("LoRA %s: starting from %s", lora_key or "", weights_file)
    if hasattr(network, "prepare_network"):
        network.prepare_network(SimpleNamespace(**config.flat()))  # kohya hooks read flat flags
    return network


def _check_lora_modules(network, task: Task, num_layers: int, lora_key=None, warn: bool = True) -> list[str]:
    """Check the modules a new network adapts, once before training (not at every save).

    Refuses Wan2.1-I2V-only modules for the task (:func:`wanlora.lora.metadata.check_lora_for_task`)
    and logs, when ``warn``, the coverage warnings of :func:`wanlora.lora.metadata.coverage_warnings`
    (``exclude_patterns`` / ``include_patterns`` that leave a partial LoRA, which diffusers' loader
    refuses in the default layout). A network whose state dict is not LoRA (LoHa/LoKr) is skipped.

    Returns:
        The coverage warnings (empty when every block has every layer).

    Raises:
        ValueError: modules the task does not have (named, with the exclude pattern that drops them).
    """
    from wanlora.lora.layouts import LoraFormatError, lora_modules
    from wanlora.lora.metadata import check_lora_for_task, coverage_warnings

    try:
        paths = set(lora_modules(network.state_dict()))
    except LoraFormatError:
        return []
    check_lora_for_task(paths, task.name)
    found = coverage_warnings(paths, num_layers, emit=False)
    for w in found if warn else ():
        log.warning("LoRA%s: %s", f" {lora_key}" if lora_key else "", w)
    return found


def _lora_rank_alpha(network, lora: LoraSettings) -> tuple[int, float]:
    """The rank and alpha a network really has (``--dim_from_weights`` takes them from the file);
    the flags' for a network module that does not expose ``unet_loras``."""
    mods = getattr(network, "unet_loras", None)
    if mods:
        return int(mods[0].lora_dim), float(mods[0].alpha.item())
    return lora.dim, lora.alpha


def _expert_schedule(plan: ExpertPlan, sampler: flow.TimestepDistribution, switch_every: int,
                     seed: int) -> ExpertSchedule | None:
    """Both experts: the per-step expert draw with ``P(high) = sampler.mass(boundary, 1000)``, so
    that sampling each step's timesteps inside its expert's range reproduces the law; None for
    one expert or a single model. ``flux_shift`` (the law depends on the latent size) leaves
    ``p_high`` to each step's batch (:func:`_expert_of_step`).

    Raises:
        ValueError: two LoRAs (``separate``) while ``--min_timestep``/``--max_timestep`` leave one
            expert no timesteps, so its LoRA would never train.
    """
    if plan.mode not in ("separate", "shared"):
        return None
    lo, hi = sampler.range
    starved = "high_noise" if hi <= plan.boundary else "low_noise" if lo >= plan.boundary else None
    if starved:
        msg = (f"--min_timestep/--max_timestep {lo:g}..{hi:g} lie on one side of the expert boundary "
               f"{plan.boundary:g}: the {starved} expert gets no timesteps")
        if plan.mode == "separate":
            raise ValueError(f"{msg} and its LoRA would never train; train one expert (--expert, "
                             "without --dit_high_noise) or widen the range")
        log.warning("%s; the shared LoRA trains on the other expert only", msg)
    if sampler.method == "flux_shift":
        log.info("experts: high_noise with probability = the flux_shift law's mass above %g for each "
                 "step's latent size, drawn every %d step(s)", plan.boundary, switch_every)
        return ExpertSchedule(None, switch_every, seed)
    p_high = sampler.mass(plan.boundary, 1000.0)
    log.info("experts: high_noise with probability %.4f, low_noise %.4f (%s), drawn every %d step(s)",
             p_high, 1 - p_high, sampler.describe(), switch_every)
    return ExpertSchedule(p_high, switch_every, seed)


def _expert_of_step(schedule: ExpertSchedule | None, plan: ExpertPlan, sampler: flow.TimestepDistribution,
                    step: int, batch: dict, mean_over_processes=None) -> str | None:
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
    p = sampler.with_latent_size(h, w).mass(plan.boundary, 1000.0)
    return schedule.expert_at(step, mean_over_processes(p) if mean_over_processes else p)


def _set_active(networks: dict, active) -> None:
    """Enable the LoRA ``active`` (a key of ``networks``, or None for none) and disable the others
    (``set_enabled``, or multiplier 1/0 for network modules without it)."""
    for key, net in networks.items():
        if hasattr(net, "set_enabled"):
            net.set_enabled(key == active)
        else:
            net.set_multiplier(1.0 if key == active else 0.0)


def _atomic_state_dir(accelerator, final: Path, train_state: TrainState) -> Path:
    """``accelerator.save_state`` into ``final`` via a temporary folder renamed into place."""
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process has written its RNG file before the rename
    if accelerator.is_main_process:
        write_json(tmp / "train_state.json", asdict(train_state))
        if final.exists():
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def _prune(output_dir: Path, pattern: str, keep) -> None:
    """Remove saves (files or state folders) whose name matches ``pattern`` (one int group) and
    whose number fails ``keep(number)``."""
    rx = re.compile(pattern)
    for p in sorted(output_dir.iterdir()):
        m = rx.fullmatch(p.name)
        if m and not keep(int(m.group(1))):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            log.info("removed old save %s", p.name)


def _check_before_loading(config):
    """Check the flags that are otherwise used only after the DiT is loaded (minutes at 14B), so a
    typo fails at once: ``--attn_mode`` (installed, and with a backward pass), import ``--network_module`` (returned), resolve ``--optimizer_type`` (and its
    package), ``--lr_scheduler``, ``--weighting_scheme``, parse ``--network_args`` / ``--optimizer_args``, and for
    ``--sample_prompts`` parse the prompt file and require ``--vae`` and ``--t5`` files.

    Raises:
        ValueError / ImportError / FileNotFoundError: the message names the flag and the fix.
    """
    from wanlora.models.attention import check_attn_mode
    from wanlora.networks import resolve_network_module

    check_attn_mode(config.model.attn_mode, training=True)  # sage has no backward: LoRA on q/k/v would not learn
    module = resolve_network_module(config.network.network_module)
    check_optimizer_type(config.optimization.optimizer_type)
    check_lr_scheduler(config.optimization.lr_scheduler)
    parse_kv_args(config.network.network_args, "--network_args")
    parse_kv_args(config.optimization.optimizer_args)
    flow.loss_weighting(config.timesteps.weighting_scheme, torch.zeros(1))  # an unknown scheme raises here
    if config.sampling.sample_prompts:
        if not (config.model_files.vae and config.model_files.t5):
            raise ValueError("--sample_prompts needs --vae and --t5 (and --t5_tokenizer) to make samples")
        for flag, path in (("--vae", config.model_files.vae), ("--t5", config.model_files.t5)):
            if not Path(path).exists():
                raise FileNotFoundError(f"{flag} {path}: no such file (needed by --sample_prompts)")
        if isinstance(config.sampling.sample_prompts, (str, os.PathLike)):
            from wanlora.inference.prompts import read_prompt_file

            read_prompt_file(config.sampling.sample_prompts)
    return module


# ------------------------------------------------------------------------------------------
# the loop


def plan_run(config: TrainConfig) -> tuple[Task, ExpertPlan, flow.TimestepDistribution, Conditioning]:
    """The task, the expert plan, the timestep distribution and the conditioning of a run, checked
    (no files read).

    Raises:
        ValueError: expert flags that do not fit the task (:func:`plan_experts`), a
            ``--ti2v_first_frame`` the task does not take (:func:`wanlora.conditioning.conditioning_for`),
            a bad timestep law.
    """
    task = get_task(config.model_files.task)
    plan = plan_experts(task, config.model_files.dit, config.model_files.dit_high_noise, config.experts.expert,
                        config.experts.expert_lora, config.experts.timestep_boundary)
    conditioning = conditioning_for(task, config.data.ti2v_first_frame)
    return task, plan, flow.TimestepDistribution.from_config(config.timesteps), conditioning


def train(config: TrainConfig, *, dataset=None, load_dit=None, sample_fn=None) -> TrainState:
    """Train as ``config`` says; returns the final state.

    Args:
        config: the run's settings (:func:`wanlora.commands.train.parse_config`).
        dataset: a batch dataset to use instead of ``--dataset_config`` (tests, benchmarks),
            with the contract of :func:`_build_dataloader`.
        load_dit: a replacement for :func:`wanlora.models.load_dit` (same signature).
        sample_fn: ``sample_fn(step, epoch, networks)`` replacing the samples of
            ``--sample_prompts`` (default: :func:`_make_sampler`).
    Raises:
        NonFiniteLossError: ``--max_nonfinite_steps`` non-finite losses in a row (state saved).
        ValueError: inconsistent flags (named).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, broadcast_object_list, set_seed

    task, plan, sampler, conditioning = plan_run(config)
    module = _check_before_loading(config)

    # ---- accelerator, seed, logging
    log_with = "tensorboard" if config.tracking.logging_dir and config.tracking.log_with == "tensorboard" else None
    # torchrun / mpirun without GPUs: Accelerate runs several CPU processes (gloo) only when told
    # cpu=True; `accelerate launch --cpu` says so through ACCELERATE_USE_CPU.
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    # module dropout skips whole adapters on a step, which DDP must be told about
    ddp = DistributedDataParallelKwargs(find_unused_parameters=any(
        a.startswith("module_dropout") for a in config.network.network_args or []))
    accelerator = Accelerator(
        cpu=multi_cpu,
        kwargs_handlers=[ddp],
        gradient_accumulation_steps=config.optimization.gradient_accumulation_steps,
        mixed_precision=config.launch.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(config.saving.output_dir),
                                            logging_dir=str(config.tracking.logging_dir) if config.tracking.logging_dir else None),
    )
    saved = None
    if config.saving.resume:
        state_file = Path(config.saving.resume) / "train_state.json"
        if not state_file.is_file():
            raise ValueError(f"--resume {config.saving.resume}: no train_state.json there; give a folder written "
                             "by --save_state (OUTPUT_DIR/NAME-stepXXXXXXXX-state)")
        saved = json.loads(state_file.read_text())
    seed = saved["seed"] if saved is not None else config.optimization.seed
    if seed is None:  # one seed for all processes: they must draw the same experts
        seed = broadcast_object_list([random.randint(0, 2**31 - 1)])[0]
        log.info("no --seed given; using %d", seed)
    set_seed(seed)
    device, main = accelerator.device, accelerator.is_main_process
    if not main:  # one process speaks; the others only warn
        logging.getLogger("wanlora").setLevel(logging.WARNING)
    layout = _parallel_layout(config, plan, device)
    rank = layout.dp_rank  # the data and random streams: one per sequence group
    log.info("layout: %s", layout.describe())
    output_dir = Path(config.saving.output_dir)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
    for note in plan.notes:
        log.info(note)
    for warning in plan.warnings:
        log.warning(warning)
    log.info("task %s, %s: %s", task.name, plan.mode, ", ".join(
        f"{e or 'model'} t in [{lo:g}, {hi:g})" for e, (lo, hi) in plan.ranges.items()))
    schedule = _expert_schedule(plan, sampler, config.experts.expert_switch_every, seed)  # which expert each step

    def mean_p(p: float) -> float:  # flux_shift: processes with other bucket sizes agree on P(high)
        return accelerator.reduce(torch.tensor([p], dtype=torch.float64, device=device), "mean").item()

    # ---- data
    positions, loader = _build_dataloader(config, task, seed, dataset)
    if layout.sp_size > 1:  # a sequence group shares its batches: shard over the data-parallel groups
        from accelerate.data_loader import prepare_data_loader

        loader = prepare_data_loader(loader, device, num_processes=layout.dp_size, process_index=layout.dp_rank,
                                     put_on_device=True)
    else:
        loader = accelerator.prepare(loader)
    accum = config.optimization.gradient_accumulation_steps
    steps_per_epoch = max(math.ceil(len(loader) / accum), 1)
    max_steps = config.optimization.max_train_steps
    if config.optimization.max_train_epochs:
        max_steps = config.optimization.max_train_epochs * steps_per_epoch
    log.info("%d batches per epoch per process, %d optimizer steps per epoch, %d steps (%d epochs)",
             len(loader), steps_per_epoch, max_steps, math.ceil(max_steps / steps_per_epoch))

    # ---- model and experts
    dit_dtype = _dit_dtype(config, accelerator.mixed_precision)
    # under FSDP each rank loads on the CPU and keeps only its shards on the device
    dit, expert_weights = _load_dit_and_experts(config, task, plan, "cpu" if layout.fsdp else device, dit_dtype,
                                                load_dit)
    if layout.world_size > 1:
        from wanlora.models.distributed import distribute_dit

        distribute_dit(dit, layout)

    # ---- LoRA networks, optimizers, schedulers (one set per trained LoRA)
    networks, wrappers, optimizers, schedulers = {}, {}, {}, {}
    for key in plan.loras:
        settings = config.lora(key, alone=len(plan.loras) == 1)
        net = _build_network(config, module, key, dit, settings).to(device)
        _check_lora_modules(net, task, len(dit.blocks), key, warn=main)
        lr = settings.learning_rate
        groups, _ = net.prepare_optimizer_params(unet_lr=lr)
        opt = build_optimizer(config.optimization.optimizer_type, groups, lr, config.optimization.optimizer_args)
        sched = build_lr_scheduler(config.optimization.lr_scheduler, opt, config.optimization.lr_warmup_steps, max_steps,
                                   config.optimization.lr_scheduler_num_cycles, config.optimization.lr_scheduler_power)
        wrapper, opt = accelerator.prepare(LoRAForward(net), opt)
        accelerator.register_for_checkpointing(sched)
        networks[key], wrappers[key], optimizers[key], schedulers[key] = net, wrapper, opt, sched
    trainable = {key: [p for p in net.parameters() if p.requires_grad] for key, net in networks.items()}
    if config.compile.compile:  # after the LoRA hooks are in: they are traced into the block graphs
        dit.compile_blocks(**config.compile.kwargs())

    # ---- resume
    state = TrainState(seed=seed)
    if saved is not None:
        accelerator.load_state(str(config.saving.resume))
        state = TrainState(**saved)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", config.saving.resume, state.global_step,
                 state.epoch + 1, state.batch_in_epoch)

    if log_with:
        accelerator.init_trackers(config.tracking.log_prefix + config.tracking.log_tracker_name)

    # ---- saving
    save_dtype = config.saving.save_precision
    stem = config.saving.output_name

    def lora_files(tag: str) -> dict:
        return {key: output_dir / f"{tag}{plan.file_suffix(key)}.safetensors" for key in plan.loras}

    run_metadata = _run_metadata(config, plan, max_steps, accelerator.mixed_precision, seed)
    base_hashes: dict = {}

    def save_loras(tag: str) -> None:
        accelerator.wait_for_everyone()
        if main:
            from wanlora.lora.metadata import build_lora_metadata, checkpoint_quick_hash

            files = lora_files(tag)
            for key, file in files.items():
                net = accelerator.unwrap_model(wrappers[key]).network
                rank_, alpha_ = _lora_rank_alpha(net, config.lora(key, alone=len(plan.loras) == 1))
                dit_path = plan.dit_paths[plan.loras[key][0]]
                if dit_path not in base_hashes:
                    base_hashes[dit_path] = _quick_hash(checkpoint_quick_hash, dit_path)
                other = [f.name for k, f in files.items() if k != key]
                md = build_lora_metadata(
                    task, network_dim=rank_, network_alpha=alpha_, expert=plan.metadata_expert(key),
                    network_module=config.network.network_module,
                    network_args=parse_kv_args(config.network.network_args, "--network_args"),
                    title=stem, base_model=dit_path, base_model_hash=base_hashes[dit_path],
                    timestep_range=_lora_timestep_range(plan, sampler, key),
                    pair_file=other[0] if other else None,
                    extra={**run_metadata, "ss_learning_rate": optimizers[key].param_groups[0]["initial_lr"],
                           "ss_steps": state.global_step, "ss_epoch": state.epoch},
                )
                net.save_weights(str(file), save_dtype, md)
                log.info("saved %s", file)
        accelerator.wait_for_everyone()

    def save_state(tag: str) -> Path:
        return _atomic_state_dir(accelerator, output_dir / f"{tag}-state", state)

    def save_and_prune(tag: str, number: int, numbered: str, keep: int | None, keep_state: int | None) -> None:
        """Save the LoRAs (and with --save_state the state) as ``tag``; then remove the saves
        named by the regex ``numbered`` (one int group) whose number is ``<= number - keep``."""
        save_loras(tag)
        if config.saving.save_state:
            save_state(tag)
        if main and keep:
            _prune(output_dir, numbered + r"(_high_noise|_low_noise)?\.safetensors", lambda k: k > number - keep)
        if main and keep_state:
            _prune(output_dir, numbered + "-state", lambda k: k > number - keep_state)

    def after_step_saves() -> None:
        s = state.global_step
        if config.saving.save_every_n_steps and s % config.saving.save_every_n_steps == 0 and s < max_steps:
            save_and_prune(f"{stem}-step{s:08d}", s, rf"{re.escape(stem)}-step(\d+)", config.saving.save_last_n_steps,
                           config.saving.save_last_n_steps_state or config.saving.save_last_n_steps)

    def after_epoch_saves(epoch_done: int) -> None:
        every = config.saving.save_every_n_epochs
        if every and epoch_done % every == 0 and state.global_step < max_steps:
            save_and_prune(f"{stem}-{epoch_done:06d}", epoch_done, rf"{re.escape(stem)}-(\d{{6}})",
                           (config.saving.save_last_n_epochs or 0) * every,
                           (config.saving.save_last_n_epochs_state or config.saving.save_last_n_epochs or 0) * every)

    # ---- samples during training
    if sample_fn is None:
        sample_fn = _make_sampler(config, task, plan, dit, expert_weights, accelerator)

    def maybe_sample(step: int, epoch: int | None, first: bool = False) -> None:
        if sample_fn is None:
            return
        due = first or (epoch is None and config.sampling.sample_every_n_steps and step % config.sampling.sample_every_n_steps == 0) \
            or (epoch is not None and config.sampling.sample_every_n_epochs and epoch % config.sampling.sample_every_n_epochs == 0)
        if due:
            sample_fn(step, epoch, networks)
            _set_active(networks, None)  # the loop re-activates its expert on the next step

    if config.sampling.sample_at_first and state.global_step == 0:
        maybe_sample(0, None, first=True)

    # ---- the loop
    from tqdm.auto import tqdm

    progress = tqdm(total=max_steps, initial=state.global_step, disable=not main, desc="steps")
    window_open = False
    active_lora = expert = None
    window_losses, window_local, window_t = [], [], []
    window_bad = False
    micro = 0
    t_last = time.perf_counter()
    while state.global_step < max_steps:
        positions.epoch = state.epoch
        epoch_loader = loader
        if state.batch_in_epoch:
            epoch_loader = accelerator.skip_first_batches(loader, state.batch_in_epoch)
        for batch in epoch_loader:
            # -- a new optimizer step: choose its expert, swap weights, seed dropout
            if not window_open:
                expert = _expert_of_step(schedule, plan, sampler, state.global_step, batch, mean_p)
                active_lora = plan.lora_for(expert)
                if expert_weights.activate(expert):
                    log.debug("step %d: swapped in the %s expert", state.global_step, expert)
                _set_active(networks, active_lora)
                torch.manual_seed(step_generator(seed, state.global_step, 0, rank).initial_seed())
                window_open, window_losses, window_local, window_t, window_bad, micro = True, [], [], [], False, 0

            wrapper, opt = wrappers[active_lora], optimizers[active_lora]
            lo, hi = plan.ranges[expert]
            with accelerator.accumulate(wrapper):
                g = step_generator(seed, state.global_step, micro, rank)
                loss, t = flow_matching_loss(
                    lambda x, ts, c, y, clip: wrapper(dit, x, ts, c, y, clip), batch, sampler, lo, hi, g, device,
                    config.timesteps.weighting_scheme, conditioning)
                loss_all = accelerator.reduce(loss.detach().clone(), reduction="mean")
                finite = bool(torch.isfinite(loss_all))
                window_bad |= not finite
                accelerator.backward(loss if finite else torch.nan_to_num(loss) * 0.0)
                grad_norm = None
                if accelerator.sync_gradients and not window_bad:
                    params = trainable[active_lora]
                    if config.optimization.max_grad_norm:
                        grad_norm = accelerator.clip_grad_norm_(params, config.optimization.max_grad_norm)
                    else:
                        grad_norm = torch.linalg.vector_norm(torch.stack(
                            [p.grad.detach().float().norm() for p in params if p.grad is not None]))
                    opt.step()
                opt.zero_grad(set_to_none=True)
            micro += 1
            state.batch_in_epoch += 1
            window_losses.append(loss_all.item())
            window_local.append(loss.item())
            window_t.append(t)

            if not accelerator.sync_gradients:
                continue
            # -- the optimizer step is complete
            window_open = False
            if window_bad:
                state.nonfinite_in_row += 1
                log.warning("step %d: non-finite loss (%s expert) — step skipped (%d in a row)",
                            state.global_step + 1, expert, state.nonfinite_in_row)
                if state.nonfinite_in_row >= config.optimization.max_nonfinite_steps:
                    where = save_state(f"{stem}-nonfinite")
                    raise NonFiniteLossError(
                        f"{state.nonfinite_in_row} non-finite losses in a row at step {state.global_step}; "
                        f"state saved to {where}. Lower --learning_rate, use --max_grad_norm 1.0 or "
                        f"--mixed_precision bf16, then --resume {where}")
                continue
            state.nonfinite_in_row = 0
            with warnings.catch_warnings():  # the inactive expert's optimizer did not step, by design
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                for sched in schedulers.values():
                    sched.step()
            state.global_step += 1
            step_loss = sum(window_losses) / len(window_losses)
            state.losses.append((state.global_step, expert, step_loss, sum(window_local) / len(window_local)))
            now = time.perf_counter()
            it_s = 1.0 / max(now - t_last, 1e-9)
            t_last = now
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", expert=expert or "-", its=f"{it_s:.2f}")
            if log_with:
                ts = torch.cat(window_t)
                logs = {"loss/average": step_loss, f"loss/{expert or 'model'}": step_loss,
                        "timestep/mean": ts.mean().item(), "timestep/min": ts.min().item(),
                        "timestep/max": ts.max().item(), "it_per_s": it_s}
                if grad_norm is not None:
                    logs["grad_norm"] = float(grad_norm)
                for key, sched in schedulers.items():
                    logs[f"lr/{key or 'lora'}"] = sched.get_last_lr()[0]
                accelerator.log(logs, step=state.global_step)

            after_step_saves()
            maybe_sample(state.global_step, None)
            if state.global_step >= max_steps:
                if state.batch_in_epoch == len(loader):  # it was the epoch's last batch
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                    maybe_sample(state.global_step, state.epoch)  # (its save is the final save)
                break
        else:  # the epoch's batches are used up (accelerate stepped a partial accumulation window)
            state.epoch += 1
            state.batch_in_epoch = 0
            after_epoch_saves(state.epoch)
            maybe_sample(state.global_step, state.epoch)
    progress.close()

    # ---- final save
    save_loras(stem)
    if config.saving.save_state or config.saving.save_state_on_train_end:
        save_state(stem)
    if log_with:
        accelerator.end_training()
    if main:
        log.info("done: %d steps; LoRA %s", state.global_step,
                 ", ".join(str(f) for f in lora_files(stem).values()))
    return state


def _run_metadata(config: TrainConfig, plan: ExpertPlan, max_steps: int, mixed_precision: str, seed: int) -> dict:
    """The training options every saved LoRA records (musubi's ``ss_*`` names,
    ``reference/lora_formats.md`` §2, plus ``wan.expert_lora``), fixed for the run; the caller adds
    the per-save ``ss_steps``, ``ss_epoch`` and per-LoRA ``ss_learning_rate``."""
    return {
        "ss_output_name": config.saving.output_name, "ss_optimizer": config.optimization.optimizer_type,
        "ss_lr_scheduler": config.optimization.lr_scheduler, "ss_lr_warmup_steps": config.optimization.lr_warmup_steps,
        "ss_max_train_steps": max_steps, "ss_gradient_accumulation_steps": config.optimization.gradient_accumulation_steps,
        "ss_gradient_checkpointing": bool(config.model.gradient_checkpointing),
        "ss_max_grad_norm": config.optimization.max_grad_norm, "ss_mixed_precision": mixed_precision,
        "ss_seed": seed, "ss_timestep_sampling": config.timesteps.timestep_sampling,
        "ss_sigmoid_scale": config.timesteps.sigmoid_scale, "ss_discrete_flow_shift": config.timesteps.discrete_flow_shift,
        "ss_weighting_scheme": config.timesteps.weighting_scheme, "ss_logit_mean": config.timesteps.logit_mean,
        "ss_logit_std": config.timesteps.logit_std, "ss_network_dropout": config.network.network_dropout,
        "ss_training_comment": config.saving.training_comment or "",
        "wan.expert_lora": plan.mode,
    }


def _lora_timestep_range(plan: ExpertPlan, sampler: flow.TimestepDistribution, lora_key) -> tuple[float, float]:
    """The timesteps (0..1000) a LoRA trained on: its experts' ranges cut to ``--min/max_timestep``."""
    served = plan.loras[lora_key]
    a, b = sampler.range
    return max(min(plan.ranges[e][0] for e in served), a), min(max(plan.ranges[e][1] for e in served), b)


def _quick_hash(fn, path) -> str:
    try:
        return fn(path)
    except (OSError, ValueError) as e:  # a test double path, say
        log.debug("no base-model hash for %s: %s", path, e)
        return ""


def _parallel_layout(config: TrainConfig, plan: ExpertPlan, device):
    """The run's :class:`wanlora.models.distributed.ParallelLayout` from ``--ulysses_size`` and
    ``--dit_fsdp`` (every process calls it once, after the process group exists).

    Raises:
        ValueError: ``--ulysses_size`` not dividing the process count; ``--dit_fsdp`` with both
            A14B experts in one run (the expert swap rebinds whole weights, FSDP2 owns sharded
            ones) or with ``--sample_prompts`` (samples run on the main process alone).
    """
    from wanlora.models.distributed import parallel_layout

    launch = config.launch
    if launch.dit_fsdp and len(plan.dit_paths) > 1:
        raise ValueError("--dit_fsdp trains one A14B expert per run: give --dit (low noise) alone, then the "
                         "high-noise expert in a second run with --dit_high_noise alone")
    if launch.dit_fsdp and config.sampling.sample_prompts:
        raise ValueError("--dit_fsdp makes no samples during training (the sharded DiT runs on every process); drop "
                         "--sample_prompts and render the saved LoRA with `torchrun ... -m wanlora.commands.generate "
                         "--dit_fsdp`")
    return parallel_layout(launch.ulysses_size, launch.dit_fsdp, device)


def _make_sampler(config, task, plan, dit, expert_weights, accelerator):
    """The ``--sample_prompts`` hook ``fn(step, epoch, networks)``, or None without prompts.

    Samples are made on the main process by :class:`wanlora.training.validation.ValidationSampler`
    (videos in ``OUTPUT_DIR/sample/``, also logged to TensorBoard); the other processes wait.
    Each expert is shown to the pipeline as an :class:`~wanlora.training.experts.ExpertView` of the one
    DiT module, which swaps in that expert's weights and LoRA when called.
    """
    if not config.sampling.sample_prompts:
        return None
    if task.has_experts and len(plan.dit_paths) == 1:
        log.warning("samples: only the %s expert is loaded, so it denoises every step of the samples; "
                    "they show the LoRA, not the two-expert result", plan.experts[0])
    sampler = None
    if accelerator.is_main_process:
        from wanlora.training.validation import ValidationSampler

        sampler = ValidationSampler(task, config.sampling.sample_prompts, vae_path=config.model_files.vae, t5_path=config.model_files.t5,
                                  t5_tokenizer=config.model_files.t5_tokenizer, clip_path=config.model_files.clip,
                                  output_dir=config.saving.output_dir,
                                  output_name=config.saving.output_name, device=accelerator.device)

    def sample(step, epoch, networks):
        if sampler is not None:
            def activate(expert):
                expert_weights.activate(expert)
                _set_active(networks, plan.lora_for(expert))

            if task.has_experts:  # an expert this run does not have is stood in for by the one it has
                dits = {e: ExpertView(dit, e if e in plan.dit_paths else plan.experts[0], activate)
                        for e in task.experts}
            else:
                dits = ExpertView(dit, None, activate)
            sp = dit.sequence_parallel  # the main process samples alone: the whole sequence on it
            dit.set_sequence_parallel(None)
            try:
                samples = sampler.sample(step, dits, epoch=epoch, networks=list(networks.values()))
            finally:
                dit.set_sequence_parallel(sp)
            if importlib.util.find_spec("moviepy") is not None:  # TensorBoard's add_video needs it
                for tracker in accelerator.trackers:
                    writer = getattr(tracker, "writer", None)
                    for smp in samples if hasattr(writer, "add_video") else ():
                        writer.add_video(f"sample/{smp.index:02d}", smp.video_tensor(), step, fps=smp.fps)
        accelerator.wait_for_everyone()

    return sample
