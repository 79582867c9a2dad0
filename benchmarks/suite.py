"""Benchmark cases, measurement and result rows.

Every case is one (provider, mode, shape, dtype, r, p) on one device; all providers of a shape run in the same
process, one after the other, so every ratio in a table is measured side by side.

Metrics
  time_ms      p20 / p50 / p80 of the wall time (CUDA: ``triton.testing.do_bench``, which flushes L2 and uses CUDA
               events; CPU: repeated ``time.perf_counter`` after a warm-up, within a time budget)
  tflops       useful FLOPs / time (the analytic count of the LoRA linear, same for every provider)
  peak_mem_mib extra CUDA memory at the peak of one forward+backward (allocator statistics; CUDA only)
  saved_mib    bytes saved for backward by the forward pass, counted with ``saved_tensors_hooks``; parameters
               and buffers excluded, each storage counted once (all devices)
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from .providers import PROVIDERS, available, parameter_storages

MODES = ("forward", "backward", "full")


@dataclass(frozen=True)
class Shape:
    tokens: int  # M: rows of x (batch x sequence)
    in_features: int  # K
    out_features: int  # N
    r: int
    p: float
    dtype: torch.dtype

    @property
    def label(self) -> str:
        return f"{self.tokens}x{self.in_features}x{self.out_features}"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


@dataclass
class Case:
    provider: str
    mode: str
    shape: Shape


@dataclass
class Measurement:
    case: Case
    time_ms: Tuple[float, float, float]  # p20, p50, p80
    saved_mib: float
    peak_mem_mib: Optional[float]
    auto_path: str = ""  # fused providers: what the "auto" backend ran per pass (auto_path_label)

    @property
    def tflops(self) -> Tuple[float, float, float]:
        flops = useful_flops(self.case.shape, self.case.mode)
        # the fastest time gives the highest rate: p20 of time -> p80 of throughput
        return tuple(flops / (t * 1e-3) / 1e12 for t in reversed(self.time_ms))


def useful_flops(shape: Shape, mode: str) -> float:
    """Multiply-add FLOPs of the LoRA linear (2 per MAC). Forward: base GEMM + down + up projection.
    Backward: dgrad GEMM + g@B + dB + dA + the LoRA part of dx (W frozen: no dW)."""
    M, K, N, r = shape.tokens, shape.in_features, shape.out_features, shape.r
    fwd = 2 * M * K * N + 2 * M * K * r + 2 * M * r * N
    bwd = 2 * M * N * K + 2 * M * N * r * 2 + 2 * M * K * r * 2
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


# ----------------------------------------------------------------------------------------------------------------
# shape sets
# ----------------------------------------------------------------------------------------------------------------


DENSE = ("fused", "fused-in-peft", "peft", "naive", "naive+compile", "base")
QLORA = ("fused-nf4", "peft-nf4", "base")
DORA = ("fused-dora", "fused-dora-in-peft", "peft-dora")
QDORA = ("fused-dora-nf4", "peft-dora-nf4")


def cpu_default() -> List[Tuple[Shape, Tuple[str, ...], Tuple[str, ...]]]:
    """About 3 minutes on 2 cores: the goal shape (2048 tokens, 1024 x 1024, r = 16) in fp32 and bf16, plus 512
    tokens in fp32 for the token axis of the plots, and a QLoRA row (NF4 base, fp32 compute). PyTorch's bf16 GEMMs
    are very slow on CPUs without AVX512-BF16 (seconds per call), so bf16 runs only the goal providers and the full
    mode; torch.compile (about 20 s per compilation here) only at the goal shape. DoRA (the DoRA goals: fused vs
    PEFT's DoRA, forward+backward, fp32) at the goal shape, full mode only, in the same round-robin as LoRA's."""
    out = []
    for p in (0.0, 0.1):
        out.append((Shape(512, 1024, 1024, 16, p, torch.float32), ("fused", "fused-in-peft", "peft", "naive", "base"),
                    MODES))
        out.append((Shape(2048, 1024, 1024, 16, p, torch.float32), DENSE, MODES))
        out.append((Shape(2048, 1024, 1024, 16, p, torch.float32), DORA, ("full",)))
        out.append((Shape(2048, 1024, 1024, 16, p, torch.bfloat16), ("fused", "peft", "base"), ("full",)))
    out.append((Shape(512, 1024, 1024, 16, 0.1, torch.float32), QLORA, MODES))
    return out


def cpu_full() -> List[Tuple[Shape, Tuple[str, ...], Tuple[str, ...]]]:
    everything = DENSE + QLORA[:2] + DORA
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for tokens in (256, 512, 1024, 2048, 4096):
            for r in (8, 16, 64):
                for p in (0.0, 0.1):
                    out.append((Shape(tokens, 1024, 1024, r, p, dtype), everything, MODES))
    return out


def gpu_default() -> List[Tuple[Shape, Tuple[str, ...], Tuple[str, ...]]]:
    """The LLM shapes (bf16): 4096 x 4096, 4096 x 11008 and 8192 x 8192 at 512 to 16384 tokens, r = 16, p in
    {0, 0.1}; a rank sweep (8, 64) and torch.compile at the headline shape (8192 tokens, 4096 x 4096); QLoRA also at
    16 and 128 tokens (decode-like, where dequantizing inside the GEMM pays off). DoRA, dense and NF4 (QDoRA), at
    4096 x 4096 for every token count."""
    bf16 = torch.bfloat16
    out = []
    for K, N in ((4096, 4096), (4096, 11008), (8192, 8192)):
        for tokens in (512, 2048, 8192, 16384):
            headline = (K, N, tokens) == (4096, 4096, 8192)
            providers = DENSE if headline else tuple(p for p in DENSE if p != "naive+compile")
            if (K, N) == (4096, 4096):
                providers += DORA
            for p in (0.0, 0.1):
                out.append((Shape(tokens, K, N, 16, p, bf16),
                            providers + QLORA[:2] + (QDORA if (K, N) == (4096, 4096) else ()), MODES))
    for r in (8, 64):
        for p in (0.0, 0.1):
            out.append((Shape(8192, 4096, 4096, r, p, bf16), ("fused", "peft", "base"), MODES))
    for tokens in (16, 128):
        for p in (0.0, 0.1):
            out.append((Shape(tokens, 4096, 4096, 16, p, bf16), QLORA, MODES))
    return out


# ----------------------------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------------------------


def _quantiles(times: List[float]) -> Tuple[float, float, float]:
    if len(times) == 1:
        return times[0], times[0], times[0]
    qs = statistics.quantiles(times, n=10, method="inclusive")
    return qs[1], statistics.median(times), qs[7]


def _cpu_interleaved(fns: Dict[str, callable], budget_s: float, min_reps: int = 3, max_reps: int = 50):
    """Time several providers round-robin (one call each per round, the order rotating) until the budget is spent:
    on a shared CPU slow drifts then hit every provider alike, so the ratios stay fair."""
    for fn in fns.values():
        fn()  # warm-up (allocator, caches, lazy initialisation, compilation)
    times = {name: [] for name in fns}
    names = list(fns)
    start = time.perf_counter()
    rounds = 0
    while rounds < min_reps or (rounds < max_reps and time.perf_counter() - start < budget_s * len(fns)):
        for name in names[rounds % len(names):] + names[: rounds % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return {name: _quantiles(ts) for name, ts in times.items()}


def _gpu_quantiles(fn, grad_to_none) -> Tuple[float, float, float]:
    import triton.testing

    return tuple(triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8], grad_to_none=grad_to_none))


def saved_bytes(module, x) -> int:
    """Bytes the forward saves for backward, parameters and buffers excluded, each storage once."""
    exclude = parameter_storages(module)
    storages: Dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    del y
    return sum(storages.values())


class _Runner:
    """One provider's module with its inputs, exposing one callable per mode."""

    def __init__(self, module, shape: Shape, device: torch.device):
        self.module = module.train()
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.x = torch.randn(shape.tokens, shape.in_features, generator=gen).to(device=device, dtype=shape.dtype)
        self.x.requires_grad_(True)
        self.g = torch.randn(shape.tokens, shape.out_features, generator=gen).to(device=device, dtype=shape.dtype)
        self.trainable = [t for t in module.parameters() if t.requires_grad] + [self.x]
        self._retained = None

    def clear_grads(self):
        for t in self.trainable:
            t.grad = None

    def fn(self, mode: str):
        module, x, g = self.module, self.x, self.g
        if mode == "forward":
            return lambda: module(x)
        if mode == "full":
            def full():
                module(x).backward(g)
                self.clear_grads()
            return full
        # backward alone: one forward, then repeated backward passes through the retained graph
        self._retained = module(x)

        def backward():
            self._retained.backward(g, retain_graph=True)
            self.clear_grads()
        return backward

    def release(self):
        self._retained = None
        self.clear_grads()

    def peak_memory_mib(self, device) -> float:
        self.release()
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        self.module(self.x).backward(self.g)
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        self.clear_grads()
        return peak


def measure_shape(modules: Dict[str, object], shape: Shape, modes: Dict[str, Iterable[str]], device: torch.device,
                  budget_s: float = 1.0, progress=None) -> List[Measurement]:
    """Measure the provider modules of one shape (``modes[provider]``: the modes to time), side by side."""
    runners = {name: _Runner(m, shape, device) for name, m in modules.items()}
    saved = {name: saved_bytes(r.module, r.x) / 2**20 for name, r in runners.items()}
    peaks = {name: r.peak_memory_mib(device) for name, r in runners.items()} if device.type == "cuda" else {}
    out = []
    for mode in MODES:
        fns = {name: r.fn(mode) for name, r in runners.items() if mode in modes[name]}
        if not fns:
            continue
        if device.type == "cuda":
            times = {name: _gpu_quantiles(fn, runners[name].trainable) for name, fn in fns.items()}
        else:
            times = _cpu_interleaved(fns, budget_s)
        for name in fns:
            runners[name].release()
            path = auto_path_label(shape, device) if name.startswith("fused") else ""
            out.append(Measurement(Case(name, mode, shape), times[name], saved[name], peaks.get(name), path))
        if progress is not None:
            progress(len(fns))
    return out


def auto_path_label(shape: Shape, device: torch.device) -> str:
    """Which implementation the ``"auto"`` backend ran for this shape, per pass: ``"forward=triton
    backward=torch"`` on CUDA (from ``fused_lora.auto_choices()``; several backward variants are joined with
    ``/``), ``"torch"`` on the CPU (where "auto" is the torch path)."""
    if device.type != "cuda":
        return "torch"
    from fused_lora import _autoselect, auto_choices

    winners: Dict[str, List[str]] = {}
    for choice in auto_choices():
        if _autoselect.shape_matches(choice.key, shape.tokens, shape.in_features, shape.out_features, shape.r,
                                     shape.dtype):
            pass_name = choice.key.pass_name.replace("lora_", "")
            if choice.winner not in winners.setdefault(pass_name, []):
                winners[pass_name].append(choice.winner)
    return " ".join(f"{p}={'/'.join(w)}" for p, w in winners.items())


def measure_group(shape: Shape, providers: Dict[str, Iterable[str]], device: torch.device, budget_s: float = 1.0,
                  progress=None, report=None) -> List[Measurement]:
    """Build the providers of one shape (``providers[name]``: the modes to time) and measure them side by side.
    A provider that cannot be built (e.g. a missing optional dependency) is reported through ``report(message)``
    and left out; a failed measurement is reported and gives no rows."""
    import sys

    report = report or (lambda message: print(message, file=sys.stderr))
    modules = {}
    for provider in providers:
        try:
            modules[provider] = build(provider, shape, device)
        except Exception as exc:
            report(f"skipping {provider} {shape}: {type(exc).__name__}: {exc}")
    out: List[Measurement] = []
    try:
        out = measure_shape(modules, shape, {name: providers[name] for name in modules}, device, budget_s, progress)
    except Exception as exc:
        report(f"failed {shape}: {type(exc).__name__}: {exc}")
    del modules
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def build(provider: str, shape: Shape, device: torch.device):
    return PROVIDERS[provider](shape.in_features, shape.out_features, shape.r, shape.p, shape.dtype, device)


def cases_for(plan, providers: Optional[Iterable[str]] = None, modes: Optional[Iterable[str]] = None) -> List[Case]:
    chosen = set(providers) if providers else None
    chosen_modes = set(modes) if modes else None
    out = []
    for shape, shape_providers, shape_modes in plan:
        for provider in shape_providers:
            if chosen is not None and provider not in chosen:
                continue
            if not available(provider):
                continue
            for mode in shape_modes:
                if chosen_modes is None or mode in chosen_modes:
                    out.append(Case(provider, mode, shape))
    return out
