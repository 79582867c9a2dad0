"""Every kernel and every shipped launch configuration compiles ahead of time for sm_80 and sm_90 (no GPU needed):
no spills (cuobjdump STACK = LOCAL = 0), shared memory within the target's limit, tensor-core instructions
wherever a tl.dot runs on 16-bit or tf32 operands -- also with fp32 adapters over bf16 activations (PEFT's adapter
dtype), whose A / B tiles the kernels convert after loading them. Runs ``python -m benchmarks.aot`` in a
subprocess: the compile needs TRITON_INTERPRET unset."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the checker lives in benchmarks/, beside the package, not in it
    sys.path.insert(0, ROOT)

from benchmarks import aot  # noqa: E402

pytestmark = pytest.mark.aot


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.aot", "--json", str(out)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=1500)
    if not out.exists():
        pytest.fail(f"benchmarks.aot produced no results:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text()), proc


def test_all_compile_without_spills(results):
    rows, proc = results
    bad = [r for r in rows if not r["ok"]]
    assert not bad, "\n".join(
        f"{r['kernel']} {r['variant']} {r['config']} sm_{r['target']}: regs={r['registers']} stack={r['stack']} "
        f"local={r['local']} smem={r['shared']}/{r['shared_limit']} mma={r['mma_sync']} wgmma={r['wgmma']} "
        f"error={r['error']}" for r in bad
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    for r in rows:
        assert r["stack"] == 0 and r["local"] == 0 and 0 < r["registers"] <= 255
        assert r["shared"] <= r["shared_limit"]
        if r["needs_tensor_cores"]:
            assert r["mma_sync"] + r["wgmma"] > 0


def test_every_shipped_configuration_is_covered(results):
    """Coverage is derived from the launchers themselves, so a newly added configuration cannot escape the check."""
    rows, _ = results
    compiled = {(r["kernel"], r["variant"].split("/")[-1], r["config"], r["num_warps"], r["num_stages"], r["target"])
                for r in rows}
    for launcher in aot.all_launchers():
        for family, configs in launcher.configs.items():
            for cfg in configs:
                name = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items())
                for target in aot.TARGETS:
                    key = (launcher.name, family, name, cfg.num_warps, cfg.num_stages, target)
                    assert key in compiled, f"not compiled: {key}"


def test_fp32_adapters_are_compiled(results):
    """The launches with fp32 A / B over bf16 x and g (dense and in-loop NF4 weights) really pass fp32 adapters to
    every kernel that loads A or B, and each of those launches is compiled in every tiling of its family for both
    targets (the check above then holds them to zero spills and tensor-core instructions)."""
    import torch

    rows, _ = results
    compiled = {(r["kernel"], r["variant"], r["config"], r["target"]) for r in rows}
    captures = [c for c in aot.capture_launches() if "fp32-adapters" in c.variant and "dora" not in c.variant]
    assert {(c.launcher, c.variant) for c in captures} == {
        *((k, "fp32-adapters") for k in ("_lora_down_kernel", "_lora_linear_fwd_kernel", "_lora_grad_out_kernel",
                                         "_lora_dgrad_kernel")),
        *((k, "nf4-fp32-adapters") for k in ("_lora_linear_fwd_kernel", "_lora_dgrad_kernel")),
        # the rank tiles lora_down (16, 32) and grad_out (16, 32, 64) take for r = 16, 32, 64
        ("_lora_down_kernel", "fp32-adapters-r16"), ("_lora_grad_out_kernel", "fp32-adapters-r16"),
        ("_lora_grad_out_kernel", "fp32-adapters-r32"),
    }
    for capture in captures:
        adapters = [capture.args[k].dtype for k in ("a_ptr", "b_ptr") if k in capture.args]
        assert capture.dtype == "bfloat16" and adapters == [torch.float32], (capture.launcher, capture.variant)
        launcher = next(launcher for launcher in aot.all_launchers() if launcher.name == capture.launcher)
        family = "half-nf4" if capture.variant.startswith("nf4") else next(
            f for f in ("half-fp32a", "half") if f in launcher.configs)  # the dense GEMMs: their own tilings
        for cfg in launcher.configs[family]:
            name = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items())
            for target in aot.TARGETS:
                key = (capture.launcher, f"bfloat16/{capture.variant}/{family}", name, target)
                assert key in compiled, f"not compiled: {key}"


def test_tested_triton_range_is_declared_consistently():
    """The oldest and newest tested Triton (benchmarks.aot.TESTED_TRITON) are pyproject.toml's lower bound and the
    two pins of scripts/setup-env.sh (`make test` on the newest, `make test-oldest-triton` on the oldest)."""
    import re
    from pathlib import Path

    root = Path(ROOT)
    oldest, newest = aot.TESTED_TRITON
    lower = re.search(r'"triton>=([\d.]+)', (root / "pyproject.toml").read_text()).group(1)
    assert lower.split(".")[:2] == oldest.split(".")[:2], f"pyproject.toml says triton>={lower}, oldest tested {oldest}"
    script = (root / "scripts" / "setup-env.sh").read_text()
    assert f"\nTRITON_OLDEST={oldest}\n" in script and f"\nTRITON_NEWEST={newest}\n" in script



def test_dora_variants_are_compiled(results):
    """Every DoRA launch (dense and in-loop NF4 bases, with and without dropout, bf16 with bf16 and fp32 adapters,
    fp32) really carries its DoRA flags -- the column scale and z in the forward, the scaled g and dm in grad_out,
    the scaled g or the second accumulator in the dgrad -- and is compiled in every tiling of the family its wrapper
    chose (the two-accumulator "-dora2" tilings with dropout) for both targets."""
    rows, _ = results
    compiled = {(r["kernel"], r["variant"], r["config"], r["target"]) for r in rows}
    captures = [c for c in aot.capture_launches() if "dora" in c.variant]
    variants = {(c.launcher, c.variant, c.dtype) for c in captures}
    for dtype in ("bfloat16", "float32"):
        for variant in ("dora", "dora-p0", "nf4-dora", "nf4-dora-p0"):
            for kernel in ("_lora_linear_fwd_kernel", "_lora_dgrad_kernel"):
                assert (kernel, variant, dtype) in variants
        assert ("_lora_grad_out_kernel", "dora", dtype) in variants
        assert ("_lora_grad_out_kernel", "deterministic-dora", dtype) in variants
    for variant in ("fp32-adapters-dora", "fp32-adapters-dora-p0", "nf4-fp32-adapters-dora",
                    "nf4-fp32-adapters-dora-p0"):
        for kernel in ("_lora_linear_fwd_kernel", "_lora_dgrad_kernel"):
            assert (kernel, variant, "bfloat16") in variants
    for capture in captures:
        args = capture.args
        assert args["DORA"] is True, (capture.launcher, capture.variant)
        dropout = not capture.variant.endswith("-p0")
        if capture.launcher == "_lora_grad_out_kernel":
            assert args["COMPUTE_DM"] is True
            assert args["PARTIALS"] is capture.variant.startswith("deterministic")
        else:
            assert args["HAS_DROPOUT"] is dropout
            assert capture.family.endswith("-dora2") is dropout, (capture.variant, capture.family)
        launcher = next(launcher for launcher in aot.all_launchers() if launcher.name == capture.launcher)
        families = (capture.family,) if capture.dtype != "float32" else (
            capture.family.replace("ieee", "tf32", 1), capture.family)
        for family in families:
            for cfg in launcher.configs[family]:
                name = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items())
                for target in aot.TARGETS:
                    key = (capture.launcher, f"{capture.dtype}/{capture.variant}/{family}", name, target)
                    assert key in compiled, f"not compiled: {key}"
