"""Adapters in another dtype than the activations, as PEFT keeps them (``autocast_adapter_dtype=True``): fp32
``lora_A`` / ``lora_B`` over bf16 / fp16 activations, dense and NF4 bases, both backends.

* ``test_backends_round_at_the_documented_points``: with small dyadic inputs every fp32 accumulation is exact, so
  each result of either backend is *exactly* the float64 model of the rounding points that
  ``FusedLoraFunction``'s docstring states (A and B rounded to the activation dtype where they enter a product,
  ``xa`` / ``gb`` / ``y`` / ``dx`` rounded to it, dA / dB not rounded at all in fp32). Both backends equal the same
  model: this is also their parity test, bit for bit, with the same seed.
* ``test_three_way_against_peft``: random O(1) inputs, the three-way rule against float64 with PEFT's own
  computation (its fp32 LoRA branch on an fp32 copy of x) as the comparison.
* ``test_torch_path_makes_no_fp32_copy_of_x``: what the torch path allocates, recorded op by op.
* The module side: ``adapter_dtype`` of ``FusedLoraLinear`` / ``apply_lora`` / ``load_adapter`` (default: PEFT's),
  NF4 layers whose compute dtype is independent of the adapters', parity with PEFT's layers; the errors.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fused_lora import FusedLoraLinear, apply_lora, fused_lora_linear, lora_layers, torch_ops, use_backend
from fused_lora import use_cpu_half_compute
from fused_lora.dropout import Dropout
from fused_lora.nf4 import quantize_nf4

from conftest import INTERPRETING
from helpers import (
    HALF_EPS,
    assert_close_fp32,
    assert_rounding_flips_only,
    assert_three_way,
    lora_reference,
    make_inputs,
)

peft = pytest.importorskip("peft")

HALF = (torch.bfloat16, torch.float16)

# (backend, CPU half-precision policy of the torch path): the Triton kernels (interpreter) where they run.
BACKENDS = [("torch", "fp32"), ("torch", "native")] + ([("triton", "fp32")] if INTERPRETING else [])


def _fused(backend, policy, scaling, p, seed):
    def fn(x, weight, lora_A, lora_B, bias):
        with use_backend(backend), use_cpu_half_compute(policy):
            return fused_lora_linear(x, weight, lora_A, lora_B, scaling, bias=bias, dropout_p=p, seed=seed)

    return fn


def _outputs_and_grads(fn, leaves, grad, requires=("x", "lora_A", "lora_B", "bias")):
    """``{"y": output, name: gradient}`` of ``fn(**leaves)`` (fresh copies of the leaves, each keeping its dtype)."""
    leaves = {k: None if v is None else v.detach().clone().requires_grad_(k in requires) for k, v in leaves.items()}
    y = fn(**leaves)
    y.backward(grad.to(y.dtype))
    return {"y": y.detach(), **{k: leaves[k].grad for k in requires if leaves.get(k) is not None}}


def _keep(p, seed, rows, cols):
    """The 0/1 float64 mask fused-lora draws for (p, seed), or None without dropout."""
    return None if p == 0 else Dropout(p, seed).keep_mask(rows, cols, "cpu", dtype=torch.float64)


def _weight(kind, dense, monkeypatch):
    """``(weight argument, its dense values)``: the dense tensor, or its NF4 form (bitsandbytes' dequantized values
    in the activation dtype: what both backends multiply with) on the Triton path's in-loop dequantization
    ("nf4") or through a buffer ("nf4-buffer", forced by lowering NF4_FUSED_MAX_TOKENS)."""
    if kind == "dense":
        return dense, dense
    from fused_lora.kernels import lora

    monkeypatch.setattr(lora, "NF4_FUSED_MAX_TOKENS", 128 if kind == "nf4" else 16)
    nf4 = quantize_nf4(dense)
    return nf4, nf4.dequantize_torch(dense.dtype)


# ------------------------------------------------------------------------------------------------ rounding points


def _dyadic(shape, scale, gen, perturb=0.0):
    """Integers in [-8, 8] times ``scale`` (a power of two); with ``perturb``, each times ``1 + u``,
    ``perturb <= |u| < 2 * perturb``: values that round back to the integer multiple in any dtype whose half ulp
    exceeds ``2 * perturb`` relative."""
    t = torch.randint(-8, 9, shape, generator=gen).double() * scale
    if perturb:
        u = (1 + torch.rand(shape, generator=gen, dtype=torch.float64)) * perturb
        t = t * (1 + torch.where(torch.rand(shape, generator=gen) < 0.5, -u, u))
    return t


def _dyadic_inputs(M, K, N, r, act, adapters, seed=0):
    """x, g: multiples of 1/8, |.| <= 1; W: of 1/64, |.| <= 1/8; bias: of 1/8. A and B: multiples k/64 of 1/64
    (|k| <= 8) perturbed by a relative 1/16 to 1/8 of the activation dtype's eps, so that they are not
    representable in it but round to k/64 there. xa and gb are then on a 2**-9 grid (rounding them keeps that),
    and every sum of products stays below 2**22 units of its grid for M, K, N <= 64, r <= 8 (the largest: dB sums M
    products g * xa on a 2**-12 grid, each below K / 4; dA likewise with N): each fp32 accumulation of both
    backends is exact, whatever its order, and every rounding is one well-defined rounding of an exact value."""
    gen = torch.Generator().manual_seed(seed)
    eps = torch.finfo(act).eps
    return dict(
        x=_dyadic((M, K), 1 / 8, gen).to(act),
        weight=_dyadic((N, K), 1 / 64, gen).to(act),
        lora_A=_dyadic((r, K), 1 / 64, gen, perturb=eps / 16).to(adapters),
        lora_B=_dyadic((N, r), 1 / 64, gen, perturb=eps / 16).to(adapters),
        bias=_dyadic((N,), 1 / 8, gen).to(act),
    ), _dyadic((M, N), 1 / 8, gen).to(act)


def _documented_model(x, weight, lora_A, lora_B, bias, grad, scaling, keep, p):
    """FusedLoraFunction's rounding points in float64 (``rnd``: to the activation dtype ``t``): ``xa = rnd(D(x)
    rnd(A)^T)``, ``y = rnd(x W^T + s xa rnd(B)^T + bias)``, ``gb = rnd(g rnd(B))``, ``dx = rnd(g W + s D(gb rnd(A)))``,
    ``dB = s g^T xa`` and ``dA = s gb^T D(x)`` rounded once to the adapters' dtype, ``dbias = rnd(colsum g)``."""
    act = x.dtype

    def rnd(t):
        return t.to(act).double()

    x, w, g, b = x.double(), weight.double(), grad.double(), bias.double()
    a_r, b_r = rnd(lora_A.double()), rnd(lora_B.double())
    drop = (lambda t: t) if keep is None else (lambda t: t * keep / (1 - p))
    xa = rnd(drop(x) @ a_r.t())
    gb = rnd(g @ b_r)
    return {
        "y": (x @ w.t() + scaling * xa @ b_r.t() + b).to(act),
        "x": (g @ w + scaling * drop(gb @ a_r)).to(act),
        "lora_A": (scaling * gb.t() @ drop(x)).to(lora_A.dtype),
        "lora_B": (scaling * g.t() @ xa).to(lora_B.dtype),
        "bias": g.sum(0).to(act),
    }


