"""What compiling a block removes: kernels and bytes of one LoRA DiT block, eager against inductor.

One Wan DiT block with the trainer's LoRA (rank 32 on its 10 Linear layers, float32) and
``load_dit``'s precision (bf16 weights, float32 islands), forward under bf16 autocast and backward
as the trainer runs them, counted twice:

* **eager**: every aten operator the block dispatches (a ``TorchDispatchMode``), split into
  matmul/attention ("extern": ``mm``/``addmm``/``bmm`` and the fused attention kernels) and
  everything else (elementwise, reductions, copies, dtype casts; views launch nothing and are not
  counted), with the bytes each non-matmul operator reads and writes (the memory span of every
  tensor argument and result). Run under ``FakeTensorMode``, so the real size (A14B: width 5120,
  ffn 13824, 40 heads, 32 760 tokens = 832x480x81) costs seconds and no memory. Dtype casts
  (``_to_copy``) and RoPE's operators (those of ``apply_rope``, forward and backward) are counted
  apart.
* **compiled**: the same block through ``WanDiT.compile_blocks`` (inductor, the token count
  symbolic, as ``--compile`` runs it), with inductor's own
  figures (``torch._inductor.metrics``): the kernels it generated and, per kernel of its scheduler
  after fusion, the bytes it reads and writes (``num_bytes_accessed``'s per-node figures), the
  extern calls apart. On this machine inductor emits C++ kernels for the CPU; which operators fuse
  is decided by the same scheduler as for GPU Triton kernels, but each backend accepts slightly
  different fusions, so the GPU kernel count can differ by a few. Compiling and running a block
  of real width takes a minute per token count on two CPU cores, so the compiled side runs at
  small token counts (``--compile_grids``, default 256, 512, 1024) and its bytes are extrapolated
  linearly in tokens (bytes = a + b·L through the two smallest; the third checks the fit, as
  eager's count at the real size checks the same fit of eager's small sizes).

The table gives per block (forward + backward) and per training step (x layers, with gradient
checkpointing's recomputation = one more forward per block) the non-matmul kernels, their bytes
and what those bytes cost at an H100's HBM bandwidth (3.35 TB/s; a lower bound: it assumes every
kernel streams at peak bandwidth).

    python benchmarks/fusion.py                    # A14B block, 32760 tokens (compiled at 256-1024)
    python benchmarks/fusion.py --arch 1.3B        # the 1.3B widths (1536/8960/12 heads)
    python benchmarks/fusion.py --tiny --out f.json    # toy sizes: the smoke test
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import sys
import time
from collections import Counter
from contextlib import contextmanager
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from common import active_lora  # benchmarks/, first on sys.path when run as a script
from gpu_speed import ARCHS, SIZES, TEXT_LEN, TINY, TINY_SIZES, token_grid

import wanlora.models.dit as dit_module
from wanlora.io_utils import write_json
from wanlora.models.dit import WanDiT
from wanlora.models.loading import cast_dit

HBM_BYTES_PER_S = 3.35e12  # H100 SXM
#: aten operators that run as matmul / attention library calls (cuBLAS, flash/cuDNN attention)
EXTERN = ("mm", "addmm", "bmm", "baddbmm", "addbmm")
EXTERN_PREFIXES = ("_scaled_dot_product", "_flash_attention", "_efficient_attention", "_cudnn_attention")
#: aten operators that launch no kernel besides views: metadata queries, aliases, allocations
NO_KERNEL = {"detach", "alias", "lift_fresh", "empty", "empty_strided", "_unsafe_view", "_reshape_alias",
             "empty_like", "new_empty", "new_empty_strided", "dim", "is_contiguous", "is_same_size"}


def launches_kernel(func) -> bool:
    """Whether an aten operator runs a kernel: not a view, not a ``prim`` metadata query
    (``prim.device``), not a size query or a bare allocation."""
    name = func.overloadpacket.__name__
    return not (func.is_view or func.namespace == "prim" or name.startswith("sym_") or name in NO_KERNEL)


def is_extern(name: str) -> bool:
    """Whether an aten operator name (``aten.mm.default`` → ``mm``) is a matmul or attention kernel."""
    return name in EXTERN or name.startswith(EXTERN_PREFIXES)


def span_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches for ``t``: the memory span of its elements (a strided half of a
    tensor spans the whole, a broadcast ``expand`` only its storage), capped by the storage."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    return min(span * t.element_size(), t.untyped_storage().nbytes())


class KernelCount(TorchDispatchMode):
    """Counts the aten operators dispatched while active, per phase (``self.phase``, set by the
    caller): ``counts = {phase: Counter(extern, other, other_bytes, casts, rope, rope_bytes)}``
    and, to look into, ``ops = {phase: Counter(operator name)}``.

    RoPE operators are those dispatched inside :func:`wanlora.models.dit.apply_rope` (forward,
    ``self.in_rope``) or by an autograd node it created (backward, ``rope_nodes``)."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.counts: dict[str, Counter] = {}
        self.ops: dict[str, Counter] = {}
        self.in_rope = False
        self.rope_nodes: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not launches_kernel(func):
            return out
        name = func.overloadpacket.__name__
        c = self.counts.setdefault(self.phase, Counter())
        self.ops.setdefault(self.phase, Counter())[name] += 1
        if is_extern(name):
            c["extern"] += 1
            return out
        moved = sum(span_bytes(t) for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor))
        c["other"] += 1
        c["other_bytes"] += moved
        if name == "_to_copy" and (kwargs or {}).get("dtype") not in (None, args[0].dtype):
            c["casts"] += 1
        node = torch._C._current_autograd_node() if self.phase == "backward" else None
        if self.in_rope or (node is not None and node in self.rope_nodes):
            c["rope"] += 1
            c["rope_bytes"] += moved
        return out


