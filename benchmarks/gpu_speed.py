"""One-shot GPU speed run: the numbers that decide a Wan LoRA step on a GPU, in one script.

What it measures (random weights at real sizes, bf16 weights with ``load_dit``'s float32 islands,
LoRA rank 32 on the 10 Linear layers of every block, float32 LoRA under bf16 autocast — the
trainer's precision):

1. **One Wan2.2 A14B block** (dim 5120, ffn 13824, 40 heads), LoRA forward + backward, at the
   token counts of 832x480x81 (32 760 tokens) and 1280x720x81 (75 600 tokens): eager with each
   attention backend that is installed (``sdpa``, ``cudnn``, ``flash``, ``flash3``, ``xformers``)
   and compiled (``WanDiT.compile_blocks``, inductor) with ``sdpa``; the compile time apart; with
   the block Linears in fp8 (``--fp8_scaled``: dequantized to bf16 per matmul) and multiplied in
   fp8 (``--fp8_compute``: ``torch._scaled_mm`` with per-row scales), eager and compiled.
   MFU = model FLOPs / (time x peak), with the FLOP formula of :func:`block_flops` (also in
   ``docs/benchmarks.md``): recomputation is not counted, the frozen weights need no weight
   gradient, so a Linear costs 2x its forward and attention 3x.
2. **A whole-model training step** of a real-size random Wan2.1 T2V-1.3B and Wan2.2 TI2V-5B at
   832x480x81 with gradient checkpointing: the trainer's flow-matching loss, backward, gradient
   clipping and AdamW over the LoRA, eager and compiled.
3. **Generation**: seconds per denoising step of a real-size A14B expert (40 layers) at 832x480x81
   with batched CFG (one forward of batch 2) and one UniPC update, eager and compiled.
4. **Host syncs**: the 1.3B training step run once under ``torch.cuda.set_sync_debug_mode("error")``,
   and the trainer's whole loop (``train()``, 4 blocks of 1.3B width) under it outside its read
   points; ``ok`` or the first synchronizing call.

Peak memory is ``torch.cuda.max_memory_allocated`` per row (weights included). Every row that
cannot run (package missing, out of memory, time budget spent) says why instead of a number.

    python benchmarks/gpu_speed.py --quick --out gpu_speed.json     # about 6 minutes on one H100/H200
    python benchmarks/gpu_speed.py --tiny --device cpu              # the same code on tiny sizes (smoke)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass

import torch

from wanlora.models.attention import TRAINING_ATTN_MODES, check_attn_mode
from wanlora.models.dit import WanDiT, WanDiTConfig
from wanlora.models.fp8 import quantize_linears_, set_fp8_compute
from wanlora.models.fp8_matmul import check_fp8_compute
from wanlora.models.loading import cast_dit
from wanlora.networks.lora_wan import create_network

TEXT_LEN = 512  # text rows after zero padding (every Wan DiT)
#: bf16 dense tensor-core peak (TFLOP/s) by device-name fragment, for MFU; --peak_tflops overrides
PEAKS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.2,
         "5090": 209.5}


@dataclass(frozen=True)
class Arch:
    """A Wan DiT size: width, FFN width, heads, layers, latent channels, VAE spatial stride."""

    dim: int
    ffn: int
    heads: int
    layers: int
    channels: int
    stride: int
    text_dim: int = 4096

    def config(self, layers: int | None = None) -> WanDiTConfig:
        return WanDiTConfig(dim=self.dim, ffn_dim=self.ffn, num_heads=self.heads,
                            num_layers=self.layers if layers is None else layers,
                            in_channels=self.channels, out_channels=self.channels, text_dim=self.text_dim)


ARCHS = {
    "A14B": Arch(5120, 13824, 40, 40, 16, 8),
    "1.3B": Arch(1536, 8960, 12, 30, 16, 8),
    "5B": Arch(3072, 14336, 24, 30, 48, 16),
}
TINY = {name: Arch(64, 128, 2, 2, a.channels, a.stride, text_dim=32) for name, a in ARCHS.items()}
SIZES = {"480p": (832, 480, 81), "720p": (1280, 720, 81)}
TINY_SIZES = {"480p": (128, 64, 5), "720p": (192, 128, 5)}


def latent_grid(arch: Arch, size: tuple[int, int, int]) -> tuple[int, int, int]:
    """Latent ``(F, H, W)`` of a ``(width, height, frames)`` video (VAE: 4x temporal, ``stride``
    spatial)."""
    w, h, f = size
    return (f - 1) // 4 + 1, h // arch.stride, w // arch.stride


def token_grid(arch: Arch, size) -> tuple[int, int, int]:
    """The DiT's token grid (patch 1x2x2)."""
    f, h, w = latent_grid(arch, size)
    return f, h // 2, w // 2