@pytest.mark.parametrize("backend,policy", [b for b in BACKENDS if b[1] == "fp32"])
@pytest.mark.parametrize("act,adapters", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                          (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("weight_kind", ["dense", "nf4", "nf4-buffer"])
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_backends_round_at_the_documented_points(monkeypatch, backend, policy, act, adapters, weight_kind, p):
    """Every output and gradient equals the float64 model of the documented rounding points exactly (dyadic inputs:
    all fp32 accumulations exact, see ``_dyadic_inputs``; p = 0.5 and s = 2 keep the scales powers of two). With an
    NF4 weight (arbitrary dequantized values, so ``x W^T`` and ``g W`` are not exact in fp32), y and dx may differ
    from the model by rounding flips only; dA, dB and dbias do not involve W and stay exact. The Triton kernels and
    the torch path (fp32 policy) hence agree bit for bit on the dense weight. (fp32 activations: y and dx over NF4
    are fp32 sums of inexact products, within fp32 rounding of the model.)

    fp32 adapters over half activations: A and B do not fit the activation dtype and must be rounded where they
    enter a product, and dA / dB, exact fp32 values many of which have more significant bits than the activation
    dtype holds (checked), must come back unrounded. fp32 activations with bf16 adapters: the same rules, nothing to
    round but dA / dB, once, into bf16."""
    M, K, N, r, s, seed = 37, 41, 33, 8, 2.0, 17
    inp, grad = _dyadic_inputs(M, K, N, r, act, adapters)
    weight, dense = _weight(weight_kind, inp.pop("weight"), monkeypatch)
    out = _outputs_and_grads(lambda **t: _fused(backend, policy, s, p, seed)(weight=weight, **t), inp, grad)
    model = _documented_model(weight=dense, grad=grad, scaling=s, keep=_keep(p, seed, M, K), p=p, **inp)
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in model.items()}
    assert out["lora_A"].dtype == adapters and out["lora_B"].dtype == adapters and out["y"].dtype == act
    if act in HALF:  # the adapters really are off the activation grid, and dA / dB really carry more bits
        assert (inp["lora_A"].to(act).to(adapters) != inp["lora_A"]).float().mean() > 0.8
        for name in ("lora_A", "lora_B"):
            assert (model[name].to(act).to(adapters) != model[name]).float().mean() > 0.25, name
    for name in out:
        if weight_kind != "dense" and name in ("y", "x"):
            if act in HALF:
                assert_rounding_flips_only(out[name], model[name], name)
            else:  # fp32 results of inexact fp32 sums
                assert_close_fp32(out[name], model[name], name)
        else:
            assert torch.equal(out[name], model[name]), f"{name}: max diff {(out[name] - model[name]).abs().max()}"


# ------------------------------------------------------------------------------------------------ three-way rule


def _peft_like(quantized, scaling, keep, p):
    """PEFT's computation with fp32 adapters, written with the same torch ops so that the dropout mask can be
    fused-lora's (PEFT's nn.Dropout draws its own): the base layer in x's dtype, the LoRA branch on an fp32 copy of
    x (``_cast_input_dtype``). ``lora.Linear`` adds the fp32 branch to the base result (in fp32) and rounds the sum
    to x's dtype; ``lora.bnb.Linear4bit`` rounds the branch to x's dtype first and adds in x's dtype."""

    def fn(x, weight, lora_A, lora_B, bias):
        result = F.linear(x, weight, bias)
        xf = x.to(lora_A.dtype)
        if keep is not None:
            xf = xf * keep.to(xf.dtype) / (1 - p)
        lora = F.linear(F.linear(xf, lora_A), lora_B) * scaling
        return result + lora.to(result.dtype) if quantized else (result + lora).to(result.dtype)

    return fn


@pytest.mark.parametrize("backend,policy", BACKENDS)
@pytest.mark.parametrize("act", HALF)
@pytest.mark.parametrize("weight_kind", ["dense", "nf4"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_three_way_against_peft(monkeypatch, backend, policy, act, weight_kind, p):
    """fp32 adapters over half-precision x: outputs and the gradients of x, A, B and bias satisfy
    ``|out - ref| <= 2 |peft - ref| + atol`` element-wise, ``ref`` the same layer in float64 (the fp32 adapter
    values, the same mask), ``peft`` PEFT's own computation (``_peft_like``). Gradients come in their parameters'
    dtypes: fp32 for A and B, x's for x and bias.

    ``atol = eps * max|ref|``, ``eps`` one ulp at 1.0 of the activation dtype (2**-7 bf16, 2**-10 fp16), for every
    output: fused-lora rounds A, B, xa and gb to the activation dtype where PEFT's fp32 branch does not (the
    documented price of no fp32 copy of x). Each such rounding moves its term by at most half an ulp relative
    (2**-9 bf16, 2**-12 fp16 on average and 2**-8 / 2**-11 at most); with these O(1)-scaled terms and random signs
    their sum stays below one ulp of the largest element -- for dA / dB too, where PEFT's own error is fp32's, so
    that atol, not PEFT's error, carries the bound (the native policy also rounds the dA / dB products to the
    activation dtype: half an ulp more, inside it too)."""
    M, K, N, r, s, seed = 37, 64, 48, 8, 2.0, 5
    inp = make_inputs(M, K, N, r, torch.float32, "cpu", seed=3)
    grad = inp.pop("grad").to(act)
    for name in ("x", "weight", "bias"):
        inp[name] = inp[name].to(act)
    weight, dense = _weight(weight_kind, inp.pop("weight"), monkeypatch)
    keep = _keep(p, seed, M, K)
    out = _outputs_and_grads(lambda **t: _fused(backend, policy, s, p, seed)(weight=weight, **t), inp, grad)
    theirs = _outputs_and_grads(lambda **t: _peft_like(weight_kind != "dense", s, keep, p)(weight=dense, **t),
                                inp, grad)
    ref = _outputs_and_grads(lambda **t: lora_reference(weight=dense.double(), scaling=s, keep=keep, p=p, **t),
                             {k: v.double() for k, v in inp.items()}, grad.double())
    assert {k: v.dtype for k, v in out.items()} == {"y": act, "x": act, "lora_A": torch.float32,
                                                     "lora_B": torch.float32, "bias": act}
    for name in out:
        assert_three_way(out[name], theirs[name], ref[name], name, eps=HALF_EPS[act])


# ------------------------------------------------------------------------------------------------ no fp32 copy of x


class _RecordTensors(TorchDispatchMode):
    """Records ``(op, dtype, shape)`` of every tensor an operator returns while active."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        self.made += [(str(func), t.dtype, tuple(t.shape)) for t in tree_leaves(result) if isinstance(t, torch.Tensor)]
        return result

    def fp32_of_at_least(self, numel):
        return [m for m in self.made if m[1] == torch.float32 and math.prod(m[2]) >= numel]


@pytest.mark.parametrize("act", HALF)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_torch_path_makes_no_fp32_copy_of_x(act, p):
    """The torch path's forward and backward (``torch_ops.lora_forward`` / ``lora_backward``, what the custom
    operators run) with fp32 adapters over half-precision x, under the ``"native"`` CPU policy (the products in x's
    dtype, as on CUDA): no fp32 tensor as large as x is made, only the small converted A and B and the fp32
    gradients of A and B (N < K here, so nothing of another size qualifies either). Under the ``"fp32"`` policy the
    products run in fp32 by design (fp32 GEMMs on CPUs without half-precision matrix units): x is converted to fp32,
    as the recorder sees -- which also shows that it sees such copies. PEFT's layer makes one too (its
    ``_cast_input_dtype``)."""
    M, K, N, r = 48, 96, 40, 8
    inp = make_inputs(M, K, N, r, torch.float32, "cpu")
    x, w, bias, g = (inp[k].to(act) for k in ("x", "weight", "bias", "grad"))
    a, b = inp["lora_A"], inp["lora_B"]
    dropout = Dropout(p, 3) if p else None
    needs = (True, False, True, True, True)

    def run(policy):
        with use_cpu_half_compute(policy), _RecordTensors() as rec:
            y, xa = torch_ops.lora_forward(x, w, a, b, bias, 2.0, dropout)
            grads = torch_ops.lora_backward(g, x, w, a, b, xa, 2.0, dropout, needs)
        assert y.dtype == xa.dtype == grads[0].dtype == act and grads[2].dtype == grads[3].dtype == torch.float32
        return rec

    assert run("native").fp32_of_at_least(M * K) == []
    assert any(shape == (M, K) for _, _, shape in run("fp32").fp32_of_at_least(M * K))

    peft_layer = peft.get_peft_model(nn.Sequential(nn.Linear(K, N)).to(act), peft.LoraConfig(r=r, target_modules=["0"]))
    with _RecordTensors() as rec:
        peft_layer(x.clone().requires_grad_(True)).sum().backward()
    assert any(shape == (M, K) for _, _, shape in rec.fp32_of_at_least(M * K))


# ------------------------------------------------------------------------------------------------ module side


@pytest.mark.parametrize("dtype,default", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                           (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_layer_adapter_dtype_default_and_explicit(dtype, default):
    """PEFT's default: fp32 adapters over fp16 / bf16 math, the layer's dtype otherwise; an explicit dtype is kept.
    The forward runs with either, gradients land in the parameters' dtype."""
    layer = FusedLoraLinear(24, 16, r=4, dtype=dtype)
    assert (layer.compute_dtype, layer.adapter_dtype, layer.lora_B.dtype) == (dtype, default, default)
    assert f"compute_dtype={str(dtype)[6:]}" in repr(layer) and f"adapter_dtype={str(default)[6:]}" in repr(layer)
    linear = nn.Linear(24, 16, dtype=dtype)
    assert FusedLoraLinear.from_linear(linear).adapter_dtype == default
    for explicit in (torch.bfloat16, torch.float32):
        for made in (FusedLoraLinear(24, 16, r=4, dtype=dtype, adapter_dtype=explicit),
                     FusedLoraLinear.from_linear(linear, adapter_dtype=explicit)):
            assert made.compute_dtype == dtype and made.adapter_dtype == explicit
            nn.init.normal_(made.lora_B)
            with use_backend("torch"):
                y = made(torch.randn(3, 24, dtype=dtype))
            y.float().sum().backward()
            assert y.dtype == dtype
            assert made.lora_A.grad.dtype == made.lora_B.grad.dtype == explicit
    with pytest.raises(ValueError, match="adapter_dtype must be one of"):
        FusedLoraLinear(24, 16, adapter_dtype=torch.int8)


def test_apply_lora_adapter_dtype_matches_peft_default():
    """apply_lora on a bf16 model gives every layer the adapter dtype PEFT's get_peft_model gives it (fp32); an
    explicit ``adapter_dtype`` is used for every layer; a bad one is refused before anything changes."""
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).to(torch.bfloat16)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, target_modules=["0", "2"]))
    ours = apply_lora(copy.deepcopy(model), ["0", "2"], r=4)
    peft_dtypes = {n: (m.lora_A["default"].weight.dtype, m.lora_B["default"].weight.dtype)
                   for n, m in theirs.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert peft_dtypes == {n: (l.lora_A.dtype, l.lora_B.dtype) for n, l in lora_layers(ours)}
    assert set(peft_dtypes.values()) == {(torch.float32, torch.float32)}
    assert all(l.compute_dtype == torch.bfloat16 for _, l in lora_layers(ours))
    bf16 = apply_lora(copy.deepcopy(model), ["0", "2"], r=4, adapter_dtype=torch.bfloat16)
    assert {l.adapter_dtype for _, l in lora_layers(bf16)} == {torch.bfloat16}
    untouched = copy.deepcopy(model)
    with pytest.raises(ValueError, match="adapter_dtype must be one of"):
        apply_lora(untouched, ["0", "2"], adapter_dtype="bf16")
    assert not list(lora_layers(untouched))


def test_load_adapter_creates_layers_in_the_adapter_dtype(tmp_path):
    """load_adapter's new layers follow apply_lora's rule (fp32 over bf16, as PeftModel.from_pretrained) or the
    ``adapter_dtype`` given; a bf16 file into fp32 adapters is exact and silent, fp32 into bf16 warns."""
    from fused_lora import load_adapter, save_adapter

    model = nn.Sequential(nn.Linear(16, 8)).to(torch.bfloat16)
    saved = apply_lora(copy.deepcopy(model), ["0"], r=4, adapter_dtype=torch.bfloat16)
    nn.init.normal_(saved[0].lora_B)
    save_adapter(saved, tmp_path / "bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = load_adapter(copy.deepcopy(model), tmp_path / "bf16")
    assert back[0].adapter_dtype == torch.float32 and torch.equal(back[0].lora_B, saved[0].lora_B.float())
    save_adapter(back, tmp_path / "fp32")
    assert load_adapter(copy.deepcopy(model), tmp_path / "fp32")[0].adapter_dtype == torch.float32
    with pytest.warns(UserWarning, match=r"rounded to the layers' dtype.*float32.*bfloat16"):
        same = load_adapter(copy.deepcopy(model), tmp_path / "fp32", adapter_dtype=torch.bfloat16)
    assert same[0].adapter_dtype == torch.bfloat16 and torch.equal(same[0].lora_B, saved[0].lora_B)


def test_nf4_compute_dtype_is_independent_of_the_adapters():
    """An NF4 layer computing in bf16 with fp32 adapters (the default over bf16): fp16 x is cast to the math dtype
    (the wider of the compute dtype and x's: fp32 here, validation.quantized_math_dtype) and the output back to x's
    dtype; ``module.to(dtype)`` sets the compute dtype (and casts the adapters, as any nn.Module); the NF4 fields
    stay exact; the merged weight rounds once into the compute dtype."""
    linear = nn.Linear(64, 24)
    layer = FusedLoraLinear.from_linear(linear, r=4, quantize="nf4", compute_dtype=torch.bfloat16)
    assert (layer.compute_dtype, layer.adapter_dtype) == (torch.bfloat16, torch.float32)
    assert "compute_dtype=bfloat16" in repr(layer.base)
    nn.init.normal_(layer.lora_B)
    for x_dtype, math_dtype in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                (torch.float32, torch.float32)):
        x = torch.randn(5, 64).to(x_dtype)
        with use_backend("torch"):
            y = layer(x)
            expect = fused_lora_linear(x.to(math_dtype), layer.nf4_weight, layer.lora_A, layer.lora_B, layer.scaling,
                                       bias=layer.bias.to(math_dtype)).to(x_dtype)
        y.sum().backward()
        assert y.dtype == x_dtype and layer.lora_A.grad.dtype == torch.float32
        assert torch.equal(y.detach(), expect.detach()), x_dtype

    codes = {n: t.clone() for n, t in layer.base.named_buffers() if n.startswith("nf4_")}
    layer.to(torch.float16)
    assert (layer.compute_dtype, layer.adapter_dtype) == (torch.float16, torch.float16)
    layer.float()
    assert (layer.compute_dtype, layer.adapter_dtype) == (torch.float32, torch.float32)
    assert all(torch.equal(codes[n], t) for n, t in layer.base.named_buffers() if n.startswith("nf4_"))

    explicit = FusedLoraLinear.from_linear(linear, quantize="nf4", compute_dtype=torch.float16,
                                           adapter_dtype=torch.bfloat16)
    assert (explicit.compute_dtype, explicit.adapter_dtype) == (torch.float16, torch.bfloat16)
    with pytest.raises(ValueError, match="compute_dtype must be one of float32, float16, bfloat16"):
        FusedLoraLinear.from_linear(linear, quantize="nf4", compute_dtype=torch.float64)


def test_merge_rounds_once_with_fp32_adapters():
    """merge() / merge_and_unload with fp32 adapters over a bf16 weight: ``W + s B A`` formed in fp32 from the
    unrounded adapters and rounded once into bf16: within half a bf16 ulp of the float64 value plus the fp32 error of
    forming it (an r-term fp32 dot product and one addition: at most (r + 2) * 2**-24 of the sum of the terms'
    magnitudes, which matters only where W and the update nearly cancel)."""
    from fused_lora import merge_and_unload

    r = 8
    model = nn.Sequential(nn.Linear(96, 80)).to(torch.bfloat16)
    apply_lora(model, ["0"], r=r)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(80, r) * 0.05)
    w, a, b = layer.weight.double(), layer.lora_A.double(), layer.lora_B.double()
    exact = w + layer.scaling * (b @ a)
    fp32_error = (r + 2) * 2.0**-24 * (w.abs() + layer.scaling * (b.abs() @ a.abs()))
    merged = merge_and_unload(copy.deepcopy(model))[0].weight
    layer.merge()
    ulp = torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))))
    for merged_weight in (merged, layer.weight):
        assert merged_weight.dtype == torch.bfloat16
        assert ((merged_weight.double() - exact).abs() <= 0.5 * ulp + fp32_error).all()
        assert torch.count_nonzero(merged_weight != exact.to(torch.bfloat16)) <= exact.numel() // 1000


