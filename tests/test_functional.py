"""fused_lora_linear: parity of both backends with an independent float64 reference, gradients, shapes, strides,
dtypes, saved tensors and input validation."""

from __future__ import annotations

import pytest
import torch

from fused_lora import fused_lora_linear, use_backend
from fused_lora.dropout import Dropout

from conftest import DEVICE_BACKENDS, INTERPRETING
from helpers import (
    FP32_RTOL,
    assert_close_fp32,
    assert_rounding_flips_only,
    assert_three_way,
    fused_fn,
    lora_reference,
    make_inputs,
    outputs_and_grads,
)

GRAD_NAMES = ("x", "lora_A", "lora_B", "bias")

# M x K (in) x N (out) x r: M in {1, 37}, in/out not multiples of any block size, every rank tile case
# (r < 16 padded, r = 16, r = 64 = one full tile, r = 80 > 64 loops / grids over rank blocks).
WEIRD_SHAPES = [
    (1, 33, 100, 1),
    (37, 100, 33, 8),
    (37, 257, 100, 16),
    (9, 41, 341, 64),
    (20, 48, 80, 80),
]



def _reference_fn(scaling, p, seed, dtype=None):
    def fn(x, weight, lora_A, lora_B, bias):
        keep = None
        if p > 0:
            M, K = x.reshape(-1, x.shape[-1]).shape
            keep = Dropout(p, seed).keep_mask(M, K, x.device)
        return lora_reference(x, weight, lora_A, lora_B, bias, scaling, keep, p, dtype=dtype)

    return fn


