"""bf16 arithmetic of Triton kernels against PyTorch's bf16, bit for bit: in the interpreter, this tests the
test-only extension (tests/triton_bf16.py, installed by conftest.py) on which the bf16 kernel parity tests rely;
on CUDA (compiled kernels, no extension) the same tests check that the GPU computes what the extension models.

Every comparison is bit-exact (NaN: same positions, any payload). The stock interpreter fails these tests (bit
patterns multiplied / added as integers, truncating conversions) except those of what it already did right (abs;
bf16 -> fp16; on Triton 3.6, max / min reductions, which promote to fp32): check by hand with
``pytest -p triton_bf16_stock tests/test_triton_bf16_interpreter.py``, ``triton_bf16_stock`` being a plugin module
on PYTHONPATH whose ``pytest_configure`` calls ``triton_bf16.uninstall()``.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from fused_lora._backend import triton_available

from conftest import HAS_CUDA, INTERPRETING

if not triton_available():
    pytest.skip("triton is not installed", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.language.semantic import TritonSemantic  # noqa: E402

DEVICE = "cpu" if INTERPRETING else ("cuda" if HAS_CUDA else None)
pytestmark = [
    pytest.mark.skipif(DEVICE is None, reason="Triton kernels can run neither in the interpreter nor on CUDA"),
    # the operands include Inf, NaN and zeros on purpose; the interpreter's fp32 ops (numpy) warn about them
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
]

BF16 = torch.bfloat16


def _bits(t: torch.Tensor) -> torch.Tensor:
    view = {2: torch.int16, 4: torch.int32, 1: torch.int8, 8: torch.int64}[t.element_size()]
    return t.cpu().contiguous().view(view) if t.is_floating_point() else t.cpu()


def assert_same_bits(got: torch.Tensor, ref: torch.Tensor, what: str, inputs: torch.Tensor = None):
    """Identical bit patterns, except that a NaN may be any NaN (the same elements must be NaN)."""
    assert got.dtype == ref.dtype and got.shape == ref.shape, what
    got, ref = got.cpu(), ref.cpu()
    if got.is_floating_point():
        assert torch.equal(got.isnan(), ref.isnan()), f"{what}: NaN positions differ"
        keep = ~ref.isnan()
        got, ref = got[keep], ref[keep]
        inputs = None if inputs is None else inputs.reshape(-1)[keep.reshape(-1)]
    bad = (_bits(got) != _bits(ref)).reshape(-1).nonzero().reshape(-1)
    if bad.numel():
        shown = [f"{'' if inputs is None else f'{inputs[i].item()!r} -> '}{got.reshape(-1)[i].item()!r} "
                 f"(want {ref.reshape(-1)[i].item()!r})" for i in bad[:5].tolist()]
        pytest.fail(f"{what}: {bad.numel()} of {ref.numel()} elements differ, e.g. {'; '.join(shown)}")


def _from_bits(bits, dtype) -> torch.Tensor:
    """A tensor of ``dtype`` with the given bit patterns (python ints or an int64 tensor)."""
    width = {torch.float32: torch.int32, BF16: torch.int16, torch.float16: torch.int16}[dtype]
    bits, n = torch.as_tensor(bits, dtype=torch.int64), torch.finfo(dtype).bits
    return torch.where(bits >= 2 ** (n - 1), bits - 2**n, bits).to(width).view(dtype)


def _all_16_bit_patterns(dtype) -> torch.Tensor:
    return _from_bits(torch.arange(2**16), dtype)


# ----------------------------------------------------------------------------------------------------------------
# conversions
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _convert_kernel(x_ptr, y_ptr, n, RTZ: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    if RTZ:
        y = x.to(y_ptr.dtype.element_ty, fp_downcast_rounding="rtz")
    else:
        y = x.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs, y, mask=mask)


def _convert(x: torch.Tensor, dtype, rtz=False) -> torch.Tensor:
    x = x.to(DEVICE)
    y = torch.empty(x.shape, dtype=dtype, device=DEVICE)
    block = 4096
    _convert_kernel[(triton.cdiv(x.numel(), block),)](x, y, x.numel(), RTZ=rtz, BLOCK=block)
    return y


def _fp32_to_bf16_cases() -> torch.Tensor:
    """fp32 values whose bf16 rounding is easy to get wrong, then random ones."""
    gen = torch.Generator().manual_seed(1)
    finite_bf16 = torch.randint(0, 0x7F80, (4096,), generator=gen) | (torch.randint(0, 2, (4096,), generator=gen) << 15)
    special = [
        0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FBFFFFF,  # NaNs (quiet, negative, signalling, low payload)
        0x7F800000, 0xFF800000, 0x00000000, 0x80000000,  # +-Inf, +-0
        0x7F7FFFFF,  # largest fp32: past bf16's largest by more than half a unit -> Inf
        0x7F7F8000, 0xFF7F8000,  # largest bf16 + half a unit: a tie, to even -> +-Inf
        0x7F7F7FFF,  # just below that tie -> the largest bf16, 0x7F7F
        0x7F7F0000,  # the largest bf16 itself
        0x00000001, 0x80000001,  # smallest fp32 subnormals -> +-0
        0x00008000,  # 2**-134: a tie between 0 and bf16's smallest subnormal 2**-133 -> 0 (even)
        0x00018000,  # 3 * 2**-134: a tie between 2**-133 and 2**-132 -> 2**-132 (even)
        0x00008001,  # just above the first tie -> 2**-133
        0x007FFFFF,  # largest fp32 subnormal -> rounds up to the smallest normal 2**-126 (0x0080)
        0x007F7FFF, 0x007F8000,  # below / at the tie between bf16's largest subnormal and 2**-126
        0x3F808000, 0x3F818000,  # 1 + 2**-8 (tie -> 1.0), 1 + 3 * 2**-8 (tie -> 1 + 2**-6)
        0x3F80FFFF, 0x3F807FFF, 0x3F808001,  # near-ties around 1
    ]
    ties = (finite_bf16 << 16) | 0x8000  # exact midpoints between two neighbouring bf16 values
    near = torch.cat([(finite_bf16 << 16) | 0x7FFF, (finite_bf16 << 16) | 0x8001])
    random_bits = torch.randint(0, 2**32, (8192,), generator=gen)  # every class: NaN, Inf, subnormal, normal
    scaled = torch.randn(8192, generator=gen, dtype=torch.float64) * torch.exp2(
        torch.randint(-149, 128, (8192,), generator=gen).double())
    bits = torch.cat([torch.tensor(special), ties, near, random_bits]) & 0xFFFFFFFF
    return torch.cat([_from_bits(bits, torch.float32), scaled.float()])


def test_fp32_to_bf16_rounds_to_nearest_even():
    x = _fp32_to_bf16_cases()
    assert_same_bits(_convert(x, BF16), x.to(BF16), "fp32 -> bf16", inputs=x)


def test_fp32_to_bf16_round_toward_zero():
    x = _fp32_to_bf16_cases()
    truncated = _from_bits((x.view(torch.int32).to(torch.int64) >> 16) & 0xFFFF, BF16)
    truncated[x.isnan()] = float("nan")  # (a NaN whose payload is in the low half only would truncate to Inf)
    assert_same_bits(_convert(x, BF16, rtz=True), truncated, "fp32 -> bf16 (rtz)", inputs=x)


def test_bf16_to_fp32_is_exact():
    x = _all_16_bit_patterns(BF16)
    assert_same_bits(_convert(x, torch.float32), x.float(), "bf16 -> fp32", inputs=x)


@pytest.mark.parametrize("src,dst", [(torch.float16, BF16), (BF16, torch.float16)])
def test_bf16_fp16_conversions(src, dst):
    """Every 16-bit pattern: fp16 -> bf16 rounds once (fp16 -> fp32 is exact); bf16 -> fp16 overflows to Inf and
    rounds into fp16's subnormals."""
    x = _all_16_bit_patterns(src)
    assert_same_bits(_convert(x, dst), x.to(dst), f"{src} -> {dst}", inputs=x)