@pytest.mark.parametrize("backend,policy", BACKENDS)
def test_layers_match_peft_layers(backend, policy):
    """apply_lora and PEFT's get_peft_model on the same bf16 model, PEFT's (fp32) adapters copied into ours: the
    three-way rule against the float64 layer for outputs and the gradients of x, A and B (atol as in
    ``test_three_way_against_peft``), for a dense base (lora.Linear) and a bitsandbytes NF4 base
    (lora.bnb.Linear4bit, computing in bf16)."""
    bnb = pytest.importorskip("bitsandbytes")
    import bnb_oracle

    K, N, r = 128, 40, 8  # in_features a multiple of the blocksize: bitsandbytes' AVX-512 CPU dequantize is right
    torch.manual_seed(0)
    dense = nn.Linear(K, N).to(torch.bfloat16)
    q = bnb.nn.Linear4bit(K, N, compute_dtype=torch.bfloat16, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(dense.weight.detach().float().clone(), requires_grad=False, quant_type="nf4",
                                 module=q)
    q.bias = nn.Parameter(dense.bias.detach().clone(), requires_grad=False)
    q = q.to("cpu")
    x = torch.randn(2, 9, K, dtype=torch.bfloat16)
    g = torch.randn(2, 9, N, dtype=torch.bfloat16)
    for base in (dense, q):
        model = nn.Sequential(base)
        model.is_loaded_in_4bit = base is q  # what transformers sets: PEFT then builds its QLoRA layer
        theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=r, lora_alpha=16, target_modules=["0"]))
        peft_layer = theirs.base_model.model[0]
        with torch.no_grad():
            peft_layer.lora_B["default"].weight.normal_(0, r**-0.5)
        ours = apply_lora(copy.deepcopy(model), ["0"], r=r, lora_alpha=16)[0]
        assert ours.quantized == (base is q) and ours.adapter_dtype == peft_layer.lora_A["default"].weight.dtype
        with torch.no_grad():
            ours.lora_A.copy_(peft_layer.lora_A["default"].weight)
            ours.lora_B.copy_(peft_layer.lora_B["default"].weight)

        def run(layer, a, b, xin=x):
            xin = xin.detach().clone().requires_grad_(True)
            y = layer(xin)
            y.backward(g.to(y.dtype))
            return {"y": y.detach(), "x": xin.grad, "lora_A": a.grad, "lora_B": b.grad}

        with use_backend(backend), use_cpu_half_compute(policy):
            mine = run(ours, ours.lora_A, ours.lora_B)
        with bnb_oracle.format_exact_cpu_dequantize():
            peft_out = run(peft_layer, peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight)
        w64 = ours.base_weight(torch.bfloat16).double()
        leaves = {k: t.detach().double().requires_grad_(True) for k, t in (("x", x), ("A", ours.lora_A),
                                                                             ("B", ours.lora_B))}
        y64 = lora_reference(leaves["x"], w64, leaves["A"], leaves["B"], ours.bias.double(), ours.scaling, None, 0.0)
        y64.backward(g.double())
        ref = {"y": y64.detach(), "x": leaves["x"].grad, "lora_A": leaves["A"].grad, "lora_B": leaves["B"].grad}
        for name in mine:
            assert mine[name].dtype == peft_out[name].dtype, name
            assert_three_way(mine[name], peft_out[name], ref[name], name, eps=HALF_EPS[torch.bfloat16])


