"""DoRA in the modules, adapter files and merges (``FusedLoraLinear(use_dora=True)``, ``apply_lora``,
``save_adapter`` / ``load_adapter``, ``merge`` / ``unmerge`` / ``merge_and_unload``): parity with PEFT's DoRA layers
(dense, and QDoRA over bitsandbytes 4-bit) and with an independent float64 reference of PEFT's definition.

Tolerances (the house rules, ``tests/helpers.py``): fp32 results against float64 and against PEFT with
``assert_close_fp32`` (``FP32_RTOL`` of the largest magnitude: the same fp32 products as LoRA's plus the norm, c
and the column epilogue, each a few fp32 roundings); half precision by the three-way rule against float64 with
the same-dtype computation (PEFT's own DoRA layer in that dtype) as the baseline. Tensors that only travel through
files or state dicts are compared bitwise. Merged weights: see each merge test.
"""

from __future__ import annotations

import copy
import json
import pickle
import warnings

import pytest
import torch
import torch._dynamo
from torch import nn

import fused_lora
from fused_lora import (FusedLoraLinear, apply_lora, load_adapter, lora_layers, merge_and_unload, save_adapter,
                        use_backend)
from fused_lora.adapters import CONFIG_NAME, SAFETENSORS_NAME
from fused_lora.dropout import Dropout
from fused_lora.nf4 import quantize_nf4

from conftest import DEVICE_BACKENDS
from helpers import FP32_RTOL, HALF_EPS, adamw_losses, assert_close_fp32, assert_three_way

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft.tuners.lora import Linear as PeftLinear  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from safetensors import safe_open  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

CPU_BACKENDS = [b for d, b in DEVICE_BACKENDS if d == "cpu"]
NAMES = ("x", "lora_A", "lora_B", "lora_magnitude_vector")
PREFIX = "base_model.model."
MAG = "lora_magnitude_vector"


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------


def _peft_dora(base: nn.Module, r: int, lora_alpha: float):
    """PEFT's DoRA layer over ``base`` (an nn.Linear, or a bitsandbytes Linear4bit: PEFT's QDoRA layer)."""
    cfg = peft.LoraConfig(r=r, lora_alpha=lora_alpha, use_dora=True)
    if isinstance(base, nn.Linear) and "Linear4bit" not in {c.__name__ for c in type(base).__mro__}:
        return PeftLinear(base, "default", cfg, r=r, lora_alpha=lora_alpha, use_dora=True)
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    return PeftLinear4bit(base, "default", config=cfg, r=r, lora_alpha=lora_alpha, use_dora=True)


def _peft_params(layer):
    return {"lora_A": layer.lora_A["default"].weight, "lora_B": layer.lora_B["default"].weight,
            MAG: layer.lora_magnitude_vector["default"].weight}


