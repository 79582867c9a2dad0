"""``from_peft`` on PEFT's DoRA layers (``use_dora=True``): ``lora.Linear`` over nn.Linear and GPT-2's Conv1D, and
``lora.bnb.Linear4bit`` (QDoRA) are computed by ``fused_lora_linear(..., magnitude=...)`` with the weight norm's
``||W_i||^2`` cached per layer. Parity with unaccelerated PEFT (outputs and the gradients of x, lora_A, lora_B and
lora_magnitude_vector), dropout in training against a float64 reference of PEFT's definition with fused-lora's mask,
eval mode, the cache across optimizer steps, merges and in-place edits of W, PEFT's files and merges, the
fallbacks that stay PEFT's, and the summary.

Every model gets random non-zero B (PEFT starts at B = 0) and a magnitude moved away from its init ``||W + s B A||``
(so ``c = m / n != 1``): DoRA's terms change the result, and a wrong norm, scale or magnitude gradient shows.

Tolerances: fp32 by ``assert_close_fp32`` (``FP32_RTOL``, tests/helpers.py: the DoRA layer adds to LoRA's products
the norm ``n`` (a length-K sum in fp32, by the identity of fused_lora.dora, accurate to ~sqrt(K) u here: no row
near cancellation) and one column scale, i.e. a few more roundings of the same size, well inside 2e-5). Half
precision by the three-way rule (``assert_three_way``) against the same model in float64, the baseline being PEFT's
own bf16 computation. Fallbacks and PEFT's own code on both sides (merges, files): bit-identical.
"""

from __future__ import annotations

import copy
import io
import os
import warnings

import pytest
import torch
from torch import nn

import fused_lora.peft_native as peft_native
from fused_lora import from_peft, fusion_summary, restore_peft, use_backend
from fused_lora.dora import weight_row_norm_sq
from fused_lora.dropout import Dropout

from helpers import HALF_EPS, adamw_losses, assert_close_fp32, assert_three_way
from test_peft_native import (CPU_BACKENDS, MLP, _bnb_mlp, assert_same_run, eager_bitsandbytes, exact,  # noqa: F401
                              peft_model, run)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.tuners.lora import dora as peft_dora  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
PER_CALL_WARNING = "ignore:fused-lora. PEFT's own forward computes:UserWarning"  # warned once per reason

LAYERS = ("up", "down")


def dora_model(model=None, *, seed=0, **config):
    """A PEFT DoRA model: random non-zero B (``peft_model``) and magnitudes scaled by 0.7 to 1.3 per feature."""
    pm = peft_model(model, seed=seed, use_dora=True, **config)
    gen = torch.Generator().manual_seed(seed + 200)
    with torch.no_grad():
        for module in pm.modules():
            if isinstance(module, LoraLayer):
                for dora in module.lora_magnitude_vector.values():
                    m = dora.weight
                    m.mul_((0.7 + 0.6 * torch.rand(m.shape, generator=gen, dtype=torch.float64)).to(m.dtype))
    return pm


