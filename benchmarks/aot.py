"""Ahead-of-time compilation of every shipped kernel configuration for real GPU targets, without a GPU.

The Triton interpreter is lenient (it accepts dtype mixes the compiler rejects, never runs out of registers or
shared memory). This module compiles each kernel exactly as a real launch would -- the launch wrappers run on CPU
tensors in *capture* mode, so the arguments, strides, dtypes and constexpr flags are the real ones, and Triton's own
argument specialisation (16-byte alignment, unit strides) is applied for the chosen target -- for every shipped
configuration, for sm_80 and sm_90, and reads the result back:

* registers, stack and local memory per thread from ``cuobjdump --dump-resource-usage`` (STACK or LOCAL > 0 means
  spills), shared memory from the compiled metadata (checked against the target's per-block limit);
* tensor-core instructions counted in the PTX (``mma.sync`` on sm_80, ``wgmma`` or ``mma.sync`` on sm_90).

Run ``python -m benchmarks.aot`` from the repository root (TRITON_INTERPRET must be unset: interpreted kernels
cannot be compiled); ``tests/test_aot_compile.py`` and ``python -m benchmarks.compile_report`` run it too.
The launch-argument capture uses Triton's own binder (``create_function_from_signature`` and
``JITFunction._pack_args``, internals) and replaces ``Launcher.__call__`` while it records: test and report
tooling, outside the runtime package. It is checked against both ends of the supported range, ``TESTED_TRITON``
(the oldest, and the newest, pinned for CPU set-ups); any other version whose binder differs raises an error
naming it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import torch

# The Triton versions fused-lora is tested with: the oldest supported (pyproject.toml's lower bound; torch 2.11's
# Triton; `make test-oldest-triton`) and the newest (pinned for CPU set-ups). scripts/setup-env.sh pins the same two.
TESTED_TRITON = ("3.6.0", "3.9.0")

TARGETS = (80, 90)
# Largest dynamic shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {80: 166912, 90: 232448}


@dataclass
class Capture:
    """One kernel launch as the wrapper would issue it (``dtype``: the activations')."""

    launcher: str
    variant: str
    dtype: str
    args: dict
    family: str = ""  # the configuration family the wrapper chose (for fp32: the "ieee" one; "tf32" compiles too)


@dataclass
class CompileResult:
    kernel: str
    variant: str
    config: str
    target: int
    num_warps: int
    num_stages: int
    registers: int
    stack: int
    local: int
    shared: int
    shared_limit: int
    mma_sync: int
    wgmma: int
    needs_tensor_cores: bool  # the kernel has a tl.dot on 16-bit or tf32 operands
    error: Optional[str] = None

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0

    @property
    def ok(self) -> bool:
        tensor_cores = self.mma_sync + self.wgmma > 0 or not self.needs_tensor_cores
        return self.error is None and not self.spills and self.shared <= self.shared_limit and tensor_cores


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found in the triton wheel at {path}")
    return path


def resource_usage(cubin: bytes) -> Dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the single kernel in a cubin, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    if "REG" not in fields:
        raise RuntimeError(f"could not read resource usage from cuobjdump output:\n{out}")
    return {k: int(v) for k, v in fields.items()}


# The variants captured, and the kernels each one compiles (None: all of them); the others compile the same code as
# "default". "fp32-adapters": fp32 A and B over half-precision activations (PEFT's default), whose tiles the kernels
# convert after loading them: the kernels that load A or B, with a dense and with an in-loop NF4 weight, and (r16,
# r32) the smaller rank tiles those of them whose rank tile follows r take with fp32 adapters (the GEMM seeds' is
# fixed: kernels.lora._FP32_ADAPTERS_SEED_BLOCK_R).
#
# DoRA ("-dora" variants: ``dora_forward`` / ``dora_backward``): the forward and dgrad GEMMs with their column scale,
# z output and (with dropout) second accumulator, which take other tilings ("-dora2"); without dropout ("-dora-p0")
# they keep LoRA's tilings with an epilogue of their own; grad_out with its scaled g and the dm column sums.
_GEMMS = ("_lora_linear_fwd_kernel", "_lora_dgrad_kernel")
_VARIANT_KERNELS = {
    "default": None,
    "deterministic": ("_lora_grad_out_kernel",),
    "nf4": _GEMMS,
    "fp32-adapters": ("_lora_down_kernel", "_lora_linear_fwd_kernel", "_lora_grad_out_kernel", "_lora_dgrad_kernel"),
    "fp32-adapters-r16": ("_lora_down_kernel", "_lora_grad_out_kernel"),
    "fp32-adapters-r32": ("_lora_grad_out_kernel",),
    "nf4-fp32-adapters": _GEMMS,
    "dora": (*_GEMMS, "_lora_grad_out_kernel"),
    "dora-p0": _GEMMS,
    "deterministic-dora": ("_lora_grad_out_kernel",),
    "nf4-dora": _GEMMS,
    "nf4-dora-p0": _GEMMS,
    "fp32-adapters-dora": (*_GEMMS, "_lora_grad_out_kernel"),
    "fp32-adapters-dora-p0": _GEMMS,
    "nf4-fp32-adapters-dora": _GEMMS,
    "nf4-fp32-adapters-dora-p0": _GEMMS,
}


def _example_problems():
    """Representative launches: the heaviest variant of every kernel (dropout, bias, every gradient, the largest
    rank tile), in each dtype family, with the atomic and the deterministic dB reduction, with an NF4 base weight
    dequantized inside the GEMMs (a token count at the in-loop threshold), and with fp32 adapters over bf16
    activations (bf16 standing for the 16-bit activations, as in the other variants). Yields ``(activation dtype,
    adapter dtype, variant, (M, K, N, R))``."""
    from fused_lora.kernels.lora import NF4_FUSED_MAX_TOKENS

    K, N = 4096, 4096
    problems = [(dtype, dtype, variant, 64) for dtype in (torch.bfloat16, torch.float32)
                for variant in ("default", "deterministic", "nf4", "dora", "dora-p0", "deterministic-dora", "nf4-dora",
                                "nf4-dora-p0")]
    problems += [(torch.bfloat16, torch.float32, variant, 64)
                 for variant in ("fp32-adapters", "nf4-fp32-adapters", "fp32-adapters-dora", "fp32-adapters-dora-p0",
                                 "nf4-fp32-adapters-dora", "nf4-fp32-adapters-dora-p0")]
    problems += [(torch.bfloat16, torch.float32, f"fp32-adapters-r{r}", r) for r in (16, 32)]
    for dtype, adapter_dtype, variant, R in problems:
        yield dtype, adapter_dtype, variant, (NF4_FUSED_MAX_TOKENS if _is_nf4(variant) else 4096, K, N, R)


def _is_nf4(variant: str) -> bool:
    return variant.startswith("nf4")


def _example_weight(variant: str, N: int, K: int, dtype: torch.dtype):
    """A dense weight, or the NF4 operands record the kernels take (blocksize 64, absmax decoded)."""
    if not _is_nf4(variant):
        return torch.empty(N, K, dtype=dtype)
    from fused_lora.nf4 import NF4_CODE, NF4Operands

    return NF4Operands(packed=torch.empty((N * K + 1) // 2, 1, dtype=torch.uint8), code=NF4_CODE.clone(),
                       absmax=torch.empty(N * K // 64), blocksize=64, shape=(N, K))


@contextlib.contextmanager
def _recording_launches(captured: List[Capture], variant: str, dtype: torch.dtype, seen: Optional[set] = None):
    """Inside the block every Launcher call is appended to ``captured`` instead of launched (only the first per
    kernel, variant and dtype when ``seen`` is given)."""
    from fused_lora.kernels._launch import Launcher

    def record(self, grid, family, cfg=None, **args):
        key = (self.name, variant, dtype)
        if seen is not None:
            if key in seen:
                return
            seen.add(key)
        captured.append(Capture(self.name, variant, str(dtype).replace("torch.", ""), args, family))

    original = Launcher.__call__
    Launcher.__call__ = record
    try:
        yield
    finally:
        Launcher.__call__ = original


def capture_launches() -> List[Capture]:
    """Run the launch wrappers on CPU tensors with every Launcher in capture mode; return what they would launch."""
    from fused_lora.dropout import Dropout
    from fused_lora.kernels import lora

    captured: List[Capture] = []
    seen = set()
    for dtype, adapter_dtype, variant, (M, K, N, R) in _example_problems():
        x = torch.empty(M, K, dtype=dtype)
        w = _example_weight(variant, N, K, dtype)
        a = torch.empty(R, K, dtype=adapter_dtype)
        b = torch.empty(N, R, dtype=adapter_dtype)
        bias = torch.empty(N, dtype=dtype)
        g = torch.empty(M, N, dtype=dtype)
        xa = torch.empty(M, R, dtype=dtype)
        dropout = None if variant.endswith("-p0") else Dropout(0.1, 0)
        original_det = torch.are_deterministic_algorithms_enabled()
        try:
            torch.use_deterministic_algorithms(variant.startswith("deterministic"))
            with _recording_launches(captured, variant, dtype, seen):
                if "dora" in variant:
                    scale, z = torch.empty(N), torch.empty(M, N, dtype=dtype)
                    lora.dora_forward(x, w, a, b, bias, 2.0, dropout, scale)
                    lora.dora_backward(g, x, w, a, b, xa, z, scale, scale, 2.0, dropout, (True,) * 5)
                else:
                    lora.lora_forward(x, w, a, b, bias, 2.0, dropout)
                    lora.lora_backward(g, x, w, a, b, xa, 2.0, dropout, (True, False, True, True, True))
        finally:
            torch.use_deterministic_algorithms(original_det)
    captured = [c for c in captured
                if _VARIANT_KERNELS[c.variant] is None or c.launcher in _VARIANT_KERNELS[c.variant]]
    return captured + _capture_nf4()


def _capture_nf4() -> List[Capture]:
    """NF4 dequantization of a 4096 x 4096 weight (blocksize 64): to bf16 with and without double quantization,
    and to fp32 (double quantization) for the fp32 families."""
    from fused_lora.kernels import nf4

    rows, cols, blocksize = 4096, 4096, 64
    n_blocks = rows * cols // blocksize
    packed = torch.empty(rows * cols // 2, 1, dtype=torch.uint8)
    code = torch.empty(16, dtype=torch.float32)
    captured: List[Capture] = []
    for variant, dtype in (("nested", torch.bfloat16), ("plain", torch.bfloat16), ("nested", torch.float32)):
        with _recording_launches(captured, variant, dtype):
            if variant == "nested":
                nf4.nf4_dequantize(packed, code, torch.empty(n_blocks, dtype=torch.uint8), (rows, cols), blocksize,
                                   dtype, absmax2=torch.empty(n_blocks // 256), code2=torch.empty(256),
                                   offset=torch.empty(()))
            else:
                nf4.nf4_dequantize(packed, code, torch.empty(n_blocks), (rows, cols), blocksize, dtype)
    return captured


def all_launchers():
    """Every Launcher the package ships (the fused LoRA kernels and the NF4 dequantization)."""
    from fused_lora.kernels import lora, nf4

    return tuple(lora.LAUNCHERS) + tuple(nf4.LAUNCHERS)


def _launcher_by_name(name: str):
    for launcher in all_launchers():
        if launcher.name == name:
            return launcher
    raise KeyError(name)


def _version(text: str) -> Tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", text).groups()
    return int(major), int(minor)


# Triton's launch binding, as JITFunction.run does it before compiling, in Triton 3.6 to 3.9 (both ends checked):
# ``create_function_from_signature(sig, kparams, backend)`` makes a binder whose call returns ``(bound_args,
# specialization, options)``; ``JITFunction._pack_args(backend, kwargs, bound_args, specialization, options)`` turns
# them into ``(options, signature, constexprs, attrs)`` for ``ASTSource``. Triton 3.5 and older bind differently.
_BINDER_PARAMS = ("sig", "kparams", "backend")
_PACK_ARGS_PARAMS = ("self", "backend", "kwargs", "bound_args", "specialization", "options")


def _triton_binding():
    """``(create_function_from_signature, JITFunction._pack_args)`` of the installed Triton, or a RuntimeError that
    names the version and what differs when that is not the interface described above."""
    import inspect

    import triton
    from triton.runtime import jit

    version = triton.__version__
    tested = f"tested with Triton {TESTED_TRITON[0]} to {TESTED_TRITON[1]}"
    if _version(version) < _version(TESTED_TRITON[0]):
        raise RuntimeError(f"benchmarks.aot needs Triton >= {TESTED_TRITON[0]} ({tested}); found {version}")
    create = getattr(jit, "create_function_from_signature", None)
    pack = getattr(getattr(jit, "JITFunction", None), "_pack_args", None)
    found = tuple(None if f is None else tuple(inspect.signature(f).parameters) for f in (create, pack))
    if found != (_BINDER_PARAMS, _PACK_ARGS_PARAMS):
        raise RuntimeError(
            f"benchmarks.aot ({tested}) does not know the launch binder of Triton {version}: expected "
            f"triton.runtime.jit.create_function_from_signature{_BINDER_PARAMS} and "
            f"JITFunction._pack_args{_PACK_ARGS_PARAMS}, found {found[0]} and {found[1]}; adapt compile_capture"
        )
    return create, pack


def compile_capture(capture: Capture, args: dict, cfg, target_arch: int):
    """Compile one captured launch (with launch arguments ``args``) and configuration ``cfg`` for
    ``sm_<target_arch>``; returns Triton's compiled kernel (``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend

    create_function_from_signature, pack_args = _triton_binding()
    kernel = _launcher_by_name(capture.launcher).kernel
    target = GPUTarget("cuda", target_arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {**args, **cfg.all_kwargs()}
    bound = binder(**kwargs)
    packed = pack_args(kernel, backend, kwargs, *bound) if isinstance(bound, tuple) and len(bound) == 3 else None
    if not (isinstance(packed, tuple) and len(packed) == 4):
        raise RuntimeError(f"benchmarks.aot: Triton {triton.__version__}'s binder returned "
                           f"{type(bound).__name__} / {type(packed).__name__}, not the 3- and 4-tuples it knows")
    options, signature, constexprs, attrs = packed
    return compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def compile_launch(capture: Capture, family: str, cfg, target_arch: int) -> CompileResult:
    """Compile one captured launch with configuration ``cfg`` for ``sm_<target_arch>`` and read its resources."""
    launcher = _launcher_by_name(capture.launcher)
    kernel = launcher.kernel
    args = dict(capture.args)
    precision = family.split("-")[0]  # "half", "tf32" or "ieee" (an "-nf4" suffix names in-loop NF4 tilings)
    if precision != "half" and "INPUT_PRECISION" in kernel.arg_names:  # fp32 GEMMs compile once per precision
        args["INPUT_PRECISION"] = precision
    cfg_name = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    base = dict(kernel=capture.launcher, variant=f"{capture.dtype}/{capture.variant}/{family}", config=cfg_name,
                target=target_arch, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                shared_limit=SHARED_LIMIT[target_arch],
                needs_tensor_cores="tl.dot(" in kernel.src and precision in ("half", "tf32"))
    try:
        compiled = compile_capture(capture, args, cfg, target_arch)
        usage = resource_usage(compiled.asm["cubin"])
        ptx = compiled.asm["ptx"]
        return CompileResult(
            **base, registers=usage["REG"], stack=usage.get("STACK", 0), local=usage.get("LOCAL", 0),
            shared=int(compiled.metadata.shared), mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
            wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
        )
    except Exception as exc:  # reported, and fails the check
        return CompileResult(**base, registers=0, stack=0, local=0, shared=0, mma_sync=0, wgmma=0,
                             error=f"{type(exc).__name__}: {exc}"[:2000])


def _compile_job(job) -> CompileResult:
    capture, family, cfg_index, target = job
    return compile_launch(capture, family, _launcher_by_name(capture.launcher).configs[family][cfg_index], target)


def jobs() -> List[Tuple]:
    """(capture, family, configuration index, target) for every shipped configuration."""
    out = []
    for capture in capture_launches():
        launcher = _launcher_by_name(capture.launcher)
        # the family the wrapper chose (on CPU tensors fp32 is "ieee"; its tensor-core twin "tf32" compiles too)
        families = (capture.family,) if capture.dtype != "float32" else (
            capture.family.replace("ieee", "tf32", 1), capture.family)
        for family in families:
            for cfg_index in range(len(launcher.configs[family])):
                for target in TARGETS:
                    out.append((capture, family, cfg_index, target))
    return out


def compile_all(workers: Optional[int] = None) -> List[CompileResult]:
    """Compile every (kernel, configuration, variant, target); in parallel processes."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("benchmarks.aot needs TRITON_INTERPRET unset: interpreted kernels cannot be compiled")
    _triton_binding()  # an unknown Triton fails here, once, with the reason (not as one error per compilation)
    todo = jobs()
    workers = workers or max(1, min(len(todo), os.cpu_count() or 1))
    if workers == 1:
        return [_compile_job(j) for j in todo]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_compile_job, todo, chunksize=2))


def format_table(results: List[CompileResult]) -> str:
    head = ("kernel", "variant", "config", "warps", "stages", "sm", "regs", "stack", "local", "smem KiB", "mma",
            "wgmma", "ok")
    rows = [head]
    for r in results:
        rows.append((r.kernel.strip("_"), r.variant, r.config, str(r.num_warps), str(r.num_stages), str(r.target),
                     str(r.registers), str(r.stack), str(r.local), f"{r.shared / 1024:.1f}", str(r.mma_sync),
                     str(r.wgmma), "yes" if r.ok else ("ERROR " + r.error if r.error else "NO")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results as JSON to this path")
    parser.add_argument("--workers", type=int, default=None)
    ns = parser.parse_args(argv)
    results = compile_all(ns.workers)
    print(format_table(results))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump([dict(asdict(r), spills=r.spills, ok=r.ok) for r in results], f, indent=1)
    bad = [r for r in results if not r.ok]
    print(f"\n{len(results)} compilations, {len(bad)} failing (errors, spills, shared memory over the limit, or a "
          "tl.dot without tensor-core instructions)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
