"""Memory layouts of every tensor argument reachable from the public API.

Each argument of ``fused_lora_linear`` (x, a dense weight, lora_A, lora_B, bias, the upstream gradient g) and each
buffer of an ``NF4Weight`` (plain: data, code, absmax; nested: data, code, qabsmax, absmax2, code2, offset) is
replaced, one at a time, by a view in one of four layouts holding the same values as a contiguous tensor:

* ``expanded``: stride 0 -- one row (one element of a 1-D tensor, one byte of the packed ``[k, 1]`` codes)
  broadcast over the first dimension; g is one value broadcast over both, as ``y.sum().backward()`` produces. The
  values are therefore made constant along those dimensions first, for the view and its contiguous twin alike;
* ``strided``: every other element of the last dimension of a buffer twice as long;
* ``transposed``: 2-D tensors column-major (the ``.t()`` of a contiguous transposed copy; for the ``[k, 1]``
  packed codes that is ``.t()`` of a ``[1, k]`` row, strides ``(1, k)``); 1-D ones a row of a transposed
  matrix (a column of a row-major ``[n, 3]`` buffer: stride 3, storage offset 1);
* ``offset``: a contiguous slice that starts 5 elements into a bigger buffer (misaligned for vector loads).
  The 0-dim ``offset`` of a nested weight has this layout only.

Every view lives in a buffer whose other elements are NaN (0xFF for uint8 buffers; for ``expanded``, the rows
after the broadcast one), so a kernel that misses a stride reads NaN or a wrong NF4 code, never a plausible value,
and never out of bounds.

What is compared: the output and every gradient (x, lora_A, lora_B, bias, and the weight's when it is dense), on
both backends, against the float64 reference of ``helpers.lora_reference`` with the fp32 tolerance
(``FP32_RTOL``); and, for the Triton kernels in the interpreter, bit for bit against the same kernels on the
contiguous twin. Exact equality is expected there: a layout only changes the addresses the kernels load from,
never which values meet in which order (tiles, loops, dot products and the dB / dbias reductions depend on
indices only, and the interpreter runs the atomic-add programs in a fixed order). It is not asserted elsewhere:
on a GPU the atomic dB / dbias accumulation order varies from run to run, and the torch path hands differently
laid-out operands to different BLAS kernels, which may sum in another order. The NF4 dequantization itself is
elementwise with one IEEE rounding per step on both paths, so it is compared bit for bit everywhere.

NF4 weights go through both Triton paths: dequantized inside the GEMMs (M <= NF4_FUSED_MAX_TOKENS) and into a
transient dense buffer first (forced here by lowering the limit); ``nf4_dequantize`` itself is swept through
``NF4Weight.dequantize``, its ``out`` tensor included.

The ``fused_lora_linear`` tests also check that the backend received the view itself (same storage address and
strides), so that the kernels, not some copy on the way, are what is tested. Run time in the interpreter: about
20-35 s of one core on a busy 2-core machine (201 tests).
"""

from __future__ import annotations

from typing import Dict, Optional

import pytest
import torch

from fused_lora import functional, fused_lora_linear, use_backend
from fused_lora.nf4 import NF4Weight, _quantize_blockwise_8bit, dynamic_map, quantize_nf4

from conftest import DEVICE_BACKENDS, INTERPRETING
from helpers import assert_close_fp32, lora_reference, make_inputs

# In the interpreter's tiles (16 rows, 32 columns, 32-deep reductions) every dimension has a full and a partial
# tile, so every pointer increment between loop iterations runs; N * K is odd: the packed codes end in a pad nibble.
# The rank loops step through A and B only beyond 64 (the largest rank tile): lora_A / lora_B get rank R_WIDE
# (two rank tiles, one partial), the other arguments the cheaper R. No dropout: its mask is a function of element
# indices only, never of the memory layout.
M, K, N, R, R_WIDE = 20, 41, 33, 8, 72
SCALING = 1.7
# NF4: 32-element blocks (43 absmax values) and, nested, 8 absmax per second-level block (6 absmax2 values), so
# every statistic has several entries (quantize_nf4 always nests by 256, which would leave a single absmax2).
NF4_BLOCKSIZE, NF4_NESTED_BLOCKSIZE = 32, 8

