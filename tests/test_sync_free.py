"""No host synchronization inside the training step's device work: forward, loss, backward,
gradient clipping. On a GPU each ``.item()``, ``.tolist()``, ``.cpu()``, ``bool(tensor)`` (an
``if`` on a tensor), ``float``/``int`` of a tensor, or a data-dependent shape (boolean-mask
indexing) stops the host until the GPU's queue drains. Here these methods are patched to raise while
the device work runs, so any such read in the DiT, the LoRA modules, the loss or the TI2V
first-frame inputs fails the test. (On a GPU, ``benchmarks/gpu_speed.py`` runs the whole step under
``torch.cuda.set_sync_debug_mode("error")``.)
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from wanlora.models.dit import WanDiT, WanDiTConfig
from wanlora.networks.lora_wan import create_network

torch.set_num_threads(1)

_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


class _RefuseDataDependent(TorchDispatchMode):
    """Raise on every operator whose output depends on tensor values on the host: a scalar read
    (``_local_scalar_dense``: ``item``, ``bool``, ``float``) or a data-dependent shape (``nonzero``,
    boolean-mask indexing, ``masked_select``, ``unique``)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tags = set(getattr(func, "tags", ()))
        if tags & {torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape}:
            raise AssertionError(f"host read of a tensor inside the step: {func}")
        if func is torch.ops.aten.index.Tensor and any(
                i is not None and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())):
            raise AssertionError(f"host read of a tensor inside the step: boolean-mask indexing ({func})")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_reads():
    """Make every host read of a tensor's values raise: the Python methods ``_READS`` and, below
    them, every operator with a value-dependent result."""
    saved = {name: getattr(torch.Tensor, name) for name in _READS}

    def refuse(name):
        def method(self, *args, **kwargs):
            raise AssertionError(f"host read of a tensor inside the step: Tensor.{name}")
        return method

    try:
        for name in _READS:
            setattr(torch.Tensor, name, refuse(name))
        with _RefuseDataDependent():
            yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def test_the_guard_catches_what_it_claims():
    t = torch.ones(3)
    for read in (lambda: t.sum().item(), lambda: bool(t.any()), lambda: t.tolist(), lambda: t[t > 0],
                 lambda: float(t[0]), lambda: t.nonzero(), lambda: torch.masked_select(t, t > 0),
                 lambda: t.unique()):
        with no_host_reads(), pytest.raises(AssertionError, match="host read"):
            read()
    assert t.sum().item() == 3.0  # restored


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_forward_loss_backward_and_clipping_read_nothing_on_the_host(checkpointing):
    from wanlora.training import flow

    torch.manual_seed(0)
    cfg = WanDiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_channels=16, out_channels=16, text_dim=32)
    dit = WanDiT(cfg).requires_grad_(False)
    dit.set_gradient_checkpointing(checkpointing)
    net = create_network(1.0, 4, 4, None, None, dit, rank_dropout="0.1")
    net.apply_to(None, dit)
    net.train()
    params = list(net.parameters())
    # host side (drawn before the step, as the trainer's generator draws are): noise, timesteps
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 2, 4, 4, generator=g), torch.randn(2, 16, 2, 4, 4, generator=g)
    t = flow.TimestepDistribution("shift", discrete_flow_shift=5.0).sample(2, g, 0.0, 1000.0)
    ctx = [torch.randn(3, 32, generator=g), torch.randn(5, 32, generator=g)]
    dit(x0, t, ctx)  # the RoPE table of this grid is built once, outside the step
    with no_host_reads():
        sigma = flow.timestep_to_sigma(t)
        pred = dit(flow.add_noise(x0, noise, sigma), t, ctx)
        loss = (pred.float() - flow.flow_target(x0, noise)).square().mean()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        finite = torch.isfinite(loss)  # kept on the device: read when the step's losses are logged
    assert bool(finite) and norm.item() > 0
    assert all(p.grad is not None for p in params)


def test_ti2v_first_frame_inputs_read_nothing_on_the_host():
    """The clean-first-frame inputs select with ``torch.where`` (boolean-mask indexing would be a
    data-dependent shape, a sync on a GPU) and equal the definition."""
    from wanlora.conditioning import clean_first_frame

    g = torch.Generator().manual_seed(0)
    x0, x_t = torch.randn(3, 4, 5, 2, 2, generator=g), torch.randn(3, 4, 5, 2, 2, generator=g)
    t = torch.tensor([100.0, 500.0, 900.0])
    chosen = torch.tensor([True, False, True])
    with no_host_reads():
        xs, ts, keep = clean_first_frame(x0, x_t, t, chosen)
    for i in range(3):
        first = x0[i, :, 0] if chosen[i] else x_t[i, :, 0]
        assert torch.equal(xs[i, :, 0], first) and torch.equal(xs[i, :, 1:], x_t[i, :, 1:])
        assert ts[i].tolist() == [0.0 if chosen[i] else t[i].item()] + [t[i].item()] * 4
        assert keep[i, 0, :, 0, 0].tolist() == [0.0 if chosen[i] else 1.0] + [1.0] * 4
