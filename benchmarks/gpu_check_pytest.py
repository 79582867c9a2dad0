"""pytest plugin of ``make gpu-check`` (``python -m pytest -p benchmarks.gpu_check_pytest ...``), driven by
environment variables that ``benchmarks/gpu_check.py`` sets for its test phase:

``GPU_CHECK_TESTS_CSV``       one row per test, written as each test finishes (``nodeid, outcome, duration_s,
                              message``), so a run stopped at its time limit still leaves what it did;
``GPU_CHECK_TESTS_DEADLINE``  a wall-clock time (``time.time()``) after which tests that have not started are skipped
                              with the reason :data:`BUDGET_REASON`, instead of overrunning the phase's budget;
``GPU_CHECK_ONE_CONFIG=1``    every Triton launcher keeps only the first shipped configuration of each family: the
                              tests compile each kernel variant once instead of autotuning over every
                              configuration (the benchmark phases autotune as usual; every configuration is
                              checked in the interpreter by ``make test``).

It also makes ``fused_lora.kernels`` importable from a checkout that was not installed (the package maps
``kernels/`` to ``fused_lora.kernels``; see :func:`ensure_kernels_importable`), before the tests' conftest imports it.
Works with pytest-xdist: workers skip and patch, the controller writes the CSV.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import sys
import time

try:
    import pytest

    hookimpl = pytest.hookimpl
except ImportError:  # benchmarks/gpu_check.py imports this module for its constants: it must not need pytest
    pytest = None

    def hookimpl(**_):
        return lambda fn: fn

CSV_ENV = "GPU_CHECK_TESTS_CSV"
DEADLINE_ENV = "GPU_CHECK_TESTS_DEADLINE"
ONE_CONFIG_ENV = "GPU_CHECK_ONE_CONFIG"
CSV_FIELDS = ["nodeid", "outcome", "duration_s", "message"]
BUDGET_REASON = "gpu-check: the time budget of the test phase is spent"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_subpackage(package, name: str, directory: str) -> bool:
    """Make ``<package>.<name>`` importable from ``directory/<name>`` when it is not importable otherwise (the
    ``package-dir`` mapping of an installed fused-lora, missing in a bare checkout): ``directory`` is appended to
    the package's search path. Returns True when it had to."""
    if importlib.util.find_spec(f"{package.__name__}.{name}") is not None:
        return False
    if not os.path.isdir(os.path.join(directory, name)):
        return False
    package.__path__.append(directory)
    return importlib.util.find_spec(f"{package.__name__}.{name}") is not None


def ensure_kernels_importable() -> bool:
    """``fused_lora.kernels`` from this checkout's ``kernels/`` when fused-lora is not installed (e.g. the set-up's
    ``pip install -e .`` failed on an offline GPU image). Returns True when the fix was needed."""
    try:
        import fused_lora
    except ImportError:
        return False
    if os.path.abspath(os.path.dirname(fused_lora.__file__)) != os.path.join(ROOT, "fused_lora"):
        return False  # another installation of fused_lora: leave it alone
    return ensure_subpackage(fused_lora, "kernels", ROOT)


if os.environ.get(CSV_ENV) or os.environ.get(DEADLINE_ENV):
    ensure_kernels_importable()  # before conftest.py imports fused_lora.kernels


_CSV = {}  # "state": (file, csv writer) of the controller process


def _first_config_only() -> None:
    from fused_lora.kernels import lora, nf4

    for launcher in (*lora.LAUNCHERS, *nf4.LAUNCHERS):
        launcher.configs = {family: configs[:1] for family, configs in launcher.configs.items()}


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")  # a pytest-xdist worker


def pytest_configure(config):
    if os.environ.get(ONE_CONFIG_ENV) == "1":
        _first_config_only()
    path = os.environ.get(CSV_ENV)
    if path and not _is_worker(config):
        handle = open(path, "w", newline="")
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        handle.flush()
        _CSV["state"] = (handle, writer)


def pytest_unconfigure(config):
    state = _CSV.pop("state", None)
    if state is not None:
        state[0].close()


@hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    deadline = os.environ.get(DEADLINE_ENV)
    if deadline and time.time() > float(deadline):
        pytest.skip(BUDGET_REASON)


def _message(report) -> str:
    if report.passed:
        return ""
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        return reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason
    text = getattr(report, "longreprtext", "") or ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E ")]
    message = (errors[0] if errors else (lines[-1] if lines else ""))
    return message[:300]


def pytest_runtest_logreport(report):
    state = _CSV.get("state")
    if state is None:
        return
    if report.when == "call":
        outcome = report.outcome
    elif report.when == "setup" and not report.passed:
        outcome = "skipped" if report.skipped else "error"
    elif report.when == "teardown" and report.failed:
        outcome = "error"
    else:
        return
    handle, writer = state
    writer.writerow(dict(nodeid=report.nodeid, outcome=outcome, duration_s=f"{report.duration:.3f}",
                         message=_message(report)))
    handle.flush()


if __name__ == "__main__":  # pragma: no cover
    sys.exit("a pytest plugin: python -m pytest -p benchmarks.gpu_check_pytest ...")