def _perturb(ours, seed):
    """Random B (not PEFT's zeros) and a magnitude moved away from its initial norms, so that every DoRA term (c != 1,
    s B A != 0) shows in the outputs and gradients."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ours.lora_B.copy_(torch.randn(ours.lora_B.shape, generator=gen) * ours.r ** -0.5)
        m = ours.lora_magnitude_vector
        m.copy_(m.double() * (1 + 0.3 * torch.rand(m.shape, generator=gen, dtype=torch.float64)))


def _copy_into_peft(ours, theirs):
    with torch.no_grad():
        for name, p in _peft_params(theirs).items():
            p.copy_(getattr(ours, name))


def _dense_pair(K, N, r, dtype, seed=0, bias=True):
    """Our DoRA layer and PEFT's over identical nn.Linear bases, identical A, B (random) and m (perturbed); the
    adapters in ``dtype`` (PEFT's lora.Linear built directly keeps them in its base's dtype)."""
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        base.weight.copy_(torch.randn(N, K, generator=gen) * K ** -0.5)
        if bias:
            base.bias.copy_(torch.randn(N, generator=gen))
    base = base.to(dtype)
    ours = FusedLoraLinear.from_linear(copy.deepcopy(base), r=r, lora_alpha=2 * r, use_dora=True,
                                       adapter_dtype=dtype)
    theirs = _peft_dora(base, r, 2 * r)
    for p in _peft_params(theirs).values():
        p.data = p.data.to(dtype)
    # PEFT's initial magnitude (its own ||W||) is ours; PEFT rounds it to a half-precision base's dtype
    assert_close_fp32(ours.lora_magnitude_vector, _peft_params(theirs)[MAG], "initial magnitude",
                      rtol=HALF_EPS.get(dtype, FP32_RTOL))
    _perturb(ours, seed + 1)
    _copy_into_peft(ours, theirs)
    return ours, theirs


def _run_ours(layer, x, g, backend="torch"):
    x = x.detach().clone().requires_grad_(True)
    with use_backend(backend):
        y = layer(x)
        y.backward(g.to(y.dtype))
    out = {"y": y.detach(), "x": x.grad}
    for name in NAMES[1:]:
        out[name] = getattr(layer, name).grad.clone()
    layer.zero_grad(set_to_none=True)
    return out


def _run_peft(layer, x, g):
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(g.to(y.dtype))
    return {"y": y.detach(), "x": x.grad, **{k: p.grad.clone() for k, p in _peft_params(layer).items()}}


def _run_reference(layer, x, g, keep=None, p=0.0, dtype=torch.float64):
    """PEFT's DoRA definition in ``dtype`` on ``layer``'s values (an NF4 W: its dequantized values in the math
    dtype), written independently of fused_lora (only the mask comes from outside): n = ||W + s B A|| detached."""
    math_dtype = torch.promote_types(layer.compute_dtype, x.dtype) if layer.quantized else x.dtype
    w = layer.base_weight(math_dtype).detach().to(dtype)
    leaves = {"x": x.detach().to(dtype)}
    leaves.update({name: getattr(layer, name).detach().to(dtype) for name in NAMES[1:]})
    for t in leaves.values():
        t.requires_grad_(True)
    a, b, m, s = leaves["lora_A"], leaves["lora_B"], leaves[MAG], layer.scaling
    with torch.no_grad():
        n = torch.linalg.vector_norm(w + s * b @ a, dim=1)
    c = m / n
    xv = leaves["x"]
    xd = xv if keep is None else xv * keep.reshape(xv.shape).to(dtype) / (1 - p)
    y = xv @ w.t() + (c - 1) * (xd @ w.t()) + c * s * ((xd @ a.t()) @ b.t())
    if layer.bias is not None:
        y = y + layer.bias.detach().to(math_dtype).to(dtype)
    y.backward(g.to(dtype))
    return {"y": y.detach(), **{k: t.grad for k, t in leaves.items()}}


def _layer_seed():
    """The dropout seed the next layer call draws (fused_lora_linear takes it from torch's default generator)."""
    state = torch.random.get_rng_state()
    seed = int(torch.randint(-(2 ** 63), 2 ** 63 - 1, (), dtype=torch.int64))
    torch.random.set_rng_state(state)
    return seed


# --------------------------------------------------------------------------------------------------------------------
# the layer: parity with PEFT and with the float64 definition
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dense_fp32_matches_peft_and_the_definition(backend):
    """Outputs and the gradients of x, A, B and m equal PEFT's DoRA layer's and the float64 definition's (p = 0,
    3-D input)."""
    ours, theirs = _dense_pair(48, 40, 8, torch.float32)
    x, g = torch.randn(2, 9, 48), torch.randn(2, 9, 40)
    mine = _run_ours(ours, x, g, backend)
    peft_out = _run_peft(theirs, x, g)
    ref = _run_reference(ours, x, g)
    for name in mine:
        assert_close_fp32(mine[name], peft_out[name], f"{name} vs PEFT")
        assert_close_fp32(mine[name], ref[name], f"{name} vs float64")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_half_three_way_against_peft(dtype):
    """Half-precision base and adapters: the three-way rule with PEFT's DoRA layer in that dtype as the baseline."""
    ours, theirs = _dense_pair(64, 48, 8, dtype, seed=3)
    x, g = torch.randn(13, 64, dtype=dtype), torch.randn(13, 48, dtype=dtype)
    mine = _run_ours(ours, x, g)
    peft_out = _run_peft(theirs, x, g)
    ref = _run_reference(ours, x, g)
    for name in mine:
        assert mine[name].dtype == dtype, name
        assert_three_way(mine[name], peft_out[name], ref[name], name)


def test_dropout_in_training_against_the_definition():
    """p > 0 in training: PEFT's dropout form ``x W^T + b + (c - 1) D(x) W^T + c s D(x) A^T B^T`` with the layer's
    own mask (float64 reference); eval mode drops nothing and equals PEFT's eval output."""
    ours, theirs = _dense_pair(40, 24, 4, torch.float32, seed=5)
    ours.lora_dropout = 0.3
    x, g = torch.randn(11, 40), torch.randn(11, 24)
    ours.train()
    seed = _layer_seed()
    mine = _run_ours(ours, x, g)
    keep = Dropout(0.3, seed).keep_mask(11, 40, "cpu", dtype=torch.float64)
    assert 0 < int(keep.sum()) < keep.numel()
    ref = _run_reference(ours, x, g, keep, 0.3)
    for name in mine:
        assert_close_fp32(mine[name], ref[name], name)
    ours.eval()
    theirs.eval()
    assert_close_fp32(ours(x).detach(), theirs(x).detach(), "eval output")


def test_new_dora_layer_computes_its_base_layer():
    """m starts as ||W|| (B = 0: c = 1): a new DoRA layer equals its base layer, with and without dropout, dense and
    NF4 (the NF4 base's own output: F.linear with its dequantized weight)."""
    torch.manual_seed(0)
    linear = nn.Linear(40, 24)
    x = torch.randn(7, 40)
    for p in (0.0, 0.2):
        layer = FusedLoraLinear.from_linear(linear, r=4, lora_alpha=8, lora_dropout=p, use_dora=True).train()
        assert layer.lora_magnitude_vector.requires_grad and layer.lora_magnitude_vector.dtype == torch.float32
        assert_close_fp32(layer(x).detach(), linear(x).detach(), f"dense p={p}")
    nf4 = FusedLoraLinear.from_linear(linear, r=4, lora_alpha=8, quantize="nf4", use_dora=True)
    expect = nn.functional.linear(x, nf4.base_weight(torch.float32), linear.bias)
    assert_close_fp32(nf4(x).detach(), expect.detach(), "nf4")
    # and from scratch (nn.Linear's initialisation of W, then m from it)
    fresh = FusedLoraLinear(40, 24, r=4, use_dora=True)
    assert_close_fp32(fresh.lora_magnitude_vector, fresh.weight.detach().norm(dim=1), "m = ||W||")


def test_lora_layers_are_unchanged():
    """use_dora=False (the default): the parameters, state-dict keys and repr of a LoRA layer, nothing DoRA's."""
    layer = FusedLoraLinear(16, 8, r=2)
    assert [n for n, _ in layer.named_parameters()] == ["bias", "lora_A", "lora_B", "base.weight"]
    assert list(layer.state_dict()) == ["bias", "lora_A", "lora_B", "lora_merged", "base.weight"]
    assert layer.lora_magnitude_vector is None and "dora" not in repr(layer)
    dora = FusedLoraLinear(16, 8, r=2, use_dora=True)
    assert [n for n, _ in dora.named_parameters()] == ["bias", "lora_A", "lora_B", MAG, "base.weight"]
    assert "use_dora=True" in repr(dora)
    with pytest.raises(ValueError, match="use_dora='yes' must be True or False"):
        FusedLoraLinear(16, 8, use_dora="yes")
    with pytest.raises(ValueError, match="use_dora=1 must be True or False"):
        apply_lora(nn.Sequential(nn.Linear(4, 4)), ["0"], use_dora=1)


def test_meta_device_and_torch_compile():
    """A DoRA layer built on the meta device computes nothing until it has values (to_empty, then
    reset_lora_parameters: m from W). Under torch.compile(fullgraph=True) the norm cache (Python identity checks)
    is bypassed and the compiled layer computes what the eager one does, gradients of m included."""
    meta = FusedLoraLinear(16, 8, r=2, use_dora=True, device="meta")
    assert meta.lora_magnitude_vector.device.type == "meta"
    meta.to_empty(device="cpu")
    with torch.no_grad():
        meta.weight.normal_()
    meta.reset_lora_parameters()
    assert_close_fp32(meta.lora_magnitude_vector, meta.weight.norm(dim=1), "m after to_empty + reset")

    ours, _ = _dense_pair(32, 24, 4, torch.float32, seed=17)
    ours.eval()
    x, g = torch.randn(5, 32), torch.randn(5, 24)
    eager = _run_ours(ours, x, g)
    compiled = _run_ours(torch.compile(ours, fullgraph=True), x, g)
    for name in eager:
        assert_close_fp32(compiled[name], eager[name], name)


# --------------------------------------------------------------------------------------------------------------------
# QDoRA: NF4 bases against PEFT over bitsandbytes Linear4bit
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def bnb_cpu():
    """bitsandbytes on the CPU as an oracle (tests/test_qlora.py's fixtures): eager, and its 4-bit dequantization held
    to the format (bnb_oracle.py: its AVX-512 kernel is not when in_features is not a multiple of the blocksize)."""
    bnb = pytest.importorskip("bitsandbytes")
    import bnb_oracle

    with torch._dynamo.config.patch(disable=True), bnb_oracle.format_exact_cpu_dequantize():
        yield bnb


def _bnb_linear4bit(bnb, K, N, compute_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    lin = bnb.nn.Linear4bit(K, N, bias=True, compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
    lin.weight = bnb.nn.Params4bit(torch.randn(N, K, generator=gen) * K ** -0.5, requires_grad=False,
                                   quant_type="nf4", compress_statistics=True, module=lin)
    lin.bias = nn.Parameter(torch.randn(N, generator=gen), requires_grad=False)
    return lin.to("cpu")


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_qdora_matches_peft_on_bitsandbytes_linear4bit(bnb_cpu, compute_dtype):
    """from_bnb(use_dora=True) against PEFT's QDoRA layer (lora.bnb.Linear4bit, use_dora) on identical Linear4bit
    bases: the initial magnitude, outputs and the gradients of x, A, B, m. fp32: to fp32 rounding; bf16: the
    three-way rule against the float64 definition on the dequantized weight, PEFT's bf16 computation the baseline."""
    K, N, r = 96, 40, 8
    ours = FusedLoraLinear.from_bnb(_bnb_linear4bit(bnb_cpu, K, N, compute_dtype, 5), r=r, lora_alpha=16,
                                    adapter_dtype=compute_dtype, use_dora=True)
    theirs = _peft_dora(_bnb_linear4bit(bnb_cpu, K, N, compute_dtype, 5), r, 16)
    for p in _peft_params(theirs).values():
        p.data = p.data.to(compute_dtype)
    # the initial magnitude: ||W|| of the dequantized weight, as PEFT's (bf16: both round a norm to bf16, ours of W
    # dequantized to the compute dtype, PEFT's of the fp32 dequantization: one bf16 ulp apart at most)
    init_rtol = HALF_EPS.get(compute_dtype, FP32_RTOL)
    assert_close_fp32(ours.lora_magnitude_vector, _peft_params(theirs)[MAG], "initial magnitude", rtol=init_rtol)
    _perturb(ours, 6)
    _copy_into_peft(ours, theirs)
    x, g = torch.randn(3, 7, K, dtype=compute_dtype), torch.randn(3, 7, N, dtype=compute_dtype)
    mine = _run_ours(ours, x, g)
    peft_out = _run_peft(theirs, x, g)
    ref = _run_reference(ours, x, g)
    for name in mine:
        if compute_dtype == torch.float32:
            assert_close_fp32(mine[name], peft_out[name], f"{name} vs PEFT")
            assert_close_fp32(mine[name], ref[name], f"{name} vs float64")
        else:
            assert_three_way(mine[name], peft_out[name].to(compute_dtype), ref[name], name)


def test_qdora_fp32_activations_over_bf16_compute_use_the_fp32_norm():
    """fp32 x over a bf16-compute NF4 base computes in fp32 (validation.quantized_math_dtype), and the cached
    ||W_i||^2 is that of W dequantized to fp32 (the math dtype), not to bf16: outputs and gradients are fp32-accurate
    against float64 of the fp32 dequantized values. A bf16 norm would move c by ~2**-9 (~100x FP32_RTOL)."""
    torch.manual_seed(0)
    layer = FusedLoraLinear.from_linear(nn.Linear(128, 64), r=8, lora_alpha=16, quantize="nf4",
                                        compute_dtype=torch.bfloat16, use_dora=True)
    assert layer.adapter_dtype == torch.float32
    _perturb(layer, 2)
    x, g = torch.randn(5, 128), torch.randn(5, 64)
    mine = _run_ours(layer, x, g)
    assert mine["y"].dtype == torch.float32
    ref = _run_reference(layer, x, g)
    for name in mine:
        assert_close_fp32(mine[name], ref[name], name)


# --------------------------------------------------------------------------------------------------------------------
# merge / unmerge
# --------------------------------------------------------------------------------------------------------------------


def test_dense_merge_and_unmerge_match_peft():
    """merge(): W' = (m / n)[:, None] * (W + s B A), computed in float64 and rounded once (equal to the float64
    value rounded to fp32 except at near-ties), PEFT's merged weight to fp32 rounding; the merged layer computes
    what the unmerged one did; unmerge() restores W (PEFT's formula W'/(m/n) - s B A: a few fp32 roundings of
    |W| + |s B A|, the bound below) and the unmerged outputs."""
    ours, theirs = _dense_pair(48, 40, 8, torch.float32, seed=7)
    ours.eval()
    theirs.eval()
    x = torch.randn(6, 48)
    before = ours(x).detach()
    w0 = ours.weight.detach().clone()
    w64, a, b, m = (t.detach().double() for t in (ours.weight, ours.lora_A, ours.lora_B, ours.lora_magnitude_vector))
    lora = ours.scaling * b @ a
    exact = (m / torch.linalg.vector_norm(w64 + lora, dim=1))[:, None] * (w64 + lora)
    ours.merge()
    theirs.merge()
    merged = ours.weight.detach()
    assert torch.count_nonzero(merged != exact.float()) <= max(1, merged.numel() // 1000)  # near-ties only
    assert_close_fp32(merged, theirs.base_layer.weight.detach(), "merged weight vs PEFT")
    assert_close_fp32(ours(x).detach(), before, "merged output")
    ours.unmerge()
    theirs.unmerge()
    bound = 4 * 2 ** -24 * (w0.abs().max() + lora.abs().max())
    assert (ours.weight - w0).abs().max() <= bound
    assert (theirs.base_layer.weight - w0).abs().max() <= bound
    assert_close_fp32(ours(x).detach(), before, "unmerged output")


def test_bf16_merge_rounds_once():
    """A bf16 base with fp32 adapters (PEFT's default): the merged weight is W' rounded once to bf16, W' computed in
    float64 from W's exact values (within half a bf16 ulp of every element, also where c made W'_ij much smaller
    than W_ij: an fp32 W' - W would carry an error relative to |W_ij| there, seen at 1.5 half-ulps)."""
    torch.manual_seed(0)
    layer = FusedLoraLinear.from_linear(nn.Linear(96, 80).to(torch.bfloat16), r=8, lora_alpha=16, use_dora=True)
    assert layer.adapter_dtype == torch.float32
    _perturb(layer, 1)
    w, a, b, m = (t.detach().double() for t in (layer.weight, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector))
    lora = layer.scaling * b @ a
    exact = (m / torch.linalg.vector_norm(w + lora, dim=1))[:, None] * (w + lora)
    layer.merge()
    merged = layer.weight.detach()
    ulp = torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))))
    assert ((merged.double() - exact).abs() <= 0.5 * ulp * (1 + 1e-6)).all()


