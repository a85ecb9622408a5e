"""Block swap: DiT blocks whose frozen weights live in host memory and visit the device in turn.

``--blocks_to_swap N`` keeps ``K = L − N`` of the ``L`` blocks on the device at any moment (the
musubi-tuner meaning of N). The resident set is a window of K consecutive blocks that slides with
the computation:

* forward (blocks ``0 → L−1``): entering block ``j`` makes the window ``j .. j+K−1`` (clipped to
  the last K blocks): block ``j−1`` leaves, block ``j+K−1`` is prefetched — K−1 blocks ahead of
  the one computing;
* backward with gradient checkpointing (blocks recomputed ``L−1 → 0``): entering block ``j``'s
  recomputation makes the window ``j−K+1 .. j``: block ``j+1`` (whose backward is finished)
  leaves, block ``j−K+1`` is prefetched. The forward ends holding the last K blocks and the
  backward ends holding the first K, each exactly what the next pass needs first.

Blocks ``[N, K)`` (when K > N) are in every window and never move. The others, ``[0, N) ∪ [K, L)``,
keep their weights in (pinned, on CUDA) host memory; the device holds ``min(N, K)`` reusable
slots for them. Weights are frozen, so a block that leaves is not copied back: its parameters are
re-pointed at the host copy and its slot is reused. Copies run host→device only, on a side CUDA
stream; a CUDA event per slot orders "compute finished with the slot" before "copy into it", and
one per slot orders "copy done" before the compute that uses it. LoRA adapters are not part of the
blocks (they hook the Linear layers from outside) and stay on the device.

On the CPU the same schedule runs host→host (slots are separate CPU tensors, copies synchronous):
results are bit-identical to no swapping, which the tests check, with the residency bound.

Training needs gradient checkpointing with block swap: without it autograd would keep references
to slot tensors that are overwritten before the backward pass (:meth:`BlockSwap.check_training`).

Regional compilation (``--compile``, :meth:`~wanlora.models.dit.WanDiT.compile_blocks`) combines
with it: the swap's pre-hook runs eagerly before each compiled block (``torch.compiler.disable``),
and since the compiled graph takes the parameters as inputs, a block computes with whichever slot
holds its weights at that moment (``tests/test_compile.py``).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

__all__ = ["BlockSwap", "block_tensors", "place_with_block_swap"]

log = logging.getLogger(__name__)


def block_tensors(block: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of a block's parameters and buffers (its frozen base weights, including
    fp8 scales), in module order."""
    out = dict(block.named_parameters())
    out.update(dict(block.named_buffers()))
    return out


def _keep_in_place(block: nn.Module):
    """A replacement for ``block._apply`` that leaves the block alone (``model.to(...)`` then
    moves every other part of the model)."""
    def _apply(fn, recurse=True):
        return block
    return _apply