def test_bf16_int_conversions():
    """int32 -> bf16 for integers exact in fp32 (|i| <= 2**24), bf16 -> int32 truncating toward zero."""
    gen = torch.Generator().manual_seed(2)
    ints = torch.cat([torch.randint(-(2**24), 2**24 + 1, (4096,), generator=gen), torch.arange(-600, 600)]).int()
    assert_same_bits(_convert(ints, BF16), ints.to(BF16), "int32 -> bf16", inputs=ints)
    floats = (torch.randn(4096, generator=gen) * torch.exp2(torch.randint(-4, 24, (4096,), generator=gen).float()))
    floats = floats.to(BF16)
    assert_same_bits(_convert(floats, torch.int32), floats.to(torch.int32), "bf16 -> int32", inputs=floats)


# ----------------------------------------------------------------------------------------------------------------
# tl.dot
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _dot_kernel(a_ptr, b_ptr, acc_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                HAS_ACC: tl.constexpr):
    rm = tl.arange(0, M)
    rn = tl.arange(0, N)
    rk = tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    if HAS_ACC:
        c = tl.dot(a, b, tl.load(acc_ptr + rm[:, None] * N + rn[None, :]))
    else:
        c = tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], c)


def _dot(a, b, acc=None):
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), dtype=torch.float32, device=DEVICE)
    acc_arg = acc.to(DEVICE) if acc is not None else c
    _dot_kernel[(1,)](a.to(DEVICE), b.to(DEVICE), acc_arg, c, M=M, N=N, K=K, HAS_ACC=acc is not None)
    return c.cpu()