def test_nf4_merge_requantizes_and_unmerge_restores_the_codes():
    """NF4 (as the LoRA NF4 merge tests define it): merge() re-quantizes the dense W' of the dequantized W (fp32,
    exact), unmerge() restores the pre-merge codes exactly, over repeated cycles."""
    torch.manual_seed(0)
    layer = FusedLoraLinear.from_linear(nn.Linear(128, 64), r=8, lora_alpha=16, quantize="nf4", use_dora=True).eval()
    _perturb(layer, 3)
    original = {name: buf.clone() for name, buf in layer.base.named_buffers() if name.startswith("nf4_")}
    merged = layer.base_weight(torch.float32).double() + layer.delta_weight()  # W' in float64
    w, a, b, m = (t.detach().double() for t in (layer.base_weight(torch.float32), layer.lora_A, layer.lora_B,
                                                layer.lora_magnitude_vector))
    lora = layer.scaling * b @ a
    exact = (m / torch.linalg.vector_norm(w + lora, dim=1))[:, None] * (w + lora)  # PEFT's formula
    assert (merged - exact).abs().max() <= 1e-12 * exact.abs().max()
    expect = quantize_nf4(merged.float(), blocksize=64, double_quant=True)
    x = torch.randn(5, 128)
    for cycle in range(3):
        layer.merge()
        assert torch.equal(layer.nf4_weight.data, expect.data) and torch.equal(layer.nf4_weight.qabsmax, expect.qabsmax)
        torch.testing.assert_close(layer(x), nn.functional.linear(x, expect.dequantize(torch.float32), layer.bias),
                                   rtol=0, atol=0)
        layer.unmerge()
        for name, buf in original.items():
            assert torch.equal(getattr(layer.base, name), buf), (cycle, name)