def block_flops(tokens: int, dim: int, ffn: int, text_len: int = TEXT_LEN) -> tuple[float, float]:
    """Forward FLOPs of one Wan block: ``(Linear layers, attention)``, multiply-add = 2 FLOPs.

    Linear: self-attention q, k, v, o and cross-attention q, o on ``L`` tokens (``6·2·L·D²``),
    cross-attention k, v on the ``Lt`` text rows (``2·2·Lt·D²``), FFN (``2·2·L·D·F``).
    Attention: ``QKᵀ`` and ``PV`` of self-attention (``2·2·L²·D``) and cross-attention
    (``2·2·L·Lt·D``). Norms, modulation, RoPE, softmax and the LoRA matmuls (rank r adds
    ``2·L·(in+out)·r`` per Linear, under 1 % at r=32) are not counted.
    """
    L, D, F, Lt = tokens, dim, ffn, text_len
    linear = 12 * L * D * D + 4 * Lt * D * D + 4 * L * D * F
    attn = 4 * L * L * D + 4 * L * Lt * D
    return float(linear), float(attn)


def train_flops(tokens: int, dim: int, ffn: int, layers: int) -> float:
    """Model FLOPs of one LoRA training step: ``layers · (2·linear + 3·attention)`` — the frozen
    Linear layers need the input gradient only (1x forward), attention's backward is 2x its
    forward; recomputation (gradient checkpointing) is not model FLOPs."""
    linear, attn = block_flops(tokens, dim, ffn)
    return layers * (2 * linear + 3 * attn)


def infer_flops(tokens: int, dim: int, ffn: int, layers: int, batch: int = 1) -> float:
    """Forward FLOPs of ``batch`` samples through ``layers`` blocks."""
    linear, attn = block_flops(tokens, dim, ffn)
    return batch * layers * (linear + attn)


# ---------------------------------------------------------------------------------------------
# timing helpers


class Budget(Exception):
    """The time budget is spent: the remaining rows are skipped."""


class Runner:
    """Runs rows, keeps the table, enforces the time budget and frees memory between rows."""

    def __init__(self, device: torch.device, budget_s: float, peak_tflops: float | None):
        self.device, self.budget_s, self.peak = device, budget_s, peak_tflops
        self.t_start = time.perf_counter()
        self.rows: list[dict] = []

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time_it(self, fn, warmup: int, reps: int) -> tuple[float, float]:
        """``(first call s, median s)`` of ``fn()`` over ``reps`` calls after ``warmup`` calls."""
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        first = time.perf_counter() - t0
        for _ in range(max(0, warmup - 1)):
            fn()
        times = []
        for _ in range(reps):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return first, statistics.median(times)

    def row(self, section: str, name: str, fn, flops: float | None = None) -> None:
        """Run ``fn() -> dict`` (with ``s`` seconds, optional ``first_s``) and record the row."""
        rec = {"section": section, "config": name}
        if time.perf_counter() - self.t_start > self.budget_s:
            rec["error"] = "skipped: time budget spent"
            self.rows.append(rec)
            print(f"  {section} | {name}: {rec['error']}", flush=True)
            return
        torch._dynamo.reset()  # each row compiles its own graphs (compile time is part of the row)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            rec.update(fn())
            if self.device.type == "cuda":
                rec["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if flops is not None:
                rec["tflops"] = flops / rec["s"] / 1e12
                if self.peak:
                    rec["mfu"] = rec["tflops"] / self.peak
        except Exception as e:  # a row that cannot run says why; the others still run
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            if not isinstance(e, (ImportError, ValueError, torch.OutOfMemoryError)):
                traceback.print_exc(limit=4)
        self.rows.append(rec)
        print(f"  {section} | {name}: " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()
            if k not in ("section", "config")), flush=True)