def _on_grid(shape, gen):
    """bf16 values +-m * 2**(e - 7), m in [128, 255], e in {0, 1}: every product is a multiple of 2**-14 below
    2**4 in magnitude, so a 32-term sum (plus an accumulator below 2**8 on the same grid) needs at most 24
    significant bits: fp32 accumulation is exact in any order and must equal the float64 result bit for bit,
    while any bf16 rounding of an operand, a product or a partial sum would show."""
    m = torch.randint(128, 256, shape, generator=gen).double()
    e = torch.randint(0, 2, shape, generator=gen).double()
    sign = torch.randint(0, 2, shape, generator=gen).double() * 2 - 1
    return (sign * m * torch.exp2(e - 7)).to(BF16)


@pytest.mark.parametrize("with_acc", [False, True])
def test_dot_is_exact_products_with_fp32_accumulation(with_acc):
    gen = torch.Generator().manual_seed(3)
    a, b = _on_grid((16, 32), gen), _on_grid((32, 16), gen)
    acc = (torch.randint(-(2**22), 2**22, (16, 16), generator=gen).double() * 2.0**-14).float() if with_acc else None
    ref = a.double() @ b.double() + (acc.double() if with_acc else 0.0)
    assert torch.equal(ref.float().double(), ref)  # the exact result is an fp32 value
    assert_same_bits(_dot(a, b, acc), ref.float(), "tl.dot(bf16, bf16" + (", acc)" if with_acc else ")"))


def test_dot_of_random_values_accumulates_in_fp32():
    """Random bf16 operands: within fp32 accumulation's error bound of the exact result, (K + 1) * 2**-24 *
    (|a| @ |b| + |acc|) per element; accumulating in bf16 instead would miss it by ~2**-9 relative."""
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(16, 64, generator=gen).to(BF16)
    b = torch.randn(64, 32, generator=gen).to(BF16)
    acc = torch.randn(16, 32, generator=gen)
    exact = a.double() @ b.double() + acc.double()
    bound = (64 + 1) * 2.0**-24 * (a.double().abs() @ b.double().abs() + acc.double().abs())
    err = (_dot(a, b, acc).double() - exact).abs()
    assert (err <= bound).all(), f"max error {err.max().item():.3e}, bound there {bound[err.argmax() // 32].max():.3e}"