def test_qdora_merge_matches_peft(bnb_cpu):
    """PEFT's QDoRA merge (dequantize, W' = (m / n) (W + s B A), re-quantize with bitsandbytes) gives the same NF4
    weight up to the fp32 rounding of W': its block statistics may differ in the last fp32 bit (then every element
    of the nested block moves by ~1e-7 of its value: assert_close_fp32), and an element within that rounding of a
    decision boundary may take the neighbouring NF4 level (a chance of ~1e-6 per element; allowed for at most
    0.1% of the elements, each by at most one level gap, 0.28 of the largest absmax)."""
    ours = FusedLoraLinear.from_bnb(_bnb_linear4bit(bnb_cpu, 96, 40, torch.float32, 8), r=4, lora_alpha=8,
                                    use_dora=True)
    theirs = _peft_dora(_bnb_linear4bit(bnb_cpu, 96, 40, torch.float32, 8), 4, 8)
    _perturb(ours, 9)
    _copy_into_peft(ours, theirs)
    ours.merge()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "Merge lora module to 4-bit linear may get different generations"
        theirs.merge()
    import bnb_oracle

    weight = theirs.base_layer.weight
    peft_w = bnb_oracle.dequantize(weight.data, weight.quant_state, torch.float32)
    our_w = ours.base_weight(torch.float32)
    scale = peft_w.abs().max()
    flips = (our_w - peft_w).abs() > FP32_RTOL * scale
    assert int(flips.sum()) <= max(1, our_w.numel() // 1000)
    assert (our_w - peft_w).abs().max() <= 0.28 * scale
    assert_close_fp32(our_w[~flips], peft_w[~flips], "merged NF4 weight")


def test_merged_state_dict_round_trip_and_missing_merge_norm():
    """A merged DoRA layer's state dict carries the merge norm n (dora_merge_norm, with the merged flag): a layer
    loaded from it unmerges to the same weight as the original. Without n, unmerge() refuses (n is not recoverable
    from W'), and an unmerged state dict has no such entry."""
    ours, _ = _dense_pair(32, 24, 4, torch.float32, seed=11)
    unmerged_keys = list(ours.state_dict())
    assert "dora_merge_norm" not in unmerged_keys
    w0 = ours.weight.detach().clone()
    ours.merge()
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    assert state["dora_merge_norm"].dtype == torch.float64 and state["dora_merge_norm"].shape == (24,)
    other = FusedLoraLinear(32, 24, r=4, lora_alpha=8, use_dora=True)
    other.load_state_dict(state)
    assert other.merged
    other.unmerge()
    ours.unmerge()
    assert torch.equal(other.weight, ours.weight)
    assert (other.weight - w0).abs().max() <= 1e-6
    assert list(other.state_dict()) == unmerged_keys
    # module.to(dtype) keeps the norm exact (held as its bit pattern)
    ours.merge()
    norm = ours.state_dict()["dora_merge_norm"].clone()
    ours.to(torch.float64).to(torch.float32)
    assert torch.equal(ours.state_dict()["dora_merge_norm"], norm)
    ours.unmerge()
    state.pop("dora_merge_norm")
    third = FusedLoraLinear(32, 24, r=4, lora_alpha=8, use_dora=True)
    third.load_state_dict(state)
    with pytest.raises(RuntimeError, match="without its merge norm"):
        third.unmerge()


def test_set_adapter_weights_on_a_merged_dora_layer():
    """New A, B and m for a merged layer: unmerged with the old adapter, merged again with the new one."""
    ours, _ = _dense_pair(32, 24, 4, torch.float32, seed=12)
    source, _ = _dense_pair(32, 24, 4, torch.float32, seed=13)
    expect = copy.deepcopy(ours)
    expect.set_adapter_weights(source.lora_A, source.lora_B, source.lora_magnitude_vector)
    ours.merge()
    ours.set_adapter_weights(source.lora_A, source.lora_B, source.lora_magnitude_vector)
    assert ours.merged and torch.equal(ours.lora_magnitude_vector, source.lora_magnitude_vector)
    x = torch.randn(4, 32)
    assert_close_fp32(ours.eval()(x).detach(), expect.eval()(x).detach(), "outputs")
    with pytest.raises(ValueError, match="magnitude has shape"):
        ours.set_adapter_weights(source.lora_A, source.lora_B, torch.ones(3))
    with pytest.raises(ValueError, match="not a DoRA layer"):
        FusedLoraLinear(32, 24, r=4, lora_alpha=8).set_adapter_weights(source.lora_A, source.lora_B, torch.ones(24))


# --------------------------------------------------------------------------------------------------------------------
# the norm cache and state dicts
# --------------------------------------------------------------------------------------------------------------------


def _cached(cache):
    """The one cached ||W_i||^2 of a WeightNormCache (None when empty)."""
    entries = list(cache._entries.values())
    assert len(entries) <= 1
    return entries[0][1] if entries else None


def test_weight_norm_cache_follows_the_weight():
    """||W_i||^2 is computed once per weight and dropped by merge / unmerge, load_state_dict of a new base weight and
    module.to(dtype): the cache is empty after each (white box: a stale entry would fail here), and the outputs
    afterwards equal a fresh layer's with the same values (black box)."""
    ours, _ = _dense_pair(32, 24, 4, torch.float32, seed=14)
    cache = ours._weight_norm
    x = torch.randn(5, 32)

    def fresh_output(layer):
        twin = FusedLoraLinear(32, 24, r=4, lora_alpha=8, use_dora=True, dtype=layer.weight.dtype)
        twin.load_state_dict(layer.state_dict())
        return twin(x.to(layer.weight.dtype)).detach()

    ours(x)
    assert _cached(cache) is not None
    value = _cached(cache)
    ours(x)
    assert _cached(cache) is value  # cached, not recomputed

    ours.merge()
    assert _cached(cache) is None
    ours.unmerge()
    assert _cached(cache) is None
    assert_close_fp32(ours(x).detach(), fresh_output(ours), "after merge / unmerge")

    other, _ = _dense_pair(32, 24, 4, torch.float32, seed=15)
    ours(x)
    ours.load_state_dict(other.state_dict())
    assert _cached(cache) is None
    assert_close_fp32(ours(x).detach(), other(x).detach(), "after load_state_dict")

    ours.to(torch.float64)
    assert _cached(cache) is None
    with use_backend("torch"):
        y64 = ours(x.double())
    assert y64.dtype == torch.float64 and _cached(cache).dtype == torch.float64
    assert_close_fp32(y64.detach(), other(x).detach(), "after .to(float64)")


def test_state_dict_round_trip_keeps_the_magnitude_and_pickles():
    ours, _ = _dense_pair(32, 24, 4, torch.float32, seed=16)
    state = ours.state_dict()
    assert list(state) == ["bias", "lora_A", "lora_B", MAG, "lora_merged", "base.weight"]
    other = FusedLoraLinear(32, 24, r=4, lora_alpha=8, use_dora=True)
    other.load_state_dict(state)
    assert torch.equal(other.lora_magnitude_vector, ours.lora_magnitude_vector)
    x = torch.randn(3, 32)
    assert torch.equal(other(x), ours(x))
    with pytest.raises(RuntimeError, match=MAG):  # a DoRA state dict is not a LoRA layer's, nor the reverse
        FusedLoraLinear(32, 24, r=4, lora_alpha=8).load_state_dict(state)
    with pytest.raises(RuntimeError, match=MAG):
        other.load_state_dict(FusedLoraLinear(32, 24, r=4, lora_alpha=8).state_dict())
    ours(x)  # a filled norm cache (weak references) does not stop pickling or deep copies
    for twin in (pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)):
        assert torch.equal(twin(x), ours(x))


