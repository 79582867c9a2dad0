"""The "auto" backend on CUDA picks, per pass and problem, the faster of the Triton kernels and the torch path. The
selection logic runs here on CPU with injected timings (the kernels in the Triton interpreter)."""

from __future__ import annotations

import pytest
import torch

import fused_lora
from fused_lora import _autoselect, functional, fused_lora_linear, torch_ops
from fused_lora.dropout import Dropout

from conftest import INTERPRETING
from helpers import assert_close_fp32, lora_reference, make_inputs, outputs_and_grads


def test_selector_picks_the_fastest_once_per_key():
    timed = []

    def timer(key, candidate, fn):
        timed.append((key, candidate))
        return fn()

    sel = _autoselect.AutoSelector(timer)
    candidates = {"triton": lambda: 2.0, "torch": lambda: 1.0}
    assert sel.choose(("k",), candidates) == "torch"
    assert sel.choose(("k",), candidates) == "torch"
    assert timed == [(("k",), "triton"), (("k",), "torch")]  # timed once
    assert sel.choose(("tie",), {"triton": lambda: 1.0, "torch": lambda: 1.0}) == "triton"
    first, tie = sel.choices()
    assert first.key == ("k",) and first.winner == "torch" and first.times_ms == {"triton": 2.0, "torch": 1.0}
    assert tie.winner == "triton"
    sel.clear()
    assert sel.choices() == []


def test_problem_keys_separate_passes_shapes_dtypes_and_variants():
    inp = make_inputs(37, 40, 24, 8, torch.float32, "cpu")
    fwd = (inp["x"], inp["weight"], inp["lora_A"], inp["lora_B"], inp["bias"], 1.0, None)
    key = _autoselect.problem_key("lora_forward", fwd)
    assert key == _autoselect.problem_key("lora_forward", (inp["x"][:33],) + fwd[1:])  # same power-of-two bucket
    assert key != _autoselect.problem_key("lora_forward", (inp["x"][:31],) + fwd[1:])
    assert key != _autoselect.problem_key("lora_forward", fwd[:4] + (None,) + fwd[5:])  # no bias
    assert key != _autoselect.problem_key("lora_forward", fwd[:6] + (Dropout(0.1, 3),))
    assert key != _autoselect.problem_key("lora_forward", (inp["x"].t().contiguous().t(),) + fwd[1:])
    half = tuple(t.half() if isinstance(t, torch.Tensor) else t for t in fwd)
    assert key != _autoselect.problem_key("lora_forward", half)
    g, xa = inp["grad"], torch.zeros(37, 8)
    bwd = (g, inp["x"], inp["weight"], inp["lora_A"], inp["lora_B"], xa, 1.0, None, (True, False, True, True, True))
    assert _autoselect.problem_key("lora_backward", bwd) != key
    assert _autoselect.problem_key("lora_backward", bwd) != _autoselect.problem_key(
        "lora_backward", bwd[:8] + ((False, False, True, True, True),))


@pytest.mark.skipif(not INTERPRETING, reason="runs the kernels in the Triton interpreter")
@pytest.mark.parametrize("fwd_winner,bwd_winner", [("torch", "triton"), ("triton", "torch")])
def test_each_pass_runs_its_winner_with_the_same_numbers(monkeypatch, fwd_winner, bwd_winner):
    """Forward and backward may take different paths (they exchange the same saved tensors): outputs and every
    gradient match the float64 reference with the same dropout mask; each pass is timed once, then its winner
    alone runs."""
    winners = {"lora_forward": fwd_winner, "lora_backward": bwd_winner}
    timed = []

    def timer(key, candidate, fn):
        fn()  # the candidate must work
        timed.append((key.pass_name, candidate))
        return 1.0 if candidate == winners[key.pass_name] else 3.0

    monkeypatch.setattr(_autoselect, "SELECTOR", _autoselect.AutoSelector(timer))
    monkeypatch.setattr(functional, "resolve_backend", lambda device: "fastest")
    ran = []
    for impl, label in ((torch_ops, "torch"), (fused_lora.kernels, "triton")):
        for name in ("lora_forward", "lora_backward"):
            real = getattr(impl, name)
            monkeypatch.setattr(impl, name, lambda *a, real=real, label=label, name=name:
                                ran.append((name, label)) or real(*a))

    inp = make_inputs(37, 41, 33, 8, torch.float32, "cpu")
    grad = inp.pop("grad")

    def fn(x, weight, lora_A, lora_B, bias):
        return fused_lora_linear(x, weight, lora_A, lora_B, 1.5, bias=bias, dropout_p=0.25, seed=9)

    outputs_and_grads(fn, inp, grad)
    assert sorted(timed) == sorted((p, c) for p in winners for c in ("triton", "torch"))
    ran.clear()
    out = outputs_and_grads(fn, inp, grad)
    assert len(timed) == 4 and ran == [("lora_forward", fwd_winner), ("lora_backward", bwd_winner)]
    keep = Dropout(0.25, 9).keep_mask(37, 41, torch.device("cpu"))
    ref = outputs_and_grads(lambda **t: lora_reference(**t, scaling=1.5, keep=keep, p=0.25),
                            {k: v.double() for k, v in inp.items()}, grad.double())
    assert set(out) == set(ref)
    for name in out:
        assert_close_fp32(out[name], ref[name], name)
    assert {c.key.pass_name: c.winner for c in fused_lora.auto_choices()} == winners


