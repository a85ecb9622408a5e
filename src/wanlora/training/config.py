"""The training run's settings: one frozen :class:`TrainConfig`, grouped by concern.

Built once by ``wanlora-train`` (:mod:`wanlora.commands.train`) from the command line and the TOML
``--config_file``; the loop (:func:`wanlora.training.trainer.train`) and its parts read it and never
change it. Each leaf field is the flag of the same name (``config.network.network_dim`` <->
``--network_dim``); flag names are the ones users know from the Wan LoRA tooling (musubi-tuner /
kohya) plus the Wan2.2 expert flags. To add a flag add a field here (:mod:`wanlora.run_config`).

The per-expert LoRA settings (``--network_dim_high_noise``, ``--learning_rate_high_noise``, ...)
are resolved in one place, :meth:`TrainConfig.lora`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch

from wanlora.run_config import (CompileOptions, ModelFiles, attn_option, dtype_option, fsdp_option, group, option,
                                ulysses_option)

__all__ = ["TrainConfig", "ModelConfig", "ExpertConfig", "DataConfig", "NetworkConfig", "OptimizationConfig",
           "TimestepConfig", "SavingConfig", "TrackingConfig", "SamplingConfig", "ValidationConfig", "EmaConfig",
           "LaunchConfig", "LoraSettings"]


@dataclass(frozen=True)
class ModelConfig:
    """The frozen DiT: precision, attention and memory."""

    dit_dtype: torch.dtype | None = dtype_option(
        None, "dtype of the frozen DiT weights (default: bf16/fp16 under that mixed precision, else fp32)")
    attn_mode: str = attn_option("attention kernel: sdpa (PyTorch picks), cudnn, flash (FlashAttention-2), flash3 "
                                 "(FlashAttention-3), xformers; torch = sdpa. sage has no backward and is refused "
                                 "for training")
    gradient_checkpointing: bool = option(False, "recompute DiT blocks in backward")
    gradient_checkpointing_cpu_offload: bool = option(
        False, "with --gradient_checkpointing: keep the checkpointed block inputs in pinned host memory "
        "(docs/memory.md)")
    gradient_checkpointing_cpu_offload_dtype: torch.dtype | None = dtype_option(
        None, "with --gradient_checkpointing_cpu_offload: keep the host checkpoints in bf16 (half the host memory, "
        "LoRA gradients change by ~0.2 percent, docs/benchmarks.md) instead of the residual stream's float32 (default, "
        "exact)")
    gradient_checkpointing_segments: int = option(
        0, "with --gradient_checkpointing: keep only N segment inputs through the forward and recompute each "
        "segment's block inputs in backward; fewest float32 block inputs held near N = sqrt(blocks): 13 instead of "
        "40 for a 40-block expert with N = 7, for L - N more block forwards per step (about +21 percent block compute); "
        "exact. 0: off (docs/memory.md)")
    fp8_base: bool = option(False, "store the frozen Linear weights of the DiT blocks in float8_e4m3fn (half of "
                            "bf16), computed in --dit_dtype (docs/memory.md)")
    fp8_scaled: bool = option(False, "fp8 with one float32 scale per output channel (implies --fp8_base)")
    fp8_compute: bool = option(False, "multiply the fp8 block weights in fp8 (per-row scales, torch._scaled_mm) on "
                               "GPUs with fp8 tensor cores (compute capability 8.9+); implies --fp8_scaled unless "
                               "--fp8_base is given")
    blocks_to_swap: int = option(0, "DiT blocks kept in pinned host memory and copied to the GPU ahead of use "
                                 "(needs --gradient_checkpointing)")
    estimate_memory: bool = option(False, "print the predicted GPU and host memory peaks for these settings "
                                   "(largest clip of --dataset_config) and exit")

    @property
    def fp8(self) -> str | None:
        """``load_dit``'s ``fp8``: ``"scaled"``, ``"base"`` or ``None``."""
        if self.fp8_scaled or (self.fp8_compute and not self.fp8_base):
            return "scaled"
        return "base" if self.fp8_base else None