@pytest.mark.gpu_check
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("M,K,N,r", WEIRD_SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("bias", [True, False])
def test_fp32_matches_float64_reference(device, backend, M, K, N, r, p, bias):
    inp = make_inputs(M, K, N, r, torch.float32, device, bias=bias)
    grad = inp.pop("grad")
    out = outputs_and_grads(fused_fn(backend, 1.7, p, seed=11), inp, grad)
    ref = outputs_and_grads(_reference_fn(1.7, p, seed=11), {k: v.double() if v is not None else None for k, v in inp.items()}, grad.double())
    assert set(out) == set(ref) == {"y", *[n for n in GRAD_NAMES if inp.get(n) is not None]}
    for name in out:
        assert out[name].dtype == torch.float32
        assert_close_fp32(out[name], ref[name], name)


@pytest.mark.gpu_check
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,K,N,r", [(37, 100, 33, 8), (9, 41, 341, 64), (64, 128, 96, 16)])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_half_precision_three_way(device, backend, dtype, M, K, N, r, p):
    """Half-precision outputs and gradients are at most 2x as far from float64 as plain PyTorch in the same dtype.
    (bf16 kernels in the interpreter: with its exact-bf16 extension, tests/triton_bf16.py.)"""
    inp = make_inputs(M, K, N, r, dtype, device)
    grad = inp.pop("grad")
    out = outputs_and_grads(fused_fn(backend, 2.0, p, seed=5), inp, grad)
    baseline = outputs_and_grads(_reference_fn(2.0, p, seed=5, dtype=dtype), inp, grad)
    ref = outputs_and_grads(_reference_fn(2.0, p, seed=5), {k: v.double() for k, v in inp.items()}, grad.double())
    for name in out:
        assert out[name].dtype == dtype, name
        assert_three_way(out[name], baseline[name], ref[name], name)


# bf16 kernels, every variant, at M = 37, K = 41, N = 33 (no multiple of any tile) and r in {1, 8, 16}: each rank
# with and without dropout and with and without bias (pairwise), the dense weight, and an NF4 weight on both of its
# paths (dequantized inside the GEMMs, or into a buffer first: forced here by lowering NF4_FUSED_MAX_TOKENS).
BF16_VARIANTS = [
    ("dense", 1, True, 0.25), ("dense", 1, False, 0.0), ("dense", 8, True, 0.0), ("dense", 8, False, 0.25),
    ("dense", 16, True, 0.25), ("dense", 16, False, 0.0),
    ("nf4-fused", 8, True, 0.25), ("nf4-fused", 16, False, 0.0),
    ("nf4-buffer", 8, False, 0.25), ("nf4-buffer", 16, True, 0.0),
]


@pytest.mark.gpu_check
@pytest.mark.parametrize("device,backend", [db for db in DEVICE_BACKENDS if db[1] == "triton"])
@pytest.mark.parametrize("weight_kind,r,bias,p", BF16_VARIANTS)
def test_bf16_kernels_every_variant(monkeypatch, device, backend, weight_kind, r, bias, p):
    """bf16 kernel outputs and every gradient (x, A, B, bias): the three-way rule against float64 with plain
    PyTorch bf16 as the baseline, and, on the CPU, against the torch path with the same dropout seed, computing in
    fp32 (``use_cpu_half_compute("fp32")``): both round xa, gb and each result to bf16 at the same points and
    accumulate in fp32, so they differ only where their fp32 summation orders flip a rounding, of a result or of
    xa / gb (``assert_rounding_flips_only``)."""
    from fused_lora import use_cpu_half_compute
    from fused_lora.kernels import lora
    from fused_lora.nf4 import quantize_nf4

    dtype = torch.bfloat16
    inp = make_inputs(37, 41, 33, r, dtype, device, bias=bias, seed=r)
    grad = inp.pop("grad")
    weight = inp.pop("weight")
    dense = weight
    if weight_kind != "dense":
        weight = quantize_nf4(weight)
        dense = weight.dequantize_torch(dtype)  # bitsandbytes' values: what both paths multiply with
        monkeypatch.setattr(lora, "NF4_FUSED_MAX_TOKENS", 64 if weight_kind == "nf4-fused" else 16)

    def run(fn, dtype=None, w=weight):
        leaves = inp if dtype is None else {k: (v.to(dtype) if v is not None else None) for k, v in inp.items()}
        return outputs_and_grads(lambda **t: fn(weight=w if dtype is None else w.to(dtype), **t), leaves,
                                 grad if dtype is None else grad.to(dtype))

    out = run(fused_fn(backend, 1.7, p, seed=3))
    baseline = run(_reference_fn(1.7, p, seed=3, dtype=dtype), w=dense)
    ref = run(_reference_fn(1.7, p, seed=3), dtype=torch.float64, w=dense)
    assert set(out) == set(ref) == {"y", "x", "lora_A", "lora_B", *(["bias"] if bias else [])}
    for name in out:
        assert out[name].dtype == dtype, name
        assert_three_way(out[name], baseline[name], ref[name], name)
    if device == "cpu":  # (the CUDA torch path computes in bf16, rounding y twice: no fp32 policy there)
        with use_cpu_half_compute("fp32"):
            torch_path = run(fused_fn("torch", 1.7, p, seed=3))
        for name in out:
            assert_rounding_flips_only(out[name], torch_path[name], name)


@pytest.mark.gpu_check
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_3d_input_and_frozen_weight_gradient(device, backend):
    """[batch, seq, in] inputs; W and bias gradients when the user unfroze them (never dropped silently)."""
    inp = make_inputs(None, 40, 24, 8, torch.float32, device, lead=(3, 5))
    grad = inp.pop("grad")
    names = ("x", "weight", "lora_A", "lora_B", "bias")
    out = outputs_and_grads(fused_fn(backend, 0.5, 0.2, seed=3), inp, grad, requires=names)
    ref = outputs_and_grads(_reference_fn(0.5, 0.2, seed=3), {k: v.double() for k, v in inp.items()}, grad.double(),
                            requires=names)
    assert out["y"].shape == (3, 5, 24) and out["x"].shape == (3, 5, 40)
    with use_backend(backend):  # the output is a plain tensor, not a view of a 2-D one (FSDP2 warns about views)
        assert not fused_lora_linear(inp["x"], inp["weight"], inp["lora_A"], inp["lora_B"], 0.5)._is_view()
    for name in ("y",) + names:
        assert_close_fp32(out[name], ref[name], name)


def _strided_views(layout, x, weight):
    """Leaves (what gradients are taken for) and the strided views of them that the op receives."""
    M, K = x.shape
    if layout == "x_sliced":  # every other column of a wider buffer
        leaf = torch.zeros(M, 2 * K, dtype=x.dtype, device=x.device)
        leaf[:, ::2] = x
        return leaf, lambda t: t[:, ::2], weight, lambda w: w
    if layout == "x_transposed":  # column-major activations
        return x.t().contiguous(), lambda t: t.t(), weight, lambda w: w
    if layout == "x_expanded":  # one row broadcast over M (stride 0)
        return x[:1].clone(), lambda t: t.expand(M, K), weight, lambda w: w
    # a Conv1D-style [in, out] weight storage, read transposed
    return x, lambda t: t, weight.t().contiguous(), lambda w: w.t()


@pytest.mark.gpu_check
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("layout", ["x_sliced", "x_transposed", "x_expanded", "w_transposed"])
def test_non_contiguous_inputs(device, backend, layout):
    """Strided views are read in place (explicit strides in the kernels); outputs and gradients match."""
    inp = make_inputs(19, 36, 28, 4, torch.float32, device)
    grad = inp.pop("grad")
    x_leaf, x_view, w_leaf, w_view = _strided_views(layout, inp["x"], inp["weight"])
    results = []
    for fn, dtype in ((fused_fn(backend, 1.0, 0.3, seed=9), torch.float32),
                      (_reference_fn(1.0, 0.3, seed=9), torch.float64)):
        xl = x_leaf.to(dtype).detach().requires_grad_(True)
        wl = w_leaf.to(dtype).detach().requires_grad_(True)
        x, w = x_view(xl), w_view(wl)
        if dtype == torch.float32:
            assert not (x.is_contiguous() and w.is_contiguous())
        y = fn(x, w, inp["lora_A"].to(dtype), inp["lora_B"].to(dtype), inp["bias"].to(dtype))
        y.backward(grad.to(dtype))
        results.append((y.detach(), xl.grad, wl.grad))
    for name, out, ref in zip(("y", "x.grad", "weight.grad"), *results):
        assert_close_fp32(out, ref, name)


@pytest.mark.gpu_check
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_non_contiguous_grad_output(device, backend):
    """A broadcast (stride-0) upstream gradient, as produced by y.sum().backward()."""
    inp = make_inputs(7, 20, 12, 4, torch.float32, device)
    inp.pop("grad")
    leaves = {k: v.clone().requires_grad_(k != "weight") for k, v in inp.items()}
    fused_fn(backend, 2.0, 0.0, seed=0)(**leaves).sum().backward()
    ref_leaves = {k: v.double().clone().requires_grad_(k != "weight") for k, v in inp.items()}
    _reference_fn(2.0, 0.0, 0)(**ref_leaves).sum().backward()
    for k in ("x", "lora_A", "lora_B", "bias"):
        assert_close_fp32(leaves[k].grad, ref_leaves[k].grad, k)


@pytest.mark.gpu_check
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_backends_agree_with_dropout(device, backend):
    """Same seed -> same mask on both backends: outputs and gradients agree to fp32 rounding."""
    inp = make_inputs(37, 100, 60, 8, torch.float32, device)
    grad = inp.pop("grad")
    out = outputs_and_grads(fused_fn(backend, 2.0, 0.4, seed=1234), inp, grad)
    ref = outputs_and_grads(fused_fn("torch", 2.0, 0.4, seed=1234), inp, grad)
    for name in out:
        assert_close_fp32(out[name], ref[name], name)
    # a different seed really changes the result (the mask matters)
    other = outputs_and_grads(fused_fn(backend, 2.0, 0.4, seed=1235), inp, grad)
    assert (other["lora_A"] - out["lora_A"]).abs().max() > 1e-3


@pytest.mark.gpu_check
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_seed_from_default_generator(device, backend):
    inp = make_inputs(8, 32, 16, 4, torch.float32, device)
    inp.pop("grad")
    with use_backend(backend):
        torch.manual_seed(7)
        a = fused_lora_linear(**inp, scaling=1.0, dropout_p=0.5)
        b = fused_lora_linear(**inp, scaling=1.0, dropout_p=0.5)
        torch.manual_seed(7)
        c = fused_lora_linear(**inp, scaling=1.0, dropout_p=0.5)
        evaluation = fused_lora_linear(**inp, scaling=1.0, dropout_p=0.5, training=False)
    assert torch.equal(a, c)
    assert not torch.equal(a, b)
    assert_close_fp32(evaluation, lora_reference(**{k: v.double() for k, v in inp.items()}, scaling=1.0, keep=None, p=0.0))


@pytest.mark.gpu_check
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_saved_tensors(device, backend, p):
    """Saved for backward: x itself (no copy), W, A, B, the [M, r] product and (with dropout) the 0-dim seed:
    nothing else of size M x in."""
    M, K, N, r = 24, 40, 56, 8
    inp = make_inputs(M, K, N, r, torch.float32, device)
    inp.pop("grad")
    x = inp["x"].requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fused_fn(backend, 1.0, p, seed=1)(x, inp["weight"], inp["lora_A"].requires_grad_(True),
                                             inp["lora_B"].requires_grad_(True), inp["bias"])
    big = [t for t in saved if t.numel() >= M * K]
    assert len(big) == 2, [tuple(t.shape) for t in saved]  # x and W (W is 56 x 40 here)
    x_saved = [t for t in big if tuple(t.shape) == (M, K)]
    assert len(x_saved) == 1 and x_saved[0].data_ptr() == x.data_ptr()
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(M, K), (N, K), (r, K), (N, r), (M, r)] + ([()] if p > 0 else []))
    y.sum().backward()