# ----------------------------------------------------------------------------------------------------------------
# elementwise ops
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _elementwise_kernel(x_ptr, y_ptr, z_ptr, out_ptr, n, OP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    z = tl.load(z_ptr + offs, mask=mask)
    if OP == "add":
        r = x + y
    elif OP == "sub":
        r = x - y
    elif OP == "mul":
        r = x * y
    elif OP == "div":
        r = x / y  # Triton divides bf16 in fp32; the store rounds
    elif OP == "neg":
        r = -x
    elif OP == "abs":
        r = tl.abs(x)
    elif OP == "maximum":
        r = tl.maximum(x, y)
    elif OP == "minimum":
        r = tl.minimum(x, y)
    elif OP == "maximum_nan":
        r = tl.maximum(x, y, propagate_nan=tl.PropagateNan.ALL)
    elif OP == "minimum_nan":
        r = tl.minimum(x, y, propagate_nan=tl.PropagateNan.ALL)
    elif OP == "clamp":
        r = tl.clamp(x, y, z)
    elif OP == "clamp_nan":
        r = tl.clamp(x, y, z, propagate_nan=tl.PropagateNan.ALL)
    elif OP == "where":
        r = tl.where(z > 0, x, y)
    elif OP == "fma":
        r = tl.fma(x, y, z)
    elif OP == "chain":  # three roundings: ((x * y) + z) - x
        r = x * y
        r = r + z
        r = r - x
    elif OP == "lt":
        r = x < y
    elif OP == "le":
        r = x <= y
    elif OP == "eq":
        r = x == y
    elif OP == "ne":
        r = x != y
    elif OP == "gt":
        r = x > y
    else:
        r = x >= y
    tl.store(out_ptr + offs, r.to(out_ptr.dtype.element_ty), mask=mask)


def _elementwise(op, x, y, z, out_dtype):
    out = torch.empty(x.shape, dtype=out_dtype, device=DEVICE)
    block = 1024
    _elementwise_kernel[(triton.cdiv(x.numel(), block),)](x.to(DEVICE), y.to(DEVICE), z.to(DEVICE), out, x.numel(),
                                                          OP=op, BLOCK=block)
    return out.cpu()


def _operands(n=4096, seed=5, specials=True):
    """Random bf16 over a wide exponent range (sums and products hit ties, overflow and subnormals), with NaN,
    +-Inf, +-0, the largest bf16 and subnormals mixed in."""
    gen = torch.Generator().manual_seed(seed)

    def one():
        v = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-12, 12, (n,), generator=gen).float())
        v[: n // 8] = torch.randn(n // 8, generator=gen)  # same-exponent pairs: exact sums need 9 bits (ties)
        v = v.to(BF16)
        if specials:
            pick = torch.randperm(n, generator=gen)[: n // 16]
            values = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3.3895313892515355e38,
                                   -3.3895313892515355e38, 2.0**-130, -(2.0**-133), 2.0**-126], dtype=BF16)
            v[pick] = values[torch.randint(0, len(values), (pick.numel(),), generator=gen)]
        return v

    return one(), one(), one()


# Unary minus on floats is a negation (builder.create_fneg) in newer Tritons; Triton 3.6 computes 0 - x, which
# makes -(+0) = +0 (compiled or interpreted alike).
_MINUS_NEGATES = "create_fneg" in inspect.getsource(TritonSemantic.minus)

_TORCH_OPS = {
    "add": lambda x, y, z: x + y,
    "sub": lambda x, y, z: x - y,
    "mul": lambda x, y, z: x * y,
    "div": lambda x, y, z: (x.float() / y.float()).to(BF16),
    "neg": lambda x, y, z: -x if _MINUS_NEGATES else torch.zeros_like(x) - x,
    "abs": lambda x, y, z: x.abs(),
    "maximum_nan": lambda x, y, z: torch.maximum(x, y),
    "minimum_nan": lambda x, y, z: torch.minimum(x, y),
    "where": lambda x, y, z: torch.where(z > 0, x, y),
    "chain": lambda x, y, z: (x * y + z) - x,
}