def random_dit(arch: Arch, layers: int | None, device, attn_mode: str = "sdpa", seed: int = 0) -> WanDiT:
    """A random-weight DiT in load_dit's bf16 precision (float32 islands), built on the meta device
    and materialized in bf16 (a 14B model never exists in float32). Weights ~ N(0, 1/fan_in)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        dit = WanDiT(arch.config(layers), attn_mode=attn_mode)
    cast_dit(dit, torch.bfloat16).to_empty(device=device)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".norm" in name:
                p.fill_(1.0)
            else:
                fan_in = math.prod(p.shape[1:]) if p.ndim > 1 else p.shape[-1]
                p.normal_(0.0, fan_in ** -0.5)
    return dit.eval().requires_grad_(False)


def _lora_dit(arch: Arch, layers: int | None, device, rank: int, attn_mode: str = "sdpa", seed: int = 0,
              fp8: str | None = None):
    """:func:`random_dit` with a float32 LoRA on every block's 10 Linear layers (random up, as
    after some training). ``fp8``: ``"scaled"`` stores the block Linears as ``--fp8_scaled`` does
    (dequantized to bf16 per matmul), ``"compute"`` also multiplies them in fp8 (``--fp8_compute``)."""
    dit = random_dit(arch, layers, device, attn_mode, seed)
    if fp8:
        quantize_linears_(dit, scaled=True, compute_dtype=torch.bfloat16)
        if fp8 == "compute":
            check_fp8_compute(device)
            set_fp8_compute(dit)
    net = create_network(1.0, rank, rank, None, None, dit)
    net.apply_to(None, dit)
    net.to(device)
    for lora in net.unet_loras:
        torch.nn.init.normal_(lora.lora_up.weight, std=1e-3)
    return dit, net


def _autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# 1. one block


def bench_block(run: Runner, arch: Arch, size_name: str, size, mode: str, compiled: bool, a,
                fp8: str | None = None) -> dict:
    check_attn_mode(mode, training=True)
    dev = run.device
    dit, net = _lora_dit(arch, 1, dev, a.rank, mode, fp8=fp8)
    grid = token_grid(arch, size)
    L = math.prod(grid)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(1, L, arch.dim, device=dev, generator=g).requires_grad_()  # a middle block's input
    e0 = torch.randn(1, 1, 6, arch.dim, device=dev, generator=g) * 0.1
    ctx = torch.randn(1, TEXT_LEN, arch.dim, device=dev, generator=g).to(torch.bfloat16)
    rope = dit._rope(grid, dev)
    grad_out = torch.randn(1, L, arch.dim, device=dev, generator=g)
    block = dit.blocks[0]
    if compiled:
        dit.compile_blocks(mode=a.compile_mode)
        for t, dim in ((x, 1), (rope[0], 0), (rope[1], 0), (grad_out, 1)):
            torch._dynamo.maybe_mark_dynamic(t, dim)  # as WanDiT.forward marks them

    def step():
        with _autocast(dev):
            out = block(x, e0, ctx, rope, torch.bfloat16, mode)
        out.backward(grad_out)
        x.grad = None
        for p in net.parameters():
            p.grad = None

    first, s = run.time_it(step, a.warmup, a.reps)
    res = {"tokens": L, "s": s}
    if compiled:
        res["first_s"] = first
    return res


# ---------------------------------------------------------------------------------------------
# 2. whole-model training step


def _train_step_fn(dit, net, arch: Arch, size, device, compiled: bool, a):
    """The trainer's step on one batch: flow-matching loss (wanlora.training.trainer), backward,
    clip, AdamW; returns a no-argument callable."""
    from wanlora.training import flow, seeds
    from wanlora.training.trainer import flow_matching_loss

    dit.set_gradient_checkpointing(True)
    if compiled:
        dit.compile_blocks(mode=a.compile_mode)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(1, arch.channels, *latent_grid(arch, size), generator=g),
             "context": [torch.randn(120, arch.text_dim, generator=g).to(device)]}
    sampler = flow.TimestepDistribution("shift", discrete_flow_shift=5.0)
    counter = [0]

    def step():
        counter[0] += 1
        with _autocast(device):
            loss, _ = flow_matching_loss(
                lambda x, t, c, y, clip_fea: dit(x, t, c, y, clip_fea=clip_fea), batch, sampler, 0.0, 1000.0,
                seeds.stream_generator(0, seeds.NOISE, counter[0], 0, 0), device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_model_step(run: Runner, arch: Arch, size, compiled: bool, a) -> dict:
    dit, net = _lora_dit(arch, None, run.device, a.rank)
    step = _train_step_fn(dit, net, arch, size, run.device, compiled, a)
    first, s = run.time_it(step, a.warmup, a.reps)
    res = {"tokens": math.prod(token_grid(arch, size)), "s": s}
    if compiled:
        res["first_s"] = first
    return res


def check_sync_free(run: Runner, arch: Arch, size, a) -> dict:
    """One step under ``torch.cuda.set_sync_debug_mode("error")`` after a warm-up step."""
    if run.device.type != "cuda":
        raise ValueError("needs CUDA")
    dit, net = _lora_dit(arch, None, run.device, a.rank)
    step = _train_step_fn(dit, net, arch, size, run.device, False, a)
    step()
    run.sync()
    torch.cuda.set_sync_debug_mode("error")
    t0 = time.perf_counter()
    try:
        step()
        result = "ok: no host sync in the step"
    except RuntimeError as e:
        result = _sync_report(e)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    run.sync()
    return {"s": time.perf_counter() - t0, "result": result}


def _sync_report(e: BaseException) -> str:
    """``SYNC at <wanlora file>:<line>: <first line>`` for a sync-debug-mode error."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "wanlora" in f.filename]
    where = f" at {frames[-1].filename.split('wanlora')[-1]}:{frames[-1].lineno}" if frames else ""
    return f"SYNC{where}: {str(e).splitlines()[0]}"


