"""GPU-readiness report, no GPU needed: ``python -m benchmarks.compile_report``.

1. Every kernel x shipped configuration x target (sm_80, sm_90), compiled ahead of time exactly as a real launch
   would compile it (``benchmarks.aot``): registers, stack / local bytes (spills), shared memory, tensor-core
   instruction counts.
2. A MODELLED DRAM-traffic table per LLM shape for ``fused`` vs ``peft`` (eager PEFT LoRA), forward and backward.
   Model: each kernel (fused) or PyTorch op (PEFT) reads each of its operands once and writes each result once;
   nothing is reused across kernels/ops; within a GEMM, operand re-reads are assumed to hit L2 (the same for
   both providers, whose base GEMMs move the same bytes). Tiling-dependent buffers of the fused kernels are taken
   from the shipped configurations: the dA partial sums (``grad_a_splits``) and the dB / dbias accumulation of the
   grad-out kernel (one [N, r] fp32 slice per row block; atomics in L2 by default, a DRAM buffer in deterministic
   mode). These are modelled numbers, not measurements: run ``make bench`` on a GPU to measure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import List, Tuple

MiB = 2**20


@dataclass
class Op:
    name: str
    read: float  # bytes
    write: float


def _fused_ops(M, K, N, r, e, p, deterministic=False) -> Tuple[List[Op], List[Op]]:
    from fused_lora.kernels import lora

    bm_grad_out = lora.GRAD_OUT.configs["half" if e == 2 else "ieee"][0].kwargs["BLOCK_M"]
    slices = -(-M // bm_grad_out)
    splits = lora.grad_a_splits(M)
    fwd = [
        Op("lora_down: x -> xa (mask on the fly)", M * K * e + r * K * e, M * r * e),
        Op("linear_fwd: x W^T + s xa B^T + b", M * K * e + N * K * e + M * r * e + N * r * e + N * e, M * N * e),
    ]
    dbuf = slices * N * r * 4 if deterministic else N * r * 4
    bwd = [
        Op("grad_out: g -> gb, dB, dbias", M * N * e + N * r * e + M * r * e + (dbuf if deterministic else 0),
           M * r * e + dbuf + N * 4),
        Op("dB, dbias: reduce + cast", dbuf + N * 4, N * r * e + N * e),
        Op("dgrad: g W + s D(gb A)", M * N * e + N * K * e + M * r * e + r * K * e, M * K * e),
        Op("grad_a: gb^T D(x) (split-M partials)", M * K * e + M * r * e, splits * r * K * 4),
        Op("dA: reduce partials + cast", splits * r * K * 4, r * K * e),
    ]
    return fwd, bwd


def _peft_ops(M, K, N, r, e, p) -> Tuple[List[Op], List[Op]]:
    dropout = p > 0
    fwd = [Op("base linear", M * K * e + N * K * e + N * e, M * N * e)]
    if dropout:
        fwd.append(Op("dropout (mask + output)", M * K * e, M * K * e + M * K))
    fwd += [
        Op("lora_A", M * K * e + r * K * e, M * r * e),
        Op("lora_B", M * r * e + N * r * e, M * N * e),
        Op("* scaling", M * N * e, M * N * e),
        Op("base + lora", 2 * M * N * e, M * N * e),
    ]
    bwd = [
        Op("mul backward (g * s)", M * N * e, M * N * e),
        Op("lora_B dgrad (gb)", M * N * e + N * r * e, M * r * e),
        Op("lora_B wgrad (dB)", M * N * e + M * r * e, N * r * e),
        Op("lora_A dgrad", M * r * e + r * K * e, M * K * e),
        Op("lora_A wgrad (dA)", M * r * e + M * K * e, r * K * e),
    ]
    if dropout:
        bwd.append(Op("dropout backward", M * K * e + M * K, M * K * e))
    bwd += [
        Op("base dgrad", M * N * e + N * K * e, M * K * e),
        Op("dx accumulate", 2 * M * K * e, M * K * e),
        Op("dbias (sum g)", M * N * e, N * e),
    ]
    return fwd, bwd


def traffic_table(shapes, r=16, p=0.1, e=2) -> str:
    head = ("shape MxKxN", "r", "p", "pass", "fused MiB", "peft MiB", "fused/peft", "base GEMM MiB")
    rows = [head]
    for M, K, N in shapes:
        f_fwd, f_bwd = _fused_ops(M, K, N, r, e, p)
        p_fwd, p_bwd = _peft_ops(M, K, N, r, e, p)
        base = {"forward": (M * K + N * K + M * N) * e, "backward": (M * N + N * K + M * K) * e}
        for name, f_ops, p_ops in (("forward", f_fwd, p_fwd), ("backward", f_bwd, p_bwd)):
            f_total = sum(o.read + o.write for o in f_ops)
            p_total = sum(o.read + o.write for o in p_ops)
            rows.append((f"{M}x{K}x{N}", str(r), f"{p:g}", name, f"{f_total / MiB:.0f}", f"{p_total / MiB:.0f}",
                         f"{f_total / p_total:.2f}", f"{base[name] / MiB:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


LLM_SHAPES = [(512, 4096, 4096), (8192, 4096, 4096), (8192, 4096, 11008), (8192, 8192, 8192), (16384, 4096, 4096)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_report", description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the compile results as JSON")
    parser.add_argument("--skip-compile", action="store_true", help="only the modelled traffic table")
    ns = parser.parse_args(argv)
    status = 0
    if not ns.skip_compile:
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            print("TRITON_INTERPRET=1 is set: unset it to compile for real targets", file=sys.stderr)
            return 2
        from benchmarks import aot

        results = aot.compile_all()
        print("Ahead-of-time compilation for sm_80 / sm_90 (cuobjdump resource usage, PTX tensor-core ops)\n")
        print(aot.format_table(results))
        bad = [r for r in results if not r.ok]
        print(f"\n{len(results)} compilations; spills: {sum(r.spills for r in results)}; failing: {len(bad)}\n")
        status = 1 if bad else 0
        if ns.json:
            from dataclasses import asdict

            with open(ns.json, "w") as f:
                json.dump([dict(asdict(r), spills=r.spills, ok=r.ok) for r in results], f, indent=1)
    print("MODELLED DRAM traffic (bf16; compulsory per kernel/op, see the module docstring; not measured)\n")
    print(traffic_table(LLM_SHAPES))
    return status


if __name__ == "__main__":
    sys.exit(main())