@pytest.mark.parametrize("op", sorted(_TORCH_OPS))
def test_bf16_elementwise_ops_round_once(op):
    x, y, z = _operands()
    assert_same_bits(_elementwise(op, x, y, z, BF16), _TORCH_OPS[op](x, y, z), f"bf16 {op}", inputs=x)


@pytest.mark.parametrize("op", ["maximum", "minimum", "clamp", "clamp_nan"])
def test_bf16_minimum_maximum_clamp(op):
    """The default (NaN-ignoring) tl.maximum / tl.minimum and tl.clamp on NaN-free operands (the stock
    interpreter's NaN rule for them changed between Triton versions; the NaN-propagating maximum / minimum are
    tested above). clamp(x, lo, hi) with lo <= hi."""
    x, y, z = _operands(seed=6)
    keep = ~(x.isnan() | y.isnan() | z.isnan())
    x, y, z = x[keep], y[keep], z[keep]
    if op.startswith("clamp"):
        y, z = torch.minimum(y, z), torch.maximum(y, z)
        ref = torch.minimum(torch.maximum(x, y), z)
    else:
        ref = torch.maximum(x, y) if op == "maximum" else torch.minimum(x, y)
    assert_same_bits(_elementwise(op, x, y, z, BF16), ref, f"bf16 {op}", inputs=x)


@pytest.mark.parametrize("op,fn", [("lt", torch.lt), ("le", torch.le), ("eq", torch.eq), ("ne", torch.ne),
                                   ("gt", torch.gt), ("ge", torch.ge)])
def test_bf16_comparisons(op, fn):
    x, y, z = _operands(seed=7)
    y[::3] = x[::3]  # equal pairs
    assert_same_bits(_elementwise(op, x, y, z, torch.int8), fn(x, y).to(torch.int8), f"bf16 {op}", inputs=x)


def test_bf16_fma_rounds_once():
    """Operands with magnitudes in [1/4, 2]: x * y + z is then exact in fp32 (at most 23 significant bits), so
    PyTorch's rounding of the fp32 value is the single rounding of the exact result."""
    gen = torch.Generator().manual_seed(8)
    x, y, z = (((torch.rand(4096, generator=gen) * 1.75 + 0.25) * (torch.randint(0, 2, (4096,), generator=gen) * 2 - 1))
               .to(BF16) for _ in range(3))
    exact = x.double() * y.double() + z.double()
    assert torch.equal(exact.float().double(), exact)
    assert_same_bits(_elementwise("fma", x, y, z, BF16), exact.float().to(BF16), "bf16 fma", inputs=x)


# ----------------------------------------------------------------------------------------------------------------
# reductions and atomics
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b).to(a.dtype)  # (Triton 3.6's tl.maximum promotes bf16 to fp32)


@triton.jit
def _reduce_kernel(x_ptr, out_ptr, idx_ptr, N: tl.constexpr, OP: tl.constexpr):
    row = tl.program_id(0)
    x = tl.load(x_ptr + row * N + tl.arange(0, N))
    if OP == "max":
        tl.store(out_ptr + row, tl.max(x, axis=0))
    elif OP == "min":
        tl.store(out_ptr + row, tl.min(x, axis=0))
    elif OP == "argmax":
        tl.store(idx_ptr + row, tl.argmax(x, axis=0))
    elif OP == "argmin":
        tl.store(idx_ptr + row, tl.argmin(x, axis=0))
    elif OP == "reduce_max":  # a combine function of our own: bf16 all the way (tl.max promotes to fp32)
        tl.store(out_ptr + row, tl.reduce(x, 0, _max_combine))
    else:
        tl.store(out_ptr + row, tl.sum(x, axis=0))


