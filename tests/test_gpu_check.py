"""`make gpu-check` (benchmarks/gpu_check.py) without a GPU: which tests it selects, its plan, the folder it writes
(with injected runners), its time budgets (with an injected clock), missing packages, the no-CUDA plan output, its
pytest plugin, the kernel phase in the Triton interpreter, and the QLoRA baseline provider."""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import gpu_check, providers, suite  # noqa: E402
from benchmarks.gpu_check_pytest import BUDGET_REASON, CSV_ENV, DEADLINE_ENV, ONE_CONFIG_ENV  # noqa: E402
from benchmarks.suite import Case, Measurement, Shape  # noqa: E402

# The intended selection: the test functions whose CUDA parametrizations `make gpu-check` runs.
EXPECTED = {
    "tests/test_compile.py::test_fullgraph_compile_matches_eager",
    "tests/test_dora.py::test_triton_matches_torch_path_and_reference",
    "tests/test_dropout.py::test_kept_values_scaled_and_dropped_values_zero",
    "tests/test_dropout.py::test_triton_mask_bits_equal_torch_mask",
    "tests/test_functional.py::test_fp32_matches_float64_reference",
    "tests/test_functional.py::test_half_precision_three_way",
    "tests/test_functional.py::test_bf16_kernels_every_variant",
    "tests/test_functional.py::test_3d_input_and_frozen_weight_gradient",
    "tests/test_functional.py::test_non_contiguous_inputs",
    "tests/test_functional.py::test_non_contiguous_grad_output",
    "tests/test_functional.py::test_backends_agree_with_dropout",
    "tests/test_functional.py::test_seed_from_default_generator",
    "tests/test_functional.py::test_saved_tensors",
    "tests/test_functional.py::test_empty_batch",
    "tests/test_functional.py::test_deterministic_mode_matches_atomic_mode",
    "tests/test_gpu_contracts.py::test_fp32_kernels_follow_allow_tf32",
    "tests/test_gpu_contracts.py::test_torch_mask_on_device_equals_cpu_hash",
    "tests/test_gpu_contracts.py::test_nf4_dequantize_follows_the_format_definition",
    "tests/test_gpu_contracts.py::test_nf4_quantize_on_device_gives_cpu_bytes",
    "tests/test_gpu_contracts.py::test_nf4_linear_without_bitsandbytes",
    "tests/test_layers.py::test_matches_peft_fp32",
    "tests/test_layers.py::test_matches_peft_bf16_three_way",
    "tests/test_nf4_format.py::test_triton_dequantize_matches_bitsandbytes",
    "tests/test_nf4_format.py::test_triton_dequantize_int64_indexing",
    "tests/test_nf4_format.py::test_cuda_quantize_matches_cpu_bytes",
    "tests/test_qlora.py::test_nf4_fp32_matches_float64_reference",
    "tests/test_qlora.py::test_nf4_half_precision_three_way",
}
# marked tests without a device parameter (kept whatever the device; they skip without CUDA)
DEVICE_FREE = {"tests/test_nf4_format.py::test_cuda_quantize_matches_cpu_bytes"}


def _collect(files, collect_cuda: bool):
    env = dict(os.environ, FUSED_LORA_TEST_COLLECT_CUDA="1" if collect_cuda else "0")
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu_check",
                           "-p", "no:cacheprovider", *files], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode in (0, 5), proc.stdout[-3000:] + proc.stderr[-3000:]  # 5: nothing selected
    return [line for line in proc.stdout.splitlines() if "::" in line]


def _params(node_id: str) -> str:
    return node_id.partition("[")[2].rstrip("]")