def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass (a checkpointed block recomputing)."""
    return torch._C._current_graph_task_id() != -1


class BlockSwap:
    """Swap the blocks of a DiT between host memory and the compute device.

    Args:
        blocks: the DiT's ``nn.ModuleList`` of identical blocks (``WanDiT.blocks``).
        blocks_to_swap: N, 1 <= N <= L − 1. With one block resident (N = L − 1, musubi-tuner's
            maximum) every copy waits for the block before it to finish: nothing overlaps.
        device: the compute device. ``"cpu"`` runs the host→host schedule.
        pin: pin the host copies (default: when ``device`` is CUDA).
        share_slots_with: another model's swap (same block shapes and N) whose device slots this one
            reuses — the two A14B experts in generation, which never run at once: the device then
            holds one set of slots; whichever swap enters a block takes the slots over.

    The blocks may be anywhere when attached; afterwards the never-moving blocks are on
    ``device``, the moving ones have pinned host copies and the first window is loaded. The rest
    of the model (embeddings, head) is the caller's to move.

    Attributes:
        resident: the block indices whose weights are on the device now.
        max_resident: the largest number of resident blocks seen (the tests' bound).
        copies: blocks copied host→device so far.

    Raises:
        ValueError: N outside ``1 .. L−2``, blocks of different shapes, or trainable parameters
            inside a block (LoRA must hook from outside).
    """

    def __init__(self, blocks: nn.ModuleList, blocks_to_swap: int, device, pin: bool | None = None,
                 share_slots_with: "BlockSwap | None" = None):
        n_layers = len(blocks)
        n = int(blocks_to_swap)
        if not 1 <= n <= n_layers - 1:
            raise ValueError(f"--blocks_to_swap {n}: give 1 .. {n_layers - 1} for a DiT of {n_layers} "
                             "blocks (at least one must be on the device)")
        self.blocks = blocks
        self.n_layers, self.n_swap, self.n_resident = n_layers, n, n_layers - n
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.pin = self.cuda if pin is None else bool(pin)
        k = self.n_resident
        self.permanent = set(range(n, k))  # in every window (empty when K <= N)
        self.movable = [j for j in range(n_layers) if j not in self.permanent]
        first = block_tensors(blocks[0])
        for j, block in enumerate(blocks):
            t = block_tensors(block)
            if [(a, b.shape, b.dtype) for a, b in t.items()] != [(a, b.shape, b.dtype) for a, b in first.items()]:
                raise ValueError(f"block swap: block {j} differs in shape or dtype from block 0")
            trainable = [a for a, b in t.items() if b.requires_grad]
            if trainable:
                raise ValueError(f"block swap: block {j} has trainable tensors {trainable[:3]}; only frozen "
                                 "base weights can be swapped (LoRA hooks the layers from outside)")
        self.names = list(first)
        self._refs = [block_tensors(b) for b in blocks]
        self.host: dict[int, dict[str, torch.Tensor]] = {}
        for j in range(n_layers):
            if j in self.permanent:
                for name, t in block_tensors(blocks[j]).items():
                    t.data = t.data.to(self.device)
            else:
                self.host[j] = {name: self.to_host(t.data) for name, t in block_tensors(blocks[j]).items()}
                for name, t in block_tensors(blocks[j]).items():
                    t.data = self.host[j][name]
        n_slots = min(n, k)
        self.slot_of: dict[int, int] = {}
        if share_slots_with is not None:
            other = share_slots_with
            if (other.n_layers, other.n_swap, other.device) != (n_layers, n, self.device) or [
                    (t.shape, t.dtype) for t in other.slots[0].values()] != [(t.shape, t.dtype) for t in first.values()]:
                raise ValueError("block swap: slots can only be shared between models of the same shape, "
                                 "dtype, device and --blocks_to_swap")
            self.slots, self.copy_stream = other.slots, other.copy_stream
            self.slot_free, self.slot_ready, self._pool = other.slot_free, other.slot_ready, other._pool
        else:
            self.slots = [{name: torch.empty_like(t, device=self.device) for name, t in first.items()}
                          for _ in range(n_slots)]
            self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
            self.slot_free = [self._event() for _ in range(n_slots)]
            self.slot_ready = [self._event() for _ in range(n_slots)]
            self._pool = {"owner": None}  # the swap whose blocks the slots hold
        # Moving blocks stay out of module.to(): their tensors belong to this schedule.
        for j in self.host:
            blocks[j]._apply = _keep_in_place(blocks[j])
        self.max_resident = 0
        self.copies = 0
        self._hooks = [b.register_forward_pre_hook(self._pre_hook(j)) for j, b in enumerate(blocks)]
        self.enter(0, +1)
        log.info("block swap: %d of %d blocks on the host, %d resident on %s (%d slots)%s",
                 n, n_layers, k, self.device, n_slots, ", pinned" if self.pin else "")

    # ---- bookkeeping

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of ``t`` for a moving block (pinned when the swap pins)."""
        t = t.detach().to("cpu", copy=True)
        return t.pin_memory() if self.pin else t

    def _event(self):
        return torch.cuda.Event() if self.cuda else None

    @property
    def resident(self) -> set[int]:
        """Block indices whose weights are on the device now."""
        return self.permanent | set(self.slot_of)

    def window(self, j: int, direction: int) -> range:
        """The K blocks resident while block ``j`` computes in ``direction`` (+1 forward, −1
        backward recomputation)."""
        k, n_layers = self.n_resident, self.n_layers
        start = min(j, n_layers - k) if direction > 0 else max(j - k + 1, 0)
        return range(start, start + k)

    def _pre_hook(self, j: int):
        # Never traced: with regional compilation (WanDiT.compile_blocks) the block's hooks run
        # inside the compiled call, and moving weights (``.data`` re-pointing, copies, events) is
        # not graph material. The compiled block then starts after the hook and reads whichever
        # slot holds its weights (parameters are graph inputs).
        @torch.compiler.disable
        def hook(module, args):
            self.enter(j, -1 if _in_backward() else +1)
        return hook

    # ---- the schedule

    def enter(self, j: int, direction: int) -> None:
        """Make block ``j``'s window resident (evict behind, prefetch ahead) and make the compute
        stream wait until block ``j``'s weights have arrived."""
        if self._pool["owner"] is not self:  # the slots hold another model's blocks
            owner = self._pool["owner"]
            if owner is not None:
                for b in list(owner.slot_of):
                    owner._evict(b)
            self._pool["owner"] = self
        want = self.window(j, direction)
        for b in [b for b in self.slot_of if b not in want]:
            self._evict(b)
        order = [b for b in (j + i * direction for i in range(self.n_resident)) if b in want]
        for b in order + [b for b in want if b not in order]:  # j first, then the next ahead
            if b not in self.permanent and b not in self.slot_of:
                self._load(b)
        self.max_resident = max(self.max_resident, len(self.resident))
        if self.cuda and j in self.slot_of:
            torch.cuda.current_stream(self.device).wait_event(self.slot_ready[self.slot_of[j]])

    def _evict(self, b: int) -> None:
        s = self.slot_of.pop(b)
        for name, t in self._refs[b].items():
            t.data = self.host[b][name]
        if self.cuda:  # the compute stream's work on this slot is all enqueued before now
            self.slot_free[s].record(torch.cuda.current_stream(self.device))

    def _load(self, b: int) -> None:
        used = set(self.slot_of.values())
        s = next(i for i in range(len(self.slots)) if i not in used)
        slot, src = self.slots[s], self.host[b]
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.slot_free[s])
                for name in self.names:
                    slot[name].copy_(src[name], non_blocking=True)
                self.slot_ready[s].record(self.copy_stream)
        else:
            for name in self.names:
                slot[name].copy_(src[name])
        for name, t in self._refs[b].items():
            t.data = slot[name]
        self.slot_of[b] = s
        self.copies += 1

    # ---- experts and checks

    def host_weights(self) -> dict[int, dict[str, torch.Tensor]]:
        """The host copies of the moving blocks, ``{block index: {name: tensor}}``."""
        return self.host

    def set_host_weights(self, host: dict[int, dict[str, torch.Tensor]]) -> None:
        """Use other host copies for the moving blocks (another expert's, same shapes); resident
        moving blocks are reloaded from them."""
        if set(host) != set(self.host):
            raise ValueError("block swap: the new host weights cover other blocks")
        resident = sorted(self.slot_of)
        for b in resident:
            self._evict(b)
        self.host = host
        for b in resident:
            self._load(b)

    def check_training(self, gradient_checkpointing: bool) -> None:
        """Raise ValueError unless gradient checkpointing is on (required to train with swap)."""
        if not gradient_checkpointing:
            raise ValueError("--blocks_to_swap needs --gradient_checkpointing when training (the backward "
                             "pass reloads each block while it recomputes it)")

    def remove(self) -> None:
        """Take the hooks off (the weights stay where they are)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for j in self.host:
            self.blocks[j].__dict__.pop("_apply", None)


def place_with_block_swap(model: nn.Module, blocks_to_swap: int, device, share_slots_with: BlockSwap | None = None
                          ) -> BlockSwap | None:
    """Put a DiT on ``device`` with ``blocks_to_swap`` of its blocks swapped (0: plain ``.to``).

    Load the model on the CPU first (``load_dit(..., device="cpu")``): the swapped blocks then never
    visit the device all at once. Returns the :class:`BlockSwap` (or ``None`` for 0).

    Raises:
        ValueError: as :class:`BlockSwap`.
    """
    if not blocks_to_swap:
        model.to(device)
        return None
    swap = BlockSwap(model.blocks, blocks_to_swap, device, share_slots_with=share_slots_with)
    model.to(device)  # everything else; the moving blocks' tensors stay with the swap
    return swap