def pair(model=None, **config):
    """(ours, theirs): the DoRA model accelerated in place (nothing left to PEFT) and its unaccelerated deep copy."""
    theirs = dora_model(model, **config)
    ours = copy.deepcopy(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # from_peft warns when a layer is left to PEFT
        from_peft(ours)
    return ours, theirs


def dora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def assert_close_to_reference(ours, ref):
    """``run`` results against the float64 ones of the same model (same names, fp32 tolerance)."""
    (y, dx, grads), (y_ref, dx_ref, grads_ref) = ours, ref
    assert_close_fp32(y, y_ref, "y")
    assert_close_fp32(dx, dx_ref, "dx")
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        assert_close_fp32(grads[name], grads_ref[name], name)


class DoraCalls:
    """Counts the fused calls and checks that each is a DoRA call on PEFT's own magnitude Parameter; with
    ``seeds``, gives the first calls the dropout seeds ``seeds[i]`` (recorded with x's 2-D shape)."""

    def __init__(self, monkeypatch, model, seeds=None):
        self.n, self.masks = 0, []
        magnitudes = {id(m.lora_magnitude_vector["default"].weight) for _, m in dora_layers(model)}
        real = peft_native.fused_lora_linear

        def counting(x, weight, lora_A, lora_B, scaling, **kwargs):
            assert id(kwargs["magnitude"]) in magnitudes, "not PEFT's magnitude Parameter"
            if seeds is not None and self.n < len(seeds):
                kwargs["seed"] = seeds[self.n]
                self.masks.append((seeds[self.n], x.reshape(-1, x.shape[-1]).shape))
            self.n += 1
            return real(x, weight, lora_A, lora_B, scaling, **kwargs)

        monkeypatch.setattr(peft_native, "fused_lora_linear", counting)


# ------------------------------------------------------------------------------------------------ parity, p = 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_dense_parity_with_peft(monkeypatch, backend, conv1d):
    """No dropout: outputs and the gradients of x, every A, B and magnitude equal PEFT's DoRA and the same model
    in float64 (PEFT's code), for nn.Linear and Conv1D (fan_in_fan_out) bases, rsLoRA and per-layer ranks."""
    ours, theirs = pair(MLP(conv1d=conv1d), fan_in_fan_out=conv1d, use_rslora=True, rank_pattern={"down": 2})
    ref = copy.deepcopy(theirs).double()
    calls = DoraCalls(monkeypatch, ours)
    x, g = torch.randn(3, 5, 48), torch.randn(3, 5, 48)
    with use_backend(backend):
        result = run(ours, x, g)
    assert calls.n == 2
    assert any("lora_magnitude_vector" in name for name in result[2])
    assert_same_run(result, run(theirs, x, g), assert_close_fp32)
    assert_close_to_reference(result, run(ref, x.double(), g.double()))
    summary = fusion_summary(ours)
    assert summary.fused == ["base_model.model.up", "base_model.model.down"] and summary.all_fused
    assert str(summary) == "fused-lora: 2 of 2 PEFT LoRA layers fused"


def test_bf16_base_three_way(monkeypatch):
    """bf16 base with PEFT's fp32 adapters and magnitude (autocast_adapter_dtype): they stay fp32 Parameters with
    fp32 gradients. Outputs and dx (bf16) by the three-way rule against float64, PEFT's bf16 computation as the
    baseline; the fp32 gradients by the same rule with bf16's eps as atol (their error comes from the bf16
    activations and gradients they are computed from)."""
    ours, theirs = pair(MLP().to(torch.bfloat16))
    assert all(p.dtype == torch.float32 for n, p in ours.named_parameters() if "lora_" in n)
    ref = copy.deepcopy(theirs).double()
    calls = DoraCalls(monkeypatch, ours)
    x, g = torch.randn(4, 7, 48).to(torch.bfloat16), torch.randn(4, 7, 48).to(torch.bfloat16)
    y, dx, grads = run(ours, x, g)
    assert calls.n == 2 and y.dtype == dx.dtype == torch.bfloat16
    y_peft, dx_peft, grads_peft = run(theirs, x, g)
    y_ref, dx_ref, grads_ref = run(ref, x.double(), g.double())
    assert_three_way(y, y_peft, y_ref, "y")
    assert_three_way(dx, dx_peft, dx_ref, "dx")
    assert grads.keys() == grads_peft.keys() and any("magnitude" in n for n in grads)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
        err = (grad.double() - grads_ref[name]).abs()
        bound = 2 * (grads_peft[name].double() - grads_ref[name]).abs() \
            + HALF_EPS[torch.bfloat16] * grads_ref[name].abs().max()
        assert (err <= bound).all(), f"{name}: {(err - bound).max():.3e} over the three-way bound"


# ------------------------------------------------------------------------------------------------ dropout, eval


def _dora_reference(pm, x, g, p, masks, dense_weight=lambda base: base.weight):
    """The DoRA MLP of ``pm`` in float64, PEFT's definition written out (training with dropout D):
    ``y = x W^T + b + (c - 1) * (D(x) W^T) + c * s * D(x) A^T B^T``, ``c = m / ||W + s B A||_row`` (detached),
    ``D(x) = keep * x / (1 - p)`` with fused-lora's masks ``[(seed, (M, K)), ...]`` in call order (up, down), W from
    ``dense_weight(base layer)``. Returns (y, dx, {parameter name: gradient})."""
    params = {n: t.detach().double().requires_grad_(True) for n, t in pm.named_parameters() if t.requires_grad}
    m = pm.base_model.model

    def layer(i, name, h):
        lora = getattr(m, name)
        pre = f"base_model.model.{name}."
        A, B = params[pre + "lora_A.default.weight"], params[pre + "lora_B.default.weight"]
        mag = params[pre + "lora_magnitude_vector.default.weight"]
        w, b, s = dense_weight(lora.base_layer).double(), lora.base_layer.bias.double(), lora.scaling["default"]
        seed, (rows, cols) = masks[i]
        keep = Dropout(p, seed).keep_mask(rows, cols, "cpu").reshape(h.shape).double()
        hd = h * keep / (1 - p)
        with torch.no_grad():
            n = torch.linalg.norm(w + s * B @ A, dim=1)
        c = mag / n
        return h @ w.t() + b + (c - 1) * (hd @ w.t()) + c * s * (hd @ A.t() @ B.t())

    xr = x.double().requires_grad_(True)
    y = layer(1, "down", nn.functional.gelu(layer(0, "up", xr)))
    y.backward(g.double())
    return y.detach(), xr.grad, {n: t.grad for n, t in params.items()}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_dropout_in_training_against_float64_reference(monkeypatch, eager_bitsandbytes, backend, base):
    """Training with lora_dropout = 0.3: PEFT's dropout form (the base product taken again on D(x)) with
    fused-lora's mask, against the float64 definition with the same masks: output and every gradient; dense and
    QDoRA (bitsandbytes NF4, W as bitsandbytes dequantizes it)."""
    p = 0.3
    ours, _ = pair(_bnb_mlp() if base == "nf4" else None, lora_dropout=p)
    k, hidden = (64, 128) if base == "nf4" else (48, 80)
    ours.train()
    calls = DoraCalls(monkeypatch, ours, seeds=[1234, 5678])
    x, g = torch.randn(3, 5, k), torch.randn(3, 5, k)
    with use_backend(backend):
        y, dx, grads = run(ours, x, g)
    assert calls.n == 2 and [shape for _, shape in calls.masks] == [(15, k), (15, hidden)]
    dense = bnb_dequantize if base == "nf4" else (lambda layer: layer.weight)
    assert_close_to_reference((y, dx, grads), _dora_reference(ours, x, g, p, calls.masks, dense))
    # the masks matter: without dropout the output is another one
    ours.eval()
    with torch.no_grad():
        assert (ours(x) - y).abs().max() > 1e-2


def test_eval_mode_ignores_dropout(monkeypatch):
    """In eval mode PEFT's DoRA neither drops nor takes the base product twice, whatever p: the fused call gets
    training=False (p ignored) and matches PEFT. With the LoRA layers training but only the dropout modules in
    eval mode, PEFT takes its dropout form with D = identity: the same function, matched too."""
    ours, theirs = pair(lora_dropout=0.4)
    calls = DoraCalls(monkeypatch, ours)
    x, g = torch.randn(6, 48), torch.randn(6, 48)
    ours.eval(), theirs.eval()
    assert_same_run(run(ours, x, g), run(theirs, x, g), assert_close_fp32)
    with torch.no_grad():
        assert_close_fp32(ours(x), theirs(x), "no_grad eval")
    ours.train(), theirs.train()
    for model in (ours, theirs):
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.eval()
    assert_same_run(run(ours, x, g), run(theirs, x, g), assert_close_fp32)
    assert calls.n == 6


# ------------------------------------------------------------------------------------------------ QDoRA


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("peft_class", ["Linear4bit", "Linear"])
def test_bitsandbytes_4bit_qdora_parity(monkeypatch, eager_bitsandbytes, backend, peft_class):
    """PEFT's QDoRA (lora.bnb.Linear4bit, and lora.Linear over an NF4 Linear4bit; fp32 compute): outputs and every
    gradient match PEFT's, which dequantizes W with bitsandbytes for its norm; the packed weight is untouched and
    the cached ``||W_i||^2`` is that of the dequantized weight."""
    ours, theirs = pair(_bnb_mlp(loaded_in_4bit=peft_class == "Linear4bit"))
    layer = ours.base_model.model.up
    assert type(layer).__name__ == "Fused" + peft_class
    packed = layer.base_layer.weight
    before = packed.detach().clone()
    calls = DoraCalls(monkeypatch, ours)
    x, g = torch.randn(3, 4, 64), torch.randn(3, 4, 64)
    with use_backend(backend):
        result = run(ours, x, g)
    assert calls.n == 2
    assert_same_run(result, run(theirs, x, g), assert_close_fp32)
    assert layer.base_layer.weight is packed and torch.equal(packed, before)
    dense = bnb_dequantize(layer.base_layer)
    cached = layer.__dict__[peft_native._DORA_ATTR].get(peft_native._nf4_view(layer, layer.base_layer),
                                                              torch.float32)
    assert_close_fp32(cached, weight_row_norm_sq(dense), "||W_i||^2 of the dequantized weight")


def bnb_dequantize(base):
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float()


# ------------------------------------------------------------------------------------------------ the cache


def test_training_steps_move_m_and_the_cache_follows_the_base_weight(monkeypatch):
    """A tiny Llama, all-linear DoRA: three AdamW steps change A, B and m (the cached ||W_i||^2 stays the same
    tensor: it belongs to the frozen W, the adapters' part of the norm is recomputed every step) and the losses
    match PEFT's; then an in-place edit of W (a new version) and a dtype move (new storage) recompute it, and
    the outputs still match PEFT's."""
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, vocab_size=64,
                                      attn_implementation="eager")
    torch.manual_seed(0)
    ours, theirs = pair(transformers.LlamaForCausalLM(config), target_modules="all-linear")
    calls = DoraCalls(monkeypatch, ours)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj

    m0 = layer.lora_magnitude_vector["default"].weight.detach().clone()
    first = []
    ours_losses = adamw_losses(
        ours, ids, after_first_step=lambda: first.append(
            layer.__dict__[peft_native._DORA_ATTR].get(layer.base_layer.weight)))
    cached = first[0]
    theirs_losses = adamw_losses(theirs, ids)
    assert calls.n == 3 * 7
    for a, b in zip(ours_losses, theirs_losses):
        assert abs(a - b) <= 2e-5 * abs(b), (ours_losses, theirs_losses)
    assert (layer.lora_magnitude_vector["default"].weight - m0).abs().max() > 1e-3  # m trained
    norms = layer.__dict__[peft_native._DORA_ATTR]
    assert norms.get(layer.base_layer.weight) is cached  # not recomputed for adapter updates
    assert torch.equal(cached, weight_row_norm_sq(layer.base_layer.weight))
    with torch.no_grad():
        assert_close_fp32(ours(ids).logits, theirs(ids).logits, "logits after training")

    for model in (ours, theirs):  # in place: the version counter moves
        with torch.no_grad():
            model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.mul_(1.5)
    with torch.no_grad():
        assert_close_fp32(ours(ids).logits, theirs(ids).logits, "logits after an in-place edit of W")
    fresh = norms.get(layer.base_layer.weight)
    assert fresh is not cached and torch.equal(fresh, weight_row_norm_sq(layer.base_layer.weight))
    ours.double(), theirs.double()  # new storage and dtype
    with torch.no_grad():
        assert_close_fp32(ours(ids).logits, theirs(ids).logits, "float64 logits")
    assert norms.get(layer.base_layer.weight).dtype == torch.float64


