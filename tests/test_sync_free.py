"""No host synchronization inside the training step's device work (forward, loss, backward,
gradient clipping), nor in the training loop's steady state outside its read points. On a GPU each ``.item()``, ``.tolist()``, ``.cpu()``, ``bool(tensor)`` (an
``if`` on a tensor), ``float``/``int`` of a tensor, or a data-dependent shape (boolean-mask
indexing) stops the host until the GPU's queue drains. Here these methods are patched to raise while
the device work runs, so any such read in the DiT, the LoRA modules, the loss or the TI2V
first-frame inputs fails the test. For the whole loop, where the host legitimately reads its own
CPU-born values (timestep draws, shapes), the values a GPU would hold are tracked instead
(:class:`_DeviceValues`) and every host read of one is recorded with the loop function it came
from. (On a GPU, ``benchmarks/gpu_speed.py`` runs the whole step under
``torch.cuda.set_sync_debug_mode("error")``.)
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from fixed_batches import FixedBatches
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


# ---- the whole loop ------------------------------------------------------------------------------


class _DeviceValues(TorchDispatchMode):
    """Mark what a GPU run holds on the device — the tensors :meth:`mark` is given (weights, batches)
    and every operator's outputs and written arguments computed from a marked tensor — and record
    each host read of a marked value: a value-dependent operator (``item``, ``bool``, ``nonzero``,
    boolean-mask indexing) or a Python read method (``_READS``: ``.cpu()`` on a CPU tensor dispatches
    nothing). ``reads`` holds, per read, the innermost ``wanlora`` function on the stack."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []
        self._saved = {}

    @staticmethod
    def mark(*tensors):
        for t in pytree.tree_leaves(tensors):
            if isinstance(t, torch.Tensor):
                t._on_device = True

    def _record(self, what):
        frame = sys._getframe(1)
        while frame is not None and not frame.f_globals.get("__name__", "").startswith("wanlora."):
            frame = frame.f_back
        self.reads.append(f"{frame.f_code.co_qualname if frame else '?'}: {what}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        marked = any(getattr(t, "_on_device", False) for t in pytree.tree_leaves((args, kwargs))
                     if isinstance(t, torch.Tensor))
        if marked:
            tags = set(getattr(func, "tags", ()))
            if tags & {torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape}:
                self._record(str(func))
        out = func(*args, **kwargs)
        if marked:
            self.mark(out)
            for i, a in enumerate(func._schema.arguments):  # in-place and out= arguments
                if a.alias_info is not None and a.alias_info.is_write:
                    self.mark(args[i] if i < len(args) else kwargs.get(a.name))
        return out

    def __enter__(self):
        for name in _READS:
            original = self._saved[name] = getattr(torch.Tensor, name)

            def method(t, *a, _name=name, _original=original, **k):
                if getattr(t, "_on_device", False):
                    self._record(f"Tensor.{_name}")
                return _original(t, *a, **k)
            setattr(torch.Tensor, name, method)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(torch.Tensor, name, fn)
        return super().__exit__(*exc)


_Batches = FixedBatches  # tests/fixed_batches.py


@pytest.mark.parametrize("clip", ["1.0", "0"], ids=["clipped", "unclipped"])
def test_the_training_loop_reads_the_device_only_at_its_read_points(tiny_dir, tmp_path, monkeypatch, clip):
    """12 optimizer steps of 2 micro-batches, one of them NaN (a step skipped on the device), with
    ``--log_every_n_steps 4``: from the first micro-batch until the final save, the only host reads
    of device values are the step log's three reads; the skipped step is still found and reported."""
    from accelerate.state import AcceleratorState

    from wanlora.commands.train import parse_config
    from wanlora.training import trainer
    from wanlora.training.checkpoint import Checkpointer
    from wanlora.training.step_log import StepLog

    flags = json.loads((Path(tiny_dir("t2v-A14B")) / "manifest.json").read_text())["flags"]
    config = parse_config(["--task", "t2v-A14B", "--dit", flags["--dit"], "--dataset_config", "unused.toml",
                           "--output_dir", str(tmp_path), "--output_name", "lora", "--network_dim", "4",
                           "--seed", "3", "--max_data_loader_n_workers", "0", "--expert", "low",
                           "--max_train_steps", "12", "--gradient_accumulation_steps", "2",
                           "--log_every_n_steps", "4", "--max_grad_norm", clip])
    guard, armed = _DeviceValues(), []
    reads_at = []
    micro_step, final, read = trainer._micro_step, Checkpointer.final, StepLog.read

    def watched_micro_step(accelerator, config, dit, window, batch, *rest):
        if not armed:  # the steady state starts here: the weights are what a GPU holds
            guard.mark(list(dit.parameters()), list(dit.buffers()), window.lora.trainable)
            guard.__enter__()
            armed.append(True)
        guard.mark(batch["latents"], batch["context"])  # moved to the device by the loader
        return micro_step(accelerator, config, dit, window, batch, *rest)

    def unwatched_final(self, *a, **k):
        guard.__exit__(None, None, None)
        return final(self, *a, **k)

    def counted_read(self, state):
        reads_at.append((state.global_step, len(guard.reads)))
        return read(self, state)

    monkeypatch.setattr(trainer, "_micro_step", watched_micro_step)
    monkeypatch.setattr(Checkpointer, "final", unwatched_final)
    monkeypatch.setattr(StepLog, "read", counted_read)
    try:
        state = trainer.train(config, dataset=_Batches(24, nan_at=(5,)))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert armed and [s for s, _ in reads_at] == [4, 8, 12]
    sites = {r.split(":")[0] for r in guard.reads}
    assert sites == {"StepLog.read"}, guard.reads  # the one stacked .tolist() per read point
    assert len(guard.reads) == 3
    # batch 5 is step 3's second micro-batch: skipped on the device, counted at the read of step 4
    assert [s for s, *_ in state.losses] == [1, 2] + list(range(4, 13)) and state.nonfinite_in_row == 0
