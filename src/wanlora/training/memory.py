"""Peak memory before a run starts: the memory model behind ``--estimate_memory``.

The prediction adds parts that are either exact or measured:

* **weights** — exact: the DiT is built on the meta device from the task's sizes and every tensor
  counted in the dtype ``load_dit`` gives it (fp8 block Linears at one byte plus their float32
  scales, the float32 islands at four, the rest in the compute dtype). With ``--blocks_to_swap N``
  the device holds ``L − N`` blocks and the host (pinned) the ``min(L, 2N)`` blocks that move
  (:mod:`wanlora.models.block_swap`); a second expert adds its weights on the device, or on the
  host with ``--offload_inactive_dit`` (one expert, never both).
* **LoRA** — exact: ``rank·(in + out)`` float32 parameters per adapted Linear, with gradient and
  two AdamW moments (16 bytes per parameter); one LoRA per expert.
* **checkpoints** — exact: gradient checkpointing keeps each block's input, ``[B, T, D]`` float32
  (the residual stream's precision), on the device, or on the host with
  ``--gradient_checkpointing_cpu_offload`` (in bf16 with ``--gradient_checkpointing_cpu_offload_dtype bf16``);
  with ``--gradient_checkpointing_segments S`` the device holds ``S + ceil(L / S)`` of them at once.
* **one block's activations** — measured: ``benchmarks/activation_memory.py`` ran one block of
  each width on the CPU at 128–512 tokens and fitted ``bytes = a·T + b`` (:data:`BLOCK_ACTIVATION`,
  ``train`` = a block's recomputation and backward, ``infer`` = a forward without autograd).
  Without checkpointing every block keeps its activations: ``L`` times the ``train`` figure (an
  upper bound: it includes each block's backward temporaries).
* **allowances** — assumed, not measured here: :data:`CUDA_RESERVE` for the CUDA context, cuBLAS
  workspaces and allocator slack; :data:`HOST_BASE` for the Python process (torch, CUDA libraries).

Tokens: ``T = F'·(H/s/2)·(W/s/2)`` with ``F' = (frames − 1)/4 + 1`` latent frames and ``s`` the VAE
stride (8, or 16 for TI2V-5B); 832x480x81 with the Wan2.1 VAE gives 21·30·52 = 32,760 tokens.
Generation batches the conditional and unconditional passes (``B = 2``); the VAE and text encoder
are not included (they visit the device before and after the DiT, not with it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

import torch

from wanlora.tasks import get_task

__all__ = ["BLOCK_ACTIVATION", "MemorySettings", "MemoryEstimate", "estimate_memory", "dit_weight_bytes",
           "token_count", "lora_parameter_count", "block_activation_bytes", "largest_clip", "estimate_for_training",
           "estimate_for_generation", "GiB"]

GiB = 2**30

#: Measured activation memory of one block (bf16 compute, LoRA rank 32 on its ten Linears):
#: ``{family dim: {"train" | "infer": (bytes per token, constant bytes)}}``, least-squares fits of
#: ``python benchmarks/activation_memory.py --tokens 128 256 384 512`` (x86-64 CPU, torch 2.13;
#: largest residual 0.42 % for 14B train, below 0.01 % for the others). On the CPU the constant
#: holds oneDNN's packed copy of the block's bf16 weights (it equals the block's weight bytes to
#: within a context-sized rest); CUDA kernels make no such copy, so on CUDA
#: :func:`block_activation_bytes` subtracts it.
BLOCK_ACTIVATION: dict[int, dict[str, tuple[float, float]]] = {
    5120: {"train": (475861.0, 777448456.0), "infer": (164992.0, 723369984.0)},
    3072: {"train": (359652.0, 368797704.0), "infer": (135296.0, 341196800.0)},
    1536: {"train": (198276.0, 114374664.0), "infer": (78464.0, 100278272.0)},
}

#: Device allowance for the CUDA context, library workspaces and allocator slack (assumed).
CUDA_RESERVE = int(1.5 * GiB)
#: Host memory of the process itself: Python, torch and the CUDA libraries (assumed), or a
#: CPU-only torch process.
HOST_BASE = int(3.0 * GiB)
HOST_BASE_CPU = int(0.5 * GiB)

_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def token_count(task, width: int, height: int, frames: int) -> int:
    """DiT tokens of one clip: latent frames × (latent height / 2) × (latent width / 2).

    Raises:
        ValueError: a size that is not a multiple of the task's pixel unit, or frames not 4n+1.
    """
    task = get_task(task)
    unit = task.pixel_unit
    if width % unit or height % unit:
        raise ValueError(f"{width}x{height}: width and height must be multiples of {unit} px for {task.name}")
    if frames < 1 or (frames - 1) % task.vae_stride[0]:
        raise ValueError(f"{frames} frames: use 4n+1 frames (1, 5, ..., 81)")
    _, f, h, w = task.latent_shape(frames, height, width)
    pt, ph, pw = task.patch_size
    return (f // pt) * (h // ph) * (w // pw)


def dit_weight_bytes(task, dtype=torch.bfloat16, fp8: str | None = None, config=None) -> tuple[int, int]:
    """``(bytes of one block, bytes outside the blocks)`` of the task's DiT as ``load_dit`` holds it.

    Exact: the model is built on the meta device and each tensor counted in its loaded dtype.
    ``config`` (a :class:`~wanlora.models.dit.WanDiTConfig`) replaces the task's official sizes.
    """
    task = get_task(task)
    if config is None:
        return _official_weight_bytes(task.name, dtype, fp8)
    return _weight_bytes(config, dtype, fp8)


@functools.lru_cache(maxsize=64)
def _official_weight_bytes(task_name: str, dtype, fp8) -> tuple[int, int]:
    from wanlora.models.dit import WanDiTConfig

    task = get_task(task_name)
    return _weight_bytes(WanDiTConfig(
        dim=task.dim, ffn_dim=task.ffn_dim, num_heads=task.num_heads, num_layers=task.num_layers,
        in_channels=task.in_channels, out_channels=task.out_channels, text_dim=task.text_dim,
        freq_dim=task.freq_dim, patch_size=task.patch_size), dtype, fp8)


def _weight_bytes(cfg, dtype, fp8) -> tuple[int, int]:
    from wanlora.models.dit import WanDiT
    from wanlora.models.fp8 import is_fp8_target
    from wanlora.models.loading import keeps_float32

    with torch.device("meta"):  # blocks are identical: one is enough
        model = WanDiT(dataclasses.replace(cfg, num_layers=1))
    block = outside = 0
    for key, t in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if fp8 and leaf == "weight" and is_fp8_target(module):
            n = t.numel() + (4 * t.shape[0] if fp8 == "scaled" else 0)
        else:
            n = t.numel() * (4 if keeps_float32(key) else _BYTES[dtype])
        if key.startswith("blocks.0."):
            block += n
        elif not key.startswith("blocks."):
            outside += n
    return block, outside


@dataclass(frozen=True)
class MemorySettings:
    """What a run's peak memory depends on.

    Attributes:
        task: ``--task``.
        width, height, frames: the largest clip (pixels, 4n+1 frames).
        batch: clips per step (generation: 2 with batched guidance).
        rank: LoRA rank (training).
        training: a training step (else a generation step).
        dtype: compute dtype of the DiT.
        fp8: ``None``, ``"base"`` or ``"scaled"``.
        blocks_to_swap: N blocks in host memory.
        gradient_checkpointing: checkpoint every block (training).
        checkpoint_offload: ``--gradient_checkpointing_cpu_offload``.
        checkpoint_dtype: ``--gradient_checkpointing_cpu_offload_dtype`` (``None``: float32).
        checkpoint_segments: ``--gradient_checkpointing_segments`` (0: one kept input per block).
        experts: DiTs the run holds (2 for both A14B experts).
        offload_inactive: ``--offload_inactive_dit``.
        device: ``"cuda"`` or ``"cpu"`` (on the CPU device and host memory are one).
    """

    task: str
    width: int
    height: int
    frames: int
    batch: int = 1
    rank: int = 32
    training: bool = True
    dtype: torch.dtype = torch.bfloat16
    fp8: str | None = None
    blocks_to_swap: int = 0
    gradient_checkpointing: bool = True
    checkpoint_offload: bool = False
    checkpoint_dtype: torch.dtype | None = None
    checkpoint_segments: int = 0
    experts: int = 1
    offload_inactive: bool = False
    device: str = "cuda"


@dataclass
class MemoryEstimate:
    """Predicted peak bytes, by part: ``device`` and ``host`` dicts, and the token count."""

    settings: MemorySettings
    tokens: int
    device: dict = field(default_factory=dict)
    host: dict = field(default_factory=dict)

    @property
    def device_total(self) -> int:
        return sum(self.device.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    def format(self) -> str:
        """A table of the parts and totals in GiB, then which GPU sizes it fits."""
        s = self.settings
        lines = [f"memory estimate: {s.task}, {s.width}x{s.height}x{s.frames} ({self.tokens} tokens), batch "
                 f"{s.batch}, {'training rank ' + str(s.rank) if s.training else 'generation'}, "
                 f"{s.fp8 and 'fp8 ' + s.fp8 or str(s.dtype).replace('torch.', '')}, "
                 f"blocks_to_swap {s.blocks_to_swap}"]
        for name, parts, total in (("GPU" if s.device == "cuda" else "device", self.device, self.device_total),
                                   ("host", self.host, self.host_total)):
            lines.append(f"  {name} peak {total / GiB:6.1f} GiB")
            lines += [f"    {k:34s} {v / GiB:6.2f} GiB" for k, v in parts.items() if v]
        if s.device == "cuda":
            fits = [g for g in (16, 24, 32, 48, 80, 96, 141) if self.device_total <= g * 1e9 * 0.98]
            lines.append(f"  fits a {fits[0]} GB GPU or larger" if fits else "  does not fit a 141 GB GPU")
        return "\n".join(lines)


def block_activation_bytes(task, mode: str, rows: int, device: str = "cuda") -> int:
    """Peak activation bytes of one block of ``task``'s DiT over ``rows`` tokens (batch × tokens).

    Args:
        mode: ``"train"`` (recomputation + backward) or ``"infer"`` (forward, no autograd).
        device: ``"cuda"`` drops the CPU-only packed weight copy from the measured constant.

    A width without a measurement scales the nearest measured family linearly in width.
    """
    task = get_task(task)
    dim = task.dim
    near = dim if dim in BLOCK_ACTIVATION else min(BLOCK_ACTIVATION, key=lambda d: abs(d - dim))
    a, b = BLOCK_ACTIVATION[near][mode]
    a, b = a * dim / near, b * dim / near
    if device != "cpu":
        b = max(0.0, b - dit_weight_bytes(task, torch.bfloat16)[0])
    return int(a * rows + b)


def estimate_memory(s: MemorySettings) -> MemoryEstimate:
    """Predict the device and host peaks of a run (module docstring for each part).

    Raises:
        ValueError: sizes that do not fit the task, or ``blocks_to_swap`` outside ``0 .. L−1``.
    """
    task = get_task(s.task)
    n_layers, dim = task.num_layers, task.dim
    if not 0 <= s.blocks_to_swap <= n_layers - 1:
        raise ValueError(f"--blocks_to_swap {s.blocks_to_swap}: give 0 .. {n_layers - 1} for {task.name}")
    tokens = token_count(task, s.width, s.height, s.frames)
    est = MemoryEstimate(s, tokens)
    dev, host = est.device, est.host
    block, outside = dit_weight_bytes(task, s.dtype, s.fp8)
    n = s.blocks_to_swap
    moving = min(n_layers, 2 * n) if n else 0
    resident = n_layers - n
    dev["DiT weights"] = outside + resident * block
    if n:
        host["block swap (pinned blocks)"] = moving * block * s.experts
    if s.experts > 1:
        other = outside + (n_layers - moving) * block  # the swap holds its own blocks of each expert
        if s.offload_inactive:
            host["inactive expert (pinned)"] = other
        else:
            dev["second expert's weights"] = other
    rows = tokens * s.batch
    if s.training:
        dev["LoRA + grads + AdamW"] = 16 * lora_parameter_count(task, s.rank) * s.experts
        if s.gradient_checkpointing:
            if s.checkpoint_offload:
                stash = s.checkpoint_dtype or torch.float32
                host[f"block checkpoints ({str(stash).removeprefix('torch.')})"] = n_layers * rows * dim * _BYTES[stash]
            elif s.checkpoint_segments:  # the segment inputs + one segment's block inputs
                kept = s.checkpoint_segments + math.ceil(n_layers / s.checkpoint_segments)
                dev[f"block checkpoints (float32, {kept}/{n_layers})"] = kept * rows * dim * 4
            else:
                dev["block checkpoints (float32)"] = n_layers * rows * dim * 4
            dev["one block's recompute + backward"] = block_activation_bytes(task, "train", rows, s.device)
        else:
            dev["every block's activations"] = n_layers * block_activation_bytes(task, "train", rows, s.device)
        # residual stream entering the blocks, the head's input and the residual gradient (float32)
        dev["embeddings, head, loss (estimated)"] = 3 * rows * dim * 4
    else:
        dev["one block's forward"] = block_activation_bytes(task, "infer", rows, s.device)
        dev["residual stream, head (estimated)"] = 2 * rows * dim * 4
    if s.fp8:  # one layer dequantized at a time: float32 upcast + compute-dtype copy
        dev["fp8 dequantization (largest layer)"] = dim * task.ffn_dim * (4 + _BYTES[s.dtype])
    if s.device == "cuda":
        dev["CUDA context, workspaces (assumed)"] = CUDA_RESERVE
        host["process (assumed)"] = HOST_BASE
    else:  # one memory: everything is host memory
        host.update({k: v for k, v in dev.items()})
        host["process (assumed)"] = HOST_BASE_CPU
        dev.clear()
    return est


def lora_parameter_count(task, rank: int) -> int:
    """LoRA parameters on the ten Linear layers of every block: ``rank·(in + out)`` each."""
    task = get_task(task)
    d, f = task.dim, task.ffn_dim
    per_block = 8 * rank * (d + d) + rank * (d + f) + rank * (f + d)
    return task.num_layers * per_block



def largest_clip(dataset_config, task) -> tuple[int, int, int, int]:
    """``(width, height, frames, batch_size)`` of the largest item a dataset TOML produces (the
    entry with the most tokens at its resolution and longest ``target_frames``; images count as 1
    frame).

    Raises:
        DatasetConfigError: as :func:`wanlora.dataset.config.load_dataset_config`.
    """
    from wanlora.dataset.config import load_dataset_config

    group = load_dataset_config(dataset_config, task)
    best = None
    for d in group.datasets:
        w, h = d.resolution
        frames = max(d.target_frames) if d.kind == "video" else 1
        cand = (token_count(task, w, h, frames) * d.batch_size, (w, h, frames, d.batch_size))
        best = cand if best is None or cand[0] > best[0] else best
    if best is None:
        raise ValueError(f"{dataset_config}: no dataset entries")
    return best[1]


def estimate_for_training(config) -> MemoryEstimate:
    """The estimate of a ``wanlora-train`` run (``--estimate_memory``): the largest clip of its
    dataset TOML, its rank (the larger of the two experts'), experts, dtype (``--dit_dtype``, else
    bf16 as under ``--mixed_precision bf16``), fp8, swap and checkpoint settings, on CUDA.

    Args:
        config: a :class:`wanlora.training.config.TrainConfig`.

    Raises:
        ValueError: a missing or invalid ``--dataset_config``, settings that do not fit the task.
    """
    from wanlora.training.experts import plan_experts

    task = get_task(config.model_files.task)
    if config.data.dataset_config is None:
        raise ValueError("--estimate_memory needs --dataset_config (its largest clip sets the size)")
    width, height, frames, batch = largest_clip(config.data.dataset_config, task)
    plan = plan_experts(task, config.model_files.dit, config.model_files.dit_high_noise, config.experts.expert,
                        config.experts.expert_lora, config.experts.timestep_boundary)
    m = config.model
    ranks = [config.network.network_dim]
    if config.network.network_dim_high_noise:
        ranks.append(config.network.network_dim_high_noise)
    dtype = m.dit_dtype or (torch.float16 if config.launch.mixed_precision == "fp16" else torch.bfloat16)
    return estimate_memory(MemorySettings(
        task.name, width, height, frames, batch=batch, rank=max(ranks), training=True, dtype=dtype, fp8=m.fp8,
        blocks_to_swap=m.blocks_to_swap, gradient_checkpointing=m.gradient_checkpointing,
        checkpoint_offload=m.gradient_checkpointing_cpu_offload,
        checkpoint_dtype=m.gradient_checkpointing_cpu_offload_dtype,
        checkpoint_segments=m.gradient_checkpointing_segments, experts=len(plan.dit_paths),
        offload_inactive=config.experts.offload_inactive_dit))


def estimate_for_generation(task, width: int | None = None, height: int | None = None, frames: int | None = None, *,
                            dtype: torch.dtype = torch.bfloat16, fp8: str | None = None, blocks_to_swap: int = 0,
                            cfg_batched: bool = True, offload_inactive: bool = True) -> MemoryEstimate:
    """The estimate of a ``wanlora-generate`` run (``--estimate_memory``) at one request's size, on CUDA.

    Args:
        task: ``--task`` name or :class:`wanlora.tasks.Task`.
        width, height, frames: pixels and ``4n+1`` frames; None (or 0) takes the task's default;
            width and height are rounded down to the task's pixel unit as the pipeline does.
        dtype: the DiT's compute dtype (float32, the CPU default, is counted as bfloat16: the
            estimate is of a CUDA run). fp8: ``None``, ``"base"`` or ``"scaled"``.
        blocks_to_swap: ``--blocks_to_swap``.
        cfg_batched: the conditional and unconditional passes as one batch of 2 (else 1,
            ``--cfg_separate``).
        offload_inactive: both A14B experts held, the inactive one on the host (else both on the
            device, ``--no_offload``).
    """
    task = get_task(task)
    unit = task.pixel_unit
    width = (width or task.size[0]) // unit * unit
    height = (height or task.size[1]) // unit * unit
    return estimate_memory(MemorySettings(
        task.name, width, height, frames or task.frame_num, batch=2 if cfg_batched else 1, training=False,
        dtype=dtype if dtype != torch.float32 else torch.bfloat16, fp8=fp8, blocks_to_swap=blocks_to_swap,
        experts=2 if task.has_experts else 1, offload_inactive=offload_inactive))