# ------------------------------------------------------------------------------------------------ PEFT workflows


def test_save_pretrained_same_files_and_reload(tmp_path, monkeypatch):
    """After a fused forward+backward (the caches exist), save_pretrained writes PEFT's files byte for byte
    (lora_magnitude_vector included, use_dora in the config); PEFT reloads them, and from_peft on the reloaded
    model computes the same outputs."""
    ours, theirs = pair()
    x, g = torch.randn(4, 48), torch.randn(4, 48)
    run(ours, x, g)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    assert sorted(os.listdir(tmp_path / "ours")) == sorted(os.listdir(tmp_path / "theirs"))
    for name in os.listdir(tmp_path / "theirs"):
        if name == "adapter_config.json":
            continue  # target_modules is a set: its order may differ; compared below
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "theirs" / name).read_bytes(), name
    config = peft.PeftConfig.from_pretrained(str(tmp_path / "ours"))
    assert config.use_dora and config.to_dict() == peft.PeftConfig.from_pretrained(str(tmp_path / "theirs")).to_dict()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "pt") as f:
        assert sum("lora_magnitude_vector" in k for k in f.keys()) == 2
    torch.manual_seed(0)  # the base model dora_model built
    reloaded = from_peft(peft.PeftModel.from_pretrained(MLP(), str(tmp_path / "ours")))
    assert fusion_summary(reloaded).all_fused
    with torch.no_grad():
        assert_close_fp32(reloaded(x), theirs(x), "reloaded")


