"""DoRA on the torch path (fused_lora.dora): the row-norm identity and its fallback, and DoraFunction against PEFT's
DoRA layer (p = 0), an independent float64 reference of PEFT's definition (p > 0), gradcheck and saved tensors."""

from __future__ import annotations

import pytest
import torch

from fused_lora import fused_lora_linear
from fused_lora.dora import dora_row_norm_sq, weight_row_norm_sq
from fused_lora.dropout import Dropout

from helpers import HALF_EPS, assert_close_fp32, assert_three_way

M, K, N, R = 24, 40, 32, 4
SCALING = 1.5
NAMES = ("x", "lora_A", "lora_B", "magnitude", "bias")


def _inputs(dtype, seed=0, m=M, k=K, n=N, r=R):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    weight = rnd(n, k, scale=k ** -0.5)
    inp = dict(x=rnd(m, k), weight=weight, lora_A=rnd(r, k, scale=k ** -0.5), lora_B=rnd(n, r, scale=r ** -0.5),
               bias=rnd(n))
    # magnitude perturbed away from its init ||W_i||, so that c != 1 even where B A is small
    inp["magnitude"] = (weight.double().norm(dim=1) * (1 + 0.3 * torch.rand(n, generator=gen, dtype=torch.float64))
                        ).to(dtype)
    return inp, rnd(m, n)


def _reference(x, weight, lora_A, lora_B, magnitude, bias, scaling, keep=None, p=0.0):
    """PEFT's DoRA definition in float64, written independently of fused_lora (only the mask comes from outside)."""
    x, weight, lora_A, lora_B, magnitude = (t.double() for t in (x, weight, lora_A, lora_B, magnitude))
    with torch.no_grad():  # n detached
        n = torch.linalg.norm(weight + scaling * lora_B.detach() @ lora_A.detach(), dim=1)
    c = magnitude / n
    xd = x if keep is None else x * keep.double() / (1 - p)
    y = x @ weight.t() + (c - 1) * (xd @ weight.t()) + c * scaling * (xd @ lora_A.t() @ lora_B.t())
    return y if bias is None else y + bias.double()


def _run(fn, inp, grad):
    leaves = {k: v.detach().clone().requires_grad_(k in NAMES) for k, v in inp.items()}
    y = fn(**leaves)
    y.backward(grad.to(y.dtype))
    return {"y": y.detach(), **{k: leaves[k].grad for k in NAMES}}


def _fused(p=0.0, seed=None):
    def fn(x, weight, lora_A, lora_B, magnitude, bias):
        return fused_lora_linear(x, weight, lora_A, lora_B, SCALING, bias=bias, dropout_p=p, seed=seed,
                                 magnitude=magnitude)
    return fn