@pytest.mark.gpu_check
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_empty_batch(device, backend):
    inp = make_inputs(1, 16, 8, 4, torch.float32, device)
    inp.pop("grad")
    for shape in [(0, 16), (2, 0, 16)]:
        x = torch.randn(*shape, device=device, requires_grad=True)
        A = inp["lora_A"].clone().requires_grad_(True)
        B = inp["lora_B"].clone().requires_grad_(True)
        with use_backend(backend):
            y = fused_lora_linear(x, inp["weight"], A, B, 2.0, bias=inp["bias"], dropout_p=0.1)
        assert y.shape == shape[:-1] + (8,)
        y.sum().backward()
        assert x.grad.shape == x.shape
        assert torch.count_nonzero(A.grad) == 0 and torch.count_nonzero(B.grad) == 0


def _require_cpu_half_compute(policy, dtype):
    """Skip the native policy for a half dtype where the CPU has no matrix units for it: PyTorch's half-precision
    GEMMs there are 10-150x slower than fp32 (the policy still works, it is only slow)."""
    from fused_lora import torch_ops

    if policy == "native" and dtype in (torch.float16, torch.bfloat16) and not torch_ops._cpu_has_native(dtype):
        pytest.skip(f"this CPU has no native {dtype} matrix units (bf16: AVX512-BF16 or AMX, fp16: AMX-FP16)")