def check_loop_sync_free(run: Runner, arch: Arch, size, a, layers: int = 4, steps: int = 10) -> dict:
    """The trainer's whole loop (``train()``: loader with pinned memory, expert plan, loss, backward,
    clipping, fused AdamW with the device-side skip, schedules, step log) on a random ``layers``-block
    DiT of ``arch`` under ``torch.cuda.set_sync_debug_mode("error")`` from its third micro-batch on,
    except inside the step log's read points (``--log_every_n_steps 4``) and the final save, which
    read the device by design."""
    if run.device.type != "cuda":
        raise ValueError("needs CUDA")
    import tempfile

    from accelerate.state import AcceleratorState

    from wanlora.commands.train import parse_config
    from wanlora.training import trainer
    from wanlora.training.checkpoint import Checkpointer
    from wanlora.training.step_log import StepLog

    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(1, arch.channels, *latent_grid(arch, size), generator=g),
             "context": [torch.randn(120, arch.text_dim, generator=g)], "keys": ["bench"]}

    class Batches:
        def __len__(self):
            return 1000

        def __getitem__(self, pos):
            return batch

    def unguarded(fn):
        def call(*args, **kwargs):
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(mode)
        return call

    micro_step, read, final, calls = trainer._micro_step, StepLog.read, Checkpointer.final, [0]

    def guarded_micro_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:  # two warm-up steps: first allocations, autotuning
            torch.cuda.set_sync_debug_mode("error")
        return micro_step(*args, **kwargs)

    t0 = time.perf_counter()
    trainer._micro_step, StepLog.read, Checkpointer.final = guarded_micro_step, unguarded(read), unguarded(final)
    try:
        with tempfile.TemporaryDirectory() as out:
            argv = ["--task", "t2v-1.3B", "--dit", "bench", "--dataset_config", "none.toml", "--output_dir", out,
                    "--network_dim", str(a.rank), "--network_alpha", str(a.rank), "--max_train_steps", str(steps),
                    "--log_every_n_steps", "4", "--seed", "0", "--max_data_loader_n_workers", "0",
                    "--mixed_precision", "bf16", "--gradient_checkpointing"]
            trainer.train(parse_config(argv), dataset=Batches(),
                          load_dit=lambda *_, **k: random_dit(arch, layers, k["device"], k.get("attn_mode", "sdpa")))
        result = f"ok: no host sync in {steps - 2} steps of the loop outside its read points"
    except RuntimeError as e:
        result = _sync_report(e)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        trainer._micro_step, StepLog.read, Checkpointer.final = micro_step, read, final
        AcceleratorState._reset_state(reset_partial_state=True)
    return {"s": time.perf_counter() - t0, "result": result}


