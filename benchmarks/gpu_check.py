"""``make gpu-check`` (``python -m benchmarks.gpu_check [--out DIR]``): one prepared GPU acceptance run.

Made for the rare session that is lent a GPU (about 15 minutes of device time in all): it must work the first
time, finish within 8 minutes wall (Triton compilation and autotuning included) and bring everything back in one
folder. Four phases, each with a time budget (a phase may also use what earlier ones left); when a budget runs out,
what is left of the phase is skipped with a note in the log instead of overrunning, and a watchdog stops the run at
the hard limit whatever happens:

``tests``    the CUDA tests that matter most: ``pytest -m gpu_check`` (the mark is kept on CUDA parametrizations
             only, tests/conftest.py) over the test files that use it, through pytest-xdist where installed, with
             ``-p no:cacheprovider`` and the plugin ``benchmarks/gpu_check_pytest.py`` (one row per test in
             ``tests.csv`` as it finishes; tests not started when the budget runs out are skipped; one launch
             configuration per kernel family, so each kernel variant compiles once). Tests that need bitsandbytes
             skip cleanly where it is absent (``pytest.importorskip``).
``bench``    the headline benchmarks, bf16, r = 16, forward / backward / full, ``fused`` vs ``peft`` vs ``base``,
             timed side by side (``benchmarks.suite.measure_group``, ``triton.testing.do_bench``): 8192 x 4096 x 4096
             and 8192 x 4096 x 11008 at p in {0, 0.1}; at 4096 x 4096 also DoRA, ``fused-dora`` and ``peft-dora``, in
             the same groups (the DoRA goal compares ``fused-dora`` with ``fused`` timed side by side).
``qlora``    ``fused-nf4`` at 16, 512 and 8192 tokens (4096 x 4096, p = 0.1) vs ``nf4-dequant``: dequantize-then-
             matmul on the same NF4 bytes with fused_lora's torch dequantization + ``F.linear``, and the eager LoRA
             branch (``benchmarks/providers.py``; bitsandbytes is not needed).
``kernels``  each of the five LoRA kernels (``kernels/lora.py``) and the NF4 dequantize kernel, launched exactly as
             the layer launches them (the launches of one forward + backward are recorded and replayed one by one),
             against its cuBLAS / torch equivalent on the same tensors: time, TFLOP/s and GB/s (compulsory bytes:
             each tensor argument once), so a slow kernel is named; plus a parity check of the Triton path against
             the torch path at that shape (the autotuned configurations, which the tests do not use).

Then a summary at the end of the log: test counts and failures, slow kernels, and the goals, met / not met / not
measured. Files (at most 8, in one folder): see :data:`FILES`. Exit status 0 when every phase ran without error
and no test failed, 1 otherwise, 3 at the hard stop.

Without a CUDA device it prints the plan -- the first line says "no CUDA device" -- and exits 0.

First run: an H200 on 2026-11-28 (``benchmarks/results/gpu-check-nvidia-h200/``), every phase well inside its
budget (tests 66 s, bench 31 s, qlora 32 s, kernels 6 s). The pieces are also tested on the CPU
(tests/test_gpu_check.py): the test selection, the plan, the folder written with injected runners, the budgets with
injected clocks, missing packages, and the kernel phase's recording, replay and cost accounting in the Triton
interpreter.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import importlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

_STARTED = time.monotonic()  # the watchdog counts from the process's start (imports included)

from .gpu_check_pytest import CSV_ENV, DEADLINE_ENV, ONE_CONFIG_ENV, BUDGET_REASON, ensure_kernels_importable

ensure_kernels_importable()  # a checkout that the set-up could not install still runs

import torch  # noqa: E402

from . import report  # noqa: E402
from .suite import MODES, Measurement, Shape  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
TESTS_DIR = os.path.join(ROOT, "tests")
OUT_ENV = "GPU_CHECK_OUT"
MARKER = "gpu_check"

PHASES = ("tests", "bench", "qlora", "kernels")
# Seconds per phase ("report": the summary and the plot). Estimates for an H200 machine (16 cores): the tests'
# compilations (one configuration per kernel variant, in parallel workers), then autotuning at the benchmark shapes.
BUDGETS_S = {"tests": 170.0, "bench": 110.0, "qlora": 60.0, "kernels": 45.0, "report": 15.0}
TOTAL_S = sum(BUDGETS_S.values())  # 400 s; `make gpu-check` adds the set-up and the imports
HARD_STOP_MARGIN_S = 40.0  # the watchdog ends the run TOTAL_S + this (440 s) after the process started: with the
# set-up of `make gpu-check` (an editable install on a fresh GPU machine, seconds), under 8 minutes in all
MIN_PHASE_S = 10.0  # a phase with less time left is skipped
MIN_UNIT_S = 5.0  # a benchmark group or kernel shape is not started with less time left in its phase
TESTS_STOP_NEW_S = 30.0  # tests not started this long before the test phase's end are skipped

FILES = {
    "log": "gpu-check.log",  # everything: environment, plan, pytest output, tables, notes, the summary at the end
    "tests": "tests.csv",  # one row per test: nodeid, outcome, duration_s, message
    "bench": "benchmarks.csv",  # the bench and qlora measurements, in make bench's CSV format
    "kernels": "kernels.csv",  # one row per kernel and implementation (triton / torch)
    "plot": "gpu-check.png",  # speed-ups of the headline, QLoRA and kernel comparisons
}

TEST_FILE_ORDER = ("tests/test_functional.py", "tests/test_gpu_contracts.py", "tests/test_dropout.py",
                   "tests/test_nf4_format.py", "tests/test_qlora.py", "tests/test_layers.py", "tests/test_compile.py")

OPTIONAL_PACKAGES = ("triton", "pytest", "xdist", "peft", "matplotlib", "bitsandbytes", "transformers")
NEEDS = {"peft": ("peft", "peft-nf4", "peft-dora", "peft-dora-nf4"),  # package -> providers that need it
         "bitsandbytes": ("peft-nf4", "peft-dora-nf4")}

KERNELS = ("_lora_down_kernel", "_lora_linear_fwd_kernel", "_lora_grad_out_kernel", "_lora_dgrad_kernel",
           "_lora_grad_a_kernel", "_nf4_dequant_kernel")
SLOW_RATIO = 1.15  # a kernel slower than this times its torch / cuBLAS equivalent is named in the summary
PARITY_RTOL = {torch.float32: 1e-4, torch.float16: 2.0**-5, torch.bfloat16: 2.0**-5}


# ----------------------------------------------------------------------------------------------------------------
# the plan
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """Providers of one shape, timed side by side in the given modes."""

    shape: Shape
    providers: Tuple[str, ...]
    modes: Tuple[str, ...] = MODES

    @property
    def label(self) -> str:
        s = self.shape
        return f"{s.label} {s.dtype_name} r={s.r} p={s.p:g}"


DORA_PROVIDERS = ("fused-dora", "peft-dora")  # in the 4096 x 4096 bench groups


def bench_groups() -> List[Group]:
    bf16 = torch.bfloat16
    return [Group(Shape(8192, K, N, 16, p, bf16), ("fused", "peft", "base") + (DORA_PROVIDERS if N == 4096 else ()))
            for K, N in ((4096, 4096), (4096, 11008)) for p in (0.1, 0.0)]


def qlora_groups() -> List[Group]:
    return [Group(Shape(tokens, 4096, 4096, 16, 0.1, torch.bfloat16), ("fused-nf4", "nf4-dequant", "base"))
            for tokens in (16, 512, 8192)]


def kernel_shapes() -> List[Shape]:
    return [Shape(8192, 4096, N, 16, 0.1, torch.bfloat16) for N in (4096, 11008)]


def marked_tests(tests_dir: str = TESTS_DIR) -> List[str]:
    """``tests/<file>::<function>`` of every test function decorated ``@pytest.mark.gpu_check`` (read from the
    sources: the same list on every machine, nothing imported)."""
    found = []
    for name in sorted(os.listdir(tests_dir)):
        if not (name.startswith("test_") and name.endswith(".py")):
            continue
        pending = False
        with open(os.path.join(tests_dir, name)) as f:
            for line in f:
                if line.strip() == f"@pytest.mark.{MARKER}":
                    pending = True
                    continue
                match = re.match(r"def (test_\w+)\(", line)
                if match:
                    if pending:
                        found.append(f"tests/{name}::{match.group(1)}")
                    pending = False
    return found


def pytest_command(test_files: Sequence[str], workers: int) -> List[str]:
    cmd = [sys.executable, "-m", "pytest", *test_files, "-m", MARKER, "-p", "no:cacheprovider",
           "-p", "benchmarks.gpu_check_pytest", "-q", "-rfEs", "--tb=short", "--color=no"]
    if workers > 1:
        cmd += ["-n", str(workers), "--dist", "load"]
    return cmd


@dataclass
class Plan:
    phases: Tuple[str, ...]
    budgets: Dict[str, float]  # the chosen phases and "report"
    hard_stop_s: float
    marked: List[str]
    bench: List[Group]
    qlora: List[Group]
    kernels: List[Shape]

    @property
    def total_s(self) -> float:
        return sum(self.budgets.values())

    @property
    def test_files(self) -> List[str]:
        """The files holding marked tests, the most important first (without pytest-xdist they run in this order,
        so a spent budget cuts the least important)."""
        files = {name.split("::")[0] for name in self.marked}
        rank = {name: i for i, name in enumerate(TEST_FILE_ORDER)}
        return sorted(files, key=lambda name: (rank.get(name, len(rank)), name))


def make_plan(phases: Iterable[str] = PHASES, budget_s: float = TOTAL_S) -> Plan:
    """The phases in their fixed order, with :data:`BUDGETS_S` scaled so that the chosen phases and the report
    share ``budget_s`` seconds."""
    chosen = tuple(p for p in PHASES if p in set(phases))
    base = {p: BUDGETS_S[p] for p in chosen + ("report",)}
    scale = budget_s / sum(base.values())
    return Plan(chosen, {p: b * scale for p, b in base.items()}, budget_s + HARD_STOP_MARGIN_S, marked_tests(),
                bench_groups(), qlora_groups(), kernel_shapes())


def goal_definitions() -> List[str]:
    return [f"{g[0]}: {g[1]}" for g in _GOALS]


def describe_plan(plan: Plan, out_dir: str, workers: int) -> List[str]:
    lines = [f"plan: {plan.total_s:.0f} s of phases, hard stop {plan.hard_stop_s:.0f} s after the start (a phase may "
             "also use what earlier ones left; what does not fit is skipped with a note)",
             f"output folder: {out_dir}",
             "files: " + ", ".join(FILES.values())]
    for phase in plan.phases:
        lines.append(f"phase {phase} ({plan.budgets[phase]:.0f} s):")
        if phase == "tests":
            cmd = pytest_command(plan.test_files, workers)
            lines.append("  $ " + " ".join(["python"] + cmd[1:])
                         + ("" if workers > 1 else " [-n <cores / 2, at most 8> --dist load: with pytest-xdist]"))
            lines.append(f"  {len(plan.marked)} test functions marked {MARKER} (their CUDA parametrizations run; "
                         "tests needing bitsandbytes skip where it is absent):")
            lines += [f"    {name}" for name in plan.marked]
        elif phase in ("bench", "qlora"):
            for group in (plan.bench if phase == "bench" else plan.qlora):
                lines.append(f"  {group.label}: {', '.join(group.providers)} x {', '.join(group.modes)}")
        else:
            for shape in plan.kernels:
                lines.append(f"  {shape.label} {shape.dtype_name} r={shape.r} p={shape.p:g}: "
                             + ", ".join(f"{k} vs {_TORCH_EQUIVALENT[k]}" for k in KERNELS))
    lines.append(f"phase report ({plan.budgets['report']:.0f} s): summary at the end of the log, "
                 f"{FILES['plot']}")
    lines.append("goals:")
    lines += [f"  {g}" for g in goal_definitions()]
    return lines


# ----------------------------------------------------------------------------------------------------------------
# packages, log, runners
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Package:
    ok: bool
    detail: str  # version, or the import error


def probe_packages(import_module: Callable = importlib.import_module) -> Dict[str, Package]:
    out = {}
    for name in OPTIONAL_PACKAGES:
        try:
            module = import_module(name)
            out[name] = Package(True, str(getattr(module, "__version__", "?")))
        except Exception as exc:  # ImportError, or a broken install raising anything else
            out[name] = Package(False, f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
    return out


def xdist_workers(packages: Dict[str, Package]) -> int:
    if not packages["xdist"].ok:
        return 1
    return max(1, min(8, (os.cpu_count() or 2) // 2))


class Log:
    """Lines to the log file (flushed at once) and, unless ``echo=False``, to the console."""

    def __init__(self, path: str, stream):
        self._file = open(path, "w")
        self._stream = stream
        self._lock = threading.Lock()

    def __call__(self, line: str = "", echo: bool = True) -> None:
        with self._lock:
            if self._file is None:
                return
            self._file.write(line + "\n")
            self._file.flush()
            if echo:
                self._stream.write(line + "\n")
                self._stream.flush()

    def quiet(self, line: str) -> None:
        self(line, echo=False)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


@dataclass
class KernelRow:
    shape: Shape
    kernel: str
    impl: str  # "triton" or "torch"
    what: str
    config: str
    time_ms: Tuple[float, float, float]  # p20, p50, p80
    flops: float
    bytes: float

    @property
    def tflops(self) -> float:
        return self.flops / (self.time_ms[1] * 1e-3) / 1e12

    @property
    def gbps(self) -> float:
        return self.bytes / (self.time_ms[1] * 1e-3) / 1e9


@dataclass
class KernelReport:
    rows: List[KernelRow]
    notes: List[str]
    parity_ok: bool


@dataclass
class Runners:
    """What touches the GPU, replaceable in tests.

    ``run_pytest(cmd, env, stop_new_after_s, kill_after_s, write_line) -> returncode`` (negative: killed);
    ``measure_group(group) -> [Measurement]``; ``kernel_report(shape) -> KernelReport``."""

    run_pytest: Callable[[List[str], Dict[str, str], float, float, Callable[[str], None]], int]
    measure_group: Callable[[Group], List[Measurement]]
    kernel_report: Callable[[Shape], KernelReport]


_CHILDREN: List[subprocess.Popen] = []


def _kill_children() -> None:
    for proc in _CHILDREN:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)


def run_pytest_subprocess(cmd, env, stop_new_after_s, kill_after_s, write_line) -> int:
    """pytest in its own process group: tests not started ``stop_new_after_s`` from now are skipped (the plugin),
    and the whole group (xdist workers included) is killed at ``kill_after_s``; output goes to ``write_line``."""
    env = dict(env, **{DEADLINE_ENV: f"{time.time() + stop_new_after_s:.3f}"})
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    _CHILDREN.append(proc)

    def pump():
        for line in proc.stdout:
            write_line(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=kill_after_s)
    except subprocess.TimeoutExpired:
        _kill_children()
        proc.wait()
        rc = -int(signal.SIGKILL)
    reader.join(timeout=10)
    return rc


def cuda_runners(device: torch.device, log: Log) -> Runners:
    from . import suite

    def measure(group: Group) -> List[Measurement]:
        return suite.measure_group(group.shape, {p: group.modes for p in group.providers}, device,
                                   report=lambda message: log("  " + message))

    return Runners(run_pytest_subprocess, measure, lambda shape: kernel_report(shape, device))


# ----------------------------------------------------------------------------------------------------------------
# the kernel phase: record the launches of one forward + backward, replay each alone
# ----------------------------------------------------------------------------------------------------------------

_TORCH_EQUIVALENT = {
    "_lora_down_kernel": "torch.mm(x, A^T)",
    "_lora_linear_fwd_kernel": "torch.addmm(bias, x, W^T)",
    "_lora_grad_out_kernel": "torch.mm(g, B) + torch.mm(g^T, xa) + g.sum(0)",
    "_lora_dgrad_kernel": "torch.mm(g, W)",
    "_lora_grad_a_kernel": "torch.mm(gb^T, x)",
    "_nf4_dequant_kernel": "NF4Weight.dequantize_torch",
}


def kernel_flops(kernel: str, M: int, K: int, N: int, r: int) -> float:
    """Useful FLOPs (2 per multiply-add) of one launch; the LoRA terms the GEMM kernels fold in included."""
    return {
        "_lora_down_kernel": 2 * M * K * r,
        "_lora_linear_fwd_kernel": 2 * M * N * K + 2 * M * N * r,
        "_lora_grad_out_kernel": 4 * M * N * r,  # gb = g B and dB = g^T xa
        "_lora_dgrad_kernel": 2 * M * N * K + 2 * M * K * r,
        "_lora_grad_a_kernel": 2 * M * K * r,
        "_nf4_dequant_kernel": 0,
    }[kernel]


def launch_bytes(args: Dict[str, object]) -> int:
    """Compulsory bytes of one launch: each distinct tensor argument read or written once (dummy pointer arguments
    that alias another argument counted once)."""
    sizes: Dict[int, int] = {}
    for value in args.values():
        if isinstance(value, torch.Tensor):
            ptr = value.data_ptr()
            sizes[ptr] = max(sizes.get(ptr, 0), value.numel() * value.element_size())
    return sum(sizes.values())


@contextlib.contextmanager
def recording_launches():
    """Record ``(launcher, grid, family, cfg, args)`` of every Triton launch in the block (they still run)."""
    from fused_lora.kernels._launch import Launcher

    launches = []
    launch = Launcher.__call__

    def spy(self, grid, family, cfg=None, **args):
        launches.append((self, grid, family, cfg, args))
        return launch(self, grid, family, cfg, **args)

    Launcher.__call__ = spy
    try:
        yield launches
    finally:
        Launcher.__call__ = launch


def _config_text(launcher, family: str, cfg) -> str:
    chosen = cfg or launcher.fixed_config() or getattr(launcher._tuners.get(family), "best_config", None)
    return "" if chosen is None else str(chosen).replace(",", ";")


def do_bench_ms(fn) -> Tuple[float, float, float]:
    import triton.testing

    return tuple(float(v) for v in triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8]))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_report(shape: Shape, device: torch.device, timer: Callable = do_bench_ms) -> KernelReport:
    """Time each kernel of one forward + backward (dropout ``shape.p``, bias, dx, dA, dB, dbias) and the NF4
    dequantization of W, each against its torch equivalent on the same tensors; check the Triton results against
    the torch path's (``fused_lora.torch_ops``) at this shape. ``timer(fn) -> (p20, p50, p80)`` ms (CUDA:
    ``triton.testing.do_bench``). On CPU tensors this runs in the Triton interpreter (the tests use that)."""
    from fused_lora import torch_ops
    from fused_lora.dropout import Dropout
    from fused_lora.kernels import lora
    from fused_lora.nf4 import quantize_nf4

    M, K, N, r, dtype = shape.tokens, shape.in_features, shape.out_features, shape.r, shape.dtype
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*size, scale=1.0):
        return (torch.randn(*size, generator=gen, device=device) * scale).to(dtype)

    x, W, A, B = rnd(M, K), rnd(N, K, scale=K**-0.5), rnd(r, K, scale=K**-0.5), rnd(N, r, scale=r**-0.5)
    bias, g = rnd(N), rnd(M, N)
    scaling, dropout = 2.0, (Dropout(shape.p, 1234) if shape.p > 0 else None)
    needs = (True, False, True, True, True)  # dx, (no dW: frozen), dA, dB, dbias
    w4 = quantize_nf4(W)
    with recording_launches() as launches:
        y, xa = lora.lora_forward(x, W, A, B, bias, scaling, dropout)
        dx, _, dA, dB, dbias = lora.lora_backward(g, x, W, A, B, xa, scaling, dropout, needs)
        w_deq = w4.dequantize_triton(dtype)
    _synchronize(device)

    notes, parity_ok = [], True
    y_t, xa_t = torch_ops.lora_forward(x, W, A, B, bias, scaling, dropout)
    dx_t, _, dA_t, dB_t, dbias_t = torch_ops.lora_backward(g, x, W, A, B, xa_t, scaling, dropout, needs)
    rtol = PARITY_RTOL[dtype]
    worst = []
    for name, ours, theirs in (("y", y, y_t), ("xa", xa, xa_t), ("dx", dx, dx_t), ("dA", dA, dA_t),
                               ("dB", dB, dB_t), ("dbias", dbias, dbias_t)):
        scale = theirs.float().abs().max().item() or 1.0
        err = (ours.float() - theirs.float()).abs().max().item() / scale
        worst.append(f"{name} {err:.1e}")
        parity_ok &= err <= rtol
    exact = torch.equal(w_deq.view(torch.int16 if dtype != torch.float32 else torch.int32),
                        w4.dequantize_torch(dtype).view(torch.int16 if dtype != torch.float32 else torch.int32))
    parity_ok &= exact
    notes.append(f"parity {shape.label} {shape.dtype_name} p={shape.p:g}, Triton vs torch path (max |diff| / max |ref|,"
                 f" allowed {rtol:.1e}): {', '.join(worst)}; NF4 dequantize bit-exact: {exact} -> "
                 f"{'ok' if parity_ok else 'MISMATCH'}")
    del y_t, xa_t, dx_t, dA_t, dB_t, dbias_t

    gb = torch.mm(g, B)
    e = x.element_size()
    torch_fns = {
        "_lora_down_kernel": (lambda: torch.mm(x, A.t()), 2 * M * K * r, (M * K + r * K + M * r) * e),
        "_lora_linear_fwd_kernel": (lambda: torch.addmm(bias, x, W.t()), 2 * M * N * K,
                                    (M * K + N * K + N + M * N) * e),
        "_lora_grad_out_kernel": (lambda: (torch.mm(g, B), torch.mm(g.t(), xa), g.sum(0)), 4 * M * N * r,
                                  (3 * M * N + 2 * N * r + 2 * M * r + N) * e),
        "_lora_dgrad_kernel": (lambda: torch.mm(g, W), 2 * M * N * K, (M * N + N * K + M * K) * e),
        "_lora_grad_a_kernel": (lambda: torch.mm(gb.t(), x), 2 * M * K * r, (M * r + M * K + r * K) * e),
        "_nf4_dequant_kernel": (lambda: w4.dequantize_torch(dtype), 0, None),
    }
    rows = []
    seen = []
    for launcher, grid, family, cfg, args in launches:
        name = launcher.name
        seen.append(name)
        kbytes = launch_bytes(args)
        ms = timer(lambda: launcher(grid, family, cfg, **args))
        rows.append(KernelRow(shape, name, "triton", f"{family} family", _config_text(launcher, family, cfg), ms,
                              kernel_flops(name, M, K, N, r), kbytes))
        fn, flops, tbytes = torch_fns[name]
        rows.append(KernelRow(shape, name, "torch", _TORCH_EQUIVALENT[name], "", timer(fn), flops,
                              kbytes if tbytes is None else tbytes))
    missing = [k for k in KERNELS if k not in seen]
    if missing:
        notes.append(f"kernels not launched at {shape.label}: {', '.join(missing)}")
    return KernelReport(rows, notes, parity_ok)


KERNEL_CSV_FIELDS = ["device", "shape", "tokens", "in_features", "out_features", "r", "p", "dtype", "kernel", "impl",
                     "what", "config", "p20_ms", "p50_ms", "p80_ms", "tflops", "gbps", "flops", "bytes",
                     "ratio_vs_torch"]


def kernel_pairs(rows: List[KernelRow]) -> List[Tuple[KernelRow, KernelRow]]:
    """(triton, torch) row pairs, in order."""
    torch_rows = {(r.shape, r.kernel): r for r in rows if r.impl == "torch"}
    return [(r, torch_rows[(r.shape, r.kernel)]) for r in rows
            if r.impl == "triton" and (r.shape, r.kernel) in torch_rows]


def kernel_table(rows: List[KernelRow]) -> str:
    head = ["shape MxKxN", "kernel", "ms p50", "TFLOP/s", "GB/s", "torch equivalent", "ms p50", "TFLOP/s", "GB/s",
            "ratio"]
    lines = [head]
    for ours, theirs in kernel_pairs(rows):
        lines.append([ours.shape.label, ours.kernel, f"{ours.time_ms[1]:.4f}", f"{ours.tflops:.1f}",
                      f"{ours.gbps:.0f}", theirs.what, f"{theirs.time_ms[1]:.4f}", f"{theirs.tflops:.1f}",
                      f"{theirs.gbps:.0f}", f"{ours.time_ms[1] / theirs.time_ms[1]:.2f}x"])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------------
# goals and summary
# ----------------------------------------------------------------------------------------------------------------

# (name, definition, provider, over, tokens, N, p, mode, target): ratio = time(over) / time(provider) >= target
# ("at least target times faster"), or for a negative target: time(provider) / time(over) <= -target.
_GOALS = [
    ("fwd+bwd vs PEFT", "8192x4096x4096 r=16 bf16 p=0.1 forward+backward: fused >= 1.5x faster than peft",
     "fused", "peft", 8192, 4096, 0.1, "full", 1.5),
    ("fwd vs base", "8192x4096x4096 r=16 bf16 p=0 forward: fused within 1.08x of base",
     "fused", "base", 8192, 4096, 0.0, "forward", -1.08),
    ("QLoRA 16 tokens", "fused-nf4 at 16 tokens (4096x4096 r=16 bf16 p=0.1 forward+backward): >= 1.5x faster "
     "than nf4-dequant (dequantize-then-matmul)", "fused-nf4", "nf4-dequant", 16, 4096, 0.1, "full", 1.5),
    ("QLoRA 512 tokens", "fused-nf4 at 512 tokens: >= 1.5x faster than nf4-dequant",
     "fused-nf4", "nf4-dequant", 512, 4096, 0.1, "full", 1.5),
    ("QLoRA 8192 tokens", "fused-nf4 at 8192 tokens: no slower than nf4-dequant",
     "fused-nf4", "nf4-dequant", 8192, 4096, 0.1, "full", 1.0),
    ("DoRA vs LoRA", "8192x4096x4096 r=16 bf16 p=0 forward+backward: fused-dora within 1.15x of fused (LoRA)",
     "fused-dora", "fused", 8192, 4096, 0.0, "full", -1.15),
]


def _find(measurements: List[Measurement], provider, tokens, N, p, mode) -> Optional[Measurement]:
    for m in measurements:
        s = m.case.shape
        if (m.case.provider, s.tokens, s.in_features, s.out_features, s.r, s.p, s.dtype, m.case.mode) == (
                provider, tokens, 4096, N, 16, p, torch.bfloat16, mode):
            return m
    return None


def goals(measurements: List[Measurement]) -> List[Tuple[str, str, str]]:
    """(definition, measured, verdict) per goal; verdict "met", "NOT MET" or "not measured"."""
    out = []
    for _, definition, provider, over, tokens, N, p, mode, target in _GOALS:
        ours, theirs = _find(measurements, provider, tokens, N, p, mode), _find(measurements, over, tokens, N, p, mode)
        if ours is None or theirs is None:
            missing = " and ".join(name for name, m in ((provider, ours), (over, theirs)) if m is None)
            out.append((definition, f"no measurement of {missing}", "not measured"))
            continue
        t_ours, t_theirs = ours.time_ms[1], theirs.time_ms[1]
        if target > 0:
            value, met = t_theirs / t_ours, t_theirs / t_ours >= target
            text = f"{value:.2f}x faster ({t_ours:.3f} ms vs {t_theirs:.3f} ms)"
        else:
            value, met = t_ours / t_theirs, t_ours / t_theirs <= -target
            text = f"{value:.3f}x of {over} ({t_ours:.3f} ms vs {t_theirs:.3f} ms)"
        out.append((definition, text, "met" if met else "NOT MET"))
    return out


@dataclass
class RunState:
    plan: Plan
    out_dir: str
    label: str
    log: Log
    runners: Runners
    clock: Callable[[], float]
    packages: Dict[str, Package]
    import_module: Callable
    workers: int
    tests: List[Dict[str, str]] = field(default_factory=list)
    tests_rc: Optional[int] = None
    measurements: List[Measurement] = field(default_factory=list)
    kernel_rows: List[KernelRow] = field(default_factory=list)
    kernel_notes: List[str] = field(default_factory=list)
    parity_ok: Optional[bool] = None
    notes: List[str] = field(default_factory=list)  # budget skips, missing packages, errors: repeated in the summary
    errors: List[str] = field(default_factory=list)
    phase_times: Dict[str, float] = field(default_factory=dict)

    def path(self, key: str) -> str:
        return os.path.join(self.out_dir, FILES[key])

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.log(f"NOTE: {text}")

    @property
    def unavailable(self) -> set:
        return {provider for package, providers in NEEDS.items() if not self.packages[package].ok
                for provider in providers}


def summary_lines(run: RunState) -> List[str]:
    lines = ["", "=" * 100, f"SUMMARY gpu-check on {run.label}", "=" * 100]
    if run.tests_rc is None:
        lines.append("tests: not run")
    else:
        counts: Dict[str, int] = {}
        for row in run.tests:
            counts[row["outcome"]] = counts.get(row["outcome"], 0) + 1
        budget = sum(1 for row in run.tests if row["message"] == BUDGET_REASON)
        lines.append(f"tests: {', '.join(f'{n} {k}' for k, n in sorted(counts.items())) or 'no results'} "
                     f"(pytest exit status {run.tests_rc}; {budget} skipped for the time budget)")
        for row in run.tests:
            if row["outcome"] in ("failed", "error"):
                lines.append(f"  {row['outcome'].upper()} {row['nodeid']}: {row['message']}")
    if run.parity_ok is not None:
        lines.append(f"headline parity, Triton vs torch path at the autotuned configurations: "
                     f"{'ok' if run.parity_ok else 'MISMATCH (see the kernels phase)'}")
    pairs = kernel_pairs(run.kernel_rows)
    if pairs:
        slow = [f"{a.kernel} at {a.shape.label}: {a.time_ms[1] / b.time_ms[1]:.2f}x {b.what}" for a, b in pairs
                if a.time_ms[1] > SLOW_RATIO * b.time_ms[1]]
        lines.append(f"kernels slower than {SLOW_RATIO}x their torch / cuBLAS equivalent: "
                     + ("; ".join(slow) if slow else "none"))
    else:
        lines.append("kernels: not measured")
    lines.append("goals:")
    for definition, measured, verdict in goals(run.measurements):
        lines.append(f"  [{verdict}] {definition}: {measured}")
    if run.phase_times:
        lines.append("phase times: " + ", ".join(f"{p} {t:.0f} s" for p, t in run.phase_times.items()))
    for text in run.notes:
        lines.append(f"note: {text}")
    for text in run.errors:
        lines.append(f"ERROR: {text}")
    lines.append("files: " + ", ".join(name for name in FILES.values() if os.path.exists(os.path.join(run.out_dir,
                                                                                                         name))))
    return lines


def _plot(run: RunState) -> Optional[str]:
    """One figure: headline speed-ups (fused over peft and over base per mode), QLoRA speed-up of fused-nf4 over
    nf4-dequant along the tokens, and each kernel's time relative to its torch equivalent."""
    try:
        matplotlib = run.import_module("matplotlib")
        matplotlib.use("Agg")
        plt = run.import_module("matplotlib.pyplot")
    except Exception as exc:
        run.note(f"no plot: matplotlib does not import ({type(exc).__name__}: {exc})")
        return None
    fig, axes = plt.subplots(1, 3, figsize=(17, 6.5))
    ax = axes[0]
    labels, values = [], []
    for m in run.measurements:
        if m.case.provider != "fused" or m.case.shape.tokens != 8192:
            continue
        for over in ("peft", "base"):
            ref = _find(run.measurements, over, 8192, m.case.shape.out_features, m.case.shape.p, m.case.mode)
            if ref is not None:
                s = m.case.shape
                labels.append(f"N={s.out_features} p={s.p:g} {m.case.mode} vs {over}")
                values.append(ref.time_ms[1] / m.time_ms[1])
    ax.barh(range(len(values)), values, color=["C0" if "peft" in label else "C4" for label in labels])
    ax.set_yticks(range(len(values)), labels, fontsize=6)
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("speed-up of fused (x), 8192 tokens, K = 4096, bf16, r = 16")
    ax = axes[1]
    tokens, speedups = [], []
    for t in (16, 512, 8192):
        ours, theirs = _find(run.measurements, "fused-nf4", t, 4096, 0.1, "full"), _find(
            run.measurements, "nf4-dequant", t, 4096, 0.1, "full")
        if ours and theirs:
            tokens.append(t)
            speedups.append(theirs.time_ms[1] / ours.time_ms[1])
    ax.plot(tokens, speedups, marker="o", color="C1")
    ax.set_xscale("log", base=2)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(1.5, color="C3", lw=0.8, ls="--")
    ax.set_xlabel("tokens (4096 x 4096, bf16, r = 16, p = 0.1, fwd+bwd)")
    ax.set_ylabel("fused-nf4 speed-up over nf4-dequant (x)")
    ax = axes[2]
    pairs = kernel_pairs(run.kernel_rows)
    ax.barh(range(len(pairs)), [a.time_ms[1] / b.time_ms[1] for a, b in pairs], color="C2")
    ax.set_yticks(range(len(pairs)), [f"{a.kernel}\n{a.shape.label}" for a, _ in pairs], fontsize=6)
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.axvline(SLOW_RATIO, color="C3", lw=0.8, ls="--")
    ax.set_xlabel("kernel time / torch equivalent (lower is better)")
    fig.suptitle(f"make gpu-check on {run.label}", fontsize=10)
    fig.tight_layout()
    fig.savefig(run.path("plot"), dpi=110)
    plt.close(fig)
    return run.path("plot")