# --------------------------------------------------------------------------------------------------------------------
# models: apply_lora, adapter files, merge_and_unload
# --------------------------------------------------------------------------------------------------------------------


def tiny_llama(dtype=torch.float32):
    config = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
        vocab_size=96, attn_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def tokens(seed=1):
    return torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _peft_model(base, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(use_dora=True, **config))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLayer):
                b, mag = m.lora_B["default"].weight, m.lora_magnitude_vector["default"].weight
                b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
                mag.mul_(1 + 0.2 * torch.rand(mag.shape, generator=gen))
    return model


def _copy_peft_into_ours(peft_model, ours):
    root = peft_model.base_model.model
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            for part, p in _peft_params(root.get_submodule(name)).items():
                getattr(layer, part).copy_(p)


def test_apply_lora_use_dora_trains_like_peft(llama):
    """apply_lora(use_dora=True) on a tiny Llama: the model is unchanged at creation, A, B and the magnitudes are
    the trainable parameters (as PEFT's), and with PEFT's adapters copied in, logits and three AdamW steps (p = 0)
    give PEFT's losses to fp32 rounding."""
    ids = tokens()
    ours = apply_lora(copy.deepcopy(llama), TARGETS, r=4, lora_alpha=8, use_dora=True)
    assert_close_fp32(logits(ours, ids), logits(llama, ids), "logits at creation")
    theirs = _peft_model(llama, target_modules=TARGETS, r=4, lora_alpha=8)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{part}" for n, _ in lora_layers(ours) for part in ("lora_A", "lora_B", MAG)}
    assert len(trainable) == sum(p.requires_grad for p in theirs.parameters())
    assert fused_lora.trainable_parameters_summary(ours)[0] == theirs.get_nb_trainable_parameters()[0]
    _copy_peft_into_ours(theirs, ours)
    assert_close_fp32(logits(ours, ids), logits(theirs, ids), "logits")
    losses = []
    for model in (ours, theirs):
        model.train()
        losses.append(adamw_losses(model, ids))
    for step, (a, b) in enumerate(zip(*losses)):
        assert abs(a - b) <= FP32_RTOL * abs(b), (step, a, b)
    assert losses[0][-1] < losses[0][0]