# ---------------------------------------------------------------------------------------------
# 3. generation


def bench_generation(run: Runner, arch: Arch, size, compiled: bool, a) -> dict:
    from wanlora.inference.sampling import UniPCSolver, guided_velocity, make_schedule

    dev = run.device
    dit = random_dit(arch, None, dev)
    if compiled:
        dit.compile_blocks(mode=a.compile_mode)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(1, arch.channels, *latent_grid(arch, size), device=dev, generator=g)
    ctx = [torch.randn(120, arch.text_dim, device=dev, generator=g)]
    null = [torch.randn(160, arch.text_dim, device=dev, generator=g)]
    sched = make_schedule(50, 5.0)
    solver = UniPCSolver(sched)
    state = {"x": x, "i": 0}

    def step():
        t = sched.timesteps[state["i"] % len(sched.timesteps)]
        with torch.no_grad():
            v = guided_velocity(dit, state["x"], t.view(1).to(dev), ctx, null, 5.0, batched=True)
            state["x"] = solver.step(v, state["x"])
        state["i"] += 1

    first, s = run.time_it(step, a.warmup, a.reps)
    res = {"tokens": math.prod(token_grid(arch, size)), "s": s}
    if compiled:
        res["first_s"] = first
    return res


# ---------------------------------------------------------------------------------------------