# ------------------------------------------------------------------------------------------------ errors


def _args(**over):
    args = dict(x=torch.randn(4, 8, dtype=torch.bfloat16), weight=torch.randn(6, 8, dtype=torch.bfloat16),
                lora_A=torch.randn(2, 8), lora_B=torch.randn(6, 2), scaling=2.0,
                bias=torch.randn(6, dtype=torch.bfloat16))
    args.update(over)
    return args


@pytest.mark.parametrize("over,exc,match", [
    (dict(lora_B=torch.randn(6, 2, dtype=torch.bfloat16)), TypeError,
     r"dtype mismatch: lora_A is torch.float32 but lora_B is torch.bfloat16; the adapters must share one dtype"),
    (dict(lora_A=torch.randn(2, 8, dtype=torch.float16), lora_B=torch.randn(6, 2, dtype=torch.float64)), TypeError,
     r"lora_A is torch.float16 but lora_B is torch.float64"),
    (dict(weight=torch.randn(6, 8)), TypeError,
     r"dtype mismatch: x is torch.bfloat16 but weight is torch.float32; x, weight and bias must share one dtype "
     r"\(lora_A / lora_B may differ"),
    (dict(bias=torch.randn(6)), TypeError, r"x is torch.bfloat16 but bias is torch.float32"),
    (dict(lora_A=torch.randint(0, 2, (2, 8)), lora_B=torch.randint(0, 2, (6, 2))), TypeError,
     r"lora_A has dtype torch.int64"),
])
def test_adapter_dtype_errors(over, exc, match):
    with pytest.raises(exc, match=match):
        fused_lora_linear(**_args(**over))


def test_float64_adapters_on_the_torch_backend_only():
    """float64 adapters are accepted where float64 is computed (the torch backend; "auto" sends them there) and
    refused by the Triton kernels with an error naming the dtypes."""
    args = _args(x=torch.randn(4, 8), weight=torch.randn(6, 8), bias=torch.randn(6),
                 lora_A=torch.randn(2, 8, dtype=torch.float64), lora_B=torch.randn(6, 2, dtype=torch.float64))
    ref = lora_reference(args["x"], args["weight"], args["lora_A"], args["lora_B"], args["bias"], 2.0, None, 0.0)
    for backend in ("torch", "auto"):
        with use_backend(backend):
            y = fused_lora_linear(**args)
        assert y.dtype == torch.float32
        assert_close_fp32(y, ref, backend)  # A, B rounded to fp32 where they enter the products
    if INTERPRETING:
        with use_backend("triton"), pytest.raises(TypeError, match=r"float64 tensors \(x: torch.float32, "
                                                                  r"lora_A / lora_B: torch.float64\)"):
            fused_lora_linear(**args)