def test_merge_unmerge_and_merge_and_unload(monkeypatch):
    """PEFT's DoRA merge (W' = (m / n) (W + s B A)) and unmerge run PEFT's code on both models: the same weights
    bit for bit; merged layers run the base layer (no fused call); after unmerge the cache is dropped and the
    fused outputs match PEFT's again; merge_and_unload gives the same plain modules."""
    ours, theirs = pair()
    x = torch.randn(5, 48)
    with torch.no_grad():
        adapted = ours(x)
    assert peft_native._DORA_ATTR in ours.base_model.model.up.__dict__
    calls = DoraCalls(monkeypatch, ours)
    ours.merge_adapter(), theirs.merge_adapter()
    for (name, a), (_, b) in zip(dora_layers(ours), dora_layers(theirs)):
        assert a.merged and torch.equal(a.base_layer.weight, b.base_layer.weight), name
        assert peft_native._DORA_ATTR not in a.__dict__, name
    with torch.no_grad():
        exact(ours(x), theirs(x), "merged")
        assert_close_fp32(ours(x), adapted, "merged vs adapted")
    assert calls.n == 0 and not fusion_summary(ours).fallback_calls

    ours.unmerge_adapter(), theirs.unmerge_adapter()
    for (name, a), (_, b) in zip(dora_layers(ours), dora_layers(theirs)):
        assert not a.merged and torch.equal(a.base_layer.weight, b.base_layer.weight), name
    with torch.no_grad():
        assert_close_fp32(ours(x), theirs(x), "after unmerge")
    assert calls.n == 2
    up = ours.base_model.model.up
    assert torch.equal(up.__dict__[peft_native._DORA_ATTR].get(up.base_layer.weight),
                       weight_row_norm_sq(up.base_layer.weight))  # of the unmerged weight

    merged, merged_twin = ours.merge_and_unload(), theirs.merge_and_unload()
    assert all(type(getattr(merged, n)) is nn.Linear for n in LAYERS)
    with torch.no_grad():
        exact(merged(x), merged_twin(x), "merge_and_unload")
        assert_close_fp32(merged(x), adapted, "merge_and_unload vs adapted")