@dataclass(frozen=True)
class ExpertConfig:
    """Wan2.2 A14B: which experts train and how (:mod:`wanlora.training.experts`)."""

    expert: str | None = option(None, "A14B, one expert: which one --dit is (default: detected from a "
                                "'high_noise'/'low_noise' in its path)",
                                choices=("high", "low", "high_noise", "low_noise"))
    expert_lora: str = option("separate", "both experts: one LoRA per expert (NAME_high_noise / NAME_low_noise) "
                              "or one LoRA shared by both (one file)", choices=("separate", "shared"))
    expert_switch_every: int = option(1, "both experts: draw the expert once per this many optimizer steps "
                                      "(fewer weight swaps)")
    offload_inactive_dit: bool = option(False, "both experts: keep the inactive expert's weights in pinned CPU memory")
    timestep_boundary: float | None = option(None, "A14B expert boundary, 0..1 or 0..1000 (default: the "
                                             "task's, 0.875 / 0.9)")


@dataclass(frozen=True)
class DataConfig:
    """The cached dataset and how it is read."""

    dataset_config: Path | None = option(None, "dataset TOML (required; caches must exist)")
    max_data_loader_n_workers: int = option(2, "DataLoader workers")
    persistent_data_loader_workers: bool = option(False, "keep workers between epochs")
    ti2v_first_frame: float = option(
        0.0, "ti2v-5B: train image-to-video — with this probability per sample (1.0 when given alone) latent "
        "frame 0 stays clean at timestep 0 and is left out of the loss", nargs="?", const=1.0)
    i2v_mask_first_frame: bool = option(
        False, "i2v-A14B / i2v-14B / flf2v-14B: leave latent frame 0, which the image conditioning y gives, "
        "out of the loss (a one-frame window keeps it)")


@dataclass(frozen=True)
class NetworkConfig:
    """The LoRA network(s): the plug-in module and each expert's rank, alpha and start weights."""

    network_module: str = option("networks.lora_wan", "LoRA network module (create_network convention)")
    network_dim: int = option(4, "LoRA rank")
    network_alpha: float = option(1.0, "LoRA alpha (scale = alpha / rank)")
    network_dropout: float | None = option(None, "dropout on the LoRA down output")
    network_args: tuple[str, ...] = option((), "key=value for the network module")
    network_weights: str | None = option(None, "start from these LoRA weights (the low-noise / only LoRA, "
                                         "or the one expert trained)")
    network_weights_high_noise: str | None = option(None, "start the high-noise LoRA from these weights "
                                                    "(both experts)")
    dim_from_weights: bool = option(False, "take rank and alpha from --network_weights")
    network_dim_high_noise: int | None = option(None, "rank of the high-noise LoRA (default --network_dim)")
    network_alpha_high_noise: float | None = option(None, "alpha of the high-noise LoRA (default --network_alpha)")


@dataclass(frozen=True)
class OptimizationConfig:
    """Optimizer, learning-rate schedule, run length, seed."""

    learning_rate: float = option(1e-4, "learning rate")
    learning_rate_high_noise: float | None = option(None, "learning rate of the high-noise LoRA "
                                                    "(default --learning_rate)")
    optimizer_type: str = option("adamw", "adamw, adamw8bit (bitsandbytes), adafactor (transformers), or module.Class")
    optimizer_args: tuple[str, ...] = option((), "key=value for the optimizer")
    lr_scheduler: str = option("constant", "constant, constant_with_warmup, linear, cosine, "
                               "cosine_with_restarts, polynomial")
    lr_warmup_steps: float = option(0, "warm-up steps (a value below 1 is a fraction of the training steps)")
    lr_scheduler_num_cycles: int = option(1, "cosine_with_restarts cycles")
    lr_scheduler_power: float = option(1.0, "polynomial power")
    max_train_steps: int = option(1600, "optimizer steps", clears=("max_train_epochs",))
    max_train_epochs: int | None = option(None, "epochs (overrides --max_train_steps given with it)")
    gradient_accumulation_steps: int = option(1, "batches per optimizer step")
    max_grad_norm: float = option(1.0, "clip gradients to this norm (0: off)")
    seed: int | None = option(None, "seed for everything (default: random, logged)")
    max_nonfinite_steps: int = option(5, "stop (state saved) after this many non-finite losses in a row")