def _peft_layer(inp):
    import peft
    from peft.tuners.lora import Linear

    dtype = inp["x"].dtype
    base = torch.nn.Linear(K, N, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(inp["weight"])
        base.bias.copy_(inp["bias"])
    cfg = peft.LoraConfig(r=R, lora_alpha=SCALING * R, use_dora=True, lora_dropout=0.0)
    layer = Linear(base, "default", cfg, r=R, lora_alpha=SCALING * R, use_dora=True, lora_dropout=0.0)
    assert layer.scaling["default"] == SCALING
    return layer


def _peft_outputs(inp, grad):
    layer = _peft_layer(inp)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(inp["lora_A"])
        layer.lora_B["default"].weight.copy_(inp["lora_B"])
        layer.lora_magnitude_vector["default"].weight.copy_(inp["magnitude"])
    x = inp["x"].clone().requires_grad_(True)
    y = layer(x)
    y.backward(grad.to(y.dtype))
    return {"y": y.detach(), "x": x.grad, "lora_A": layer.lora_A["default"].weight.grad,
            "lora_B": layer.lora_B["default"].weight.grad,
            "magnitude": layer.lora_magnitude_vector["default"].weight.grad, "bias": layer.base_layer.bias.grad}


def test_peft_parity_fp32():
    inp, grad = _inputs(torch.float32)
    ours = _run(_fused(), inp, grad)
    theirs = _peft_outputs(inp, grad)
    ref = _run(_reference_fn(), {k: v.double() for k, v in inp.items()}, grad.double())
    for name in ("y",) + NAMES:
        assert_close_fp32(ours[name], theirs[name], name)
        assert_close_fp32(ours[name], ref[name], name)  # and PEFT is itself this close to the definition


def test_peft_parity_bf16_three_way():
    inp, grad = _inputs(torch.bfloat16)
    ours = _run(_fused(), inp, grad)
    theirs = _peft_outputs(inp, grad)
    ref = _run(_reference_fn(), {k: v.double() for k, v in inp.items()}, grad.double())
    for name in ("y",) + NAMES:
        assert ours[name].dtype == torch.bfloat16, name
        assert_three_way(ours[name], theirs[name], ref[name], name)


def _reference_fn(keep=None, p=0.0):
    def fn(x, weight, lora_A, lora_B, magnitude, bias):
        return _reference(x, weight, lora_A, lora_B, magnitude, bias, SCALING, keep, p)
    return fn


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_against_float64_reference(p):
    seed = 1234
    inp, grad = _inputs(torch.float32, seed=1)
    keep = Dropout(p, seed).keep_mask(M, K, "cpu")
    assert 0 < int(keep.sum()) < keep.numel()
    ours = _run(_fused(p, seed), inp, grad)
    ref = _run(_reference_fn(keep, p), {k: v.double() for k, v in inp.items()}, grad.double())
    for name in ("y",) + NAMES:
        assert_close_fp32(ours[name], ref[name], name)
    # the dropout changes the result (the mask is really applied, to both D(x) products)
    plain = _run(_fused(), inp, grad)
    assert (plain["y"] - ours["y"]).abs().max() > 1e-2


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gradcheck_float64(p, monkeypatch):
    """Finite differences in float64 for x, A, B, m and bias. n is detached by definition, so its value is frozen
    at the base point for the finite differences too (they would otherwise see n move with A and B)."""
    import fused_lora.dora as dora

    inp, _ = _inputs(torch.float64, seed=2, m=5, k=7, n=6, r=3)
    leaves = [inp[k].clone().requires_grad_(True) for k in NAMES]
    weight = inp["weight"]
    seed = None if p == 0 else 99
    frozen = dora.dora_row_norm_sq(weight_row_norm_sq(weight), weight, inp["lora_A"], inp["lora_B"], SCALING)
    monkeypatch.setattr(dora, "dora_row_norm_sq", lambda *args, **kwargs: frozen.clone())

    def fn(x, a, b, mag, bias):
        return fused_lora_linear(x, weight, a, b, SCALING, bias=bias, dropout_p=p, seed=seed, magnitude=mag)

    assert torch.autograd.gradcheck(fn, tuple(leaves))


def test_norm_identity_random():
    for seed, dtype in [(0, torch.float32), (1, torch.float32), (2, torch.float64), (3, torch.bfloat16)]:
        inp, _ = _inputs(dtype, seed=seed, k=300, n=50, r=8)
        w, a, b = inp["weight"], inp["lora_A"], inp["lora_B"]
        exact = torch.linalg.norm(w.double() + SCALING * b.double() @ a.double(), dim=1) ** 2
        n_sq, rows = dora_row_norm_sq(weight_row_norm_sq(w), w, a, b, SCALING, return_fallback_rows=True)
        assert n_sq.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert not rows.any()  # no cancellation here: the identity alone
        rtol = 1e-12 if dtype == torch.float64 else 1e-5
        assert ((n_sq.double() - exact).abs() / exact).max() < rtol
        # the callable form (a weight dequantized on demand) gives the same values
        assert torch.equal(dora_row_norm_sq(weight_row_norm_sq(w), lambda: w, a, b, SCALING), n_sq)


def test_norm_near_cancellation_falls_back():
    k, n, r, s = 512, 16, 8, 2.0
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(r, k, generator=gen, dtype=torch.float64) / k ** 0.5
    b = torch.randn(n, r, generator=gen, dtype=torch.float64) / r ** 0.5
    w = torch.randn(n, k, generator=gen, dtype=torch.float64) / k ** 0.5
    tiny = [1, 4, 9]  # W_i ~ -s B_i A: n_i about 1e-4 of ||W_i||
    w[tiny] = -s * b[tiny] @ a + 1e-4 * torch.randn(len(tiny), k, generator=gen, dtype=torch.float64) / k ** 0.5
    w32, a32, b32 = w.float(), a.float(), b.float()
    exact = torch.linalg.norm(w32.double() + s * b32.double() @ a32.double(), dim=1) ** 2  # of the fp32 data
    assert (exact[tiny] / (w32.double()[tiny].norm(dim=1) ** 2)).max() < 1e-6

    wsq = weight_row_norm_sq(w32)
    n_sq, rows = dora_row_norm_sq(wsq, w32, a32, b32, s, return_fallback_rows=True)
    assert rows.nonzero().squeeze(1).tolist() == tiny
    rel = (n_sq.double() - exact).abs() / exact
    assert rel.max() < 1e-5, rel
    alone = dora_row_norm_sq(wsq, w32, a32, b32, s, fallback=False)
    rel_alone = (alone.double() - exact).abs() / exact
    assert rel_alone[tiny].min() > 1e-1, rel_alone[tiny]  # the identity alone has no correct digit there
    other = [i for i in range(n) if i not in tiny]
    assert torch.equal(alone[other], n_sq[other])

    # without a host-side branch (the GPU path, forced here): the identity in float64, the flagged rows recomputed
    # among a bounded set chosen on the device -- no value read back to the host (each would wait for a GPU)
    with _no_host_reads():
        free = dora_row_norm_sq(wsq, w32, a32, b32, s, sync_free=True)
    assert free.dtype == torch.float32
    assert ((free.double() - exact).abs() / exact).max() < 1e-5
    # and the float64 identity alone, with ||W_i||^2 in float64 (what weight_row_norm_sq gives off the CPU): good to
    # far beyond fp32's fallback threshold (kappa ~ 1e8 here)
    alone64 = dora_row_norm_sq(weight_row_norm_sq(w32.double()), w32, a32, b32, s, sync_free=True, fallback=False)
    assert ((alone64.double() - exact).abs() / exact).max() < 1e-5


class _no_host_reads:
    """Inside: reading a tensor's value on the host (bool, item, tolist, nonzero) raises."""

    _names = ("__bool__", "item", "tolist", "nonzero")

    def __enter__(self):
        self._saved = {name: getattr(torch.Tensor, name) for name in self._names}

        def refuse(*args, **kwargs):
            raise AssertionError("a host-side read of a tensor value")

        for name in self._names:
            setattr(torch.Tensor, name, refuse)

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(torch.Tensor, name, fn)


def test_no_fallback_for_rows_that_do_not_cancel_at_high_rank():
    """The estimate uses the computed ||s B_i A||: at r = 128, with ||s B A|| a third of ||W|| and no cancellation
    (n_i >= ||W_i||), no row is sent to the fallback (the triangle bound sum_j |B_ij| ||A_j|| would flag them all at
    K = 4096, whose threshold is kappa > 8)."""
    gen = torch.Generator().manual_seed(8)
    k, n, r = 4096, 64, 128
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    a = torch.randn(r, k, generator=gen) / k ** 0.5
    b = torch.randn(n, r, generator=gen) / r ** 0.5
    s = 0.3 * (w.norm(dim=1) / (b @ a).norm(dim=1)).mean().item()
    n_sq, rows = dora_row_norm_sq(weight_row_norm_sq(w), w, a, b, s, return_fallback_rows=True)
    exact = torch.linalg.norm(w.double() + s * b.double() @ a.double(), dim=1) ** 2
    assert not rows.any()
    assert ((n_sq.double() - exact).abs() / exact).max() < 1e-5


@pytest.mark.parametrize("k", [128, 96])  # 96: the NF4 blocks of 64 straddle rows, row blocks align to 2 rows
def test_nf4_norms_by_row_blocks(k, monkeypatch):
    """An NF4 W is dequantized block by block of rows for ||W_i||^2, W A^T and the fallback rows (never whole): the
    same values as from the whole dequantized weight."""
    import fused_lora.dora as dora
    import fused_lora.nf4 as nf4
    from fused_lora.nf4 import quantize_nf4

    gen = torch.Generator().manual_seed(9)
    n, r, s = 50, 4, 1.5
    weight = quantize_nf4(torch.randn(n, k, generator=gen) / k ** 0.5, blocksize=64)
    a = torch.randn(r, k, generator=gen) / k ** 0.5
    b = torch.randn(n, r, generator=gen)
    dense = weight.dequantize(torch.bfloat16)
    monkeypatch.setitem(dora._BLOCK_BYTES, "cpu", 8 * k * 6)  # 6 rows per block
    sizes = []
    original = nf4.dequantize_operands

    def recording(w, dtype):
        sizes.append(w.shape[0])
        return original(w, dtype)

    monkeypatch.setattr(nf4, "dequantize_operands", recording)
    wsq = weight_row_norm_sq(weight, torch.bfloat16)
    assert torch.equal(wsq, weight_row_norm_sq(dense))
    n_sq = dora_row_norm_sq(wsq, weight, a, b, s, dtype=torch.bfloat16)
    assert torch.allclose(n_sq, dora_row_norm_sq(wsq, dense, a, b, s), rtol=1e-6, atol=0)
    assert sizes and max(sizes) < n
    idx = torch.tensor([0, 7, n - 1])
    assert torch.equal(dora._Rows(weight, torch.bfloat16).gather(idx), dense[idx])  # the fallback's rows


def test_weight_norm_cache_entries():
    """One entry per device, read and written as one tuple: weights taking turns on a device are each recomputed,
    never served the other's norm; an in-place change through the tensor is seen."""
    from fused_lora.dora import WeightNormCache

    cache = WeightNormCache()
    w1, w2 = torch.randn(6, 5), torch.randn(6, 5)
    for _ in range(3):
        assert torch.equal(cache.get(w1), weight_row_norm_sq(w1))
        assert torch.equal(cache.get(w2), weight_row_norm_sq(w2))
    first = cache.get(w1)
    assert cache.get(w1) is first
    with torch.no_grad():
        w1.mul_(2)
    assert torch.equal(cache.get(w1), weight_row_norm_sq(w1))


def test_saved_tensors_with_dropout():
    inp, grad = _inputs(torch.float32, seed=3)
    x = inp["x"].requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    leaves = {k: inp[k].clone().requires_grad_(True) for k in ("lora_A", "lora_B", "magnitude", "bias")}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fused_lora_linear(x, inp["weight"], leaves["lora_A"], leaves["lora_B"], SCALING, bias=leaves["bias"],
                              dropout_p=0.3, seed=7, magnitude=leaves["magnitude"])
    assert K > N  # so that z [M, N] is told apart from an M x K tensor by its size
    # of x's size or more: only x itself and the frozen W (N x K, larger than x here)
    big = sorted((tuple(t.shape), t.data_ptr()) for t in saved if t.numel() >= x.numel())
    assert big == sorted([((M, K), x.data_ptr()), ((N, K), inp["weight"].data_ptr())]), big
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(M, K), (N, K), (R, K), (N, R), (M, R), (M, N), (N,), (N,), ()])
    y.backward(grad)
    assert all(v.grad is not None for v in leaves.values()) and x.grad is not None


