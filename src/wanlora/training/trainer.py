"""The training loop: LoRA on a Wan DiT with flow matching, on Accelerate.

Read :func:`train` top to bottom: the run's plan and checks, the accelerator and seed, data, the
DiT and its experts, the LoRA bundles (:mod:`wanlora.training.lora_bundle`), the checkpointer
(:mod:`wanlora.training.checkpoint`); then the loop — per optimizer step pick the expert, per
micro-batch draw timesteps and noise, predict the velocity, regress ``noise - x0``, step; then log,
save, sample — and the final save.

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
* Randomness is derived from ``(seed, step, micro-batch, process)`` at each use
  (:mod:`wanlora.training.seeds`), so a resumed run draws the same noise, timesteps, dropout and
  experts as an uninterrupted one; the global random state is only forked around a micro-batch for
  the network's own dropout, never reseeded for the run.
* Multi-process (``accelerate launch --multi_gpu`` or ``torchrun``, gloo on CPU): each LoRA is
  wrapped in a small module whose forward calls the DiT, and that wrapper is what Accelerate
  prepares (DDP over the LoRA parameters only; the frozen DiT is never wrapped). One process
  speaks: the others log warnings only, for the duration of :func:`train`.
* ``--ulysses_size N`` / ``--dit_fsdp`` (:mod:`wanlora.models.distributed`, ``docs/distributed.md``):
  the processes form ``dp × N`` ranks; a sequence group of N ranks gets the same batches and the
  same random draws (its data-parallel index takes the process index's place) and splits each
  sample's tokens; FSDP2 shards the frozen DiT over all ranks. The LoRAs stay replicated under DDP:
  the gathered output's backward sums the group's gradients, so DDP's mean over all ranks is the
  data-parallel mean, exactly as without sequence parallelism.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import random
import time
import warnings
from functools import partial
from pathlib import Path

import torch

from wanlora.conditioning import Conditioning, TextToVideo, conditioning_for, per_sample_mse
from wanlora.tasks import Task, get_task
from wanlora.training import flow, seeds
from wanlora.training.checkpoint import Checkpointer, TrainState, read_train_state, run_layout
from wanlora.training.config import TrainConfig
from wanlora.training.ema import LoraEMA
from wanlora.training.experts import ExpertPlan, ExpertWeights, expert_of_step, expert_schedule, plan_experts
from wanlora.training.lora_bundle import LoraBundle, build_lora_bundles, set_active
from wanlora.training.optim import check_lr_scheduler, check_optimizer_type, parse_kv_args
from wanlora.training.step_log import NonFiniteLossError, StepLog
from wanlora.transfer import to_device
from wanlora.training.validation_loss import build_validation_loss

__all__ = ["train", "plan_run", "flow_matching_loss", "NonFiniteLossError", "TrainState"]

log = logging.getLogger("wanlora.train")


def flow_matching_loss(model_fn, batch: dict, sampler: flow.TimestepDistribution, lo: float, hi: float,
                       generator: torch.Generator, device, weighting_scheme: str = "none",
                       conditioning: Conditioning = TextToVideo()):
    """One batch's flow-matching loss (module docstring).

    Args:
        model_fn: ``(x_t, timestep, context, y, clip_fea) -> v`` — the DiT with LoRA.
        batch: ``latents [B, C, F, h, w]``, ``context`` (list of ``[L_i, d]``), the conditioning's
            cached tensors (``y``, ``clip_fea``), and ``mask`` ``[B, 1, F, h, w]`` loss weights when
            the entry has ``mask_directory``: the loss is then the weighted mean ``Σ w·err / Σ w``
            per sample (:func:`wanlora.conditioning.per_sample_mse`).
        sampler: the timestep law; ``lo``/``hi`` restrict it to the active expert's range.
        generator: CPU generator for noise, timesteps and the conditioning's draws (in that order);
            the draws go to ``device`` by non-blocking copies (:func:`wanlora.transfer.to_device`).
        conditioning: the task's :class:`wanlora.conditioning.Conditioning` (``conditioning_for``):
            the model inputs from the batch and, for TI2V with ``first_frame_prob``, the clean
            first frame at timestep 0 masked out of the loss.
    Returns:
        ``(loss scalar float32, timesteps [B] float32 on CPU)``.
    """
    x0 = batch["latents"].to(device=device, dtype=torch.float32)
    b, _, f, h, w = x0.shape
    noise = to_device(torch.randn(x0.shape, generator=generator), device)
    if sampler.method == "flux_shift":
        sampler = sampler.with_latent_size(h, w)
    t = sampler.sample(b, generator, lo, hi)  # [B] on 0..1000, float32, CPU
    sigma = to_device(flow.timestep_to_sigma(t), device)
    x_t = flow.add_noise(x0, noise, sigma)
    target = flow.flow_target(x0, noise)
    inputs = conditioning.training_inputs(batch, x0, x_t, to_device(t, device), generator)
    pred = model_fn(inputs.x_t, inputs.timestep, batch["context"], inputs.y, inputs.clip_fea)
    loss_mask = inputs.loss_mask
    if batch.get("mask") is not None:  # the dataset's loss masks [B, 1, F, h, w] (mask_directory)
        weights = to_device(batch["mask"], device, torch.float32)
        loss_mask = weights if loss_mask is None else loss_mask * weights
    per_sample = per_sample_mse((pred.float() - target) ** 2, loss_mask)
    weights = flow.loss_weighting(weighting_scheme, sigma)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean(), t


# ------------------------------------------------------------------------------------------
# setup (each used once, in train())


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
    conditioning = conditioning_for(task, config.data.ti2v_first_frame, config.data.i2v_mask_first_frame)
    return task, plan, flow.TimestepDistribution.from_config(config.timesteps), conditioning


def check_before_loading(config: TrainConfig):
    """Check the flags that are otherwise used only after the DiT is loaded (minutes at 14B), so a
    typo fails at once: ``--attn_mode`` (installed, and with a backward pass), import ``--network_module``
    (returned), resolve ``--optimizer_type`` (and its package), ``--lr_scheduler``, ``--weighting_scheme``,
    parse ``--network_args`` (LyCORIS: a supported ``algo``) / ``--optimizer_args``, and for ``--sample_prompts`` parse the prompt file
    and require ``--vae`` and ``--t5`` files.

    Raises:
        ValueError / ImportError / FileNotFoundError: the message names the flag and the fix.
    """
    from wanlora.models.attention import check_attn_mode
    from wanlora.networks import check_network_args, resolve_network_module

    check_attn_mode(config.model.attn_mode, training=True)  # sage has no backward: LoRA on q/k/v would not learn
    module = resolve_network_module(config.network.network_module)
    check_optimizer_type(config.optimization.optimizer_type)
    check_lr_scheduler(config.optimization.lr_scheduler)
    check_network_args(config.network.network_module, parse_kv_args(config.network.network_args, "--network_args"))
    parse_kv_args(config.optimization.optimizer_args)
    flow.loss_weighting(config.timesteps.weighting_scheme, torch.zeros(1))  # an unknown scheme raises here
    files, prompts = config.model_files, config.sampling.sample_prompts
    if prompts:
        if not (files.vae and files.t5):
            raise ValueError("--sample_prompts needs --vae and --t5 (and --t5_tokenizer) to make samples")
        for flag, path in (("--vae", files.vae), ("--t5", files.t5)):
            if not Path(path).exists():
                raise FileNotFoundError(f"{flag} {path}: no such file (needed by --sample_prompts)")
        if isinstance(prompts, (str, os.PathLike)):
            from wanlora.inference.prompts import read_prompt_file

            read_prompt_file(prompts)
    return module


def make_accelerator(config: TrainConfig):
    """The run's ``accelerate.Accelerator``: accumulation, mixed precision, TensorBoard tracking,
    non-blocking batch copies to the device.

    Under ``torchrun`` / ``mpirun`` without GPUs it runs the processes on the CPU (gloo), which
    Accelerate does only when told ``cpu=True`` (``accelerate launch --cpu`` says so itself). DDP
    is told about unused parameters when ``module_dropout`` may skip whole adapters on a step.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration

    t = config.tracking
    log_with = "tensorboard" if t.logging_dir and t.log_with == "tensorboard" else None
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    ddp = DistributedDataParallelKwargs(find_unused_parameters=any(
        a.startswith("module_dropout") for a in config.network.network_args))
    return Accelerator(
        cpu=multi_cpu,
        kwargs_handlers=[ddp],
        dataloader_config=DataLoaderConfiguration(non_blocking=True),  # with pinned batches: copies do not wait
        gradient_accumulation_steps=config.optimization.gradient_accumulation_steps,
        mixed_precision=config.launch.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(config.saving.output_dir),
                                            logging_dir=str(t.logging_dir) if t.logging_dir else None),
    )