# ----------------------------------------------------------------------------------------------------------------
# phases
# ----------------------------------------------------------------------------------------------------------------


def _phase_tests(run: RunState, allowance: float) -> None:
    if not run.packages["pytest"].ok:
        run.note(f"tests phase skipped: pytest does not import ({run.packages['pytest'].detail})")
        return
    if not run.packages["xdist"].ok:
        run.note("pytest-xdist missing: the tests run in one process (slower compilation)")
    path = run.path("tests")
    env = dict(os.environ, **{CSV_ENV: path, ONE_CONFIG_ENV: "1", "PYTHONUNBUFFERED": "1",
                              "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8")})
    cmd = pytest_command(run.plan.test_files, run.workers)
    stop_new = allowance - min(TESTS_STOP_NEW_S, 0.15 * allowance)
    run.log("$ " + " ".join(["python"] + cmd[1:]))
    run.log(f"  (tests not started within {stop_new:.0f} s are skipped; pytest is killed at {allowance:.0f} s; "
            "its output is in the log only)")
    last = []

    def write(line):
        run.log.quiet("  | " + line)
        if line.strip():
            last[:] = [line]

    rc = run.runners.run_pytest(cmd, env, stop_new, allowance, write)
    run.tests_rc = rc
    if last:
        run.log("  pytest: " + last[0].strip())
    if rc < 0:
        run.note(f"pytest killed at the test phase's limit ({allowance:.0f} s): tests.csv holds the tests finished")
    elif rc not in (0, 1):
        run.errors.append(f"pytest exit status {rc} (not a test failure: collection or usage error; see the log)")
    if os.path.exists(path):
        with open(path, newline="") as f:
            run.tests = list(csv.DictReader(f))
    budget = sum(1 for row in run.tests if row["message"] == BUDGET_REASON)
    if budget:
        run.note(f"{budget} tests skipped: the test phase's time budget was spent (see tests.csv)")