LAYOUTS = ("expanded", "strided", "transposed", "offset")
DENSE_ARGS = ("x", "weight", "lora_A", "lora_B", "bias", "grad")
NF4_ARGS = {"nf4": ("data", "code", "absmax"), "nf4-nested": ("data", "code", "qabsmax", "absmax2", "code2", "offset")}
# The GEMMs get a nested weight's packed codes and code table exactly as a plain weight's (its absmax decoded by
# fused_lora.nf4.NF4Operands when read): only its statistics are new arguments there. The dequantize kernel reads
# all of them.
GEMM_NF4_ARGS = {"nf4": NF4_ARGS["nf4"], "nf4-nested": ("qabsmax", "absmax2", "code2", "offset")}
LEAVES = ("x", "lora_A", "lora_B", "bias")  # + the weight when it is dense
NF4_OPERAND = {"data": "packed"}  # NF4Weight fields named otherwise in NF4Operands


def _cases(problems, nf4_args):
    cases = []
    for problem in problems:
        for arg in DENSE_ARGS if problem == "dense" else nf4_args[problem]:
            layouts = ("offset",) if arg == "offset" else LAYOUTS  # a 0-dim tensor has no other layout
            cases += [pytest.param(problem, arg, layout, id=f"{problem}-{arg}-{layout}") for layout in layouts]
    return cases