def _file(path):
    with safe_open(str(path / SAFETENSORS_NAME), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_files_both_ways_with_peft(tmp_path, dtype):
    """PEFT's DoRA files: PEFT writes -> load_adapter into a fresh base -> PEFT's outputs; apply_lora(use_dora) with
    the same weights -> save_adapter -> the same keys (``<module>.lora_magnitude_vector``, no ``.weight``), dtypes
    (fp32 adapters and magnitudes over a bf16 model, PEFT's default) and values as PEFT's own file, use_dora in the
    config -> PeftModel.from_pretrained -> the same outputs."""
    base = tiny_llama(dtype)
    ids = tokens()
    theirs = _peft_model(base, target_modules=TARGETS, r=4, lora_alpha=8)
    theirs.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())["use_dora"] is True

    loaded = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    root = theirs.base_model.model
    assert {n for n, _ in lora_layers(loaded)} == {n for n, m in root.named_modules() if isinstance(m, LoraLayer)}
    for name, layer in lora_layers(loaded):
        assert layer.use_dora and layer.lora_magnitude_vector.requires_grad
        for part, p in _peft_params(root.get_submodule(name)).items():
            assert getattr(layer, part).dtype == p.dtype == torch.float32 and torch.equal(getattr(layer, part), p)
    expect = logits(theirs, ids)
    if dtype == torch.float32:
        assert_close_fp32(logits(loaded, ids), expect, "logits")
    else:  # bf16: the three-way rule, the same model in fp32 as the reference (its error is ~2**-16 of bf16's)
        ref = logits(copy.deepcopy(loaded).float(), ids)
        assert_three_way(logits(loaded, ids), expect, ref, "logits")

    ours = apply_lora(copy.deepcopy(base), TARGETS, r=4, lora_alpha=8, use_dora=True)
    _copy_peft_into_ours(theirs, ours)
    save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    assert config["use_dora"] is True
    mine, peft_file = _file(tmp_path / "ours"), _file(tmp_path / "peft")
    assert mine.keys() == peft_file.keys()
    assert {k for k in mine if k.endswith(MAG)} == {f"{PREFIX}{n}.{MAG}" for n, _ in lora_layers(ours)}
    for key, t in peft_file.items():
        assert mine[key].dtype == t.dtype and torch.equal(mine[key], t), key
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    relevant = [str(w.message) for w in caught if "is_gradient_checkpointing" not in str(w.message)]
    assert not relevant, relevant
    assert torch.equal(logits(again, ids), expect)