def _within_budget(run: RunState, deadline: float, phase: str, items, label, work) -> None:
    """``work(item)`` for each item while at least MIN_UNIT_S remain before ``deadline``: what does not fit is
    noted as skipped; an item that fails is recorded as an error (traceback in the log) and the next one runs."""
    for i, item in enumerate(items):
        if deadline - run.clock() < MIN_UNIT_S:
            run.note(f"{phase}: time budget spent; skipped: " + "; ".join(label(x) for x in items[i:]))
            return
        try:
            work(item)
        except Exception as exc:
            run.errors.append(f"{phase} {label(item)}: {type(exc).__name__}: {exc}")
            run.log(traceback.format_exc(), echo=False)


def _phase_groups(run: RunState, allowance: float, groups: List[Group], name: str) -> None:
    deadline = run.clock() + allowance
    dropped = sorted({p for g in groups for p in g.providers} & run.unavailable)
    for provider in dropped:
        package = next(pkg for pkg, providers in NEEDS.items() if provider in providers)
        run.note(f"{name}: provider {provider} skipped: {package} does not import ({run.packages[package].detail})")
    done = []

    def measure(group: Group) -> None:
        group = dataclasses.replace(group, providers=tuple(p for p in group.providers if p not in run.unavailable))
        start = run.clock()
        measurements = run.runners.measure_group(group)
        run.log(f"  {group.label}: {len(measurements)} measurements in {run.clock() - start:.1f} s")
        report.append_csv(run.path("bench"), report.csv_rows(measurements, torch.device("cuda"), run.label))
        run.measurements += measurements
        done.extend(measurements)

    _within_budget(run, deadline, name, groups, lambda g: g.label, measure)
    if done:
        run.log(report.table(done))
    try:
        import fused_lora

        choices = fused_lora.auto_choices()
    except Exception:
        choices = []
    for choice in choices:
        run.log(f"  auto backend: {choice}", echo=False)


