"""What the loop reports, read from the device every ``--log_every_n_steps`` steps.

On a GPU each host read of a device value (``.item()``, ``float(t)``, ``if t:``) stops the host
until the device's queue drains, so a loop that reads its loss every micro-batch runs the host and
the device in lock step: the host cannot load and queue the next step while the device computes.
The loop therefore keeps each optimizer step's numbers on the device — loss (mean over the
processes), this process's loss, the gradient norm, and whether the step was skipped (a
non-finite loss or gradient) — in one small tensor per step, and :class:`StepLog` reads all that
are pending in one transfer at a read point: every ``--log_every_n_steps`` steps, before a save,
at an epoch's end and at the end of the run. There it appends the losses to
:attr:`TrainState.losses <wanlora.training.checkpoint.TrainState.losses>`, counts the skipped steps
(a warning each; ``--max_nonfinite_steps`` in a row call ``on_limit``, which saves the state and
raises), updates the progress bar and writes the tracker's scalars with each step's number.

Host-side numbers need no read and are kept per step: the timesteps drawn (CPU), the learning
rates, and the **data wait** — the time the loop spent blocked on the data loader for the step's
batches (:meth:`StepLog.timed`), the number that says whether the input pipeline keeps up. The
wall time per step is reported as the mean over a read interval (a read waits for the device, so
that mean is the device's time, not the host's enqueue time).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

__all__ = ["StepLog", "StepRecord", "NonFiniteLossError"]

log = logging.getLogger("wanlora.train")


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row; the state was saved (path in the message)."""


@dataclass
class StepRecord:
    """One optimizer step awaiting its read: ``values`` is a float32 device tensor ``[4]`` = (loss
    of all processes, this process's loss, gradient norm, 1.0 if the step was skipped else 0.0)."""

    step: int
    expert: str
    values: torch.Tensor
    timesteps: torch.Tensor  # [sum of micro-batch sizes] float32, CPU, on 0..1000
    lrs: dict
    data_wait_s: float


class StepLog:
    """The loop's pending step records and their read points (module docstring).

    Args:
        accelerator: the run's ``accelerate.Accelerator`` (tracker, device).
        every: ``--log_every_n_steps`` (>= 1).
        max_nonfinite_steps: skipped steps in a row that call ``on_limit``.
        on_limit: ``on_limit(state)`` — save the state and raise (the trainer's
            ``NonFiniteLossError``); called at the read that finds the streak.
        progress: a tqdm bar (updated by one per step, its numbers at each read).
        tracking: write the tracker's scalars (``accelerator.log``).
    """

    def __init__(self, accelerator, every: int, max_nonfinite_steps: int, on_limit, progress, tracking: bool):
        if every < 1:
            raise ValueError(f"--log_every_n_steps {every}: give 1 or more")
        self.accelerator, self.every, self.max_nonfinite = accelerator, every, max_nonfinite_steps
        self.on_limit, self.progress, self.tracking = on_limit, progress, tracking
        self.pending: list[StepRecord] = []
        self.reads = 0  # read points so far (each one host read of the device)
        self._wait = 0.0  # data wait of the step being assembled, seconds
        self._t_read = time.perf_counter()

    def timed(self, batches):
        """Yield ``batches``' items, adding the time blocked in ``next()`` to the current step's data wait."""
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self._wait += time.perf_counter() - t0
            yield batch

    def add(self, step: int, expert: str, values: torch.Tensor, timesteps: list[torch.Tensor], bundles: dict) -> None:
        """Record optimizer step ``step`` (already counted): ``values`` as :class:`StepRecord`, on the
        device, not read; ``timesteps`` the micro-batches' ``[B]`` draws (CPU)."""
        lrs = {key: b.scheduler.get_last_lr()[0] for key, b in bundles.items()}
        self.pending.append(StepRecord(step, expert, values.detach(), torch.cat(timesteps), lrs, self._wait))
        self._wait = 0.0
        self.progress.update(1)

    def due(self, step: int) -> bool:
        """Whether step ``step`` is a scheduled read point (every ``--log_every_n_steps``)."""
        return step % self.every == 0

    def read(self, state) -> None:
        """The read point: one host read of every pending step; losses into ``state.losses``, skipped
        steps counted into ``state.nonfinite_in_row`` (``on_limit(state)`` at the limit), progress
        bar and tracker updated. Nothing pending: nothing happens."""
        if not self.pending:
            return
        rows = torch.stack([r.values for r in self.pending]).tolist()  # the one wait for the device
        self.reads += 1
        now = time.perf_counter()
        step_s, self._t_read = (now - self._t_read) / len(rows), now
        records, self.pending = self.pending, []
        limit_hit = False
        for r, (loss, local, grad_norm, skipped) in zip(records, rows):
            if skipped:
                state.nonfinite_in_row += 1
                log.warning("step %d: non-finite loss or gradient (%s expert) — step skipped (%d in a row)",
                            r.step, r.expert, state.nonfinite_in_row)
                limit_hit |= state.nonfinite_in_row >= self.max_nonfinite
            else:
                state.nonfinite_in_row = 0
                state.losses.append((r.step, r.expert, loss, local))
            if self.tracking:
                self._log(r, loss, grad_norm, bool(skipped), step_s)
        last = records[-1]
        wait_ms = 1000 * sum(r.data_wait_s for r in records) / len(records)
        self.progress.set_postfix(loss=f"{rows[-1][0]:.4f}", expert=last.expert, s_step=f"{step_s:.3g}",
                                  data_wait_ms=f"{wait_ms:.3g}")
        if limit_hit:
            self.on_limit(state)

    def _log(self, r: StepRecord, loss: float, grad_norm: float, skipped: bool, step_s: float) -> None:
        logs = {"timestep/mean": r.timesteps.mean().item(), "timestep/min": r.timesteps.min().item(),
                "timestep/max": r.timesteps.max().item(), "time/data_wait_s": r.data_wait_s,
                "time/step_s": step_s, "it_per_s": 1.0 / max(step_s, 1e-9), "skipped": float(skipped)}
        if not skipped:
            logs.update({"loss/average": loss, f"loss/{r.expert}": loss, "grad_norm": grad_norm})
        logs.update({f"lr/{key}": lr for key, lr in r.lrs.items()})
        device = self.accelerator.device
        if device.type == "cuda":  # the runtime peak, to compare with --estimate_memory
            logs["memory/peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            logs["memory/peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        self.accelerator.log(logs, step=r.step)
