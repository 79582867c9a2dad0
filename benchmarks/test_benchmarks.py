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