@pytest.mark.parametrize("dtype,policy", [(torch.float32, "auto"), (torch.bfloat16, "fp32"),
                                          (torch.bfloat16, "native")])
@pytest.mark.parametrize("need_dx", [True, False])
def test_torch_path_mask_blocks(monkeypatch, dtype, policy, need_dx):
    """The CPU torch path applies dropout over blocks of rows (normally ~1 MiB of mask each, so small inputs have
    one): blocks of 16 rows over M = 37 (two full blocks and a remainder) when it computes in fp32, with and without
    dx; every gradient, W's included, against the float64 reference (bf16: the three-way rule). With the native
    half-precision policy the whole mask is one block (its dA partial sums would round in bf16)."""
    from fused_lora import torch_ops, use_cpu_half_compute

    _require_cpu_half_compute(policy, dtype)
    monkeypatch.setattr(torch_ops, "_MASK_BLOCK_BYTES", 16 * 100 * 4)
    with use_cpu_half_compute(policy):
        cdt = torch_ops.compute_dtype(torch.empty(0, dtype=dtype))
        assert cdt == (dtype if policy == "native" else torch.float32)
        assert torch_ops._mask_block_rows(37, 100, cdt) == (37 if policy == "native" else 16)
        inp = make_inputs(37, 100, 72, 8, dtype, "cpu")
        grad = inp.pop("grad")
        names = ("x", "weight", "lora_A", "lora_B", "bias") if need_dx else ("weight", "lora_A", "lora_B", "bias")
        out = outputs_and_grads(fused_fn("torch", 1.3, 0.25, seed=21), inp, grad, requires=names)
    ref = outputs_and_grads(_reference_fn(1.3, 0.25, seed=21), {k: v.double() for k, v in inp.items()},
                            grad.double(), requires=names)
    baseline = None
    if dtype != torch.float32:
        baseline = outputs_and_grads(_reference_fn(1.3, 0.25, seed=21, dtype=dtype), inp, grad, requires=names)
    assert set(out) == {"y", *names}
    for name in out:
        assert out[name].dtype == dtype, name
        if baseline is None:
            assert_close_fp32(out[name], ref[name], name)
        else:
            assert_three_way(out[name], baseline[name], ref[name], name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("policy", ["fp32", "native"])
def test_torch_path_cpu_half_compute_policies(monkeypatch, dtype, policy):
    """Both CPU half-precision policies, whatever this host's default: the torch path multiplies in the dtype
    the policy names (checked on the GEMM calls themselves), the backward follows the policy of its forward even
    when another is in force, and outputs and gradients pass the three-way rule against float64."""
    from fused_lora import use_cpu_half_compute

    _require_cpu_half_compute(policy, dtype)
    want = dtype if policy == "native" else torch.float32
    other = "native" if policy == "fp32" else "fp32"
    seen = []
    real_mm = torch.mm

    def spy_mm(a, b, *args, **kwargs):
        seen.append((a.dtype, b.dtype))
        return real_mm(a, b, *args, **kwargs)

    inp = make_inputs(37, 100, 33, 8, dtype, "cpu")
    grad = inp.pop("grad")
    with use_cpu_half_compute(policy):
        leaves = {k: v.clone().requires_grad_(k != "weight") for k, v in inp.items()}
        y = fused_fn("torch", 2.0, 0.1, seed=8)(**leaves)
    with use_cpu_half_compute(other), monkeypatch.context() as patch:
        patch.setattr(torch, "mm", spy_mm)  # the torch path's masked products and dx GEMM go through torch.mm
        y.backward(grad)
    assert seen and all(d == (want, want) for d in seen), seen
    out = {"y": y.detach(), **{k: v.grad for k, v in leaves.items() if v.grad is not None}}
    baseline = outputs_and_grads(_reference_fn(2.0, 0.1, seed=8, dtype=dtype), inp, grad)
    ref = outputs_and_grads(_reference_fn(2.0, 0.1, seed=8), {k: v.double() for k, v in inp.items()}, grad.double())
    assert set(out) == set(ref)
    for name in out:
        assert out[name].dtype == dtype, name
        assert_three_way(out[name], baseline[name], ref[name], name)


def test_gradcheck_float64_torch_path():
    """Analytical gradients of the torch path against finite differences, dropout and bias included."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, 7, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    with use_backend("torch"):
        for p in (0.0, 0.4):
            fn = lambda x, w, a, b, bias: fused_lora_linear(x, w, a, b, 1.5, bias=bias, dropout_p=p, seed=99)
            assert torch.autograd.gradcheck(fn, (x, w, a, b, bias))


@pytest.mark.skipif(not INTERPRETING, reason="the per-configuration sweep runs in the Triton interpreter")
def test_every_shipped_config_in_interpreter():
    """Each shipped launch configuration of each kernel gives the torch path's result. Boundary masks, the rank
    loop / rank grid (r = 80: one full 64-wide rank tile and a partial one), grouped ordering and the split-M dA
    reduction are configuration dependent; the shape spans at least two of the largest tiles in every dimension.
    The other kernels run with their largest tiles meanwhile, which keeps the interpreter fast. The "-nf4"
    tilings run with an NF4 weight and a token count that takes the in-loop dequantization path, the "-fp32a" ones
    with fp32 adapters."""
    import contextlib

    from fused_lora.kernels import lora

    from fused_lora.nf4 import quantize_nf4

    K, N, r = 264, 260, 80
    for launcher in lora.LAUNCHERS:
        for family, configs in launcher.configs.items():
            dtype = torch.float16 if family.startswith("half") else torch.float32
            nf4 = family.endswith("-nf4")  # tilings of the GEMMs that dequantize an NF4 W in their main loop
            M = lora.NF4_FUSED_MAX_TOKENS - 28 if nf4 else 136
            inp = make_inputs(M, K, N, r, dtype, "cpu")
            grad = inp.pop("grad")
            weight = quantize_nf4(inp.pop("weight")) if nf4 else inp.pop("weight")
            if family.endswith("-fp32a"):  # tilings of the GEMMs converting fp32 adapter tiles
                inp["lora_A"], inp["lora_B"] = inp["lora_A"].float(), inp["lora_B"].float()

            def run(backend):
                fn = fused_fn(backend, 1.5, 0.2, seed=4)
                return outputs_and_grads(lambda **t: fn(weight=weight, **t), inp, grad)

            ref = run("torch")
            for cfg in configs:
                with contextlib.ExitStack() as stack:
                    for other in lora.LAUNCHERS:
                        stack.enter_context(other.forced(cfg if other is launcher else other.configs["half"][0]))
                    out = run("triton")
                for name in out:
                    scale = ref[name].double().abs().max().item()
                    err = (out[name].double() - ref[name].double()).abs().max().item()
                    tol = FP16_SWEEP_RTOL if dtype == torch.float16 else FP32_RTOL
                    assert err <= tol * scale, f"{launcher.name} {family} {cfg} {name}: {err:.2e} vs {scale:.2e}"


# fp16 kernel vs fp16 torch path (which computes in fp32 on CPU and rounds once): both round xa, gb and the
# output to fp16, at different points; a few fp16 ulps (2**-10 each) of the largest value bound the difference.
FP16_SWEEP_RTOL = 4 * 2.0**-10


@pytest.mark.gpu_check
@pytest.mark.parametrize("device", [device for device, backend in DEVICE_BACKENDS if backend == "triton"])
def test_deterministic_mode_matches_atomic_mode(device):
    """torch's deterministic mode: the dB / dbias reduction over per-row-block partial sums instead of atomics gives
    bit-identical gradients run after run, equal to the atomic mode's up to fp32 summation order (the Triton
    kernels: in the interpreter on CPU, compiled on CUDA)."""
    inp = make_inputs(70, 64, 90, 16, torch.float32, device)
    grad = inp.pop("grad")
    atomic = outputs_and_grads(fused_fn("triton", 1.0, 0.1, seed=2), inp, grad)
    torch.use_deterministic_algorithms(True)
    try:
        det1 = outputs_and_grads(fused_fn("triton", 1.0, 0.1, seed=2), inp, grad)
        det2 = outputs_and_grads(fused_fn("triton", 1.0, 0.1, seed=2), inp, grad)
    finally:
        torch.use_deterministic_algorithms(False)
    for name in atomic:
        assert torch.equal(det1[name], det2[name]), name
        assert_close_fp32(det1[name], atomic[name], name)


# ----------------------------------------------------------------------------------------------------------------
# input validation
# ----------------------------------------------------------------------------------------------------------------


def _valid(**over):
    base = dict(
        x=torch.randn(4, 8), weight=torch.randn(6, 8), lora_A=torch.randn(2, 8), lora_B=torch.randn(6, 2),
        scaling=2.0, bias=torch.randn(6),
    )
    base.update(over)
    return base


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(x=torch.randn(4, 9)), ValueError, r"x has 9 features .* in_features=8"),
        (dict(x=torch.tensor(1.0)), ValueError, r"0-dim"),
        (dict(lora_A=torch.randn(0, 8), lora_B=torch.randn(6, 0)), ValueError, r"rank r must be >= 1"),
        (dict(lora_A=torch.randn(2, 7)), ValueError, r"lora_A has shape \[2, 7\]"),
        (dict(lora_B=torch.randn(6, 3)), ValueError, r"lora_B has shape \[6, 3\]; expected \[out_features, r\] = \[6, 2\]"),
        (dict(weight=torch.randn(6, 8, 1)), ValueError, r"weight must be 2-D"),
        (dict(bias=torch.randn(5)), ValueError, r"bias has shape \[5\]"),
        (dict(lora_A=torch.randn(2, 8, dtype=torch.float64)), TypeError,
         r"dtype mismatch: lora_A is torch.float64 but lora_B is torch.float32"),
        (dict(weight=torch.randn(6, 8, dtype=torch.float64)), TypeError,
         r"dtype mismatch: x is torch.float32 but weight is torch.float64"),
        (dict(x=torch.randn(4, 8).half()), TypeError, r"dtype mismatch"),
        (dict(x=torch.randint(0, 3, (4, 8))), TypeError, r"x has dtype torch.int64"),
        (dict(scaling=float("nan")), ValueError, r"scaling=nan must be a finite number"),
        (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
        (dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
        (dict(x=[[1.0] * 8]), TypeError, r"x must be a torch.Tensor"),
    ],
)
def test_bad_input_errors(over, exc, match):
    with pytest.raises(exc, match=match):
        fused_lora_linear(**_valid(**over))


def test_device_mismatch_error():
    meta_w = torch.randn(6, 8, device="meta")
    with pytest.raises(ValueError, match=r"device mismatch: x is on cpu but weight is on meta"):
        fused_lora_linear(**_valid(weight=meta_w))


def test_triton_rejects_float64():
    if not INTERPRETING:
        pytest.skip("needs the Triton kernels runnable on CPU tensors")
    with use_backend("triton"), pytest.raises(TypeError, match="float64"):
        args = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in _valid().items()}
        fused_lora_linear(**args)


def test_autocast_casts_inputs():
    inp = make_inputs(6, 16, 12, 4, torch.float32, "cpu")
    inp.pop("grad")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused_lora_linear(**inp, scaling=1.0)
    assert y.dtype == torch.bfloat16
    ref = lora_reference(**{k: v.to(torch.bfloat16).double() for k, v in inp.items()}, scaling=1.0, keep=None, p=0.0)
    assert (y.double() - ref).abs().max() <= 2 * 2.0**-7 * ref.abs().max()
