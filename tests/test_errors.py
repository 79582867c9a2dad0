"""Unclear errors made clear (issue 11, items 10 and 11): each bad input raises an error naming the argument and
what is wrong, or works as PyTorch's own layer does; the limits that stay (double backward, torch.func) say so."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fused_lora import (
    FusedLoraLinear,
    NF4Weight,
    apply_lora,
    fused_lora_linear,
    lora_layers,
    quantize_nf4,
    use_backend,
)
from fused_lora.adapters import CONFIG_NAME, SAFETENSORS_NAME, load_adapter, save_adapter

from conftest import DEVICE_BACKENDS

bnb = pytest.importorskip("bitsandbytes")

PREFIX = "base_model.model."


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.v_proj = nn.Linear(16, 8)


def _adapter_dir(tmp_path):
    save_adapter(apply_lora(TwoLinears(), ["q_proj", "v_proj"], r=4, lora_alpha=8), tmp_path)
    return tmp_path


def _edit_config(path, **changes):
    config = json.loads((path / CONFIG_NAME).read_text())
    config.update(changes)
    (path / CONFIG_NAME).write_text(json.dumps(config))


def _edit_tensors(path, fn):
    tensors = load_file(path / SAFETENSORS_NAME)
    fn(tensors)
    save_file(tensors, path / SAFETENSORS_NAME, metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------------ adapter files


@pytest.mark.parametrize("change,match", [
    (dict(r=0), r"adapter_config\.json: r=0 must be a positive integer"),
    (dict(r="4"), r"adapter_config\.json: r='4' must be a positive integer"),
    (dict(r=4.0), r"adapter_config\.json: r=4\.0 must be a positive integer"),
    (dict(r=True), r"adapter_config\.json: r=True must be a positive integer"),
    (dict(lora_alpha=None), r"adapter_config\.json: lora_alpha=None must be a finite number"),
    (dict(lora_alpha="8"), r"adapter_config\.json: lora_alpha='8' must be a finite number"),
    (dict(rank_pattern={"q_proj": 0}), r"adapter_config\.json: rank_pattern\['q_proj'\]=0 must be a positive integer"),
    (dict(rank_pattern={"q_proj": "4"}), r"rank_pattern\['q_proj'\]='4' must be a positive integer"),
    (dict(rank_pattern={"q_proj": 4.0}), r"rank_pattern\['q_proj'\]=4\.0 must be a positive integer"),
    (dict(alpha_pattern={"q_proj": None}), r"alpha_pattern\['q_proj'\]=None must be a finite number"),
])
@pytest.mark.parametrize("existing", [False, True], ids=["new-layers", "existing-layers"])
def test_adapter_config_rank_and_alpha_values(tmp_path, change, match, existing):
    path = _adapter_dir(tmp_path)
    _edit_config(path, **change)
    model = TwoLinears()
    if existing:
        apply_lora(model, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    with pytest.raises(ValueError, match=match):
        load_adapter(model, path)


A_KEY = f"{PREFIX}q_proj.lora_A.weight"
B_KEY = f"{PREFIX}v_proj.lora_B.weight"


def _poison(key, index, value):
    def fn(tensors):
        tensors[key][index] = value
    return fn


@pytest.mark.parametrize("corrupt,exc,match", [
    (lambda t: t.update({A_KEY: torch.ones(4, 16, dtype=torch.int32)}), TypeError,
     r"q_proj\.lora_A\.weight has dtype torch\.int32"),
    (lambda t: t.update({B_KEY: torch.zeros(8, 4, dtype=torch.bool)}), TypeError,
     r"v_proj\.lora_B\.weight has dtype torch\.bool"),
    (_poison(A_KEY, (1, 3), float("nan")), ValueError,
     r"q_proj\.lora_A\.weight has 1 non-finite value.*first at index \[1, 3\]"),
    (_poison(B_KEY, (7, 0), float("-inf")), ValueError,
     r"v_proj\.lora_B\.weight has 1 non-finite value.*first at index \[7, 0\]"),
])
def test_adapter_tensors_must_be_finite_floats(tmp_path, corrupt, exc, match):
    path = _adapter_dir(tmp_path)
    _edit_tensors(path, corrupt)
    model = TwoLinears()
    with pytest.raises(exc, match=match):
        load_adapter(model, path)
    assert not list(lora_layers(model))  # refused before the model was modified


# ------------------------------------------------------------------------------------------------ regexes


@pytest.mark.parametrize("kwargs,match", [
    (dict(target_modules="q_proj("), r"target_modules='q_proj\(' is not a valid regular expression"),
    (dict(target_modules=["q_proj"], exclude_modules="v_proj("),
     r"exclude_modules='v_proj\(' is not a valid regular expression"),
    (dict(target_modules=["q_proj"], modules_to_save=["v_proj("]),
     r"modules_to_save entry 'v_proj\(' is not a valid regular expression"),
    (dict(target_modules=["q_proj"], rank_pattern={"q_proj(": 4}),
     r"rank_pattern key 'q_proj\(' is not a valid regular expression"),
    (dict(target_modules=["q_proj"], alpha_pattern={"[q": 4}),
     r"alpha_pattern key '\[q' is not a valid regular expression"),
])
def test_bad_regex_names_the_argument(kwargs, match):
    model = TwoLinears()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        apply_lora(model, **kwargs)
    assert not list(lora_layers(model)) and model.state_dict().keys() == before.keys()


@pytest.mark.parametrize("change,match", [
    (dict(target_modules="q_proj("), r"adapter_config\.json: target_modules='q_proj\(' is not a valid regular"),
    (dict(exclude_modules="(v"), r"adapter_config\.json: exclude_modules='\(v' is not a valid regular"),
    (dict(rank_pattern={"q_proj(": 2}), r"adapter_config\.json: rank_pattern key 'q_proj\(' is not a valid regular"),
])
def test_bad_regex_in_adapter_config(tmp_path, change, match):
    path = _adapter_dir(tmp_path)
    _edit_config(path, **change)
    with pytest.raises(ValueError, match=match):
        load_adapter(TwoLinears(), path)


# ------------------------------------------------------------------------------------------------ layer construction


def test_from_bnb_says_what_it_expects():
    with pytest.raises(TypeError, match=r"expects a bitsandbytes Linear4bit .*NF4.*got .*Linear.*"
                                        r"from_linear\(linear, quantize='nf4'\)"):
        FusedLoraLinear.from_bnb(nn.Linear(64, 64))
    with pytest.raises(TypeError, match=r"Linear8bitLt.*8-bit.*not supported"):
        FusedLoraLinear.from_bnb(bnb.nn.Linear8bitLt(64, 64))
    with pytest.raises(TypeError, match=r"Linear8bitLt.*8-bit.*not supported"):
        NF4Weight.from_bnb(bnb.nn.Linear8bitLt(64, 64))
    # a Linear4bit that is not quantized yet keeps its own message
    with pytest.raises(ValueError, match="not quantized yet"):
        FusedLoraLinear.from_bnb(bnb.nn.Linear4bit(64, 64, quant_type="nf4"))


def test_from_linear_refuses_bitsandbytes_layers():
    quantized = bnb.nn.Linear4bit(64, 64, quant_type="nf4").to("cpu")
    for layer in (quantized, bnb.nn.Linear4bit(64, 64, quant_type="nf4")):
        with pytest.raises(TypeError, match=r"Linear4bit.*use FusedLoraLinear\.from_bnb"):
            FusedLoraLinear.from_linear(layer)
    with pytest.raises(TypeError, match=r"Linear8bitLt.*8-bit.*not supported"):
        FusedLoraLinear.from_linear(bnb.nn.Linear8bitLt(64, 64))


class DoublingLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class NoForwardLinear(nn.Linear):
    pass


def test_from_linear_refuses_subclasses_with_their_own_forward():
    with pytest.raises(TypeError, match=r"DoublingLinear.*own forward"):
        FusedLoraLinear.from_linear(DoublingLinear(8, 8))
    # subclasses that keep nn.Linear.forward stay accepted
    FusedLoraLinear.from_linear(NoForwardLinear(8, 8))
    FusedLoraLinear.from_linear(nn.modules.linear.NonDynamicallyQuantizableLinear(8, 8))

    model = nn.Sequential()
    model.add_module("proj", DoublingLinear(8, 8))
    with pytest.raises(TypeError, match=r"module 'proj' is a .*DoublingLinear.*own forward"):
        apply_lora(model, ["proj"])


# ------------------------------------------------------------------------------------------------ NF4


@pytest.mark.parametrize("blocksize,exc,match", [
    (64.0, TypeError, r"blocksize must be an int .*got 64\.0"),
    (True, TypeError, r"blocksize must be an int .*got True"),
    ("64", TypeError, r"blocksize must be an int .*got '64'"),
    (48, ValueError, r"blocksize must be one of"),
])
def test_quantize_nf4_blocksize_type(blocksize, exc, match):
    with pytest.raises(exc, match=match):
        quantize_nf4(torch.randn(8, 64), blocksize=blocksize)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_quantize_nf4_refuses_non_finite_weights(value):
    w = torch.randn(8, 96)
    w[2, 70] = value
    w[5, 1] = value
    with pytest.raises(ValueError, match=r"2 non-finite value.*first at \[2, 70\].*NF4 cannot represent"):
        quantize_nf4(w)
    linear = nn.Linear(96, 8).half()
    with torch.no_grad():
        linear.weight.copy_(w)
    with pytest.raises(ValueError, match=r"2 non-finite value.*first at \[2, 70\]"):
        FusedLoraLinear.from_linear(linear, quantize="nf4")


# ------------------------------------------------------------------------------------------------ in_features = 0


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_zero_in_features_works_like_nn_linear(device, backend, bias):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Initializing zero-element tensors is a no-op", as nn.Linear
        layer = FusedLoraLinear(0, 5, r=2, lora_dropout=0.1, bias=bias, device=device)
        ref = nn.Linear(0, 5, bias=bias, device=device)
    if bias:
        with torch.no_grad():
            ref.bias.copy_(layer.bias)
        layer.bias.requires_grad_(True)
    for shape in [(3, 0), (2, 4, 0), (0,)]:
        x = torch.randn(*shape, device=device, requires_grad=True)
        with use_backend(backend):
            y = layer(x)
        assert y.shape == ref(x).shape == shape[:-1] + (5,)
        torch.testing.assert_close(y, ref(x), rtol=0, atol=0)
        layer.zero_grad()
        y.sum().backward()
        assert x.grad.shape == x.shape
        assert layer.lora_A.grad.shape == (2, 0) and torch.count_nonzero(layer.lora_B.grad) == 0
        if bias:
            assert torch.equal(layer.bias.grad, torch.full((5,), float(y.numel() // 5), device=device))


# ------------------------------------------------------------------------------------------------ meta device


def test_meta_device_propagates_shapes():
    layer = FusedLoraLinear(8, 5, r=2, lora_dropout=0.1, device="meta")
    x = torch.empty(2, 3, 8, device="meta", requires_grad=True)
    y = layer(x)
    assert y.device.type == "meta" and y.shape == (2, 3, 5)
    y.sum().backward()
    assert x.grad.device.type == "meta" and x.grad.shape == x.shape
    assert layer.lora_A.grad.shape == (2, 8) and layer.lora_B.grad.shape == (5, 2)
    y2 = fused_lora_linear(torch.empty(4, 8, device="meta"), torch.empty(6, 8, device="meta"),
                           torch.empty(2, 8, device="meta"), torch.empty(6, 2, device="meta"), 2.0)
    assert y2.device.type == "meta" and y2.shape == (4, 6)


# ------------------------------------------------------------------------------------------------ limits that stay


def _layer():
    layer = FusedLoraLinear(8, 5, r=2)
    nn.init.normal_(layer.lora_B)
    return layer


def test_double_backward_says_it_is_not_supported():
    layer = _layer()
    x = torch.randn(3, 8, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"fused-lora.*double backward.*not supported"):
        gx.sum().backward()
    # create_graph=True alone (no second backward through fused-lora's gradients) still works
    y = layer(x)
    (gx2,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (gx_ref,) = torch.autograd.grad(layer(x).sum(), x)
    torch.testing.assert_close(gx2.detach(), gx_ref)


@pytest.mark.parametrize("transform", ["vmap", "grad", "jvp", "jacrev"])
def test_torch_func_transforms_say_they_are_not_supported(transform):
    layer = _layer()
    x = torch.randn(3, 8)
    call = {
        "vmap": lambda: torch.func.vmap(layer)(x.unsqueeze(0).expand(2, 3, 8)),
        "grad": lambda: torch.func.grad(lambda t: layer(t).sum())(x),
        "jvp": lambda: torch.func.jvp(layer, (x,), (torch.ones_like(x),)),
        "jacrev": lambda: torch.func.jacrev(layer)(x),
    }[transform]
    with pytest.raises(NotImplementedError, match=r"fused-lora.*torch\.func.*not supported"):
        call()


def test_forward_mode_ad_says_it_is_not_supported():
    import torch.autograd.forward_ad as fwAD

    layer = _layer()
    with fwAD.dual_level():
        x = fwAD.make_dual(torch.randn(3, 8), torch.ones(3, 8))
        with pytest.raises(NotImplementedError, match=r"fused-lora.*forward-mode.*not supported"):
            layer(x)