def test_pickle_and_deepcopy_after_a_forward():
    """The per-layer cache is not part of the pickled or copied state (a copy computes its own)."""
    ours, _ = pair()
    x = torch.randn(3, 48)
    with torch.no_grad():
        y = ours(x)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = copy.deepcopy(ours)
    for model in (loaded, copied):
        layer = model.base_model.model.up
        assert type(layer) is peft_native.FusedLinear
        assert not layer.__dict__[peft_native._DORA_ATTR]._entries
        with torch.no_grad():
            exact(model(x), y, "reloaded")


def test_torch_compile_fullgraph(monkeypatch):
    """A fused DoRA layer compiles without graph breaks (aot_eager, fullgraph=True) and matches eager; under
    compilation the weight norm is computed in the graph (the cache is not read)."""
    torch._dynamo.reset()
    ours, _ = pair(lora_dropout=0.0)
    layer = ours.base_model.model.up
    x, g = torch.randn(4, 48), torch.randn(4, 80)

    def grads(fn):
        xx = x.clone().requires_grad_(True)
        fn(xx).backward(g)
        out = [xx.grad] + [p.grad.clone() for p in layer.parameters() if p.requires_grad]
        layer.zero_grad(set_to_none=True)
        return out

    eager = grads(layer)
    compiled = grads(torch.compile(layer, backend="aot_eager", fullgraph=True))
    for i, (a, b) in enumerate(zip(compiled, eager)):
        assert_close_fp32(a, b, f"gradient {i}")
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------ what stays PEFT's


