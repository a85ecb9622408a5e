"""The process layout of a multi-process run: data-parallel × sequence-parallel ranks, FSDP2 base.

``world_size = dp × sp``. Global ranks ``g·sp .. g·sp + sp − 1`` form sequence group ``g`` (they
share one sample and split its tokens, :mod:`wanlora.models.sequence_parallel`); the ``dp`` groups
see different samples. Consecutive ranks share a group so that, with one node per ``sp`` GPUs or
more, the all-to-alls stay inside a node. The groups come from ``torch.distributed``'s
``init_device_mesh`` (mesh dims ``("dp", "sp")``), never from hand-made rank lists.

``--dit_fsdp`` shards the frozen DiT with FSDP2 (``torch.distributed.fsdp.fully_shard``) over all
ranks: each transformer block is one unit (its weights all-gathered just before it runs and freed
after), the embeddings and head form the root unit. The official ``wan/distributed/fsdp.py`` wraps
the same blocks with FSDP1; FSDP2 shards per parameter (DTensor), so frozen and trainable weights
need no flattening rules. The LoRA adapters live outside the DiT's module tree
(:class:`wanlora.networks.lora.LoRAModule` holds its base layer by reference), so FSDP never sees
them: they stay replicated and are synchronized like any DDP model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from wanlora.models.sequence_parallel import SequenceParallel

__all__ = ["ParallelLayout", "parallel_layout", "shard_dit", "distribute_dit", "init_from_env"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelLayout:
    """Where this process sits in a ``dp × sp`` run.

    Attributes:
        world_size: all processes (``dp_size · sp_size``).
        dp_size: data-parallel degree: groups that draw different samples.
        sp_size: sequence-parallel (Ulysses) degree: ranks that split one sample's tokens.
        rank: this process's global rank.
        dp_rank: its sequence group, ``rank // sp_size`` — the index that picks its samples and
            seeds its noise and timesteps (equal on every rank of the group).
        sp_rank: its place in the group, ``rank % sp_size`` (which token chunk it holds).
        fsdp: the frozen DiT is sharded with FSDP2 over all ranks.
        mesh: the ``("dp", "sp")`` DeviceMesh, or None without sequence parallelism and FSDP.
        fsdp_mesh: the 1-D DeviceMesh of all ranks that shards the DiT, or None without FSDP.
    """

    world_size: int = 1
    dp_size: int = 1
    sp_size: int = 1
    rank: int = 0
    dp_rank: int = 0
    sp_rank: int = 0
    fsdp: bool = False
    mesh: object = None
    fsdp_mesh: object = None

    def sequence_parallel(self) -> SequenceParallel | None:
        """The :class:`SequenceParallel` of this rank's group, or None when ``sp_size == 1``."""
        if self.sp_size == 1:
            return None
        return SequenceParallel(self.mesh.get_group("sp"))

    def describe(self) -> str:
        """One line for the log: ``world 4 = 2 data-parallel × 2 sequence-parallel (Ulysses); FSDP2 ...``."""
        return (f"world {self.world_size} = {self.dp_size} data-parallel × {self.sp_size} sequence-parallel "
                f"(Ulysses); FSDP2 sharded frozen DiT: {'on' if self.fsdp else 'off'}")