def _phase_kernels(run: RunState, allowance: float) -> None:
    if not run.packages["triton"].ok:
        run.note(f"kernels phase skipped: triton does not import ({run.packages['triton'].detail})")
        return
    deadline = run.clock() + allowance
    rows = []

    def time_kernels(shape) -> None:
        start = run.clock()
        result = run.runners.kernel_report(shape)
        run.log(f"  {shape.label} {shape.dtype_name}: {len(result.rows)} timings in {run.clock() - start:.1f} s")
        for note in result.notes:
            run.log("  " + note)
        run.parity_ok = result.parity_ok if run.parity_ok is None else (run.parity_ok and result.parity_ok)
        run.kernel_notes += result.notes
        rows.extend(result.rows)
        _write_kernel_rows(run, result.rows)

    _within_budget(run, deadline, "kernels", run.plan.kernels, lambda s: f"{s.label} {s.dtype_name}", time_kernels)
    run.kernel_rows += rows
    if rows:
        run.log(kernel_table(rows))


def _write_kernel_rows(run: RunState, rows: List[KernelRow]) -> None:
    path = run.path("kernels")
    new = not os.path.exists(path)
    torch_time = {(r.shape, r.kernel): r.time_ms[1] for r in rows if r.impl == "torch"}
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=KERNEL_CSV_FIELDS)
        if new:
            writer.writeheader()
        for r in rows:
            s = r.shape
            ratio = r.time_ms[1] / torch_time[(s, r.kernel)] if r.impl == "triton" and (s, r.kernel) in torch_time \
                else ""
            writer.writerow(dict(device=run.label, shape=s.label, tokens=s.tokens, in_features=s.in_features,
                                 out_features=s.out_features, r=s.r, p=s.p, dtype=s.dtype_name, kernel=r.kernel,
                                 impl=r.impl, what=r.what, config=r.config, p20_ms=f"{r.time_ms[0]:.6g}",
                                 p50_ms=f"{r.time_ms[1]:.6g}", p80_ms=f"{r.time_ms[2]:.6g}",
                                 tflops=f"{r.tflops:.4g}", gbps=f"{r.gbps:.4g}", flops=int(r.flops),
                                 bytes=int(r.bytes), ratio_vs_torch=f"{ratio:.4g}" if ratio != "" else ""))


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def default_out_dir(device_name: str) -> str:
    return os.path.join(RESULTS_DIR, f"gpu-check-{_slug(device_name)}")