def test_dora_and_lora_files_and_layers_do_not_mix(llama, tmp_path):
    """A DoRA file is refused by LoRA layers and a LoRA file by DoRA layers (the file would compute another function
    there; see load_adapter's docstring); a DoRA config without magnitudes, a magnitude of the wrong shape, and
    layers that differ in use_dora (one LoraConfig) are errors too."""
    dora = apply_lora(copy.deepcopy(llama), ["q_proj"], r=2, lora_alpha=4, use_dora=True)
    save_adapter(dora, tmp_path / "dora")
    lora = apply_lora(copy.deepcopy(llama), ["q_proj"], r=2, lora_alpha=4)
    save_adapter(lora, tmp_path / "lora")
    with pytest.raises(ValueError, match=r"is a LoRA layer \(use_dora=False\) but the adapter config has use_dora=Tr"):
        load_adapter(lora, tmp_path / "dora")
    with pytest.raises(ValueError, match=r"is a DoRA layer \(use_dora=True\) but the adapter config has use_dora=Fa"):
        load_adapter(dora, tmp_path / "lora")

    from safetensors.torch import load_file, save_file

    key = f"{PREFIX}model.layers.0.self_attn.q_proj.{MAG}"
    tensors = load_file(tmp_path / "dora" / SAFETENSORS_NAME)
    save_file({k: v for k, v in tensors.items() if k != key}, tmp_path / "dora" / SAFETENSORS_NAME,
              metadata={"format": "pt"})
    fresh = copy.deepcopy(llama)
    with pytest.raises(ValueError, match=r"use_dora=True: each DoRA layer needs its magnitude.*q_proj\.lora_magnitude"):
        load_adapter(fresh, tmp_path / "dora")
    save_file({**tensors, key: torch.ones(5)}, tmp_path / "dora" / SAFETENSORS_NAME, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"q_proj\.lora_magnitude_vector has shape \[5\], the layer expects \[64\]"):
        load_adapter(fresh, tmp_path / "dora")
    assert not list(lora_layers(fresh))  # nothing applied
    config = json.loads((tmp_path / "dora" / CONFIG_NAME).read_text())
    (tmp_path / "dora" / CONFIG_NAME).write_text(json.dumps({**config, "use_dora": "false"}))
    with pytest.raises(ValueError, match="use_dora='false' must be True or False"):
        load_adapter(fresh, tmp_path / "dora")

    mixed = apply_lora(copy.deepcopy(llama), ["q_proj"], r=2, lora_alpha=4, use_dora=True)
    apply_lora(mixed, ["v_proj"], r=2, lora_alpha=4)
    with pytest.raises(ValueError, match="layers differ in use_dora"):
        save_adapter(mixed, tmp_path / "mixed")