def _left_to_peft_case(name, pm):
    """Put the DoRA model ``pm`` in a state the fused path does not compute; the expected reason."""
    up = pm.base_model.model.up
    if name == "hook on the magnitude":
        up.lora_magnitude_vector["default"].register_forward_pre_hook(lambda m, args: None)
        return "hooks on the base, adapter or dropout modules"
    if name == "trainable base weight":
        up.base_layer.weight.requires_grad_(True)
        return "base weight requires grad"
    if name == "DoRA fan_in_fan_out":
        up.lora_magnitude_vector["default"].fan_in_fan_out = True
        return "DoRA fan_in_fan_out=True over a Linear"
    raise AssertionError(name)


@pytest.mark.filterwarnings(PER_CALL_WARNING)
@pytest.mark.parametrize("case", ["hook on the magnitude", "trainable base weight", "DoRA fan_in_fan_out"])
def test_states_left_to_peft_give_peft_numbers_and_a_reason(monkeypatch, case):
    """A DoRA layer in a state the fused path does not reproduce is computed by PEFT's forward (the same numbers,
    bit for bit, as the twin), listed in the summary with its reason; the other layer stays fused."""
    theirs = dora_model()
    reason = _left_to_peft_case(case, theirs)
    ours = copy.deepcopy(theirs)
    with pytest.warns(UserWarning, match="1 of 2 PEFT LoRA layers fused"):
        from_peft(ours)
    summary = fusion_summary(ours)
    assert summary.fused == ["base_model.model.down"]
    assert summary.left_to_peft["base_model.model.up"].startswith(reason), summary
    calls = DoraCalls(monkeypatch, ours)
    x, g = torch.randn(3, 48), torch.randn(3, 48)
    if case == "DoRA fan_in_fan_out":  # PEFT then fails on its own (a transposed weight): the same error
        with pytest.raises(RuntimeError) as expected:
            theirs(x)
        with pytest.raises(RuntimeError) as got:
            ours(x)
        assert str(got.value) == str(expected.value)
        return
    assert_same_run(run(ours, x, g), run(theirs, x, g), assert_close_fp32)
    assert calls.n == 1  # down
    with torch.no_grad():  # up is PEFT's own code on both sides
        exact(ours.base_model.model.up(x), theirs.base_model.model.up(x), "up")


def test_peft_dora_cache_in_eval_mode_runs_peft(monkeypatch):
    """PEFT's opt-in DoRA cache (ENABLE_DORA_CACHING) reuses the first eval call's weight norm until train(): the
    fused path cannot reproduce a stale norm, so such calls run PEFT's forward, are counted and named."""
    ours, theirs = pair()
    monkeypatch.setattr(peft_dora, "ENABLE_DORA_CACHING", True)
    calls = DoraCalls(monkeypatch, ours)
    x = torch.randn(3, 48)
    ours.eval(), theirs.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact(ours(x), theirs(x), "cached eval")
    assert calls.n == 0
    assert "ENABLE_DORA_CACHING" in fusion_summary(ours).left_to_peft["base_model.model.up"]
    ours.train(), theirs.train()  # training: PEFT does not cache, the fused path computes
    x2, g = torch.randn(3, 48), torch.randn(3, 48)
    assert_same_run(run(ours, x2, g), run(theirs, x2, g), assert_close_fp32)
    assert calls.n == 2 and fusion_summary(ours).left_to_peft == {}


@pytest.mark.filterwarnings(PER_CALL_WARNING)
def test_other_lora_variants_still_run_peft(monkeypatch):
    """Variants other than DoRA (aLoRA here) stay PEFT's, with their reason."""
    theirs = peft_model(alora_invocation_tokens=[1, 2])
    ours = copy.deepcopy(theirs)
    with pytest.warns(UserWarning, match="0 of 2 PEFT LoRA layers fused"):
        from_peft(ours)
    assert set(fusion_summary(ours).left_to_peft.values()) == {"LoRA variant ALora (PEFT computes variants)"}
    x, g = torch.randn(3, 48), torch.randn(3, 48)
    assert_same_run(run(ours, x, g), run(theirs, x, g), exact)


def test_restore_peft_drops_the_cache():
    ours, theirs = pair()
    x = torch.randn(3, 48)
    with torch.no_grad():
        ours(x)
    restore_peft(ours)
    for name, layer in dora_layers(ours):
        assert type(layer) is peft.tuners.lora.Linear, name
        assert not any(k.startswith("_fused_lora") for k in layer.__dict__), name
    with torch.no_grad():
        exact(ours(x), theirs(x), "restored")