def _environment(device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    for mod in ("flash_attn", "flash_attn_interface", "xformers", "sageattention", "triton"):
        try:
            m = __import__(mod)
            env[mod] = getattr(m, "__version__", "installed")
        except ImportError:
            env[mod] = None
    return env


def table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    out = ["| section | config | tokens | s | first call s | TFLOP/s | MFU | peak GiB | note |",
           "|---|---|---|---|---|---|---|---|---|"]

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    for r in rows:
        out.append(f"| {r['section']} | {r['config']} | {r.get('tokens', '')} | {f(r.get('s'), '.4f')} | "
                   f"{f(r.get('first_s'), '.1f')} | {f(r.get('tflops'), '.0f')} | "
                   f"{f(r.get('mfu') and 100 * r['mfu'], '.1f')}{'%' if r.get('mfu') else ''} | "
                   f"{f(r.get('peak_gib'), '.1f')} | {r.get('error') or r.get('result') or ''} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions (the one-shot run: ~6 min)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (smoke test of this script, any device)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sections", default="block,step,generate,sync", help="comma list of what to run")
    p.add_argument("--attn_modes", default=",".join(TRAINING_ATTN_MODES), help="backends of the block rows")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank")
    p.add_argument("--compile_mode", default=None, help="inductor mode of the compiled rows")
    p.add_argument("--no_compile", action="store_true", help="skip the compiled rows")
    p.add_argument("--peak_tflops", type=float, help="bf16 dense peak for MFU (default: by GPU name)")
    p.add_argument("--budget_s", type=float, default=420.0, help="skip the rows left after this many seconds")
    p.add_argument("--out", help="also write the rows and the environment as JSON here")
    a = p.parse_args(argv)
    a.warmup, a.reps = (2, 3) if a.quick or a.tiny else (3, 10)

    device = torch.device(a.device)
    archs, sizes = (TINY, TINY_SIZES) if a.tiny else (ARCHS, SIZES)
    peak = a.peak_tflops
    if peak is None and device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAKS.items() if k in name), None)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    env = _environment(device)
    print(json.dumps(env), flush=True)
    run = Runner(device, a.budget_s, peak)
    sections = a.sections.split(",")
    modes = a.attn_modes.split(",")
    compiled_variants = [False] if a.no_compile else [False, True]

    if "block" in sections:
        arch = archs["A14B"]
        for size_name, size in sizes.items():
            L = math.prod(token_grid(arch, size))
            fl = train_flops(L, arch.dim, arch.ffn, 1)
            for mode in modes:
                run.row("A14B block fwd+bwd", f"{size_name} eager {mode}",
                        lambda: bench_block(run, arch, size_name, size, mode, False, a), fl)
            for fp8 in ("scaled", "compute"):  # --fp8_scaled (dequantized to bf16) and --fp8_compute
                run.row("A14B block fwd+bwd", f"{size_name} eager sdpa fp8_{fp8}",
                        lambda: bench_block(run, arch, size_name, size, "sdpa", False, a, fp8), fl)
            if not a.no_compile:
                run.row("A14B block fwd+bwd", f"{size_name} compiled sdpa",
                        lambda: bench_block(run, arch, size_name, size, "sdpa", True, a), fl)
                run.row("A14B block fwd+bwd", f"{size_name} compiled sdpa fp8_compute",
                        lambda: bench_block(run, arch, size_name, size, "sdpa", True, a, "compute"), fl)
    if "step" in sections:
        for name in ("1.3B", "5B"):
            arch = archs[name]
            L = math.prod(token_grid(arch, sizes["480p"]))
            fl = train_flops(L, arch.dim, arch.ffn, arch.layers)
            for compiled in compiled_variants:
                run.row(f"{name} training step (checkpointed)", f"480p {'compiled' if compiled else 'eager'}",
                        lambda: bench_model_step(run, arch, sizes["480p"], compiled, a), fl)
    if "generate" in sections:
        arch = archs["A14B"]
        L = math.prod(token_grid(arch, sizes["480p"]))
        fl = infer_flops(L, arch.dim, arch.ffn, arch.layers, batch=2)
        for compiled in compiled_variants:
            run.row("A14B expert generation step (CFG batched)", f"480p {'compiled' if compiled else 'eager'}",
                    lambda: bench_generation(run, arch, sizes["480p"], compiled, a), fl)
    if "sync" in sections:
        run.row("host syncs in the training step", "1.3B 480p",
                lambda: check_sync_free(run, archs["1.3B"], sizes["480p"], a))
        run.row("host syncs in the training loop", "1.3B widths, 4 blocks, 480p, train()",
                lambda: check_loop_sync_free(run, archs["1.3B"], sizes["480p"], a))

    arch = ARCHS["A14B"]
    L = math.prod(token_grid(arch, SIZES["480p"]))
    floor = train_flops(L, arch.dim, arch.ffn, arch.layers)
    print()
    print(table(run.rows))
    print(f"\nA14B expert step at 832x480x81: {floor / 1e15:.2f} PFLOP of model FLOPs"
          + (f"; floor {floor / (peak * 1e12):.2f} s at the {peak:.0f} TFLOP/s peak" if peak else ""))
    block_rows = [r for r in run.rows if r["section"].startswith("A14B block") and "480p" in r["config"]
                  and "s" in r]
    if block_rows and not a.tiny:
        best = min(block_rows, key=lambda r: r["s"])
        print(f"best block configuration at 480p: {best['config']}, {best['s']:.3f} s/block -> "
              f"{best['s'] * arch.layers:.1f} s per 40-block step before the rest of the model")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"environment": env, "rows": run.rows, "argv": sys.argv[1:]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