@contextmanager
def tag_rope(counter: KernelCount):
    """Mark what :func:`~wanlora.models.dit.apply_rope` dispatches in ``counter``: its forward
    operators while it runs, and the autograd nodes it creates (between its output and its input)
    for the backward."""
    original = dit_module.apply_rope

    def traced(x, cos, sin):
        counter.in_rope = True
        try:
            out = original(x, cos, sin)
        finally:
            counter.in_rope = False
        stop, todo = x.grad_fn, [out.grad_fn]
        while todo:
            node = todo.pop()
            if node is None or node is stop or node in counter.rope_nodes:
                continue
            counter.rope_nodes.add(node)
            todo.extend(n for n, _ in node.next_functions)
        return out

    with mock.patch.object(dit_module, "apply_rope", traced):
        yield


def block_step(arch, grid, rank: int, compiled: bool = False):
    """``step(before_backward)``: one LoRA block's forward under bf16 autocast and the backward of
    a random output gradient (as a middle block sees them: the residual stream needs a gradient),
    calling ``before_backward()`` between the two.

    ``arch``: a ``gpu_speed.Arch``; ``grid``: the ``(F, H, W)`` token grid; ``compiled``: the
    block compiled as ``--compile`` does (``WanDiT.compile_blocks``, inductor, token count
    symbolic: its inputs marked as ``WanDiT.forward`` marks them)."""
    dev = torch.device("cpu")
    dit = cast_dit(WanDiT(arch.config(layers=1)), torch.bfloat16).requires_grad_(False)
    active_lora(dit, rank)
    L = math.prod(grid)
    x = torch.randn(1, L, arch.dim).requires_grad_()
    e0 = torch.randn(1, 1, 6, arch.dim) * 0.1
    ctx = torch.randn(1, TEXT_LEN, arch.dim).to(torch.bfloat16)
    rope = dit._rope(grid, dev)
    grad_out = torch.randn(1, L, arch.dim)
    block = dit.blocks[0]
    if compiled:
        dit.compile_blocks(backend="inductor")
        for t, dim in ((x, 1), (rope[0], 0), (rope[1], 0)):
            torch._dynamo.maybe_mark_dynamic(t, dim)

    def step(before_backward=lambda: None):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(x, e0, ctx, rope, torch.bfloat16, "sdpa")
        before_backward()
        out.backward(grad_out)

    return step