def test_marker_selects_the_intended_cuda_tests():
    """Collected as on a GPU machine (the CUDA parametrizations, FUSED_LORA_TEST_COLLECT_CUDA=1): -m gpu_check
    selects exactly the intended test functions, each only in CUDA parametrizations, and the plan lists the
    same functions (read from the sources)."""
    plan = gpu_check.make_plan()
    assert set(plan.marked) == EXPECTED
    ids = _collect(plan.test_files, collect_cuda=True)
    functions = {node.partition("[")[0] for node in ids}
    assert functions == EXPECTED
    for node in ids:
        if node.partition("[")[0] in DEVICE_FREE:
            continue
        assert re.search(r"(^|-)cuda(-|$)", _params(node)), node
        assert not re.search(r"(^|-)cpu(-|$)", _params(node)), node
    count = {f: sum(1 for node in ids if node.startswith(f + "[")) for f in EXPECTED}
    assert count["tests/test_functional.py::test_fp32_matches_float64_reference"] == 40  # 20 cases x 2 backends
    assert count["tests/test_functional.py::test_bf16_kernels_every_variant"] == 10  # cuda-triton only
    assert count["tests/test_gpu_contracts.py::test_fp32_kernels_follow_allow_tf32"] == 12
    assert count["tests/test_functional.py::test_deterministic_mode_matches_atomic_mode"] == 1


def test_marker_selects_no_cpu_parametrization_here():
    """On this CPU-only machine (no simulation) the marked tests' CPU parametrizations lose the mark."""
    ids = _collect(["tests/test_dropout.py", "tests/test_gpu_contracts.py"], collect_cuda=False)
    assert ids == []


def test_plan_shapes_and_budgets():
    plan = gpu_check.make_plan()
    bf16 = torch.bfloat16
    assert plan.phases == ("tests", "bench", "qlora", "kernels")
    bench = {(g.shape.tokens, g.shape.in_features, g.shape.out_features, g.shape.r, g.shape.p, g.shape.dtype):
             (g.providers, g.modes) for g in plan.bench}
    for N in (4096, 11008):
        dora = ("fused-dora", "peft-dora") if N == 4096 else ()  # DoRA next to LoRA: its goal compares the two
        for p in (0.0, 0.1):
            assert bench[(8192, 4096, N, 16, p, bf16)] == (("fused", "peft", "base") + dora,
                                                           ("forward", "backward", "full"))
    assert plan.bench[0].shape == Shape(8192, 4096, 4096, 16, 0.1, bf16)  # the headline first
    assert [g.shape.tokens for g in plan.qlora] == [16, 512, 8192]
    assert all(g.providers == ("fused-nf4", "nf4-dequant", "base") and g.shape.dtype == bf16 for g in plan.qlora)
    assert [(s.tokens, s.in_features, s.out_features) for s in plan.kernels] == [(8192, 4096, 4096),
                                                                                  (8192, 4096, 11008)]
    from fused_lora.kernels import lora, nf4

    assert set(gpu_check.KERNELS) == {launcher.name for launcher in (*lora.LAUNCHERS, *nf4.LAUNCHERS)}
    assert plan.total_s == pytest.approx(gpu_check.TOTAL_S)
    assert plan.hard_stop_s <= 8 * 60 - 20  # room for the set-up and the imports within 8 minutes
    assert all(provider in providers.PROVIDERS for g in plan.bench + plan.qlora for provider in g.providers)
    half = gpu_check.make_plan(["bench", "kernels"], 100)
    assert half.phases == ("bench", "kernels") and half.total_s == pytest.approx(100)
    assert half.budgets["bench"] / half.budgets["kernels"] == pytest.approx(110 / 45)
    assert len(gpu_check.FILES) <= 8


def test_no_cuda_prints_the_plan_and_exits_0(tmp_path):
    out = io.StringIO()
    assert gpu_check.main(["--out", str(tmp_path / "never")], cuda_available=False, stream=out) == 0
    lines = out.getvalue().splitlines()
    assert "no CUDA device" in lines[0]
    text = out.getvalue()
    for expected in ["phase tests", "phase bench", "phase qlora", "phase kernels", "8192x4096x4096 bfloat16",
                     "8192x4096x11008", "16x4096x4096", "_lora_dgrad_kernel vs torch.mm(g, W)", "-m gpu_check",
                     "-p no:cacheprovider", *gpu_check.FILES.values(), str(tmp_path / "never"), "(170 s)"]:
        assert expected in text, expected
    assert not (tmp_path / "never").exists()
    # the make target, as a CPU-only machine runs it (FUSED_LORA_PYTHON: no set-up)
    proc = subprocess.run(["make", "-s", "gpu-check", f"OUT={tmp_path / 'never'}"], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, FUSED_LORA_PYTHON=sys.executable), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no CUDA device" in proc.stdout.splitlines()[0]
    assert not (tmp_path / "never").exists()