def parallel_layout(config: TrainConfig, plan: ExpertPlan, device):
    """The run's :class:`wanlora.models.distributed.ParallelLayout` from ``--ulysses_size`` and
    ``--dit_fsdp`` (every process calls it once, after the process group exists).

    Raises:
        ValueError: ``--ulysses_size`` not dividing the process count; ``--dit_fsdp`` with both
            A14B experts in one run (the expert swap rebinds whole weights, FSDP2 owns sharded
            ones) or with ``--sample_prompts`` (samples run on the main process alone).
    """
    from wanlora.models.distributed import parallel_layout as layout_of

    launch = config.launch
    if launch.dit_fsdp and config.model.blocks_to_swap:
        raise ValueError("--blocks_to_swap and --dit_fsdp do not combine: FSDP already shards the DiT over the "
                         "processes; drop one of them")
    if launch.dit_fsdp and len(plan.dit_paths) > 1:
        raise ValueError("--dit_fsdp trains one A14B expert per run: give --dit (low noise) alone, then the "
                         "high-noise expert in a second run with --dit_high_noise alone")
    if launch.dit_fsdp and config.sampling.sample_prompts:
        raise ValueError("--dit_fsdp makes no samples during training (the sharded DiT runs on every process); drop "
                         "--sample_prompts and render the saved LoRA with `torchrun ... -m wanlora.commands.generate "
                         "--dit_fsdp`")
    return layout_of(launch.ulysses_size, launch.dit_fsdp, device)