def eager_counts(arch, grid, rank: int) -> dict:
    """:class:`KernelCount` of one block's forward and backward at ``grid``, under FakeTensorMode."""
    with FakeTensorMode():
        step = block_step(arch, grid, rank)
        counter = KernelCount()
        with tag_rope(counter), counter:
            step(lambda: setattr(counter, "phase", "backward"))
    return {phase: dict(c) for phase, c in counter.counts.items()}


def _graph_kernels(graph) -> Counter:
    """The kernels of one inductor graph after fusion, read from its scheduler: ``extern``
    (matmul/attention library calls), ``other`` (generated kernels and other library fallbacks),
    ``other_bytes`` and ``extern_bytes`` (inductor's count of the bytes each reads and writes:
    ``Scheduler`` nodes' ``get_read_write_buffers_sizes``, what ``num_bytes_accessed`` sums). A CPU-only
    outer-loop fusion (several kernels sharing their outer loops) counts as its kernels, as
    Triton would emit them."""
    from torch._inductor.scheduler import (
        ExternKernelSchedulerNode,
        NopKernelSchedulerNode,
    )

    c = Counter()
    for node in graph.scheduler.nodes:
        if isinstance(node, NopKernelSchedulerNode):
            continue
        if isinstance(node, ExternKernelSchedulerNode):
            op = getattr(node.node, "op_overload", None)
            if op is None:  # the outputs of a multi-output call: no kernel
                continue
            if is_extern(op.overloadpacket.__name__):
                c["extern"] += 1
                c["extern_bytes"] += node.get_read_write_buffers_sizes()
                continue
        for kernel in node.get_outer_nodes() if hasattr(node, "get_outer_nodes") else [node]:
            c["other"] += 1
            c["other_bytes"] += kernel.get_read_write_buffers_sizes()
    return c


@contextmanager
def inductor_kernels():
    """Collect, per phase (``"forward"``, ``"backward"``: inductor's graph kind), the
    :func:`_graph_kernels` of every graph inductor compiles, with ``generated``
    (``torch._inductor.metrics.generated_kernel_count``'s growth: the C++ kernels written, a
    vectorized body and a scalar tail each counting) and ``num_bytes_accessed`` (inductor's total,
    matmuls included). Yields ``{phase: Counter}``; compiles afresh (a cache hit would skip the
    scheduler)."""
    from torch._inductor import compile_fx, metrics
    from torch._inductor.graph import GraphLowering

    phases = {"forward": Counter(), "backward": Counter()}
    count_bytes = GraphLowering.count_bytes
    generated = [metrics.generated_kernel_count]

    def counted(graph):  # runs once per graph, after its code is generated
        res = count_bytes(graph)
        c = _graph_kernels(graph)
        c["generated"] = metrics.generated_kernel_count - generated[0]
        c["num_bytes_accessed"] = res[0]
        generated[0] = metrics.generated_kernel_count
        phases["backward" if graph.is_backward else "forward"].update(c)
        return res

    # inductor runs count_bytes (the per-kernel bytes) only with its metrics log at INFO
    log = compile_fx.inductor_metrics_log
    level, propagate = log.level, log.propagate
    log.setLevel(logging.INFO)
    log.propagate = False  # the counts, not the log lines
    handler = logging.NullHandler()
    log.addHandler(handler)
    try:
        with mock.patch.object(GraphLowering, "count_bytes", counted), \
                torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            yield phases
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