# ----------------------------------------------------------------------------------------------------------------
# the run itself, with injected runners and clock


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


TIMES_MS = {"fused": 1.0, "peft": 2.0, "base": 0.9, "fused-nf4": 1.0, "nf4-dequant": 1.2, "fused-dora": 1.1,
            "peft-dora": 2.4}


def _fake_runners(clock, tests_rows=None, tests_advance=0.0, group_advance=1.0, kernel_advance=1.0, calls=None):
    calls = calls if calls is not None else {}

    def run_pytest(cmd, env, stop_new_after_s, kill_after_s, write_line):
        calls["pytest"] = (cmd, env, stop_new_after_s, kill_after_s)
        rows = tests_rows if tests_rows is not None else [
            ("tests/test_a.py::test_ok[cuda-triton]", "passed", ""),
            ("tests/test_a.py::test_bad[cuda-triton]", "failed", "E   AssertionError: y: max error 1e-1"),
            ("tests/test_a.py::test_late[cuda-triton]", "skipped", BUDGET_REASON),
        ]
        with open(env[CSV_ENV], "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["nodeid", "outcome", "duration_s", "message"])
            for nodeid, outcome, message in rows:
                writer.writerow([nodeid, outcome, "0.1", message])
        write_line("3 tests: 1 passed, 1 failed, 1 skipped")
        clock.now += tests_advance if tests_advance >= 0 else kill_after_s
        return 1 if any(r[1] == "failed" for r in rows) else 0

    def measure_group(group):
        calls.setdefault("groups", []).append(group)
        clock.now += group_advance
        return [Measurement(Case(p, mode, group.shape), (0.9 * TIMES_MS[p], TIMES_MS[p], 1.1 * TIMES_MS[p]), 1.0, 2.0)
                for p in group.providers for mode in group.modes]

    def kernel_report(shape):
        calls.setdefault("kernels", []).append(shape)
        clock.now += kernel_advance
        rows = []
        for name in gpu_check.KERNELS:
            slow = 1.3 if name == "_lora_dgrad_kernel" else 0.8
            for impl, ms in (("triton", slow), ("torch", 1.0)):
                rows.append(gpu_check.KernelRow(shape, name, impl, "what", "cfg", (ms, ms, ms), 1e12, 1e9))
        return gpu_check.KernelReport(rows, [f"parity {shape.label}: ok"], True)

    return gpu_check.Runners(run_pytest, measure_group, kernel_report), calls


def _run(tmp_path, runners, clock, argv=(), import_module=None):
    out = io.StringIO()
    kwargs = {} if import_module is None else {"import_module": import_module}
    rc = gpu_check.main(["--out", str(tmp_path), *argv], cuda_available=True, runners=runners,
                        device_name="Fake GPU (0 SMs)", clock=clock, watchdog=False, stream=out, **kwargs)
    log = (tmp_path / gpu_check.FILES["log"]).read_text()
    return rc, log, out.getvalue()


def test_writes_one_folder_with_the_documented_files(tmp_path):
    clock = FakeClock()
    runners, calls = _fake_runners(clock)
    (tmp_path / "other-run.csv").write_text("kept")
    (tmp_path / "tests.csv").write_text("stale")
    rc, log, console = _run(tmp_path, runners, clock)
    assert rc == 1  # a test failed
    names = set(os.listdir(tmp_path)) - {"other-run.csv"}
    expected = set(gpu_check.FILES.values())
    if importlib.util.find_spec("matplotlib") is None:  # e.g. the oldest-Triton environment: no plot, noted
        expected.discard(gpu_check.FILES["plot"])
        assert "no plot: matplotlib does not import" in log
    assert names == expected and len(names) <= 8
    assert (tmp_path / "other-run.csv").read_text() == "kept"
    cmd, env, stop_new, kill_after = calls["pytest"]
    assert cmd[1:3] == ["-m", "pytest"] and "-m" in cmd and cmd[cmd.index("-m", 3) + 1] == "gpu_check"
    assert "no:cacheprovider" in cmd and "benchmarks.gpu_check_pytest" in cmd
    assert env[ONE_CONFIG_ENV] == "1" and env[CSV_ENV] == str(tmp_path / "tests.csv")
    assert kill_after == pytest.approx(170) and stop_new == pytest.approx(170 - 0.15 * 170)
    assert [g.shape for g in calls["groups"]] == [g.shape for g in gpu_check.bench_groups() + gpu_check.qlora_groups()]
    with open(tmp_path / "benchmarks.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["device"] for r in rows} == {"Fake GPU (0 SMs)"}
    # bench: 2 groups of 5 providers (DoRA at 4096 x 4096) and 2 of 3; qlora: 3 of 3; 3 modes each
    assert len([r for r in rows if r["metric"] == "time_ms"]) == (2 * 5 + 2 * 3 + 3 * 3) * 3
    with open(tmp_path / "kernels.csv") as f:
        krows = list(csv.DictReader(f))
    assert len(krows) == 2 * 2 * len(gpu_check.KERNELS)
    assert float(next(r for r in krows if r["kernel"] == "_lora_dgrad_kernel" and r["impl"] == "triton")
                 ["ratio_vs_torch"]) == pytest.approx(1.3)
    summary = log[log.index("SUMMARY"):]
    assert "tests: 1 failed, 1 passed, 1 skipped (pytest exit status 1; 1 skipped for the time budget)" in summary
    assert "FAILED tests/test_a.py::test_bad[cuda-triton]: E   AssertionError" in summary
    assert "_lora_dgrad_kernel at 8192x4096x4096: 1.30x" in summary
    assert "[met] 8192x4096x4096 r=16 bf16 p=0.1 forward+backward: fused >= 1.5x faster than peft: 2.00x" in summary
    assert "[NOT MET] 8192x4096x4096 r=16 bf16 p=0 forward: fused within 1.08x of base: 1.111x" in summary
    assert "[NOT MET] fused-nf4 at 16 tokens" in summary and "[met] fused-nf4 at 8192 tokens" in summary
    assert "[met] 8192x4096x4096 r=16 bf16 p=0 forward+backward: fused-dora within 1.15x of fused (LoRA): 1.100x of " \
           "fused" in summary
    assert "headline parity, Triton vs torch path at the autotuned configurations: ok" in summary
    assert "  | 3 tests: 1 passed" in log and "  | 3 tests" not in console
    written = [name for name in gpu_check.FILES.values() if name in expected]
    assert console.rstrip().endswith("files: " + ", ".join(written))


def test_time_budgets_skip_what_does_not_fit(tmp_path):
    """Each benchmark group takes 60 s, each kernel shape 60 s, the tests their whole budget (170 s): the bench
    phase gets 110 s (two groups), qlora 50 s (one), kernels 35 s (one); the rest is skipped with notes."""
    clock = FakeClock()
    runners, calls = _fake_runners(clock, tests_advance=-1, group_advance=60.0, kernel_advance=60.0)
    rc, log, _ = _run(tmp_path, runners, clock)
    assert len(calls["groups"]) == 3 and len(calls["kernels"]) == 1
    assert "bench: time budget spent; skipped: 8192x4096x11008 bfloat16 r=16 p=0.1; 8192x4096x11008 bfloat16 " \
           "r=16 p=0" in log
    assert "qlora: time budget spent; skipped: 512x4096x4096 bfloat16 r=16 p=0.1; 8192x4096x4096" in log
    assert "kernels: time budget spent; skipped: 8192x4096x11008 bfloat16" in log
    assert "== phase bench: up to 110 s" in log and "== phase qlora: up to 50 s" in log
    assert "== phase kernels: up to 35 s" in log
    assert "[not measured] fused-nf4 at 512 tokens" in log


def test_a_phase_without_time_left_is_skipped(tmp_path):
    clock = FakeClock()
    runners, calls = _fake_runners(clock, tests_advance=395.0, tests_rows=[("t::a[cuda]", "passed", "")])
    rc, log, _ = _run(tmp_path, runners, clock)
    assert rc == 0 and "groups" not in calls and "kernels" not in calls
    for phase in ("bench", "qlora", "kernels"):
        assert f"phase {phase} skipped" in log
    assert "SUMMARY" in log and "[not measured]" in log


def test_phases_and_budget_options(tmp_path):
    clock = FakeClock()
    runners, calls = _fake_runners(clock)
    rc, log, _ = _run(tmp_path, runners, clock, ["--phases", "kernels", "--budget", "60"])
    assert rc == 0 and "pytest" not in calls and "groups" not in calls and len(calls["kernels"]) == 2
    assert "tests: not run" in log and not (tmp_path / "tests.csv").exists()


def test_missing_packages_are_reported_and_their_parts_skipped(tmp_path):
    """peft, matplotlib and pytest-xdist absent (an injected import failure): the peft provider and the plot are
    skipped with notes, the tests run in one process, the PEFT goal is not measured; nothing crashes."""
    import importlib

    def import_module(name):
        if name.split(".")[0] in ("peft", "matplotlib", "xdist"):
            raise ModuleNotFoundError(f"No module named '{name}'")
        return importlib.import_module(name)

    clock = FakeClock()
    runners, calls = _fake_runners(clock, tests_rows=[("t::a[cuda]", "passed", "")])
    rc, log, _ = _run(tmp_path, runners, clock, import_module=import_module)
    assert rc == 0
    assert all("peft" not in g.providers for g in calls["groups"])
    assert "bench: provider peft skipped: peft does not import (ModuleNotFoundError" in log
    assert "bench: provider peft-dora skipped: peft does not import" in log
    assert "no plot: matplotlib does not import" in log
    assert "pytest-xdist missing: the tests run in one process" in log
    assert "-n" not in calls["pytest"][0]
    assert "[not measured] 8192x4096x4096 r=16 bf16 p=0.1 forward+backward: fused >= 1.5x faster than peft: " \
           "no measurement of peft" in log
    assert not (tmp_path / gpu_check.FILES["plot"]).exists()


# ----------------------------------------------------------------------------------------------------------------
# the pytest plugin, the import fallback, the kernel phase, the QLoRA baseline


def _run_plugin(tmp_path, deadline):
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_ok():\n    assert True\n"
        "def test_bad():\n    assert 1 == 2, 'one is not two'\n"
        "def test_skip():\n    pytest.skip('not here')\n")
    path = tmp_path / "out.csv"
    env = dict(os.environ, PYTHONPATH=ROOT, **{CSV_ENV: str(path), DEADLINE_ENV: str(deadline)})
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                           "benchmarks.gpu_check_pytest", "test_sample.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    with open(path, newline="") as f:
        return proc, {row["nodeid"]: row for row in csv.DictReader(f)}


def test_pytest_plugin_writes_rows_and_skips_after_the_deadline(tmp_path):
    import time

    proc, rows = _run_plugin(tmp_path, time.time() + 3600)
    assert proc.returncode == 1
    assert {k: v["outcome"] for k, v in rows.items()} == {"test_sample.py::test_ok": "passed",
                                                         "test_sample.py::test_bad": "failed",
                                                         "test_sample.py::test_skip": "skipped"}
    assert "one is not two" in rows["test_sample.py::test_bad"]["message"]
    assert rows["test_sample.py::test_skip"]["message"] == "not here"
    assert rows["test_sample.py::test_ok"]["message"] == ""
    proc, rows = _run_plugin(tmp_path, time.time() - 1)
    assert proc.returncode == 0
    assert {v["outcome"] for v in rows.values()} == {"skipped"}
    assert {v["message"] for v in rows.values()} == {BUDGET_REASON}


def test_pytest_runner_kills_the_process_group_at_its_limit():
    import time

    lines = []
    start = time.monotonic()
    rc = gpu_check.run_pytest_subprocess(
        [sys.executable, "-c", "import subprocess, sys, time; print('started', flush=True); "
         "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"],
        dict(os.environ), 0.5, 2.0, lines.append)
    assert rc < 0 and time.monotonic() - start < 8  # the grandchild too: else its open pipe holds the reader 10 s
    assert lines == ["started"]


def test_kernels_importable_from_a_bare_checkout(tmp_path, monkeypatch):
    """What ensure_kernels_importable does for fused_lora when `pip install -e .` did not run: a subpackage kept
    beside the package (kernels/ next to fused_lora/) becomes importable as package.kernels."""
    import importlib

    from benchmarks.gpu_check_pytest import ensure_subpackage

    (tmp_path / "fakepkg").mkdir()
    (tmp_path / "fakepkg" / "__init__.py").write_text("")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    package = importlib.import_module("fakepkg")
    try:
        assert ensure_subpackage(package, "kernels", str(tmp_path))
        assert importlib.import_module("fakepkg.kernels").VALUE == 42
        assert not ensure_subpackage(package, "kernels", str(tmp_path))  # already importable: nothing to do
    finally:
        for name in ("fakepkg.kernels", "fakepkg"):
            sys.modules.pop(name, None)


def test_kernel_phase_records_and_replays_each_kernel_in_the_interpreter():
    """The kernel phase's own code on CPU tensors (Triton interpreter, a CPU timer): every kernel is recorded from
    one forward + backward and replayed alone, its torch equivalent timed, FLOPs and bytes accounted, and the
    Triton path agrees with the torch path."""
    import time

    calls = []

    def timer(fn):
        calls.append(fn)
        start = time.perf_counter()
        fn()
        ms = (time.perf_counter() - start) * 1e3
        return ms, ms, ms

    M, K, N, r = 40, 48, 56, 8
    rep = gpu_check.kernel_report(Shape(M, K, N, r, 0.1, torch.float32), torch.device("cpu"), timer)
    assert rep.parity_ok, rep.notes
    assert [row.kernel for row in rep.rows if row.impl == "triton"] == list(gpu_check.KERNELS)
    assert len(rep.rows) == 2 * len(gpu_check.KERNELS) == len(calls)
    pairs = dict((a.kernel, (a, b)) for a, b in gpu_check.kernel_pairs(rep.rows))
    fwd, fwd_torch = pairs["_lora_linear_fwd_kernel"]
    assert fwd.flops == 2 * M * N * K + 2 * M * N * r and fwd_torch.flops == 2 * M * N * K
    assert fwd.bytes == 4 * (M * K + N * K + M * r + N * r + N + M * N)  # x, W, xa, B, bias, y; aliases once
    assert "BLOCK_M" in fwd.config
    down, _ = pairs["_lora_down_kernel"]
    assert down.bytes == 4 * (M * K + r * K + M * r)
    assert "ratio" in gpu_check.kernel_table(rep.rows)


def test_nf4_dequantize_baseline_provider():
    """nf4-dequant: the same NF4 bytes as fused-nf4, dequantized by the torch path, then a dense matmul and the
    eager LoRA branch; outputs and dx against a float64 computation on the dequantized weight."""
    K, N, r = 64, 48, 4
    layer = providers.build_nf4_dequantize(K, N, r, 0.0, torch.float32, torch.device("cpu"))
    fused = providers.build_fused_nf4(K, N, r, 0.0, torch.float32, torch.device("cpu"))
    assert torch.equal(layer.nf4_weight.data, fused.nf4_weight.data)
    w = layer.nf4_weight.dequantize_torch(torch.float64)
    x = torch.randn(5, K, dtype=torch.float64)
    ref = x @ w.t() + layer.bias.double() + (x @ layer.lora_A.double().t() @ layer.lora_B.double().t()) * layer.scaling
    xi = x.float().requires_grad_(True)
    y = layer(xi)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    dx = torch.ones(5, N, dtype=torch.float64) @ (w + layer.scaling * layer.lora_B.double() @ layer.lora_A.double())
    torch.testing.assert_close(xi.grad.double(), dx, rtol=1e-5, atol=1e-5)
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    measurements = suite.measure_group(Shape(8, K, N, r, 0.1, torch.float32),
                                       {"fused-nf4": ("full",), "nf4-dequant": ("full",)}, torch.device("cpu"),
                                       budget_s=0.01)
    assert {m.case.provider for m in measurements} == {"fused-nf4", "nf4-dequant"}


def test_fused_nf4_provider_without_bitsandbytes(monkeypatch):
    """Where bitsandbytes is absent, fused-nf4 quantizes with fused_lora's own quantize_nf4: the same bytes."""
    pytest.importorskip("bitsandbytes")
    with_bnb = providers.build_fused_nf4(64, 48, 4, 0.0, torch.float32, torch.device("cpu"))
    monkeypatch.setattr(providers, "_bnb_available", lambda: False)
    without = providers.build_fused_nf4(64, 48, 4, 0.0, torch.float32, torch.device("cpu"))
    assert torch.equal(with_bnb.nf4_weight.data, without.nf4_weight.data)
    assert torch.equal(with_bnb.nf4_weight.absmax_fp32(), without.nf4_weight.absmax_fp32())