def test_auto_on_cpu_and_forced_backends_do_not_time(monkeypatch):
    """On CPU "auto" is the torch path, and set_backend("triton" / "torch") never times anything."""
    calls = []
    monkeypatch.setattr(_autoselect, "SELECTOR", _autoselect.AutoSelector(lambda *a: calls.append(a) or 1.0))
    inp = make_inputs(5, 8, 6, 2, torch.float32, "cpu")
    for backend in ["auto", "torch"] + (["triton"] if INTERPRETING else []):
        with fused_lora.use_backend(backend):
            fused_lora_linear(inp["x"], inp["weight"], inp["lora_A"], inp["lora_B"], 1.0)
    assert calls == [] and fused_lora.auto_choices() == []


def test_float64_under_auto_takes_the_torch_path(monkeypatch):
    monkeypatch.setattr(functional, "resolve_backend", lambda device: "fastest")
    monkeypatch.setattr(_autoselect, "SELECTOR",
                        _autoselect.AutoSelector(lambda *a: pytest.fail("float64 was timed")))
    inp = make_inputs(5, 8, 6, 2, torch.float64, "cpu")
    y = fused_lora_linear(inp["x"], inp["weight"], inp["lora_A"], inp["lora_B"], 1.0)
    assert y.dtype == torch.float64


def test_benchmark_column_says_which_path_auto_ran(monkeypatch, tmp_path):
    """The benchmark suite's "auto_path" column: per pass, the winner recorded for the measured shape (CUDA), or
    "torch" on the CPU; an older results CSV gains the column (empty for its rows) instead of being misaligned."""
    import csv

    from benchmarks import report, suite

    sel = _autoselect.AutoSelector(lambda key, candidate, fn: {"triton": 1.0, "torch": 2.0}[candidate]
                                   if key.pass_name == "lora_forward" else {"triton": 2.0, "torch": 1.0}[candidate])
    monkeypatch.setattr(_autoselect, "SELECTOR", sel)
    shape = suite.Shape(8192, 4096, 4096, 16, 0.1, torch.bfloat16)
    cuda = torch.device("cuda")
    assert suite.auto_path_label(shape, cuda) == ""
    for name, m in (("lora_forward", 8192), ("lora_backward", 5000), ("lora_forward", 100)):  # 5000 -> 8192 bucket
        key = _autoselect.ProblemKey(name, "cuda:0", _autoselect._pow2(m), 4096, 4096, 16, "torch.bfloat16",
                                     "torch.bfloat16", False, False, True, True, False, ())
        sel.choose(key, {"triton": None, "torch": None})
    assert suite.auto_path_label(shape, cuda) == "forward=triton backward=torch"
    assert suite.auto_path_label(shape, torch.device("cpu")) == "torch"

    path = tmp_path / "results.csv"
    old_fields = [f for f in report.CSV_FIELDS if f != "auto_path"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_fields)
        writer.writeheader()
        writer.writerow({k: "old" for k in old_fields})
    report.append_csv(str(path), [{k: "new" for k in report.CSV_FIELDS}])
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["auto_path"] for r in rows] == ["", "new"] and rows[0]["provider"] == "old"


def test_a_candidate_out_of_memory_while_timed_loses():
    def timer(key, candidate, fn):
        if candidate == "triton":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return 5.0

    sel = _autoselect.AutoSelector(timer)
    assert sel.choose(("k",), {"triton": None, "torch": None}) == "torch"
    both = _autoselect.AutoSelector(lambda key, candidate, fn: (_ for _ in ()).throw(
        torch.cuda.OutOfMemoryError("injected")))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        both.choose(("k",), {"triton": None, "torch": None})


def test_function_accepts_plain_backend_names_and_refuses_others():
    """FusedLoraFunction.apply takes a resolved backend: "torch" alone uses the policy in force."""
    inp = make_inputs(4, 6, 5, 2, torch.float32, "cpu")
    y = functional.FusedLoraFunction.apply(inp["x"], inp["lora_A"], inp["lora_B"], None, 1.0, 0.0, None, "torch",
                                           "dense", [], inp["weight"])
    assert_close_fp32(y, lora_reference(inp["x"], inp["weight"], inp["lora_A"], inp["lora_B"], None, 1.0, None, 0.0))
    with pytest.raises(ValueError, match="backend='auto': expected 'triton', 'fastest' or 'torch"):
        functional.FusedLoraFunction.apply(inp["x"], inp["lora_A"], inp["lora_B"], None, 1.0, 0.0, None, "auto",
                                           "dense", [], inp["weight"])
