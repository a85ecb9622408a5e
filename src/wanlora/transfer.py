"""Host-to-device copies that do not stop the host.

A plain ``tensor.to("cuda")`` from pageable memory is a synchronous copy: the CPU waits for the
GPU's queue to drain, so the GPU then idles while the next kernels are launched (and
``torch.cuda.set_sync_debug_mode("error")`` reports it). :func:`to_device` copies from page-locked
memory with ``non_blocking=True`` instead: the copy is queued on the current stream like a kernel
and the host goes on. PyTorch's pinned-memory allocator keeps the staging buffer alive until the
copy has completed, so the source may be dropped at once.
"""

from __future__ import annotations

import torch

__all__ = ["to_device"]


def to_device(t: torch.Tensor, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` on ``device`` (and in ``dtype``), without a host synchronization.

    Args:
        t: any tensor; a CPU tensor headed for a CUDA device is staged in pinned memory and copied
            asynchronously; any other move is ``Tensor.to``.
        device: the target device (``torch.device`` or a string).
        dtype: cast to this dtype on the device (after the copy), or keep ``t``'s.

    Returns:
        The tensor on ``device``; ``t`` itself when nothing changes.
    """
    device = torch.device(device)
    if t.device.type == "cpu" and device.type == "cuda":
        src = t if t.is_pinned() else t.pin_memory()
        t = src.to(device, non_blocking=True)
    else:
        t = t.to(device)
    return t if dtype is None else t.to(dtype)