LINEAR_CASES = _cases(("dense", "nf4", "nf4-nested"), GEMM_NF4_ARGS)
GEMM_NF4_CASES = _cases(("nf4", "nf4-nested"), GEMM_NF4_ARGS)
NF4_CASES = _cases(("nf4", "nf4-nested"), NF4_ARGS)
TRITON_DEVICES = [device for device, backend in DEVICE_BACKENDS if backend == "triton"]


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """The problems here are tiny: one intra-op thread. With two, on a busy 2-core machine each small torch
    product waits about 0.2 s for the second thread to wake up -- most of this file's run time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------------
# layouts
# ----------------------------------------------------------------------------------------------------------------


def _poisoned(like: torch.Tensor, shape) -> torch.Tensor:
    """A buffer whose elements outside the view poison any result that reads them."""
    fill = 255 if like.dtype == torch.uint8 else float("nan")
    return torch.full(tuple(shape), fill, dtype=like.dtype, device=like.device)


def _first(v: torch.Tensor, arg: str) -> tuple:
    """The part of ``v`` an ``expanded`` view broadcasts: its first row (for g its first element, over both
    dimensions, as ``y.sum().backward()`` passes it)."""
    return (slice(0, 1),) * v.dim() if arg == "grad" else (slice(0, 1),)


def layout_values(v: torch.Tensor, arg: str, layout: str) -> torch.Tensor:
    """The contiguous values a view in ``layout`` holds: ``v`` itself, or for ``expanded`` ``v`` made constant
    along the broadcast dimensions."""
    return v[_first(v, arg)].expand(v.shape).contiguous() if layout == "expanded" else v


def relayout(v: torch.Tensor, arg: str, layout: str) -> torch.Tensor:
    """A view holding the values of the contiguous ``v`` (from :func:`layout_values`) in ``layout``."""
    if layout == "expanded":  # the broadcast row is the first of a poisoned buffer of v's size: a kernel that
        # ignores the stride 0 reads NaN (or a wrong byte), never a plausible value or out of bounds
        first = _first(v, arg)
        buf = _poisoned(v, v.shape)
        buf[first] = v[first]
        view = buf[first].expand(v.shape)
        assert torch.equal(view, v), "expanded values must be constant along the broadcast dimensions"
    elif layout == "strided":
        buf = _poisoned(v, (*v.shape[:-1], 2 * v.shape[-1]))
        buf[..., ::2] = v
        view = buf[..., ::2]
    elif layout == "transposed":
        if v.dim() == 2:  # (not v.t().contiguous(): a [1, k] transpose is already contiguous)
            view = torch.empty((v.shape[1], v.shape[0]), dtype=v.dtype, device=v.device).copy_(v.t()).t()
        else:
            buf = _poisoned(v, (v.shape[0], 3))
            buf[:, 1] = v
            view = buf.t()[1]
    elif layout == "offset":
        buf = _poisoned(v, (v.numel() + 5,))
        buf[5:] = v.reshape(-1)
        view = buf[5:].view(v.shape)
    else:
        raise ValueError(layout)
    assert torch.equal(view, v)
    assert (view.stride(), view.storage_offset()) != (v.stride(), 0), f"{layout} did not change the layout"
    return view


# ----------------------------------------------------------------------------------------------------------------
# problems
# ----------------------------------------------------------------------------------------------------------------


def nf4_buffers(weight: torch.Tensor, nested: bool) -> Dict[str, torch.Tensor]:
    """NF4Weight buffers of ``weight`` (contiguous); nested ones with NF4_NESTED_BLOCKSIZE (bitsandbytes'
    operations, only the second-level block size differs from quantize_nf4's)."""
    q = quantize_nf4(weight, blocksize=NF4_BLOCKSIZE, double_quant=False)
    if not nested:
        return dict(data=q.data, code=q.code, absmax=q.absmax)
    absmax = q.absmax.cpu()
    offset = absmax.mean()
    code2 = dynamic_map()
    qabsmax, absmax2 = _quantize_blockwise_8bit(absmax - offset, code2, NF4_NESTED_BLOCKSIZE)
    dev = weight.device
    return dict(data=q.data, code=q.code, qabsmax=qabsmax.to(dev), absmax2=absmax2.to(dev), code2=code2.to(dev),
                offset=offset.to(dev))


def nf4_weight(buffers: Dict[str, torch.Tensor]) -> NF4Weight:
    return NF4Weight(blocksize=NF4_BLOCKSIZE, shape=(N, K), dtype=torch.float32,
                     nested_blocksize=NF4_NESTED_BLOCKSIZE, **buffers)


def problem_values(problem: str, device, rank: int = R) -> Dict[str, torch.Tensor]:
    """Contiguous inputs: x, lora_A, lora_B, bias, grad and either ``weight`` (dense) or the NF4 buffers."""
    inp = make_inputs(M, K, N, rank, torch.float32, device, seed=5)
    if problem != "dense":
        inp.update(nf4_buffers(inp.pop("weight"), nested=problem == "nf4-nested"))
    return inp


def _weight(problem: str, t: Dict[str, torch.Tensor]):
    return t["weight"] if problem == "dense" else nf4_weight({k: t[k] for k in NF4_ARGS[problem]})


def run_linear(backend: str, problem: str, t: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Output and gradients of ``fused_lora_linear`` on the tensors of ``t`` in their own layouts (leaves are
    aliases of them: ``detach`` keeps the storage, offset and strides)."""
    names = LEAVES + (("weight",) if problem == "dense" else ())
    leaves = {name: t[name].detach().requires_grad_(True) for name in names}
    weight = leaves["weight"] if problem == "dense" else _weight(problem, t)
    with use_backend(backend):
        y = fused_lora_linear(leaves["x"], weight, leaves["lora_A"], leaves["lora_B"], SCALING, bias=leaves["bias"])
    y.backward(t["grad"])
    return {"y": y.detach(), **{name: leaf.grad for name, leaf in leaves.items()}}


def reference_linear(problem: str, t: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The float64 textbook computation on the same values (NF4: the weight's exact fp32 dequantization)."""
    names = LEAVES + (("weight",) if problem == "dense" else ())
    leaves = {name: t[name].double().requires_grad_(True) for name in names}
    weight = leaves["weight"] if problem == "dense" else _weight(problem, t).dequantize_torch(torch.float32)
    y = lora_reference(leaves["x"], weight, leaves["lora_A"], leaves["lora_B"], leaves["bias"], SCALING, None, 0.0)
    y.backward(t["grad"].double())
    return {"y": y.detach(), **{name: leaf.grad for name, leaf in leaves.items()}}


_CONTIGUOUS_RUNS: Dict[tuple, Dict[str, torch.Tensor]] = {}


def contiguous_run(backend: str, problem: str, t: Dict[str, torch.Tensor], key: Optional[tuple]):
    """``run_linear`` on contiguous ``t``; cached under ``key`` (the base values are shared by every layout but
    ``expanded``)."""
    if key is None:
        return run_linear(backend, problem, t)
    if key not in _CONTIGUOUS_RUNS:
        _CONTIGUOUS_RUNS[key] = run_linear(backend, problem, t)
    return _CONTIGUOUS_RUNS[key]


def _spy_backend(monkeypatch):
    """Record the arguments every backend call receives."""
    calls = []
    real = functional._run

    def spy(backend, name, *args):
        calls.append((name, args))
        return real(backend, name, *args)

    monkeypatch.setattr(functional, "_run", spy)
    return calls


def _assert_received(calls, problem: str, arg: str, view: torch.Tensor):
    """The backend got ``view`` itself (same address and strides), not a copy."""
    if arg == "grad":
        got = [args[0] for name, args in calls if name == "lora_backward"]
    elif problem == "dense":
        index = ("x", "weight", "lora_A", "lora_B", "bias").index(arg)
        got = [args[index] for name, args in calls if name == "lora_forward"]
    else:
        got = [getattr(args[1], NF4_OPERAND.get(arg, arg)) for name, args in calls if name == "lora_forward"]
    assert got, f"no backend call received {arg}"
    for t in got:
        assert (t.data_ptr(), t.stride()) == (view.data_ptr(), view.stride()), f"{arg} reached the backend copied"


def _rank(arg: str) -> int:
    return R_WIDE if arg in ("lora_A", "lora_B") else R


def _view_and_values(problem: str, arg: str, layout: str, device):
    values = problem_values(problem, device, _rank(arg))
    values[arg] = layout_values(values[arg], arg, layout)
    view = relayout(values[arg], arg, layout)
    return values, {**values, arg: view}, view


# ----------------------------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("problem,arg,layout", LINEAR_CASES)
def test_fused_lora_linear_argument_layouts(monkeypatch, device, backend, problem, arg, layout):
    """One argument in one layout: output and gradients right (float64 reference), and bit-identical to the
    contiguous run in the interpreter. NF4 weights here take the in-GEMM dequantization (M <= the fused limit)."""
    values, viewed, view = _view_and_values(problem, arg, layout, device)
    calls = _spy_backend(monkeypatch)
    out = run_linear(backend, problem, viewed)
    _assert_received(calls, problem, arg, view)
    ref = reference_linear(problem, values)
    assert set(out) == set(ref)
    for name in out:
        assert_close_fp32(out[name], ref[name], f"{arg} {layout}: {name}")
    if backend == "triton" and INTERPRETING and device == "cpu":
        key = None if layout == "expanded" else (device, backend, problem, _rank(arg))
        contiguous = contiguous_run(backend, problem, values, key)
        for name in out:
            assert torch.equal(out[name], contiguous[name]), f"{arg} {layout}: {name} differs from the contiguous run"


@pytest.mark.skipif(not TRITON_DEVICES, reason="needs the Triton kernels (a GPU or the interpreter)")
@pytest.mark.parametrize("problem,arg,layout", GEMM_NF4_CASES)
def test_nf4_dequantized_buffer_path_layouts(monkeypatch, problem, arg, layout):
    """The same with the NF4 weight dequantized into a transient dense buffer first (the path for more than
    NF4_FUSED_MAX_TOKENS rows, forced here for M rows); the weight's buffers reach the dequantize kernel."""
    from fused_lora.kernels import lora

    device = TRITON_DEVICES[0]
    monkeypatch.setattr(lora, "NF4_FUSED_MAX_TOKENS", M - 1)
    values, viewed, view = _view_and_values(problem, arg, layout, device)
    calls = _spy_backend(monkeypatch)
    out = run_linear("triton", problem, viewed)
    _assert_received(calls, problem, arg, view)
    ref = reference_linear(problem, values)
    for name in out:
        assert_close_fp32(out[name], ref[name], f"{arg} {layout}: {name}")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("problem,arg,layout", NF4_CASES + [
    pytest.param(problem, "out", layout, id=f"{problem}-out-{layout}")
    for problem in NF4_ARGS for layout in LAYOUTS if layout != "expanded"  # an output cannot overlap itself
])
def test_nf4_dequantize_layouts(device, backend, problem, arg, layout):
    """``NF4Weight.dequantize`` (the Triton backend runs ``nf4_dequantize``) with one buffer, or the ``out``
    tensor, in one layout: bit-identical to the torch dequantization of the contiguous buffers."""
    buffers = nf4_buffers(make_inputs(M, K, N, R, torch.float32, device, seed=5)["weight"],
                          nested=problem == "nf4-nested")
    expected_values = dict(buffers)
    out = None
    if arg == "out":
        out = relayout(torch.zeros(N, K, device=device), arg, layout)
    else:
        expected_values[arg] = layout_values(buffers[arg], arg, layout)
        buffers = {**expected_values, arg: relayout(expected_values[arg], arg, layout)}
    expected = nf4_weight(expected_values).dequantize_torch(torch.float32)
    with use_backend(backend):
        got = nf4_weight(buffers).dequantize(torch.float32, out=out)
    if out is not None:
        assert got.data_ptr() == out.data_ptr() and got.stride() == out.stride()
    assert torch.equal(got, expected), f"max error {(got - expected).abs().max().item():.3e}"