def parallel_layout(ulysses_size: int = 1, fsdp: bool = False, device: torch.device | str = "cpu") -> ParallelLayout:
    """Build the layout of this process (every process must call it, in the same order).

    Args:
        ulysses_size: ranks per sequence group (``--ulysses_size``); must divide the world size.
        fsdp: shard the frozen DiT with FSDP2 (``--dit_fsdp``).
        device: this process's device (its type picks the mesh's backend: ``cuda`` → NCCL groups,
            ``cpu`` → gloo).

    Returns:
        The :class:`ParallelLayout`. With ``ulysses_size == 1`` and no FSDP no process group is
        created (plain data parallel, or one process without ``torch.distributed``).

    Raises:
        ValueError: ``ulysses_size`` < 1, or not dividing the world size; ``--ulysses_size`` > 1 or
            ``--dit_fsdp`` without ``torch.distributed`` initialized (launch with torchrun or
            accelerate launch).
    """
    if ulysses_size < 1:
        raise ValueError(f"--ulysses_size {ulysses_size}: must be 1 or more")
    if not (dist.is_available() and dist.is_initialized()):
        if ulysses_size > 1 or fsdp:
            flag = f"--ulysses_size {ulysses_size}" if ulysses_size > 1 else "--dit_fsdp"
            raise ValueError(f"{flag} needs several processes: launch with `torchrun --nproc_per_node N` "
                             "or `accelerate launch --num_processes N`")
        return ParallelLayout()
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % ulysses_size:
        raise ValueError(f"--ulysses_size {ulysses_size} must divide the number of processes ({world}); "
                         f"launch {ulysses_size}·k processes or choose a divisor of {world}")
    dp = world // ulysses_size
    if ulysses_size == 1 and not fsdp:  # plain data parallel: no groups beyond the launcher's
        return ParallelLayout(world_size=world, dp_size=world, rank=rank, dp_rank=rank)
    from torch.distributed.device_mesh import init_device_mesh

    kind = torch.device(device).type
    mesh = init_device_mesh(kind, (dp, ulysses_size), mesh_dim_names=("dp", "sp"))
    fsdp_mesh = init_device_mesh(kind, (world,), mesh_dim_names=("fsdp",)) if fsdp else None
    return ParallelLayout(world_size=world, dp_size=dp, sp_size=ulysses_size, rank=rank,
                          dp_rank=rank // ulysses_size, sp_rank=rank % ulysses_size, fsdp=bool(fsdp),
                          mesh=mesh, fsdp_mesh=fsdp_mesh)


def shard_dit(dit: nn.Module, layout: ParallelLayout) -> nn.Module:
    """Shard a (frozen) :class:`wanlora.models.dit.WanDiT` with FSDP2 over all ranks of ``layout``.

    Each ``dit.blocks[i]`` becomes one FSDP unit and the DiT itself the root unit (embeddings, head);
    after the call each rank holds ``1/world_size`` of every weight (DTensor shards, dim 0), and a
    unit's full weights exist only while it runs. Call it after the weights are loaded, cast and
    moved to the device, and after any LoRA merge; adapters hooked onto the blocks' Linears
    (:mod:`wanlora.networks.lora`) keep working, as they read the layer's input and output only.

    Args:
        dit: the model, on this rank's device.
        layout: from :func:`parallel_layout` with ``fsdp=True`` (its ``fsdp_mesh`` is the group).

    Returns:
        ``dit``, now an FSDP2 module (``fully_shard`` changes it in place).

    Raises:
        ValueError: a layout built without ``fsdp`` (or in one process).
    """
    if layout.fsdp_mesh is None:
        raise ValueError("--dit_fsdp needs several processes: launch with `torchrun --nproc_per_node N`")
    from torch.distributed.fsdp import fully_shard

    mesh = layout.fsdp_mesh
    for block in dit.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(dit, mesh=mesh, reshard_after_forward=True)
    return dit


def init_from_env(device: torch.device | str | None = None) -> torch.device:
    """Join the process group a launcher (``torchrun``, ``accelerate launch``) describes in the
    environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), for a
    command that runs without Accelerate (``wanlora-generate``).

    Args:
        device: the device asked for (``--device``), or None (CUDA when available).

    Returns:
        This process's device: ``cuda:LOCAL_RANK`` for a bare ``cuda`` request under a launcher
        of several processes, else ``device``. The group uses NCCL on CUDA, gloo on the CPU. With
        ``WORLD_SIZE`` unset or 1 nothing is initialized.
    """
    import os

    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dev
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return dev


def distribute_dit(dit: nn.Module, layout: ParallelLayout) -> nn.Module:
    """Put a loaded (and LoRA-merged or hooked) DiT on the layout: its sequence group
    (:meth:`WanDiT.set_sequence_parallel`) and, with ``layout.fsdp``, FSDP2 shards
    (:func:`shard_dit`). A one-process layout returns ``dit`` unchanged.

    Raises:
        ValueError: the sequence-group size does not divide the DiT's head count.
    """
    sp = layout.sequence_parallel()
    if sp is not None:
        dit.set_sequence_parallel(sp)
    if layout.fsdp:
        shard_dit(dit, layout)
    return dit