def run_seed(config: TrainConfig, resume: TrainState | None) -> int:
    """The run's seed: the resumed run's, else ``--seed``, else a random one drawn by the main
    process and sent to the others (every process must draw the same experts)."""
    if resume is not None:
        return resume.seed
    if config.optimization.seed is not None:
        return config.optimization.seed
    from accelerate.utils import broadcast_object_list

    seed = broadcast_object_list([random.randint(0, 2**31 - 1)])[0]
    log.info("no --seed given; using %d", seed)
    return seed


def run_length(config: TrainConfig, batches_per_epoch: int) -> int:
    """Optimizer steps of the run: ``--max_train_epochs`` epochs when given, else ``--max_train_steps``."""
    o = config.optimization
    steps_per_epoch = max(math.ceil(batches_per_epoch / o.gradient_accumulation_steps), 1)
    max_steps = o.max_train_epochs * steps_per_epoch if o.max_train_epochs else o.max_train_steps
    log.info("%d batches per epoch per process, %d optimizer steps per epoch, %d steps (%d epochs)",
             batches_per_epoch, steps_per_epoch, max_steps, math.ceil(max_steps / steps_per_epoch))
    return max_steps


def dit_dtype(config: TrainConfig, mixed_precision: str) -> torch.dtype:
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


def build_dataloader(config: TrainConfig, task: Task, seed: int, dataset=None, pin_memory: bool = False):
    """The batch dataset in a DataLoader of batch size 1 (its items are already batches);
    returns ``(positions, loader)`` (set ``positions.epoch`` before each epoch). ``pin_memory``
    (for a CUDA device): batches are put in pinned memory, so their copy to the device does not wait.

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
        persistent_workers=bool(config.data.persistent_data_loader_workers and workers > 0), pin_memory=pin_memory,
    )
    return positions, loader


def prepare_dataloader(config: TrainConfig, task: Task, seed: int, dataset, accelerator, layout):
    """:func:`build_dataloader` (pinned on CUDA), prepared for the run's processes: sharded over the
    data-parallel groups, batches moved to the device without blocking (Accelerate's loader
    fetches batch n+1 while batch n is used). Returns ``(positions, loader)``."""
    positions, loader = build_dataloader(config, task, seed, dataset, pin_memory=accelerator.device.type == "cuda")
    if layout.sp_size > 1:  # a sequence group shares its batches: shard over the data-parallel groups
        from accelerate.data_loader import prepare_data_loader

        return positions, prepare_data_loader(loader, accelerator.device, num_processes=layout.dp_size,
                                              process_index=layout.dp_rank, put_on_device=True, non_blocking=True)
    return positions, accelerator.prepare(loader)


def start_tracking_and_samples(config: TrainConfig, task: Task, plan: ExpertPlan, dit, experts, bundles, accelerator,
                               sample_fn=None, ema: LoraEMA | None = None):
    """Start the TensorBoard tracker (``--logging_dir``) and build the ``--sample_prompts`` hook
    unless ``sample_fn`` replaces it; with ``--sample_with_ema`` it samples with the ``ema``
    weights. Returns ``(tracking, sample_fn)``."""
    tracking = config.tracking.logging_dir is not None and config.tracking.log_with == "tensorboard"
    if tracking:
        accelerator.init_trackers(config.tracking.log_prefix + config.tracking.log_tracker_name)
    if sample_fn is None and config.sampling.sample_prompts:
        from wanlora.training.validation import SampleHook

        sample_fn = SampleHook(config, task, plan, dit, experts, bundles, accelerator)
    if sample_fn is not None and ema is not None and config.ema.sample_with_ema:
        sample_fn = ema.sampling_with_ema(sample_fn)
    return tracking, sample_fn


def _unbatch(items):
    """collate_fn of the batch-size-1 DataLoader: the one item, already a batch."""
    return items[0]


def load_dit_and_experts(config: TrainConfig, task: Task, plan: ExpertPlan, device, dtype, load_dit=None):
    """One DiT module (first expert's weights, on ``device``) and the expert weight store.

    ``--fp8_base``/``--fp8_scaled`` load the block Linears in fp8 (``--fp8_compute``: multiplied in fp8);
    with ``--blocks_to_swap N`` the DiT is loaded on the CPU and N blocks stay there
    (:func:`wanlora.models.block_swap.place_with_block_swap`).

    Raises:
        ValueError: ``--blocks_to_swap`` without ``--gradient_checkpointing``, or out of range;
            ``--fp8_compute`` on a GPU without fp8 tensor cores.
    """
    from wanlora.models.block_swap import place_with_block_swap
    from wanlora.models.dit import check_checkpoint_segments
    from wanlora.training.experts import base_tensors

    if load_dit is None:
        from wanlora.models import load_dit
    m = config.model
    if m.blocks_to_swap and not m.gradient_checkpointing:
        raise ValueError("--blocks_to_swap needs --gradient_checkpointing (each block is reloaded while the "
                         "backward pass recomputes it)")
    if m.fp8_compute:  # before minutes of loading
        from wanlora.models.fp8_matmul import check_fp8_compute

        check_fp8_compute(device)
    stash = m.gradient_checkpointing_cpu_offload_dtype
    if stash is not None and not m.gradient_checkpointing_cpu_offload:
        raise ValueError("--gradient_checkpointing_cpu_offload_dtype needs --gradient_checkpointing_cpu_offload")
    if stash == torch.float16:
        raise ValueError("--gradient_checkpointing_cpu_offload_dtype: use bf16 or fp32 (fp16 cannot hold the range "
                         "of the float32 residual stream)")
    if m.gradient_checkpointing_segments and not m.gradient_checkpointing:
        raise ValueError("--gradient_checkpointing_segments needs --gradient_checkpointing")
    check_checkpoint_segments(m.gradient_checkpointing_segments, task.num_layers, m.gradient_checkpointing_cpu_offload)
    if m.gradient_checkpointing_segments and m.blocks_to_swap:
        raise ValueError("--gradient_checkpointing_segments with --blocks_to_swap: choose one (the swap streams the "
                         "blocks in forward-then-reverse order; a segment's recomputation runs them forward again)")
    kw = {"fp8": m.fp8} if m.fp8 else {}  # (a replacement load_dit need not know fp8)
    experts = plan.experts
    first = "low_noise" if "low_noise" in experts else experts[0]
    t0 = time.perf_counter()
    dit = load_dit(plan.dit_paths[first], task=task.name, dtype=dtype, device="cpu" if m.blocks_to_swap else device,
                   attn_mode=m.attn_mode, **kw)
    swap = place_with_block_swap(dit, m.blocks_to_swap, device) if m.blocks_to_swap else None
    others = {}
    for e in experts:
        if e != first:
            other = load_dit(plan.dit_paths[e], task=task.name, dtype=dtype, device="cpu", attn_mode=m.attn_mode, **kw)
            others[e] = {k: v.detach() for k, v in base_tensors(other).items()}
            del other
    if m.fp8_compute:
        from wanlora.models.fp8 import set_fp8_compute

        set_fp8_compute(dit)
    weights = ExpertWeights(dit, first, others, offload=config.experts.offload_inactive_dit, swap=swap)
    dit.requires_grad_(False)
    dit.set_gradient_checkpointing(bool(m.gradient_checkpointing), cpu_offload=m.gradient_checkpointing_cpu_offload,
                                   stash_dtype=m.gradient_checkpointing_cpu_offload_dtype,
                                   segments=m.gradient_checkpointing_segments)
    dit.train()  # no dropout in Wan; train() for checkpointing
    log.info("DiT loaded in %.1fs (%s%s, %s)%s%s", time.perf_counter() - t0, dtype, f", fp8 {m.fp8}" if m.fp8 else "",
             ", ".join(f"{e or 'model'}: {plan.dit_paths[e]}" for e in experts),
             " — inactive expert offloaded to CPU" if others and config.experts.offload_inactive_dit else "",
             f" — {m.blocks_to_swap} blocks swapped" if swap else "")
    return dit, weights


def load_model_and_loras(config: TrainConfig, task: Task, plan: ExpertPlan, network_module, accelerator, layout,
                         max_steps: int, load_dit=None):
    """The frozen DiT and its expert store (:func:`load_dit_and_experts`; under FSDP each rank loads on
    the CPU and keeps only its shards on the device), the LoRA bundles on it, and with ``--compile``
    its blocks compiled after the LoRA hooks are in (they are traced into the block graphs).
    Returns ``(dit, experts, bundles)``."""
    dit, experts = load_dit_and_experts(config, task, plan, "cpu" if layout.fsdp else accelerator.device,
                                        dit_dtype(config, accelerator.mixed_precision), load_dit)
    if layout.world_size > 1:
        from wanlora.models.distributed import distribute_dit

        distribute_dit(dit, layout)
    bundles = build_lora_bundles(config, network_module, plan, task, dit, accelerator, max_steps)
    if config.compile.compile:
        dit.compile_blocks(**config.compile.kwargs())
    return dit, experts, bundles


def _read_resume(config: TrainConfig, task: Task, plan: ExpertPlan, accelerator) -> TrainState | None:
    """``--resume``'s train state, checked against this run's layout (own files only), or ``None``."""
    if not config.saving.resume:
        return None
    return read_train_state(config.saving.resume, run_layout(config, task, plan, config.optimization.seed,
                                                             accelerator.num_processes))


# ------------------------------------------------------------------------------------------
# the loop


def train(config: TrainConfig, *, dataset=None, load_dit=None, sample_fn=None, validation_dataset=None) -> TrainState:
    """Train as ``config`` says; returns the final state.

    Ends the run's distributed state in order, also when it fails: every rank past its last
    collective, the run's models (DDP reducers hold gloo work objects) released while the process
    group exists, trackers closed, the group destroyed. A gloo group left to interpreter exit can
    abort a process that trained well (``terminate called without an active exception``).

    Args:
        config: the run's settings (:func:`wanlora.commands.train.parse_config`).
        dataset: a batch dataset to use instead of ``--dataset_config`` (tests, benchmarks),
            with the contract of :func:`build_dataloader`.
        load_dit: a replacement for :func:`wanlora.models.load_dit` (same signature).
        sample_fn: ``sample_fn(step, epoch, networks)`` replacing the samples of
            ``--sample_prompts`` (:class:`wanlora.training.validation.SampleHook`).
        validation_dataset: validation batches instead of ``[[validation_datasets]]``
            (:class:`wanlora.training.validation_loss.ValidationLoss`).
    Raises:
        NonFiniteLossError: ``--max_nonfinite_steps`` skipped steps in a row (state saved).
        ValueError: inconsistent flags (named).
    """
    try:
        state, accelerator = _train(config, dataset, load_dit, sample_fn, validation_dataset)
    except BaseException:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # no barrier: the other ranks may not get there
            dist.destroy_process_group()
        raise
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # the prepared models and optimizers
    gc.collect()  # and whatever cycles still hold them, while the process group exists
    accelerator.end_training()
    return state


def _train(config: TrainConfig, dataset, load_dit, sample_fn, validation_dataset):
    """The run of :func:`train`; returns ``(state, accelerator)``."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    task, plan, timesteps, conditioning = plan_run(config)
    network_module = check_before_loading(config)
    accelerator = make_accelerator(config)
    resume = _read_resume(config, task, plan, accelerator)  # checked (own files, same layout) before anything loads
    seed = run_seed(config, resume)
    set_seed(seed)  # once: the LoRA initialization
    device, main = accelerator.device, accelerator.is_main_process
    with _only_warnings_unless(main):
        layout = parallel_layout(config, plan, device)
        rank = layout.dp_rank  # the data and random streams: one per sequence group
        log.info("layout: %s", layout.describe())
        if main:
            Path(config.saving.output_dir).mkdir(parents=True, exist_ok=True)
        _log_plan(task, plan)
        schedule = expert_schedule(plan, timesteps, config.experts.expert_switch_every, seed)
        mean_p = partial(_mean_over_processes, accelerator)  # flux_shift: every process, one P(high)

        # ---- data, model, LoRAs, checkpoints
        positions, loader = prepare_dataloader(config, task, seed, dataset, accelerator, layout)
        max_steps = run_length(config, len(loader))
        validator = build_validation_loss(config, task, plan, timesteps, conditioning, accelerator, layout, len(loader),
                                          validation_dataset, read_toml=dataset is None)
        dit, experts, bundles = load_model_and_loras(config, task, plan, network_module, accelerator, layout,
                                                     max_steps, load_dit)
        networks = {key: b.network for key, b in bundles.items()}
        ema = None if config.ema.ema_decay is None else LoraEMA(networks, config.ema.ema_decay, config.ema.ema_warmup)
        checkpoints = Checkpointer(accelerator, config, task, plan, timesteps, max_steps, seed, bundles, ema)
        state = TrainState(seed=seed)
        if resume is not None:
            state = checkpoints.load_state(config.saving.resume)
            log.info("resumed from %s at step %d (epoch %d, batch %d)", config.saving.resume, state.global_step,
                     state.epoch + 1, state.batch_in_epoch)
        tracking, sample_fn = start_tracking_and_samples(config, task, plan, dit, experts, bundles, accelerator,
                                                         sample_fn, ema)
        if sample_fn is not None and config.sampling.sample_at_first and state.global_step == 0:
            _sample(sample_fn, 0, None, networks, bundles)
        if validator is not None:
            validator.start(state, dit, experts, bundles, ema)

        # ---- the loop: nothing in it waits for the device but the step log's read points
        progress = tqdm(total=max_steps, initial=state.global_step, disable=not main, desc="steps")
        steps = StepLog(accelerator, config.tracking.log_every_n_steps, config.optimization.max_nonfinite_steps,
                        partial(_stop_nonfinite, config=config, checkpoints=checkpoints), progress, tracking)
        window: _StepWindow | None = None
        while state.global_step < max_steps:
            positions.epoch = state.epoch
            for b in bundles.values():
                b.on_epoch_start(dit)
            batches = loader if not state.batch_in_epoch else accelerator.skip_first_batches(loader, state.batch_in_epoch)
            for batch in steps.timed(batches):
                if window is None:  # a new optimizer step: its expert, weights and LoRA
                    expert = expert_of_step(schedule, plan, timesteps, state.global_step, batch, mean_p)
                    window = _StepWindow(expert, bundles[plan.lora_for(expert)], device)
                    if experts.activate(expert):
                        log.debug("step %d: swapped in the %s expert", state.global_step, expert)
                    set_active(bundles, window.lora.key)
                lo, hi = plan.ranges[window.expert]
                _micro_step(accelerator, config, dit, window, batch, timesteps, conditioning, lo, hi,
                            seeds.stream_generator(seed, seeds.NOISE, state.global_step, window.micro, rank),
                            seeds.derive_seed(seed, seeds.DROPOUT, state.global_step, window.micro, rank))
                state.batch_in_epoch += 1
                if not accelerator.sync_gradients:
                    continue
                done, window = window, None  # the optimizer step is complete (or skipped on the device)
                _step_schedulers(bundles)
                state.global_step += 1
                if ema is not None:
                    ema.update(done.lora.key)
                steps.add(state.global_step, done.expert, done.values, done.timesteps, bundles)
                if (steps.due(state.global_step) or checkpoints.saves_after_step(state.global_step)
                        or state.global_step >= max_steps):
                    steps.read(state)
                checkpoints.after_step(state, bundles)
                if validator is not None:
                    validator.after_step(state)
                if sample_fn is not None and _due(config.sampling.sample_every_n_steps, state.global_step):
                    _sample(sample_fn, state.global_step, None, networks, bundles)
                if state.global_step >= max_steps:
                    if state.batch_in_epoch == len(loader):  # it was the epoch's last batch
                        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                        if sample_fn is not None and _due(config.sampling.sample_every_n_epochs, state.epoch):
                            _sample(sample_fn, state.global_step, state.epoch, networks, bundles)
                    break
            else:  # the epoch's batches are used up (accelerate stepped a partial accumulation window)
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                steps.read(state)
                checkpoints.after_epoch(state, bundles)
                if sample_fn is not None and _due(config.sampling.sample_every_n_epochs, state.epoch):
                    _sample(sample_fn, state.global_step, state.epoch, networks, bundles)
        progress.close()

        # ---- final save
        files = checkpoints.final(state, bundles)
        log.info("done: %d steps; LoRA %s", state.global_step, ", ".join(str(f) for f in files.values()))
    return state, accelerator


class _StepWindow:
    """The micro-batches of one optimizer step: its expert and LoRA, and what they gave — kept on
    the device (``loss_sum``, ``local_sum``, ``bad``) until the step log reads them."""

    def __init__(self, expert: str, lora: LoraBundle, device):
        self.expert, self.lora, self.micro = expert, lora, 0
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=device)  # of the mean over processes
        self.local_sum = torch.zeros((), dtype=torch.float32, device=device)  # of this process's
        self.bad = torch.zeros((), dtype=torch.bool, device=device)  # a non-finite loss in the window
        self.timesteps: list[torch.Tensor] = []  # [B] per micro-batch, CPU
        self.values: torch.Tensor | None = None  # after the last micro-batch: StepRecord.values