def _reduce(op, x):
    rows, n = x.shape
    out = torch.empty(rows, dtype=BF16, device=DEVICE)
    idx = torch.empty(rows, dtype=torch.int32, device=DEVICE)
    _reduce_kernel[(rows,)](x.to(DEVICE), out, idx, N=n, OP=op)
    return out.cpu(), idx.cpu().long()


def test_bf16_max_min_reductions():
    """Distinct values, most negative: on the values, not on their bit patterns."""
    gen = torch.Generator().manual_seed(9)
    x = torch.stack([(torch.randperm(64, generator=gen) - 48).to(BF16) * 0.375 for _ in range(8)])
    for op, fn in (("max", torch.amax), ("min", torch.amin), ("reduce_max", torch.amax)):
        assert_same_bits(_reduce(op, x)[0], fn(x, dim=1), f"tl.{op}")
    for op, fn in (("argmax", torch.argmax), ("argmin", torch.argmin)):
        assert torch.equal(_reduce(op, x)[1], fn(x, dim=1)), f"tl.{op}"


@triton.jit
def _scan_kernel(x_ptr, out_ptr, N: tl.constexpr, PROD: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    tl.store(out_ptr + offs, tl.cumprod(x, 0) if PROD else tl.cumsum(x, 0))


@triton.jit
def _atomic_kernel(ptr, x_ptr):
    offs = tl.arange(0, 16)
    tl.atomic_add(ptr + offs, tl.load(x_ptr + offs))


@pytest.mark.skipif(not INTERPRETING, reason="what the interpreter extension refuses to model")
def test_unmodelled_bf16_ops_raise():
    """A bf16 sum's or scan's rounding depends on the GPU's order, and bf16 atomic adds are not modelled: they
    raise instead of giving the stock interpreter's bit-pattern arithmetic."""
    x = torch.ones(2, 64, dtype=BF16)
    with pytest.raises(Exception, match="tl.sum in bfloat16"):
        _reduce("sum", x)
    for prod, name in ((False, "cumsum"), (True, "cumprod")):
        out = torch.empty_like(x[0])
        if "_promote_bfloat16_to_float32" in inspect.getsource(getattr(tl.standard, name).fn):
            _scan_kernel[(1,)](x[0], out, N=64, PROD=prod)  # Triton 3.6 scans bf16 in fp32: exact here
            assert torch.equal(out, torch.ones(64, dtype=BF16) if prod else torch.arange(1, 65).to(BF16)), name
        else:
            with pytest.raises(Exception, match=f"tl.{name} in bfloat16"):
                _scan_kernel[(1,)](x[0], out, N=64, PROD=prod)
    with pytest.raises(Exception, match="atomic arithmetic on bfloat16"):
        _atomic_kernel[(1,)](torch.zeros(16, dtype=BF16), torch.ones(16, dtype=BF16))


# ----------------------------------------------------------------------------------------------------------------
# install() refuses an interpreter it does not fit
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not INTERPRETING, reason="installs into the interpreter")
def test_install_refuses_an_interpreter_it_does_not_fit(monkeypatch):
    import triton_bf16
    from triton.runtime import interpreter

    assert triton_bf16.installed()
    triton_bf16.uninstall()
    try:
        with monkeypatch.context() as patch:  # a Triton without one of the patch points
            patch.delattr(interpreter.InterpreterBuilder, "create_dot")
            with pytest.raises(RuntimeError, match=r"no method InterpreterBuilder\.create_dot"):
                triton_bf16.install()
        assert not triton_bf16.installed()
        with monkeypatch.context() as patch:  # one whose fp32 -> bf16 cast no longer goes through cast_impl
            patch.setattr(interpreter.InterpreterBuilder, "create_fp_trunc",
                          lambda self, src, dst: interpreter.TensorHandle(
                              (src.data.view("uint32") >> 16).astype("uint16"), dst))
            with pytest.raises(RuntimeError, match="self-check failed .*create_fp_trunc"):
                triton_bf16.install()
        assert not triton_bf16.installed()
    finally:
        triton_bf16.install()
    assert triton_bf16.installed()
