"""Exact bfloat16 arithmetic for the Triton interpreter: a test-only extension, never imported by the library.

Triton's interpreter (``TRITON_INTERPRET=1``) stores bf16 tensors as their raw ``uint16`` bit patterns and has no
bf16 arithmetic of its own (triton-lang/triton#11584, declined upstream): ``tl.dot`` on bf16 operands multiplies
the bit patterns as integers, elementwise ops add or compare the bit patterns, and fp32 -> bf16 conversions
truncate instead of rounding to nearest even. :func:`install` (called by ``tests/conftest.py`` when the interpreter
is active) patches the interpreter's builder at the few methods where bf16 values are computed on, so that bf16
kernels compute what a GPU computes:

* ``tl.dot`` with bf16 operands: their exact values, exact products, fp32 accumulation (tensor-core semantics);
* conversions: bf16 -> wider types exact; anything -> bf16 rounded once (fp64 and integer sources too), to nearest
  even (toward zero for ``fp_downcast_rounding="rtz"``); NaN stays NaN, +-Inf stays +-Inf, finite values past the
  largest bf16 go to +-Inf, subnormals are kept;
* elementwise arithmetic, negation, ``minimum`` / ``maximum`` / ``clamp`` and comparisons on bf16: computed in
  fp32 from the exact operand values and rounded once to bf16. For +, -, * and / that is the correctly rounded
  bf16 result (fp32's 24 bits >= 2 * 8 + 2: the double rounding is innocuous), as a native bf16 instruction and
  PyTorch's CPU bf16 ops give. ``fma``: in fp64, rounded once (see ``_create_fma``). (Triton's math functions --
  exp, sqrt, ... -- accept fp32 / fp64 only.)

Loads, stores, ``tl.where`` (select), reshapes, broadcasts and ``abs`` move or mask bit patterns and were already
right. ``tl.max`` / ``tl.min`` promote bf16 to fp32 before reducing (exact now); Triton 3.9's ``tl.argmax`` /
``tl.argmin`` do not, and compare the values now. What a GPU does in an order the interpreter cannot reproduce
raises ``NotImplementedError`` instead of giving a silently different answer: ``tl.sum`` (and, in 3.9,
``tl.cumsum`` / ``tl.cumprod``) *in* bf16 -- reduce in fp32: ``x.to(tl.float32)`` or ``dtype=tl.float32`` -- and
``tl.atomic_add`` on bf16. Custom ``tl.reduce`` / ``tl.associative_scan`` combine functions on bf16 run through
the patched elementwise ops in the interpreter's sequential order (exact for order-independent combines such as
max; a GPU's tree order may round a bf16 sum differently).

The patch points are methods of ``triton.runtime.interpreter.InterpreterBuilder`` -- ``cast_impl`` (which every
``create_fp_trunc`` / ``create_fp_ext`` / int <-> float cast calls), ``create_fp_to_fp``, ``binary_op``,
``unary_op``, ``ternary_op``, ``create_fma``, ``create_dot``, ``create_atomic_rmw`` -- and of its ``ReduceOps``
(``min_max``, ``sum``) and ``ScanOps`` (``cumsum``, ``cumprod``), with the same signatures in Triton 3.6 and 3.9
(both checked). :func:`install` checks that each exists and that bf16 is still stored as ``uint16``, then runs a
self-check through the builder's ``create_*`` entry points that the language calls; on a Triton whose interpreter
differs it raises ``RuntimeError`` (never a silent no-op).
"""

from __future__ import annotations

import numpy as np

__all__ = ["install", "uninstall", "installed", "round_to_bf16_bits", "bf16_bits_to_fp32"]

# (owner, method) pairs patched by install(); owner names are attributes of triton.runtime.interpreter.
_PATCHED = {
    "InterpreterBuilder": ("cast_impl", "create_fp_to_fp", "binary_op", "unary_op", "ternary_op", "create_fma",
                           "create_dot", "create_atomic_rmw"),
    "ReduceOps": ("min_max", "sum"),
    "ScanOps": ("cumsum", "cumprod"),
}
_originals = {}  # (owner name, method name) -> original function, while installed

_BF16_MAX = float.fromhex("0x1.fep127")  # 0x7F7F


# ----------------------------------------------------------------------------------------------------------------
# bf16 <-> float conversion on numpy arrays (bf16 as uint16 bit patterns, as the interpreter stores it)
# ----------------------------------------------------------------------------------------------------------------


def bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    """The exact fp32 values of bf16 bit patterns (bf16 is the top half of an fp32)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def round_to_bf16_bits(values, mode: str = "rtne") -> np.ndarray:
    """bf16 bit patterns (``uint16``) of ``values`` (any real numpy dtype), rounded once: to nearest, ties to even
    (``"rtne"``) or toward zero (``"rtz"``). NaN -> 0x7FC0 (PyTorch's quiet NaN), +-Inf -> +-Inf, signed zeros
    kept, subnormals rounded at bf16's subnormal spacing 2**-133; past the largest finite bf16 "rtne" gives +-Inf
    (as PyTorch and GPUs do) and "rtz" the largest finite value.

    Method: ``v = m * 2**e`` (``frexp``, 0.5 <= |m| < 1); bf16 keeps 8 significant bits, so its spacing near ``v``
    is ``2**q`` with ``q = max(e - 8, -133)``. ``v * 2**-q`` is exact (a power-of-two scaling of a float64), the
    integer rounding (``rint``: ties to even; ``trunc``) is the one rounding, and scaling back is exact again: the
    result has at most 9 significant bits, so it converts to fp32 exactly (or overflows to Inf), and its top 16
    bits are the bf16 pattern. Integer inputs go through float64 (exact below 2**53)."""
    if mode not in ("rtne", "rtz"):
        raise ValueError(f"rounding mode {mode!r}: expected 'rtne' or 'rtz'")
    with np.errstate(over="ignore", invalid="ignore"):
        v = np.asarray(values).astype(np.float64)  # (signalling NaNs are quietened: "invalid")
        _, e = np.frexp(v)
        q = np.maximum(e - 8, -133)
        scaled = np.ldexp(v, -q)
        r = np.rint(scaled) if mode == "rtne" else np.trunc(scaled)
        rounded = np.ldexp(r, q)
        if mode == "rtz":  # toward zero never overflows a finite value to Inf
            rounded = np.where(np.isfinite(v), np.clip(rounded, -_BF16_MAX, _BF16_MAX), rounded)
        f32 = rounded.astype(np.float32)
    bits = (f32.view(np.uint32) >> np.uint32(16)).astype(np.uint16)
    return np.where(np.isnan(v), np.uint16(0x7FC0), bits).astype(np.uint16).reshape(v.shape)


def _triton():
    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    return triton, tl, interpreter


def _is_bf16(handle) -> bool:
    """A bf16 value handle: bf16 element type *and* uint16 data (the interpreter tags some bool comparison results
    with the operands' dtype; those are not bf16 values)."""
    _, tl, interpreter = _triton()
    return (isinstance(handle, interpreter.TensorHandle) and handle.dtype.scalar == tl.bfloat16
            and handle.data.dtype == np.uint16)


def _values(handle) -> np.ndarray:
    """Numeric values of a handle: bf16 decoded to fp32, anything else as stored."""
    return bf16_bits_to_fp32(handle.data) if _is_bf16(handle) else handle.data


def _bf16_handle(values, mode="rtne"):
    _, tl, interpreter = _triton()
    return interpreter.TensorHandle(round_to_bf16_bits(values, mode), tl.bfloat16)


# ----------------------------------------------------------------------------------------------------------------
# the patched builder methods (each falls back to the original when no bf16 value is involved)
# ----------------------------------------------------------------------------------------------------------------


def _cast_impl(self, src, dst_type):
    """Every ``create_fp_trunc`` / ``create_fp_ext`` / ``create_si_to_fp`` / ``create_ui_to_fp`` /
    ``create_fp_to_si`` / ``create_fp_to_ui`` goes through here. bf16 source: exact fp32 values, then the original
    cast from fp32 (to ints: truncation toward zero). bf16 destination: one round-to-nearest-even."""
    _, tl, interpreter = _triton()
    dst = dst_type.scalar
    if _is_bf16(src):
        if dst == tl.bfloat16:
            return interpreter.TensorHandle(src.data.copy(), tl.bfloat16)
        f32 = interpreter.TensorHandle(bf16_bits_to_fp32(src.data), tl.float32)
        if dst == tl.float32:
            return f32
        return _originals["InterpreterBuilder", "cast_impl"](self, f32, dst_type)
    if dst == tl.bfloat16:
        return _bf16_handle(src.data)
    return _originals["InterpreterBuilder", "cast_impl"](self, src, dst_type)


def _create_fp_to_fp(self, src, dst_type, rounding_mode):
    """Conversions with an explicit rounding mode (``fp_downcast_rounding="rtz"``) and, in Triton 3.9, bf16 <->
    fp16 (3.6 converts those through fp32 with ``cast_impl``). bf16 -> fp16 rounds once to nearest even
    (numpy; the interpreter's own bit-level conversion turns fp16 overflow into NaN), or, with "rtz", goes through
    the interpreter's fp32 -> fp16 truncation. fp8 conversions keep the interpreter's implementation."""
    _, tl, _ = _triton()
    standard = (tl.float16, tl.bfloat16, tl.float32, tl.float64)
    src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
    if tl.bfloat16 in (src_ty, dst_ty) and src_ty in standard and dst_ty in standard:
        from triton._C.libtriton import ir

        mode = "rtz" if rounding_mode == ir.ROUNDING_MODE.RTZ else "rtne"
        if dst_ty == tl.bfloat16:
            return _bf16_handle(_values(src), mode)
        f32 = _cast_impl(self, src, tl.float32)  # bf16 -> fp32 is exact
        if dst_ty == tl.float32:
            return f32
        if mode == "rtne":  # numpy's fp32 -> fp16 / fp64 conversion: one rounding to nearest even
            return _originals["InterpreterBuilder", "cast_impl"](self, f32, dst_type)
        return _originals["InterpreterBuilder", "create_fp_to_fp"](self, f32, dst_type, rounding_mode)
    return _originals["InterpreterBuilder", "create_fp_to_fp"](self, src, dst_type, rounding_mode)


def _binary_op(self, lhs, rhs, op):
    """All binary float ops (``create_fadd`` / ``fsub`` / ``fmul`` / ``fdiv`` / ``frem``, ``minimumf`` /
    ``maximumf`` / ``minnumf`` / ``maxnumf``, ``fcmp*``) go through here: on bf16 operands, computed in fp32 from
    their exact values; a float result is rounded once to bf16, a comparison's bool result is returned as the
    original does."""
    _, _, interpreter = _triton()
    if not (_is_bf16(lhs) or _is_bf16(rhs)):
        return _originals["InterpreterBuilder", "binary_op"](self, lhs, rhs, op)
    with np.errstate(all="ignore"):  # Inf / NaN results are intended, as on a GPU
        out = op(_values(lhs), _values(rhs))
    if np.issubdtype(out.dtype, np.floating):
        return _bf16_handle(out)
    return interpreter.TensorHandle(out, lhs.dtype.scalar)


def _unary_op(self, arg, op):
    """``create_fneg`` (Triton >= 3.7; 3.6 computes ``0 - x``) on bf16: in fp32, rounded once to bf16 (exact)."""
    _, _, interpreter = _triton()
    if not _is_bf16(arg):
        return _originals["InterpreterBuilder", "unary_op"](self, arg, op)
    with np.errstate(all="ignore"):
        out = op(_values(arg))
    if np.issubdtype(out.dtype, np.floating):
        return _bf16_handle(out)
    return interpreter.TensorHandle(out, arg.dtype.scalar)


def _ternary_op(self, lhs, rhs, other, op):
    """``create_select`` (``np.where``: moves bit patterns, already exact, NaN payloads kept) and
    ``create_clampf`` (``np.clip``: on the bf16 values; exact, the result is one of the operands)."""
    if op is np.where or not any(_is_bf16(h) for h in (lhs, rhs, other)):
        return _originals["InterpreterBuilder", "ternary_op"](self, lhs, rhs, other, op)
    with np.errstate(all="ignore"):
        return _bf16_handle(op(_values(lhs), _values(rhs), _values(other)))


def _create_fma(self, x, y, z):
    """bf16 fma in float64, rounded once to bf16 (as ``fma.rn.bf16``): ``x * y`` is exact there, and the float64
    rounding of ``+ z`` cannot change the bf16 result, except when ``|z| < 2**-53 |x y|`` with ``x y`` exactly
    halfway between two bf16 values (a tie that ``z`` should have broken)."""
    if not any(_is_bf16(h) for h in (x, y, z)):
        return _originals["InterpreterBuilder", "create_fma"](self, x, y, z)
    xs, ys, zs = (np.asarray(_values(h), dtype=np.float64) for h in (x, y, z))
    with np.errstate(all="ignore"):
        return _bf16_handle(xs * ys + zs)


def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    """bf16 operands: their exact fp32 values (products of two bf16 values are exact in fp32), fp32 accumulation,
    then ``+ d`` as the interpreter does for fp16 and fp32 operands. ``input_precision`` does not apply to bf16."""
    _, _, interpreter = _triton()
    if not (_is_bf16(a) or _is_bf16(b)):
        return _originals["InterpreterBuilder", "create_dot"](self, a, b, d, input_precision, max_num_imprecise_acc)
    a32 = np.asarray(_values(a), dtype=np.float32)
    b32 = np.asarray(_values(b), dtype=np.float32)
    with np.errstate(all="ignore"):
        acc = np.matmul(a32, b32, dtype=np.float32) + _values(d).astype(np.float32)
    if _is_bf16(d):  # not reachable through tl.dot (out_dtype=bfloat16 is rejected), kept exact anyway
        return _bf16_handle(acc)
    return interpreter.TensorHandle(acc.astype(d.data.dtype), d.dtype.scalar)


def _create_atomic_rmw(self, rmwOp, ptr, val, mask, sem, scope):
    """``tl.atomic_add`` on bf16 (the only bf16 atomic read-modify-write Triton accepts) is refused: the interpreter
    would add the bit patterns. (``tl.atomic_cas`` compares and moves bit patterns, as a GPU does: unpatched.)"""
    _, tl, _ = _triton()
    if ptr.get_element_ty() == tl.bfloat16:
        raise NotImplementedError(
            "atomic arithmetic on bfloat16 is not modelled by the bf16 interpreter extension (tests/triton_bf16.py): "
            "accumulate atomically in fp32 instead")
    return _originals["InterpreterBuilder", "create_atomic_rmw"](self, rmwOp, ptr, val, mask, sem, scope)


def _min_max(self, input, val_reduce_op, idx_reduce_op=None):
    """The numpy fast path (``nanmax``, ``nanargmax``, ...) of reductions with the standard max / min / argmax /
    argmin combines, on bf16: on the values (exact: the result is an element), not on the bit patterns (wrong for
    negative values). ``tl.max`` / ``tl.min`` promote bf16 to fp32 before reducing; Triton 3.9's ``tl.argmax`` /
    ``tl.argmin`` do not, and reach this with bf16 data."""
    _, tl, _ = _triton()
    data = input[0] if isinstance(input, tuple) else input
    if not _is_bf16(data.handle):
        return _originals["ReduceOps", "min_max"](self, input, val_reduce_op, idx_reduce_op)
    values = bf16_bits_to_fp32(data.handle.data)
    val = idx = None
    if val_reduce_op:
        val = self.to_tensor(round_to_bf16_bits(val_reduce_op(values, axis=self.axis, keepdims=self.keep_dims)),
                             data.dtype)
    if idx_reduce_op:
        idx = self.to_tensor(idx_reduce_op(values, axis=self.axis, keepdims=self.keep_dims), tl.int32)
    if val is None and idx is None:
        raise ValueError("val_reduce_op and idx_reduce_op are both None")
    return (val, idx) if val is not None and idx is not None else (val if val is not None else idx)


def _unsupported_bf16_sum(owner, name):
    def method(self, input):
        if _is_bf16(input.handle):
            raise NotImplementedError(
                f"tl.{name} in bfloat16 is not modelled by the bf16 interpreter extension (tests/triton_bf16.py): a "
                "GPU adds in bf16 in its own tree order, which the interpreter cannot reproduce. Accumulate in fp32 "
                "(x.to(tl.float32), or dtype=tl.float32).")
        return _originals[owner, name](self, input)

    method.__name__ = name
    return method


def _replacements():
    return {
        "InterpreterBuilder": {
            "cast_impl": _cast_impl,
            "create_fp_to_fp": _create_fp_to_fp,
            "binary_op": _binary_op,
            "unary_op": _unary_op,
            "ternary_op": _ternary_op,
            "create_fma": _create_fma,
            "create_dot": _create_dot,
            "create_atomic_rmw": _create_atomic_rmw,
        },
        "ReduceOps": {"min_max": _min_max, "sum": _unsupported_bf16_sum("ReduceOps", "sum")},
        "ScanOps": {"cumsum": _unsupported_bf16_sum("ScanOps", "cumsum"),
                    "cumprod": _unsupported_bf16_sum("ScanOps", "cumprod")},
    }


# ----------------------------------------------------------------------------------------------------------------
# install / uninstall
# ----------------------------------------------------------------------------------------------------------------


def installed() -> bool:
    return bool(_originals)


def _unsupported(triton, reason: str) -> RuntimeError:
    return RuntimeError(
        f"the bf16 interpreter extension (tests/triton_bf16.py) does not fit Triton {triton.__version__}'s "
        f"interpreter: {reason}. It was written against Triton 3.6 - 3.9 (triton/runtime/interpreter.py); update "
        "it for this version rather than running the bf16 kernel tests on the stock interpreter, whose bf16 "
        "arithmetic is wrong.")


def install() -> None:
    """Patch the interpreter (idempotent). Raises ``RuntimeError`` if this Triton's interpreter lacks a patch
    point, stores bf16 differently, or fails the self-check afterwards."""
    if _originals:
        return
    triton, tl, interpreter = _triton()
    if interpreter._get_np_dtype(tl.bfloat16) != np.dtype(np.uint16):
        raise _unsupported(triton, f"bf16 is stored as {interpreter._get_np_dtype(tl.bfloat16)}, not uint16")
    for owner_name, names in _PATCHED.items():
        owner = getattr(interpreter, owner_name, None)
        if owner is None:
            raise _unsupported(triton, f"no class {owner_name}")
        for name in names:
            if not callable(owner.__dict__.get(name)):
                raise _unsupported(triton, f"no method {owner_name}.{name}")
    for owner_name, methods in _replacements().items():
        owner = getattr(interpreter, owner_name)
        for name, fn in methods.items():
            _originals[owner_name, name] = owner.__dict__[name]
            setattr(owner, name, fn)
    try:
        _self_check()
    except Exception as exc:
        uninstall()
        raise _unsupported(triton, f"self-check failed ({exc})") from exc


def uninstall() -> None:
    """Restore the stock interpreter (for checking by hand that the extension's tests fail without it)."""
    _, _, interpreter = _triton()
    for (owner_name, name), fn in _originals.items():
        setattr(getattr(interpreter, owner_name), name, fn)
    _originals.clear()


def _self_check() -> None:
    """The builder entry points the semantic layer calls really reach the patched methods (a Triton whose
    ``create_fp_trunc`` / ``create_fadd`` / ... stopped delegating to them fails here)."""
    _, tl, interpreter = _triton()
    b = interpreter.InterpreterBuilder()
    f32 = lambda *v: interpreter.TensorHandle(np.array(v, dtype=np.float32), tl.float32)  # noqa: E731
    bf = lambda *v: interpreter.TensorHandle(round_to_bf16_bits(np.array(v)), tl.bfloat16)  # noqa: E731
    # 1 + 2**-8 is a tie between 1 and 1 + 2**-7: even -> 1.0 (0x3F80); 1 + 3 * 2**-8 -> 1 + 2**-6 (0x3F82);
    # 3.4e38 is past the largest bf16 (3.39e38) by more than half a unit: Inf (0x7F80)
    got = b.create_fp_trunc(f32(1 + 2**-8, 1 + 3 * 2**-8, 3.4e38), tl.bfloat16).data.tolist()
    assert got == [0x3F80, 0x3F82, 0x7F80], f"create_fp_trunc gave {[hex(g) for g in got]}"
    assert b.create_fp_ext(bf(-2.5), tl.float32).data.tolist() == [-2.5], "create_fp_ext"
    assert bf16_bits_to_fp32(b.create_fadd(bf(1.5), bf(-2.0)).data).tolist() == [-0.5], "create_fadd"
    assert bf16_bits_to_fp32(b.create_fmul(bf(1.5), bf(-3.0)).data).tolist() == [-4.5], "create_fmul"
    assert b.create_fcmpOLT(bf(-1.0), bf(0.5)).data.tolist() == [True], "create_fcmpOLT"
    assert bf16_bits_to_fp32(b.create_maximumf(bf(-1.0), bf(-3.0)).data).tolist() == [-1.0], "create_maximumf"
    a = interpreter.TensorHandle(round_to_bf16_bits(np.array([[1.5, -2.0]])), tl.bfloat16)
    c = interpreter.TensorHandle(round_to_bf16_bits(np.array([[3.0], [0.25]])), tl.bfloat16)
    d = interpreter.TensorHandle(np.zeros((1, 1), np.float32), tl.float32)
    assert b.create_dot(a, c, d, None, 0).data.tolist() == [[4.0]], "create_dot"