def _micro_step(accelerator, config: TrainConfig, dit, window: _StepWindow, batch: dict,
                timesteps: flow.TimestepDistribution, conditioning: Conditioning, lo: float, hi: float,
                generator: torch.Generator,
                dropout_seed: int) -> None:
    """One micro-batch of ``window``: loss, backward, and at the window's last micro-batch gradient
    clipping and the optimizer step, skipped on the device when the window saw a non-finite loss
    or the gradient norm is not finite (:func:`_optimizer_step`). Reads nothing on the host.

    The network's own dropout draws from the global random state, which is forked around the
    micro-batch and seeded with ``dropout_seed``, so it is resume-exact and leaks nothing.
    """
    lora, device = window.lora, accelerator.device
    lora.on_step_start()
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), accelerator.accumulate(lora.wrapper):
        torch.manual_seed(dropout_seed)
        loss, t = flow_matching_loss(
            partial(lora.wrapper, dit), batch, timesteps, lo, hi, generator, device,
            config.timesteps.weighting_scheme, conditioning)
        loss_all = accelerator.reduce(loss.detach().clone(), reduction="mean")
        window.bad = window.bad | ~torch.isfinite(loss_all)
        window.loss_sum += loss_all.float()
        window.local_sum += loss.detach().float()
        accelerator.backward(loss)  # a non-finite loss's gradients are never applied: the step is skipped
        if accelerator.sync_gradients:
            if config.optimization.max_grad_norm:
                grad_norm = accelerator.clip_grad_norm_(lora.trainable, config.optimization.max_grad_norm)
            else:
                grad_norm = torch.linalg.vector_norm(torch.stack(
                    [p.grad.detach().float().norm() for p in lora.trainable if p.grad is not None]))
            skip = window.bad | ~torch.isfinite(grad_norm)
            _optimizer_step(lora.optimizer, skip, accelerator.scaler)
            n = window.micro + 1
            window.values = torch.stack([window.loss_sum / n, window.local_sum / n, grad_norm.detach().float(),
                                         skip.float()])
        lora.optimizer.zero_grad(set_to_none=True)
    window.micro += 1
    window.timesteps.append(t)


