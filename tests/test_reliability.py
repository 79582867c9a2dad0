"""Defects that would give wrong numbers or damage a base weight without a word: merged layers and adapter loading,
tied weights, the merged state in state dicts, NF4 merge cycles, float64 merges, autocast, adapters that never run."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fused_lora
from fused_lora import FusedLoraLinear, apply_lora, load_adapter, merge_and_unload, save_adapter
from fused_lora.nf4 import quantize_nf4

from helpers import assert_close_fp32


class _Mlp(nn.Module):
    def __init__(self, dim=24, hidden=40, dtype=torch.float32):
        super().__init__()
        self.up = nn.Linear(dim, hidden, dtype=dtype)
        self.down = nn.Linear(hidden, dim, dtype=dtype)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _randomize_adapters(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in fused_lora.lora_layers(model):
            for p in (layer.lora_A, layer.lora_B):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_load_adapter_into_merged_layers(tmp_path, quantize):
    """Loading unmerges first and merges the new adapter: W then holds exactly the new delta (NF4: the codes of the
    original weight plus the new delta), and a later unmerge gives back the original base weight (exactly for NF4,
    whose pre-merge codes are kept; to fp32 rounding when dense)."""
    torch.manual_seed(0)
    source = apply_lora(_Mlp(), ["up", "down"], r=4, lora_alpha=8)
    _randomize_adapters(source, seed=1)
    save_adapter(source, tmp_path / "new")

    model = apply_lora(_Mlp(), ["up", "down"], r=4, lora_alpha=8, quantize=quantize).eval()
    _randomize_adapters(model, seed=2)
    expect = copy.deepcopy(model)  # the same base, unmerged, with the new adapter
    for name, layer in fused_lora.lora_layers(expect):
        layer.set_adapter_weights(source.get_submodule(name).lora_A, source.get_submodule(name).lora_B)
    original = {n: layer.base_weight(torch.float32).clone() for n, layer in fused_lora.lora_layers(model)}
    for _, layer in fused_lora.lora_layers(model):
        layer.merge()
    load_adapter(model, tmp_path / "new")

    x = torch.randn(5, 24)
    for name, layer in fused_lora.lora_layers(model):
        assert layer.merged
        assert torch.equal(layer.lora_A, source.get_submodule(name).lora_A)
        if quantize:
            requantized = quantize_nf4(original[name] + layer.delta_weight(), blocksize=64, double_quant=True)
            assert torch.equal(layer.nf4_weight.data, requantized.data), name
    if quantize is None:  # merged dense layers compute x (W + dW) in one GEMM: fp32 rounding
        assert_close_fp32(model(x), expect(x).detach(), "outputs after loading into merged layers")
    for name, layer in fused_lora.lora_layers(model):
        layer.unmerge()
        if quantize:
            assert torch.equal(layer.base_weight(torch.float32), original[name]), name
        else:  # four fp32 roundings of |W| + |dW| at most
            bound = 4 * 2**-24 * (original[name].abs().max() + layer.delta_weight().abs().max())
            assert (layer.weight - original[name]).abs().max() <= bound, name
    if quantize:
        assert torch.equal(model(x), expect(x))
    else:
        assert_close_fp32(model(x), expect(x).detach(), "unmerged outputs")


class _Tied(nn.Module):
    def __init__(self, vocab=30, dim=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tie_word_embeddings

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.hidden(self.embed(ids))))


def test_merge_refuses_tied_weights_and_merge_and_unload_leaves_them():
    torch.manual_seed(0)
    model = _Tied()
    with pytest.warns(UserWarning, match=r"lm_head: the base weight is shared with embed.weight"):
        apply_lora(model, ["lm_head", "hidden"], r=4, lora_alpha=8)
    _randomize_adapters(model, seed=3)
    embedding = model.embed.weight.detach().clone()
    ids = torch.randint(0, 30, (2, 7))
    logits = model(ids).detach()
    assert model.lm_head.weight_shared_with == ("embed.weight",) and model.hidden.weight_shared_with == ()
    with pytest.raises(RuntimeError, match=r"shared with embed.weight \(tied weights\)"):
        model.lm_head.merge()
    assert not model.lm_head.merged and torch.equal(model.embed.weight, embedding)
    model.hidden.merge()  # not shared: merges
    assert model.hidden.merged
    merge_and_unload(model)
    assert torch.equal(model.embed.weight, embedding)
    assert_close_fp32(model(ids), logits, "merged logits")


def test_two_lora_layers_on_one_weight_and_views_of_a_larger_weight():
    model = _Mlp(dim=16, hidden=16)
    model.down.weight = model.up.weight
    with pytest.warns(UserWarning, match="shared with"):
        apply_lora(model, ["up", "down"], r=2, lora_alpha=4)
    assert model.up.weight_shared_with == ("down.base.weight",) and model.down.weight_shared_with == ("up.base.weight",)
    for layer in (model.up, model.down):
        with pytest.raises(RuntimeError, match="tied weights"):
            layer.merge()
    # slices of one fused [q; k; v] buffer: disjoint views do not count; a module holding the whole buffer does
    def fused_qkv(hold_buffer):
        qkv = nn.Parameter(torch.randn(48, 16), requires_grad=False)
        model = nn.Module()
        model.q, model.k = nn.Linear(16, 16), nn.Linear(16, 16)
        model.q.weight, model.k.weight = nn.Parameter(qkv[:16]), nn.Parameter(qkv[16:32])
        if hold_buffer:
            model.register_buffer("qkv", qkv)
        return model

    model = fused_qkv(hold_buffer=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_lora(model, ["q", "k"], r=2)
    assert model.q.weight_shared_with == () and model.k.weight_shared_with == ()
    model.q.merge()
    model = fused_qkv(hold_buffer=True)
    with pytest.warns(UserWarning, match="k: the base weight is shared with qkv"):
        apply_lora(model, ["k"], r=2)
    assert model.k.weight_shared_with == ("qkv",)
    with pytest.raises(RuntimeError, match="tied weights"):
        model.k.merge()


def test_merged_state_travels_with_the_state_dict():
    torch.manual_seed(0)
    src = FusedLoraLinear(20, 12, r=4)
    _randomize_adapters(src, seed=4)
    x = torch.randn(3, 20)
    unmerged_out = src(x).detach()
    src.merge()
    fresh = FusedLoraLinear(20, 12, r=4)
    fresh.load_state_dict(src.state_dict())  # strict
    assert fresh.merged and fresh.lora_merged.item()
    assert_close_fp32(fresh(x), unmerged_out, "merged layer restored from its state dict")
    fresh.unmerge()
    assert_close_fp32(fresh(x), unmerged_out, "after unmerge")
    # an unmerged state dict into a merged layer: the layer becomes unmerged with that weight
    src.unmerge()
    merged_dst = FusedLoraLinear(20, 12, r=4)
    merged_dst.merge()
    merged_dst.load_state_dict(src.state_dict())
    assert not merged_dst.merged
    assert_close_fp32(merged_dst(x), unmerged_out, "unmerged state dict into a merged layer")


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_merged_state_in_model_state_dicts(quantize):
    torch.manual_seed(0)
    a = apply_lora(_Mlp(), ["up"], r=4, lora_alpha=8, quantize=quantize).eval()
    _randomize_adapters(a, seed=5)
    x = torch.randn(4, 24)
    out = a(x).detach()
    a.up.merge()
    b = apply_lora(_Mlp(), ["up"], r=4, lora_alpha=8, quantize=quantize).eval()
    b.load_state_dict(a.state_dict())
    assert b.up.merged
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    if quantize is None:
        assert_close_fp32(b(x), out, "merged model")


def test_float64_merge_round_trip_in_float64():
    torch.manual_seed(0)
    layer = FusedLoraLinear(30, 20, r=4, dtype=torch.float64)
    _randomize_adapters(layer, seed=6)
    w = layer.weight.detach().clone()
    expect = w + (layer.lora_B.detach() @ layer.lora_A.detach()) * layer.scaling
    layer.merge()
    assert (layer.weight - expect).abs().max() <= 4 * 2**-53 * expect.abs().max()
    layer.unmerge()
    assert (layer.weight - w).abs().max() <= 8 * 2**-53 * expect.abs().max()  # fp32 rounding would be ~1e-8


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_autocast_leaves_float64_alone(backend):
    """Autocast casts only floating tensors other than float64, for fused_lora_linear as for nn.Linear."""
    gen = torch.Generator().manual_seed(0)
    x, w, a, b = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((3, 8), (5, 8), (2, 8), (5, 2)))
    plain = fused_lora.fused_lora_linear(x, w, a, b, 0.5)
    with fused_lora.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused_lora.fused_lora_linear(x, w, a, b, 0.5)
        assert torch.nn.functional.linear(x, w).dtype == torch.float64  # PyTorch's rule, for reference
        with pytest.raises(TypeError, match="dtype mismatch: x is torch.float64"):
            fused_lora.fused_lora_linear(x, w.float(), a, b, 0.5)  # nn.Linear fails here too
    assert y.dtype == torch.float64 and torch.equal(y, plain)


def test_all_linear_leaves_out_linears_their_parent_bypasses():
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True), nn.Linear(16, 4))
    adapted = {n for n, _ in fused_lora.lora_layers(apply_lora(model, "all-linear", r=2))}
    assert adapted == {"1"}, adapted  # not 0.self_attn.out_proj, 0.linear1, 0.linear2
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True))
    with pytest.raises(ValueError, match=r"'0.self_attn.out_proj': nn.MultiheadAttention .* never run"):
        apply_lora(model, ["out_proj"], r=2)
    with pytest.warns(UserWarning, match=r"'0.linear1': nn.TransformerEncoderLayer's inference fast path"):
        apply_lora(model, ["linear1"], r=2)


def test_encoder_fast_path_really_skips_the_adapter():
    """Why linear1 / linear2 warn: in eval mode without grad the encoder layer's fast path ignores the adapter,
    and with the fast path disabled the adapter runs (the remedy the warning gives)."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        base = enc(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_lora(enc, ["linear1"], r=2)
    with torch.no_grad():
        enc.linear1.lora_B.normal_()
        skipped = enc(x)
        before = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            used = enc(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(before)
    torch.testing.assert_close(skipped, base)
    assert (used - base).abs().max() > 1e-3


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_partial_and_old_state_dicts_keep_the_merged_state_consistent(quantize):
    """Loading only A and B into a merged layer unmerges and merges again; loading only a base weight (no flag)
    means an unmerged one; a state dict written before the flag existed loads strictly; after to_empty() (a meta
    init) the garbage buffer neither decides forward nor reaches a checkpoint."""
    torch.manual_seed(0)

    def layer():
        model = apply_lora(_Mlp(), ["up"], r=4, lora_alpha=8, quantize=quantize).eval()
        _randomize_adapters(model, seed=7)
        return model.up

    src, dst = layer(), layer()
    x = torch.randn(3, 24)
    original = dst.base_weight(torch.float32).clone()
    dst.merge()
    adapters = {k: v for k, v in src.state_dict().items() if k in ("lora_A", "lora_B")}
    dst.load_state_dict(adapters, strict=False)
    assert dst.merged and torch.equal(dst.lora_A, src.lora_A)
    dst.unmerge()
    if quantize:
        assert torch.equal(dst.base_weight(torch.float32), original)
    else:
        assert (dst.weight - original).abs().max() <= 4 * 2**-24 * (original.abs().max() + 1)

    dst.merge()
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if k.startswith("base.")}, strict=False)
    assert not dst.merged
    # the earliest format: no "lora_merged" flag, and the base's entries directly under the layer ("weight" /
    # "nf4_data", ...), as written before the base became a submodule
    old_format = {k.removeprefix("base."): v for k, v in src.state_dict().items() if k != "lora_merged"}
    assert any(k in old_format for k in ("weight", "nf4_data"))
    fresh = layer()
    fresh.merge()
    fresh.load_state_dict(old_format)  # strict
    assert not fresh.merged
    torch.testing.assert_close(fresh(x), src(x), rtol=0, atol=0)

    if quantize is None:
        meta = FusedLoraLinear(24, 40, r=4, device="meta").to_empty(device="cpu")
        meta.lora_merged.fill_(True)  # what uninitialised memory may hold
        assert not meta.merged and not meta.state_dict()["lora_merged"].item()


def test_set_adapter_weights_checks_shapes():
    layer = FusedLoraLinear(8, 6, r=2)
    with pytest.raises(ValueError, match=r"lora_A has shape \[1, 8\], the layer expects \[2, 8\]"):
        layer.set_adapter_weights(torch.randn(1, 8), torch.randn(6, 2))