@dataclass(frozen=True)
class TimestepConfig:
    """The training timestep distribution (:class:`wanlora.training.flow.TimestepDistribution`) and
    loss weighting."""

    timestep_sampling: str = option("uniform", "uniform, sigmoid, logit_normal, shift, flux_shift, logsnr "
                                    "(docs/training.md)")
    sigmoid_scale: float = option(1.0, "scale of sigmoid/shift sampling")
    logit_mean: float = option(0.0, "logit_normal mean")
    logit_std: float = option(1.0, "logit_normal std")
    mode_scale: float = option(1.29, "accepted for musubi-tuner configs and unused: 'mode' weighting is uniform here")
    discrete_flow_shift: float = option(1.0, "shift of 'shift' sampling")
    min_timestep: float | None = option(None, "lowest timestep trained (0..1000)")
    max_timestep: float | None = option(None, "highest timestep trained (0..1000)")
    preserve_distribution_shape: bool = option(False, "min/max timestep cut the distribution instead of "
                                               "rescaling it into the range")
    weighting_scheme: str = option("none", "loss weighting over timesteps: none, sigma_sqrt, cosmap "
                                   "(logit_normal, mode: uniform)")


@dataclass(frozen=True)
class SavingConfig:
    """Where and when LoRA files and training states are written."""

    output_dir: Path | None = option(None, "where LoRA files, states and samples go (required)")
    output_name: str = option("lora", "LoRA file name stem")
    save_precision: torch.dtype = dtype_option(torch.float32, "dtype of the saved LoRA tensors")
    save_every_n_steps: int | None = option(None, "save every N optimizer steps")
    save_every_n_epochs: int | None = option(None, "save every N epochs")
    save_last_n_steps: int | None = option(None, "keep only step saves of the last N steps")
    save_last_n_epochs: int | None = option(None, "keep only the last N epoch saves")
    save_last_n_steps_state: int | None = option(None, "as --save_last_n_steps, for states")
    save_last_n_epochs_state: int | None = option(None, "as --save_last_n_epochs, for states")
    save_state: bool = option(False, "with every save also write the training state (for --resume)")
    save_state_on_train_end: bool = option(False, "write the state at the end")
    resume: Path | None = option(None, "continue from a saved state folder")
    training_comment: str | None = option(None, "free text stored in the LoRA metadata")


@dataclass(frozen=True)
class TrackingConfig:
    """Metrics logging (TensorBoard through Accelerate's trackers)."""

    logging_dir: Path | None = option(None, "TensorBoard log folder (logging is off without it)")
    log_with: str = option("tensorboard", "tracker", choices=("tensorboard", "none"))
    log_prefix: str = option("", "prefix of the run's log folder name")
    log_tracker_name: str = option("wanlora", "tracker (project) name")
    log_every_n_steps: int = option(10, "read the losses from the device and report them every N steps (each "
                                    "read waits for the device; non-finite steps are counted there)")


@dataclass(frozen=True)
class SamplingConfig:
    """Sample videos during training (:mod:`wanlora.training.validation`); they need the
    ``--vae``, ``--t5`` and ``--t5_tokenizer`` model files."""

    sample_prompts: Path | None = option(None, "prompt file for samples")
    sample_every_n_steps: int | None = option(None, "sample every N steps")
    sample_every_n_epochs: int | None = option(None, "sample every N epochs (and after the last epoch)")
    sample_at_first: bool = option(False, "sample before training")
    sample_lora: tuple[str, ...] = option(
        (), "PATH[:MULTIPLIER]: a LoRA stacked on the trained one in the samples only (a Lightning / distill "
        "LoRA: set its steps and guidance in the prompt file, --s 4 --g 1); the low-noise expert or the only "
        "model unless its metadata names an expert; repeat the flag for more", nargs="+", repeatable=True,
        metavar="PATH[:MULT]")
    sample_lora_high_noise: tuple[str, ...] = option(
        (), "PATH[:MULTIPLIER]: the same for the high-noise expert (A14B)", nargs="+", repeatable=True,
        metavar="PATH[:MULT]")


@dataclass(frozen=True)
class ValidationConfig:
    """The validation loss on ``[[validation_datasets]]`` of the dataset TOML
    (:mod:`wanlora.training.validation_loss`)."""

    validate_every_n_steps: int | None = option(None, "validation loss every N optimizer steps")
    validate_every_n_epochs: int | None = option(
        None, "validation loss every N epochs (default: every epoch when the dataset TOML has "
        "[[validation_datasets]] and --validate_every_n_steps is not given)")
    max_validation_steps: int | None = option(None, "validation batches per evaluation (default: all)")
    validation_seed: int = option(0, "seed of the validation noise: the same for every evaluation and, by "
                                  "default, every run, so curves compare across steps and runs")
    validation_timesteps: int = option(4, "timesteps per expert the validation loss is evaluated at, evenly "
                                       "spaced inside the expert's range")