def _cuda_label() -> str:
    props = torch.cuda.get_device_properties(0)
    return (f"{torch.cuda.get_device_name(0)} ({props.multi_processor_count} SMs, "
            f"{props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})")


def _finish(run: RunState) -> None:
    start = run.clock()
    try:
        if run.measurements or run.kernel_rows:
            _plot(run)
    except Exception as exc:
        run.errors.append(f"plot: {type(exc).__name__}: {exc}")
    run.phase_times["report"] = run.clock() - start
    for line in summary_lines(run):
        run.log(line)


def main(argv=None, *, cuda_available: Optional[bool] = None, runners: Optional[Runners] = None,
         device_name: Optional[str] = None, clock: Callable[[], float] = time.monotonic,
         import_module: Callable = importlib.import_module, watchdog: bool = True, stream=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", help=f"the results folder (also ${OUT_ENV}; default "
                                      "benchmarks/results/gpu-check-<device>)")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES),
                        help="a subset of the phases (e.g. to rerun one in the time left)")
    parser.add_argument("--budget", type=float, default=TOTAL_S,
                        help=f"seconds for the chosen phases and the report (default {TOTAL_S:.0f}); the hard stop "
                             f"is {HARD_STOP_MARGIN_S:.0f} s later")
    ns = parser.parse_args(argv)
    stream = stream or sys.stdout
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    plan = make_plan(ns.phases, ns.budget)
    out_dir = ns.out or os.environ.get(OUT_ENV)

    if not cuda:
        lines = [f"gpu-check: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False): "
                 "nothing runs; this is the plan a machine with a GPU runs (exit status 0)"]
        lines += describe_plan(plan, out_dir or os.path.join(RESULTS_DIR, "gpu-check-<device>"), 0)
        stream.write("\n".join(lines) + "\n")
        stream.flush()
        return 0
    packages = probe_packages(import_module)
    workers = xdist_workers(packages)

    label = device_name or _cuda_label()
    out_dir = out_dir or default_out_dir(label.split(" (")[0])
    os.makedirs(out_dir, exist_ok=True)
    for name in FILES.values():  # this run's files only: earlier results of other runs stay
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out_dir, name))
    log = Log(os.path.join(out_dir, FILES["log"]), stream)
    run = RunState(plan, out_dir, label, log, None, clock, packages, import_module, workers)
    log(f"gpu-check on {label}: {report.library_versions()}")
    log("packages: " + ", ".join(f"{k} {v.detail if v.ok else 'MISSING (' + v.detail + ')'}"
                                 for k, v in packages.items()))
    for line in describe_plan(plan, out_dir, workers):
        log(line, echo=False)
    if not packages["bitsandbytes"].ok:
        run.note("bitsandbytes missing: tests that need it skip (pytest.importorskip); fused-nf4 quantizes with "
                 "fused_lora's own quantize_nf4 (the same bytes), its baseline is nf4-dequant")
    if not packages["triton"].ok:
        run.note("triton missing: fused runs the torch path and the kernels phase is skipped")
    run.runners = runners or cuda_runners(torch.device("cuda"), log)

    timer = None
    if watchdog:
        def hard_stop():
            log(f"HARD STOP: {plan.hard_stop_s:.0f} s reached; stopping with what is done")
            _kill_children()
            for line in summary_lines(run):
                log(line)
            log.close()
            os._exit(3)

        timer = threading.Timer(max(1.0, plan.hard_stop_s - (time.monotonic() - _STARTED)), hard_stop)
        timer.daemon = True
        timer.start()

    t0 = clock()
    phase_fns = {
        "tests": _phase_tests,
        "bench": lambda r, a: _phase_groups(r, a, r.plan.bench, "bench"),
        "qlora": lambda r, a: _phase_groups(r, a, r.plan.qlora, "qlora"),
        "kernels": _phase_kernels,
    }
    for i, phase in enumerate(plan.phases):
        reserved = sum(plan.budgets[p] for p in plan.phases[i + 1:]) + plan.budgets["report"]
        allowance = plan.total_s - reserved - (clock() - t0)
        if allowance < MIN_PHASE_S:
            run.note(f"phase {phase} skipped: {max(allowance, 0):.0f} s left of its budget")
            continue
        log(f"== phase {phase}: up to {allowance:.0f} s")
        start = clock()
        try:
            phase_fns[phase](run, allowance)
        except Exception as exc:
            run.errors.append(f"phase {phase}: {type(exc).__name__}: {exc}")
            log(traceback.format_exc(), echo=False)
        run.phase_times[phase] = clock() - start
        log(f"== phase {phase} done in {run.phase_times[phase]:.0f} s")
    _finish(run)
    if timer is not None:
        timer.cancel()
    log.close()
    failed = any(row["outcome"] in ("failed", "error") for row in run.tests)
    return 1 if failed or run.errors else 0


if __name__ == "__main__":
    sys.exit(main())