def test_frozen_weight_required():
    inp, _ = _inputs(torch.float32)
    with pytest.raises(ValueError, match="frozen"):
        fused_lora_linear(inp["x"], inp["weight"].requires_grad_(True), inp["lora_A"], inp["lora_B"], SCALING,
                          magnitude=inp["magnitude"])


# ----------------------------------------------------------------------------------------------------------------
# The Triton kernels (interpreter on CPU, compiled on CUDA) against the torch path and the float64 reference, with
# the same dropout mask: each DoRA variant of the forward / dgrad GEMMs (column-scale epilogue; with dropout, two
# accumulators) and of grad_out (scaled g, dm column sums), dense and NF4 bases (in the GEMMs' main loop and
# through the dequantized buffer), fp32 adapters over bf16, torch's deterministic mode.
# ----------------------------------------------------------------------------------------------------------------

from conftest import DEVICE_BACKENDS  # noqa: E402

TRITON_DEVICES = [device for device, backend in DEVICE_BACKENDS if backend == "triton"]

# (x dtype, adapter dtype, p, base, deterministic); M = 40 rows: one or three row tiles of the interpreter's 16
KERNEL_CASES = [
    (torch.float32, torch.float32, 0.0, "dense", False),
    (torch.float32, torch.float32, 0.3, "dense", False),
    (torch.float32, torch.float32, 0.3, "nf4-in-loop", True),
    (torch.float32, torch.float32, 0.0, "nf4-dequantized", False),
    (torch.bfloat16, torch.bfloat16, 0.0, "dense", True),
    (torch.bfloat16, torch.float32, 0.3, "dense", False),
    (torch.bfloat16, torch.float32, 0.0, "nf4-in-loop", False),
    (torch.float32, torch.float32, 0.3, "dense-r80", True),  # two rank tiles: dm's sums from one of them only
]