def _optimizer_step(optimizer, skip: torch.Tensor, scaler=None) -> None:
    """``optimizer.step()`` unless the device flag ``skip`` is set, without reading it on the host
    where the optimizer allows.

    * Optimizers that take torch.amp's skip flag (``_step_supports_amp_scaling``: torch's fused
      Adam/AdamW/SGD, the default ``--optimizer_type adamw``) get ``found_inf = skip``: their kernels
      leave the weights, the moments and the step count untouched when it is set, on the device.
    * Under a GradScaler (``--mixed_precision fp16``) the scaler skips non-finite gradients itself.
    * Any other optimizer: the flag is read on the host, one wait for the device per optimizer step.

    Args:
        optimizer: a torch optimizer or Accelerate's wrapper of one (``.optimizer``).
        skip: 0-dim bool tensor on the parameters' device.
        scaler: the accelerator's ``GradScaler`` or None.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    if scaler is not None:
        optimizer.step()
    elif getattr(inner, "_step_supports_amp_scaling", False):
        inner.found_inf = skip.float()
        try:
            optimizer.step()
        finally:
            del inner.found_inf
    elif not bool(skip):
        optimizer.step()


def _stop_nonfinite(state: TrainState, *, config: TrainConfig, checkpoints: Checkpointer) -> None:
    """``--max_nonfinite_steps`` skipped steps in a row (found at a step log read): save the state and stop.

    Raises:
        NonFiniteLossError: always (the message names the state folder and the fixes).
    """
    where = checkpoints.save_state(f"{config.saving.output_name}-nonfinite", state)
    raise NonFiniteLossError(
        f"{state.nonfinite_in_row} non-finite losses in a row at step {state.global_step}; "
        f"state saved to {where}. Lower --learning_rate, use --max_grad_norm 1.0 or "
        f"--mixed_precision bf16, then --resume {where}")


def _step_schedulers(bundles: dict[str, LoraBundle]) -> None:
    """Every LoRA's schedule follows the global step, whichever expert trained it."""
    with warnings.catch_warnings():  # the inactive expert's optimizer did not step, by design
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        for b in bundles.values():
            b.scheduler.step()


def _due(every: int | None, count: int) -> bool:
    return bool(every) and count % every == 0


def _sample(sample_fn, step: int, epoch: int | None, networks: dict, bundles: dict[str, LoraBundle]) -> None:
    sample_fn(step, epoch, networks)
    set_active(bundles, None)  # the loop re-activates its expert's LoRA on the next step


@contextlib.contextmanager
def _only_warnings_unless(main: bool):
    """On processes other than the main one, the ``wanlora`` loggers show warnings only, for the
    duration of the block (the level is restored afterwards)."""
    logger = logging.getLogger("wanlora")
    old = logger.level
    if not main:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(old)


def _mean_over_processes(accelerator, p: float) -> float:
    return accelerator.reduce(torch.tensor([p], dtype=torch.float64, device=accelerator.device), "mean").item()


def _log_plan(task: Task, plan: ExpertPlan) -> None:
    for note in plan.notes:
        log.info(note)
    for warning in plan.warnings:
        log.warning(warning)
    log.info("task %s, %s: %s", task.name, plan.mode, ", ".join(
        f"{e} t in [{lo:g}, {hi:g})" for e, (lo, hi) in plan.ranges.items()))