@dataclass(frozen=True)
class EmaConfig:
    """An exponential moving average of the LoRA weights (:mod:`wanlora.training.ema`)."""

    ema_decay: float | None = option(None, "keep an EMA of each LoRA with this decay (e.g. 0.999), saved beside "
                                     "every LoRA save as NAME_ema...safetensors and in --save_state")
    ema_warmup: bool = option(True, "cap the decay of the n-th EMA update at (1+n)/(10+n) (diffusers' EMAModel), "
                              "so early averages do not hold on to the initial weights")
    sample_with_ema: bool = option(False, "render samples during training with the EMA weights")


@dataclass(frozen=True)
class LaunchConfig:
    """How the processes compute (the process count comes from ``accelerate launch`` / ``torchrun``)."""

    mixed_precision: str | None = option(None, "autocast precision (default: the `accelerate launch` "
                                         "setting, else no)", choices=("no", "fp16", "bf16"))
    ulysses_size: int = ulysses_option()
    dit_fsdp: bool = fsdp_option()


@dataclass(frozen=True)
class LoraSettings:
    """One trained LoRA's resolved settings (:meth:`TrainConfig.lora`)."""

    weights: str | None
    dim: int
    alpha: float
    learning_rate: float


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run is told (module docstring)."""

    model_files: ModelFiles = group(ModelFiles, "model files", help={
        "task": "which Wan model (required)",
        "dit": "DiT checkpoint: a file, a shard index .json or a folder. With --dit_high_noise this is "
               "the low-noise expert (required)",
        "dit_high_noise": "A14B: the high-noise expert; trains both experts in one run",
        "vae": "VAE checkpoint (for samples)", "t5": "umT5 encoder checkpoint (for samples)",
        "t5_tokenizer": "umT5 tokenizer folder (for samples)",
        "clip": "CLIP image encoder (for samples of i2v-14B / flf2v-14B)"})
    model: ModelConfig = group(ModelConfig, "model")
    compile: CompileOptions = group(CompileOptions, "torch.compile")
    experts: ExpertConfig = group(ExpertConfig, "experts (A14B)")
    data: DataConfig = group(DataConfig, "data")
    network: NetworkConfig = group(NetworkConfig, "network")
    optimization: OptimizationConfig = group(OptimizationConfig, "optimization")
    timesteps: TimestepConfig = group(TimestepConfig, "timesteps")
    saving: SavingConfig = group(SavingConfig, "saving")
    tracking: TrackingConfig = group(TrackingConfig, "logging")
    sampling: SamplingConfig = group(SamplingConfig, "samples during training")
    validation: ValidationConfig = group(ValidationConfig, "validation loss")
    ema: EmaConfig = group(EmaConfig, "EMA of the LoRA weights")
    launch: LaunchConfig = group(LaunchConfig, "distribution")

    def flat(self) -> dict:
        """``{flag name: value}`` of every field (the flat view kohya-convention network modules
        expect as ``args`` in ``prepare_network(args)``)."""
        return {f.name: getattr(group_, f.name) for group_ in (getattr(self, g.name) for g in fields(self))
                for f in fields(group_)}

    def lora(self, key: str, alone: bool = False) -> LoraSettings:
        """The settings of the LoRA ``key`` (``high_noise``, ``low_noise`` or ``lora``): the
        ``--*_high_noise`` flag for the high-noise LoRA where given (``0`` counts as given), else the
        shared flag. ``alone``: this is the run's only LoRA (one expert trained), so
        ``--network_weights`` starts it when ``--network_weights_high_noise`` is not given."""
        n, o = self.network, self.optimization
        if key != "high_noise":
            return LoraSettings(n.network_weights, n.network_dim, n.network_alpha, o.learning_rate)

        def pick(value, fallback):
            return fallback if value is None else value

        weights = pick(n.network_weights_high_noise, n.network_weights if alone else None)
        return LoraSettings(weights, pick(n.network_dim_high_noise, n.network_dim),
                            pick(n.network_alpha_high_noise, n.network_alpha),
                            pick(o.learning_rate_high_noise, o.learning_rate))
