"""The suite's cases through pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

Same providers, shapes and modes as ``python -m benchmarks`` (the CPU default set, or the GPU set on CUDA);
pytest-benchmark handles rounds, statistics, ``--benchmark-json`` / ``--benchmark-compare``. Use
``--benchmark-group-by=param:shape,param:mode`` to see providers side by side.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import suite

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PLAN = suite.gpu_default() if DEVICE.type == "cuda" else suite.cpu_default()
CASES = suite.cases_for(PLAN)

_modules = {}


def _module(provider: str, shape: suite.Shape):
    key = (provider, shape)
    if key not in _modules:
        _modules.clear()  # one live module at a time: GPU memory, and torch.compile caches
        _modules[key] = suite.build(provider, shape, DEVICE)
    return _modules[key]


@pytest.mark.parametrize(
    "case", CASES,
    ids=[f"{c.shape.label}-{c.shape.dtype_name}-r{c.shape.r}-p{c.shape.p:g}-{c.mode}-{c.provider}" for c in CASES],
)
def test_case(benchmark, case: suite.Case):
    runner = suite._Runner(_module(case.provider, case.shape), case.shape, DEVICE)
    fn = runner.fn(case.mode)
    if DEVICE.type == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize(DEVICE)
    else:
        timed = fn
    benchmark.extra_info.update(
        provider=case.provider, mode=case.mode, shape=case.shape.label, dtype=case.shape.dtype_name, r=case.shape.r,
        p=case.shape.p, flops=suite.useful_flops(case.shape, case.mode),
        saved_mib=suite.saved_bytes(runner.module, runner.x) / 2**20,
    )
    benchmark.pedantic(timed, warmup_rounds=1, rounds=3 if case.shape.dtype != torch.float32 else 10)
    runner.release()


# The DoRA providers compute one function: at a tiny size their outputs and gradients agree (fp32; with dropout in
# eval mode, where PEFT's DoRA ignores p -- in training the providers draw different masks). Not a benchmark: run
# with ``pytest benchmarks/test_benchmarks.py -k agree`` (``--benchmark-only`` skips it).
DORA_SETS = {"dense": ("fused-dora", "fused-dora-in-peft", "peft-dora"), "nf4": ("fused-dora-nf4", "peft-dora-nf4")}
ROLES = ("lora_A", "lora_B", "magnitude")  # the trainable parameters, by a part of their names in every provider


def _dora_run(module, shape: suite.Shape, train: bool):
    module.train(train)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape.tokens, shape.in_features, generator=gen).to(DEVICE).requires_grad_(True)
    g = torch.randn(shape.tokens, shape.out_features, generator=gen).to(DEVICE)
    y = module(x)
    y.backward(g)
    out = {"y": y.detach(), "x": x.grad}
    for name, param in module.named_parameters():
        role = [r for r in ROLES if r in name]
        if param.requires_grad and role:
            out[role[0]] = param.grad
    assert set(out) == {"y", "x", *ROLES}, sorted(out)
    return out


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("kind", sorted(DORA_SETS))
def test_dora_providers_agree(kind, p):
    shape = suite.Shape(24, 64, 96, 4, p, torch.float32)  # in_features a multiple of NF4's blocksize
    names = [name for name in DORA_SETS[kind] if suite.available(name)]
    if len(names) < 2:
        pytest.skip(f"fewer than two {kind} DoRA providers available here: {names}")
    results = {name: _dora_run(suite.build(name, shape, DEVICE), shape, train=p == 0) for name in names}
    ref = results[names[-1]]  # PEFT's (or the last one available)
    for name in names[:-1]:
        for key, value in ref.items():
            # fp32: summation order only (tests/helpers.py FP32_RTOL); a wrong norm, scale or mask is off by far more
            err = (results[name][key].double() - value.double()).abs().max().item()
            assert err <= 2e-5 * value.abs().max().item(), f"{name} vs {names[-1]}, {key}: {err:.3e}"