def _kernel_case_inputs(dtype, adapter_dtype, device, base, m=40, k=72, n=48):
    r = 80 if base.endswith("-r80") else 5
    inp, grad = _inputs(torch.float32, seed=7, m=m, k=k, n=n, r=r)
    weight = inp.pop("weight")
    if not base.startswith("dense"):
        from fused_lora.nf4 import quantize_nf4

        weight = quantize_nf4(weight, blocksize=64).to(device)
        dense = weight.dequantize(dtype).float()
    else:
        weight = weight.to(dtype=dtype, device=device)
        dense = weight.float()
    cast = {"x": dtype, "bias": dtype, "lora_A": adapter_dtype, "lora_B": adapter_dtype, "magnitude": adapter_dtype}
    return {k: v.to(dtype=cast[k], device=device) for k, v in inp.items()}, weight, dense, grad.to(dtype=dtype,
                                                                                                     device=device)


@pytest.mark.gpu_check
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype,adapter_dtype,p,base,deterministic", KERNEL_CASES)
def test_triton_matches_torch_path_and_reference(device, dtype, adapter_dtype, p, base, deterministic, monkeypatch):
    import fused_lora.kernels.lora as klora
    from fused_lora import use_backend

    m = 40
    if base == "nf4-dequantized":
        monkeypatch.setattr(klora, "NF4_FUSED_MAX_TOKENS", 0)  # the dequantize kernel, then the dense GEMMs
    inp, weight, dense, grad = _kernel_case_inputs(dtype, adapter_dtype, device, base, m=m)
    seed = 21

    def fused(backend):
        def fn(x, lora_A, lora_B, magnitude, bias):
            with use_backend(backend):
                return fused_lora_linear(x, weight, lora_A, lora_B, SCALING, bias=bias, dropout_p=p, seed=seed,
                                         magnitude=magnitude)
        return fn

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        ours = _run(fused("triton"), inp, grad)
        torch_path = _run(fused("torch"), inp, grad)
    finally:
        torch.use_deterministic_algorithms(previous)
    keep = Dropout(p, seed).keep_mask(m, dense.shape[1], "cpu") if p > 0 else None
    ref_inputs = {k: v.cpu().double() for k, v in inp.items()}
    ref = _run(_reference_fn(keep, p), {**ref_inputs, "weight": dense.double()}, grad.cpu().double())
    for name in ("y",) + NAMES:
        want_dtype = {"lora_A": adapter_dtype, "lora_B": adapter_dtype, "magnitude": adapter_dtype}.get(name, dtype)
        assert ours[name].dtype == want_dtype, name
        if dtype == torch.float32:
            assert_close_fp32(ours[name], ref[name], name)
            assert_close_fp32(ours[name], torch_path[name], name)
        else:
            # the torch path in the same dtypes is the baseline of the three-way rule; the atol is x's eps also for
            # the fp32 gradients of fp32 adapters, whose error comes from the bf16 activations and xa / gb
            assert_three_way(ours[name], torch_path[name], ref[name], name, eps=HALF_EPS[dtype])