def test_merge_and_unload_matches_peft(llama):
    """merge_and_unload: plain nn.Linear layers holding PEFT's merged DoRA weights (to fp32 rounding) and PEFT's
    merged model's logits; a layer merged before (layer.merge()) keeps its merged weight."""
    theirs = _peft_model(llama, target_modules=TARGETS, r=4, lora_alpha=8)
    ours = apply_lora(copy.deepcopy(llama), TARGETS, r=4, lora_alpha=8, use_dora=True)
    _copy_peft_into_ours(theirs, ours)
    ids = tokens()
    before = logits(ours, ids)
    ours.model.layers[0].self_attn.q_proj.merge()
    names = [n for n, _ in lora_layers(ours)]
    merge_and_unload(ours)
    merged_peft = theirs.merge_and_unload()
    for name in names:
        layer = ours.get_submodule(name)
        assert type(layer) is nn.Linear and not layer.weight.requires_grad
        assert_close_fp32(layer.weight.detach(), merged_peft.get_submodule(name).weight.detach(), name)
    assert_close_fp32(logits(ours, ids), logits(merged_peft, ids), "merged logits vs PEFT")
    assert_close_fp32(logits(ours, ids), before, "merged logits vs unmerged")


def test_qdora_adapter_files_with_peft(bnb_cpu, tmp_path):
    """A 4-bit model (bitsandbytes Linear4bit bases, as transformers loads one): PEFT's QDoRA file loads into it
    (from_bnb DoRA layers) with PEFT's outputs, and ours loads back into PEFT with the same outputs. (PEFT's models
    run in train mode, p = 0: in eval mode bitsandbytes' CPU forward repacks the weight in place with its absmax
    rounded to bf16, and fails for in_features 96 -- README, "bitsandbytes' CPU inference repack".)"""
    from test_qlora import _Tiny, _to_bnb

    torch.manual_seed(0)
    base = _to_bnb(_Tiny(), ["up", "down"])
    base.is_loaded_in_4bit = True  # what transformers sets: PEFT then builds its QDoRA layers
    theirs = _peft_model(base, target_modules=["up", "down"], r=4, lora_alpha=8).train()
    assert type(theirs.base_model.model.up).__name__ == "Linear4bit"  # PEFT's lora.bnb layer
    theirs.save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, 50, (2, 7))
    expect = theirs(ids).detach()
    ours = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert all(layer.quantized and layer.use_dora for _, layer in lora_layers(ours))
    assert_close_fp32(ours.eval()(ids).detach(), expect, "logits")
    save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").train()
    assert_close_fp32(again(ids).detach(), expect, "logits, PEFT reading ours")


def test_reset_on_a_merged_layer_is_refused_before_anything_changes():
    """reset_lora_parameters() on a merged layer raises first: A, B and m untouched, so unmerge() still restores W."""
    ours, _ = _dense_pair(32, 24, 4, torch.float32, seed=21)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    ours.merge()
    with pytest.raises(RuntimeError, match="merged"):
        ours.reset_lora_parameters()
    for name in ("lora_A", "lora_B", MAG):
        assert torch.equal(getattr(ours, name), before[name]), name
    ours.unmerge()
    assert_close_fp32(ours.weight, before["base.weight"], "W after unmerge")