def compiled_counts(arch, grid, rank: int) -> dict:
    """:func:`inductor_kernels` of one compiled block's forward and backward at ``grid``, compiled
    afresh as ``--compile`` compiles it, with the compile + first run time in seconds."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with inductor_kernels() as phases:
        block_step(arch, grid, rank, compiled=True)()
    torch._dynamo.reset()
    return {**{k: dict(v) for k, v in phases.items()}, "seconds": time.perf_counter() - t0}


def linear_fit(points: dict[int, float]) -> tuple[float, float]:
    """``(a, b)`` of ``y = a + b·L`` through the two smallest ``L`` of ``{L: y}``."""
    (l1, y1), (l2, y2) = sorted(points.items())[:2]
    b = (y2 - y1) / (l2 - l1)
    return y1 - b * l1, b


def summarize(counts: dict[int, dict], tokens: int) -> dict:
    """One side's figures per phase from ``{token count: {phase: Counter}}``: every count per token
    count, the bytes' linear fit through the two smallest token counts (``bytes_fixed`` +
    ``bytes_per_token``·L), its largest relative miss at the other measured token counts
    (``fit_error``), and ``block_bytes``: the bytes at ``tokens``, measured when ``tokens`` was
    run, else from the fit (``block_bytes_extrapolated``)."""
    out = {}
    for phase in ("forward", "backward"):
        per = {key: {n: c[phase].get(key, 0) for n, c in counts.items()}
               for key in sorted({k for c in counts.values() for k in c[phase]})}
        a, b = linear_fit(per["other_bytes"])
        held_out = [n for n in sorted(counts)[2:]]
        out[phase] = {**per, "bytes_fixed": a, "bytes_per_token": b,
                      "fit_error": max((abs((a + b * n) / per["other_bytes"][n] - 1) for n in held_out), default=None),
                      "block_bytes": per["other_bytes"].get(tokens, a + b * tokens),
                      "block_bytes_extrapolated": tokens not in counts}
    return out


def per_step(fwd: float, bwd: float, layers: int) -> float:
    """A training step's total over ``layers`` checkpointed blocks: forward, recomputed forward,
    backward."""
    return layers * (2 * fwd + bwd)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="A14B", choices=list(ARCHS))
    p.add_argument("--size", default="480p", choices=list(SIZES), help="video size of the real token count")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--compile_grids", type=int, nargs="+", default=[1, 16, 16, 2, 16, 16, 4, 16, 16],
                   metavar="F H W",
                   help="token grids (F H W each, at least two) the compiled block runs at: the bytes are "
                        "extrapolated from the two smallest, the others check the fit (default 256, 512, "
                        "1024 tokens)")
    p.add_argument("--tiny", action="store_true", help="toy widths and sizes (smoke test)")
    p.add_argument("--out", help="also write the figures as JSON here")
    a = p.parse_args(argv)
    if len(a.compile_grids) % 3 or len(a.compile_grids) < 6:
        p.error(f"--compile_grids takes token grids F H W, at least two; got {len(a.compile_grids)} numbers")
    torch.manual_seed(0)
    arch = (TINY if a.tiny else ARCHS)[a.arch]
    grid = token_grid(arch, (TINY_SIZES if a.tiny else SIZES)[a.size])
    tokens = math.prod(grid)
    small = [tuple(a.compile_grids[i:i + 3]) for i in range(0, len(a.compile_grids), 3)]
    print(f"{a.arch} block (dim {arch.dim}, ffn {arch.ffn}, {arch.heads} heads), LoRA rank {a.rank}, bf16 autocast; "
          f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads", flush=True)

    eager = {math.prod(g): eager_counts(arch, g, a.rank) for g in [*small, grid]}
    compiled, seconds = {}, {}
    for g in small:
        n = math.prod(g)
        compiled[n] = compiled_counts(arch, g, a.rank)
        seconds[n] = compiled[n].pop("seconds")
        print(f"compiled at {n} tokens (build, compile, first run): {seconds[n]:.0f} s", flush=True)
    result = {"arch": a.arch, "dim": arch.dim, "ffn": arch.ffn, "heads": arch.heads, "layers": arch.layers,
              "rank": a.rank, "tokens": tokens, "compiled_tokens": sorted(compiled),
              "compile_seconds": seconds, "torch": torch.__version__, "machine": platform.platform(),
              "threads": torch.get_num_threads(),
              "eager": summarize(eager, tokens), "compiled": summarize(compiled, tokens)}
    print(table(result))
    if a.out:
        write_json(a.out, result)
    return 0


def table(r: dict) -> str:
    """The markdown table of :func:`main`'s result, with how each figure was obtained."""
    L, n1 = r["tokens"], r["compiled_tokens"][0]
    sides = ("eager", "compiled")

    def both(f):
        return {s: f(s) for s in sides}

    def fwd_bwd(side, key, n=n1):
        return r[side]["forward"][key][n], r[side]["backward"][key][n]

    kernels = both(lambda s: sum(fwd_bwd(s, "other")))
    extern = both(lambda s: sum(fwd_bwd(s, "extern")))
    k_step = both(lambda s: per_step(*fwd_bwd(s, "other"), r["layers"]))
    blk = both(lambda s: r[s]["forward"]["block_bytes"] + r[s]["backward"]["block_bytes"])
    stp = both(lambda s: per_step(r[s]["forward"]["block_bytes"], r[s]["backward"]["block_bytes"], r["layers"]))
    how = both(lambda s: "extrapolated" if r[s]["forward"]["block_bytes_extrapolated"] else "measured")
    constant = all(len({*r[s][ph][k].values()}) == 1 for s in sides for ph in ("forward", "backward")
                   for k in ("other", "extern"))
    lines = [f"kernels: counted at {n1} tokens ("
             + ("the same at every token count run" if constant else "they differ between token counts: see the JSON")
             + f"); bytes at {L} tokens: eager {how['eager']}, compiled {how['compiled']}"
             + (f" from {r['compiled_tokens'][:2]} tokens" if how["compiled"] == "extrapolated" else "")
             + " (bytes = a + b·L through the two smallest token counts misses the other measured ones by at most "
             + ", ".join(f"{s} {100 * max(r[s][ph]['fit_error'] or 0 for ph in ('forward', 'backward')):.2f} %"
                         for s in sides) + ")", "",
             "| per block of " + f"{r['arch']} at {L} tokens | eager | compiled | eager / compiled |",
             "|---|---|---|---|"]
    rows = [
        ("non-matmul kernels per block, fwd+bwd", kernels, "{:.0f}"),
        ("matmul/attention calls per block, fwd+bwd", extern, "{:.0f}"),
        (f"non-matmul kernels per step ({r['layers']} blocks, recompute)", k_step, "{:.0f}"),
        ("non-matmul GB per block, fwd+bwd", {s: v / 1e9 for s, v in blk.items()}, "{:.2f}"),
        (f"non-matmul TB per step ({r['layers']} blocks, recompute)", {s: v / 1e12 for s, v in stp.items()}, "{:.2f}"),
        ("its time at 3.35 TB/s (lower bound), s/step", {s: v / HBM_BYTES_PER_S for s, v in stp.items()}, "{:.2f}"),
    ]
    for label, v, fmt in rows:
        ratio = v["eager"] / v["compiled"] if v["compiled"] else float("inf")
        lines.append(f"| {label} | {fmt.format(v['eager'])} | {fmt.format(v['compiled'])} | {ratio:.1f}x |")
    e, c = r["eager"], r["compiled"]
    per_token = both(lambda s: (r[s]["forward"]["bytes_per_token"] / 1e6, r[s]["backward"]["bytes_per_token"] / 1e6))
    lines += ["", "non-matmul MB per token, forward / backward: " + ", ".join(
                  f"{s} {f:.2f} / {b:.2f}" for s, (f, b) in per_token.items()),
              f"eager, per block: dtype casts {e['forward']['casts'][n1]} forward + "
              f"{e['backward']['casts'][n1]} backward; RoPE (q and k) {e['forward']['rope'][n1]} forward + "
              f"{e['backward']['rope'][n1]} backward kernels"
              + (f", moving {(e['forward']['rope_bytes'][L] + e['backward']['rope_bytes'][L]) / 1e9:.2f} GB at {L} "
                 "tokens" if L in e["forward"]["rope_bytes"] else ""),
              "compiled, per block: inductor generated "
              f"{c['forward']['generated'][n1] + c['backward']['generated'][n1]} C++ kernels (vectorized body and "
              "scalar tail counted apart); num_bytes_accessed (matmuls included) "
              f"{(c['forward']['num_bytes_accessed'][n1] + c['backward']['num_bytes_accessed'][n1]) / 1e9:.3f} GB "
              f"at {n1} tokens; build + compile + first run " + ", ".join(
                  f"{s:.0f} s at {n}" for n, s in r["compile_seconds"].items()) + " tokens"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
