"""FusedLoraLinear: PEFT parity (outputs and gradients), initialisation, from_linear, merge/unmerge, modes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fused_lora import FusedLoraLinear, use_backend

from conftest import DEVICE_BACKENDS
from helpers import assert_close_fp32, assert_three_way

peft = pytest.importorskip("peft")
from peft.tuners.lora import Linear as PeftLoraLinear  # noqa: E402


def _peft_layer(base: nn.Linear, r, lora_alpha, lora_dropout=0.0, use_rslora=False):
    config = peft.LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora)
    return PeftLoraLinear(base, "default", config, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          use_rslora=use_rslora)


def _pair(in_f, out_f, r, alpha, dtype, device, use_rslora=False, bias=True):
    """A PEFT layer and a FusedLoraLinear with identical base and adapter weights (B random, not PEFT's zeros), the
    adapters in ``dtype``: PEFT's lora.Linear built directly keeps them in its base's dtype (get_peft_model's fp32
    adapters over half-precision bases: test_adapter_dtype.py)."""
    base = nn.Linear(in_f, out_f, bias=bias, dtype=dtype, device=device)
    ours = FusedLoraLinear(in_f, out_f, r=r, lora_alpha=alpha, bias=bias, use_rslora=use_rslora, dtype=dtype,
                           device=device, adapter_dtype=dtype)
    with torch.no_grad():
        ours.weight.copy_(base.weight)
        if bias:
            ours.bias.copy_(base.bias)
        ours.lora_B.normal_(0, r**-0.5)
    theirs = _peft_layer(base, r, alpha, use_rslora=use_rslora)
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
    return ours, theirs


def _run(layer, x, g, a_param, b_param):
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(g)
    return {"y": y.detach(), "x": x.grad, "lora_A": a_param.grad.clone(), "lora_B": b_param.grad.clone()}


@pytest.mark.gpu_check
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("shape", [(2, 9, 48, 40), (37, 1, 100, 33)])
def test_matches_peft_fp32(device, backend, use_rslora, shape):
    """Same outputs and gradients of x, A, B as PEFT's lora.Linear with identical weights (p = 0)."""
    b, t, in_f, out_f = shape
    ours, theirs = _pair(in_f, out_f, 8, 16, torch.float32, device, use_rslora)
    assert ours.scaling == theirs.scaling["default"]
    x = torch.randn(b, t, in_f, device=device)
    g = torch.randn(b, t, out_f, device=device)
    with use_backend(backend):
        mine = _run(ours, x, g, ours.lora_A, ours.lora_B)
    ref = _run(theirs, x, g, theirs.lora_A["default"].weight, theirs.lora_B["default"].weight)
    for name in mine:
        assert_close_fp32(mine[name], ref[name], name)


@pytest.mark.gpu_check
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_matches_peft_bf16_three_way(device, backend):
    """bf16: at most twice PEFT's own bf16 error against a float64 computation of the same layer (the Triton
    kernels in the interpreter too: exact bf16 through tests/triton_bf16.py)."""
    ours, theirs = _pair(64, 48, 16, 32, torch.bfloat16, device)
    x = torch.randn(4, 16, 64, device=device, dtype=torch.bfloat16)
    g = torch.randn(4, 16, 48, device=device, dtype=torch.bfloat16)
    with use_backend(backend):
        mine = _run(ours, x, g, ours.lora_A, ours.lora_B)
    peft_bf16 = _run(theirs, x, g, theirs.lora_A["default"].weight, theirs.lora_B["default"].weight)
    ref_layer, _ = _pair(64, 48, 16, 32, torch.float64, device)
    with torch.no_grad():
        for name in ("weight", "bias", "lora_A", "lora_B"):
            getattr(ref_layer, name).copy_(getattr(ours, name))
    ref_layer.lora_A.grad = ref_layer.lora_B.grad = None
    with use_backend("torch"):
        ref = _run(ref_layer, x.double(), g.double(), ref_layer.lora_A, ref_layer.lora_B)
    for name in mine:
        assert_three_way(mine[name], peft_bf16[name], ref[name], name)


def test_peft_initialisation():
    torch.manual_seed(0)
    layer = FusedLoraLinear(256, 128, r=16, lora_alpha=32)
    assert layer.lora_A.shape == (16, 256) and layer.lora_B.shape == (128, 16)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) on fan_in = in_features
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert layer.scaling == 2.0
    assert FusedLoraLinear(8, 8, r=4, lora_alpha=8, use_rslora=True).scaling == 4.0
    # a fresh adapter is the identity update
    x = torch.randn(3, 256)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


def test_from_linear_shares_storage_and_freezes():
    base = nn.Linear(40, 30)
    layer = FusedLoraLinear.from_linear(base, r=4, lora_alpha=8, lora_dropout=0.1)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.weight.data_ptr() == base.weight.data_ptr()
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert (layer.r, layer.lora_alpha, layer.lora_dropout, layer.scaling) == (4, 8, 0.1, 2.0)
    assert layer.lora_A.dtype == base.weight.dtype and layer.lora_A.device == base.weight.device
    no_bias = FusedLoraLinear.from_linear(nn.Linear(8, 8, bias=False))
    assert no_bias.bias is None
    with pytest.raises(TypeError, match="nn.Linear"):
        FusedLoraLinear.from_linear(nn.Conv1d(3, 3, 1))


def test_merge_and_unmerge():
    layer = FusedLoraLinear(32, 24, r=4, lora_alpha=8)
    nn.init.normal_(layer.lora_B)
    layer.eval()
    x = torch.randn(5, 32)
    before = layer(x)
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


def test_eval_mode_disables_dropout_and_train_mode_applies_it():
    torch.manual_seed(0)
    layer = FusedLoraLinear(64, 64, r=8, lora_alpha=8, lora_dropout=0.5, bias=False)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(16, 64)
    no_dropout = nn.functional.linear(x, layer.weight) + (x @ layer.lora_A.t() @ layer.lora_B.t()) * layer.scaling
    layer.eval()
    torch.testing.assert_close(layer(x), no_dropout)
    layer.train()
    assert not torch.allclose(layer(x), no_dropout, atol=1e-3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), r"r=0 must be a positive integer \(the LoRA rank\)"),
    (dict(r=2.5), r"r=2\.5 must be a positive integer \(the LoRA rank\)"),
    (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
    (dict(lora_dropout=-0.2), r"lora_dropout must be in \[0, 1\)"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedLoraLinear(8, 8, **kwargs)
    with pytest.raises(ValueError, match=match):
        FusedLoraLinear.from_linear(nn.Linear(8, 8), **kwargs)


def test_wrong_input_width_names_the_problem():
    with pytest.raises(ValueError, match="in_features=8"):
        FusedLoraLinear(8, 4)(torch.randn(2, 7))


def test_repr_mentions_configuration():
    text = repr(FusedLoraLinear(8, 4, r=2, lora_alpha=4, lora_dropout=0.1, dtype=torch.bfloat16))
    assert "r=2" in text and "lora_alpha=4" in text and "lora_dropout=0.1" in text
    assert "compute_dtype=bfloat16" in text and "adapter_dtype=float32" in text
