"""``from_peft`` accelerates PEFT's own LoRA layers in place: parity with unaccelerated PEFT (outputs and every
gradient; dense, Conv1D and bitsandbytes 4-bit bases; fp32, and a bf16 base with PEFT's fp32 adapters), proof that
the fused path runs inside PEFT's layers (calls counted, bytes saved for backward), the fallbacks to PEFT's own
forward with their summary, and ``restore_peft``. The PEFT workflows (save_pretrained, Trainer, merge, adapters, ...)
are in test_peft_workflows.py.

Tolerances. fp32 comparisons use ``assert_close_fp32`` (``FP32_RTOL``, justified in tests/helpers.py; a tiny Llama's
logits in tests/test_model.py's module docstring). Fallbacks run PEFT's own code on the same inputs, so they must be
bit-identical. Half precision follows the three-way rule (tests/helpers.py ``assert_three_way``).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fused_lora
import fused_lora.peft_native as peft_native
from fused_lora import from_peft, fusion_summary, restore_peft, use_backend

from conftest import DEVICE_BACKENDS
from helpers import HALF_EPS, adamw_losses, assert_close_fp32, assert_three_way

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft.tuners.lora import LoraLayer  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

CPU_BACKENDS = [backend for device, backend in DEVICE_BACKENDS if device == "cpu"]


class MLP(nn.Module):
    """in -> up -> gelu -> down (+ an embedding and a Conv1D for the layer kinds PEFT adapts differently)."""

    def __init__(self, k=48, hidden=80, conv1d=False):
        super().__init__()
        self.emb = nn.Embedding(16, k)
        self.up = Conv1D(hidden, k) if conv1d else nn.Linear(k, hidden)
        self.down = nn.Linear(hidden, k)

    def forward(self, x):
        if not x.is_floating_point():
            x = self.emb(x)
        return self.down(nn.functional.gelu(self.up(x)))


def peft_model(model=None, *, seed=0, **config):
    """A PEFT LoRA model with random nonzero B (PEFT starts B at 0, which would hide a wrong LoRA branch)."""
    torch.manual_seed(seed)
    model = model if model is not None else MLP()
    config.setdefault("target_modules", ["up", "down"])
    config.setdefault("r", 4)
    config.setdefault("lora_alpha", 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(**config))
    randomize_adapters(pm, seed)
    return pm


def randomize_adapters(pm, seed=0):
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for module in pm.modules():
            if isinstance(module, LoraLayer):
                for adapter in module.lora_B:
                    w = module.lora_B[adapter].weight
                    w.copy_(torch.randn(w.shape, generator=gen, dtype=torch.float64).to(w.dtype) * 0.3)


class FusedCalls:
    """Counts the calls of fused_lora_linear made by the accelerated layers."""

    def __init__(self, monkeypatch):
        self.n = 0
        real = peft_native.fused_lora_linear

        def counting(*args, **kwargs):
            self.n += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(peft_native, "fused_lora_linear", counting)


def run(model, x, grad, **kwargs):
    """Output and the gradients of x and of every parameter that requires grad (by name), all detached."""
    x = x.detach().clone().requires_grad_(x.is_floating_point())
    y = model(x, **kwargs)
    y.backward(grad)
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    for p in model.parameters():
        p.grad = None
    return y.detach(), (x.grad.detach() if x.requires_grad else None), grads


def assert_same_run(ours, theirs, close):
    (y, dx, grads), (y_ref, dx_ref, grads_ref) = ours, theirs
    close(y, y_ref, "y")
    if dx_ref is not None:
        close(dx, dx_ref, "dx")
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        assert grads[name].dtype == grads_ref[name].dtype, name
        close(grads[name], grads_ref[name], name)


def exact(a, b, name):
    assert torch.equal(a, b), f"{name}: not bit-identical (max diff {(a.double() - b.double()).abs().max():.3e})"


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_dense_parity_with_peft(monkeypatch, backend, conv1d):
    """Outputs and every gradient (x, every A and B) equal PEFT's, for nn.Linear and GPT-2's Conv1D
    (fan_in_fan_out) bases, rsLoRA and per-layer ranks; the fused path computes every layer."""
    theirs = peft_model(MLP(conv1d=conv1d), fan_in_fan_out=conv1d, use_rslora=True, rank_pattern={"down": 2})
    ours = from_peft(copy.deepcopy(theirs))
    calls = FusedCalls(monkeypatch)
    x, g = torch.randn(3, 5, 48), torch.randn(3, 5, 48)
    with use_backend(backend):
        result = run(ours, x, g)
    assert calls.n == 2
    assert_same_run(result, run(theirs, x, g), assert_close_fp32)
    assert fusion_summary(ours).fused == ["base_model.model.up", "base_model.model.down"]


def test_from_peft_returns_the_same_model_and_keeps_everything(monkeypatch):
    """The same PeftModel object, module tree, Parameter objects and names, requires_grad flags and state dict."""
    pm = peft_model()
    params = dict(pm.named_parameters())
    flags = {name: p.requires_grad for name, p in params.items()}
    modules = [name for name, _ in pm.named_modules()]
    state = {k: v.clone() for k, v in pm.state_dict().items()}
    assert from_peft(pm) is pm
    assert {name: p for name, p in pm.named_parameters()} == params  # identity, not only equality
    assert {name: p.requires_grad for name, p in pm.named_parameters()} == flags
    assert [name for name, _ in pm.named_modules()] == modules
    assert pm.state_dict().keys() == state.keys() and all(torch.equal(pm.state_dict()[k], v) for k, v in state.items())
    layer = pm.base_model.model.up
    assert isinstance(layer, peft.tuners.lora.Linear) and type(layer).__name__ == "FusedLinear"
    assert repr(layer).startswith("lora.FusedLinear(")
    assert from_peft(pm) is pm and type(layer).__name__ == "FusedLinear"  # idempotent


def test_llama_parity_and_training(monkeypatch):
    """A tiny Llama, all-linear with dropout in eval mode and rsLoRA: logits and every gradient match PEFT; three
    AdamW steps later (dropout 0 in train mode) the losses still match."""
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, vocab_size=64,
                                      attn_implementation="eager")
    torch.manual_seed(0)
    theirs = peft_model(transformers.LlamaForCausalLM(config), target_modules="all-linear", use_rslora=True)
    ours = from_peft(copy.deepcopy(theirs))
    calls = FusedCalls(monkeypatch)
    ids = torch.randint(0, 64, (2, 9))

    ours_losses, theirs_losses = adamw_losses(ours, ids), adamw_losses(theirs, ids)
    assert calls.n == 3 * 14  # 7 linear layers x 2 decoder layers, every step
    for a, b in zip(ours_losses, theirs_losses):
        assert abs(a - b) <= 2e-5 * abs(b), (ours_losses, theirs_losses)
    with torch.no_grad():
        assert_close_fp32(ours(ids).logits, theirs(ids).logits, "logits after training")


def test_bf16_base_keeps_peft_fp32_adapters(monkeypatch):
    """PEFT keeps adapters in fp32 on a bf16 base (autocast_adapter_dtype=True). After from_peft they stay the same
    fp32 Parameters, the fused path computes with them (no fp32 copy of x: the kernels / torch path round A and B to
    bf16 where they enter a product), and their gradients are fp32.

    Three-way rule against float64: ``ref`` is the same model in float64 (bf16 base values, fp32 adapter values),
    ``baseline`` is PEFT's own bf16 computation (its LoRA branch in fp32 on an fp32 copy of x). Outputs and dx are
    bf16 (``assert_three_way``); the fp32 adapter gradients get the same rule with bf16's eps as atol, since their
    error comes from the bf16 activations and gradients they are computed from."""
    model = MLP().to(torch.bfloat16)
    theirs = peft_model(model)
    assert theirs.base_model.model.up.lora_A["default"].weight.dtype == torch.float32
    ours = from_peft(copy.deepcopy(theirs))
    ref = copy.deepcopy(theirs).double()
    calls = FusedCalls(monkeypatch)
    x, g = torch.randn(4, 7, 48).to(torch.bfloat16), torch.randn(4, 7, 48).to(torch.bfloat16)
    y, dx, grads = run(ours, x, g)
    assert calls.n == 2
    y_peft, dx_peft, grads_peft = run(theirs, x, g)
    y_ref, dx_ref, grads_ref = run(ref, x.double(), g.double())
    assert y.dtype == dx.dtype == torch.bfloat16
    assert_three_way(y, y_peft, y_ref, "y")
    assert_three_way(dx, dx_peft, dx_ref, "dx")
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
        err = (grad.double() - grads_ref[name]).abs()
        bound = 2 * (grads_peft[name].double() - grads_ref[name]).abs() + HALF_EPS[torch.bfloat16] * grads_ref[name].abs().max()
        assert (err <= bound).all(), f"{name}: {(err - bound).max():.3e} over the three-way bound"
    for name, p in ours.named_parameters():
        if "lora_" in name:
            assert p.dtype == torch.float32, name


# ------------------------------------------------------------------------------------------------ 4-bit bases


bnb = None


def _bnb_mlp(compute_dtype=torch.float32, loaded_in_4bit=True):
    """The MLP with NF4 bitsandbytes Linear4bit layers. ``loaded_in_4bit``: what transformers sets on a 4-bit model,
    for which PEFT builds lora.bnb.Linear4bit layers (else a lora.Linear over the Linear4bit)."""
    global bnb
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = MLP(k=64, hidden=128)
    for name in ("up", "down"):
        lin = getattr(dense, name)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=compute_dtype, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type="nf4", module=q)
        q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        setattr(dense, name, q.to("cpu"))
    dense.is_loaded_in_4bit = loaded_in_4bit
    return dense


def mlp_float64_reference(pm, x, g, dense_weight):
    """The LoRA MLP of a PEFT model (``peft_model(_bnb_mlp())``) in float64, written out: base weights from
    ``dense_weight(base_layer)``, the adapters' values. Returns (y, dx, {parameter name: gradient})."""
    params = {n: p.detach().double().requires_grad_(True) for n, p in pm.named_parameters() if p.requires_grad}
    m = pm.base_model.model

    def lin(name, h):
        layer = getattr(m, name)
        A = params[f"base_model.model.{name}.lora_A.default.weight"]
        B = params[f"base_model.model.{name}.lora_B.default.weight"]
        w = dense_weight(layer.base_layer).double()
        return h @ w.t() + layer.base_layer.bias.double() + (h @ A.t()) @ B.t() * layer.scaling["default"]

    xr = x.double().requires_grad_(True)
    y = lin("down", nn.functional.gelu(lin("up", xr)))
    y.backward(g.double())
    return y.detach(), xr.grad, {n: p.grad for n, p in params.items()}


@pytest.fixture
def eager_bitsandbytes():
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):  # bitsandbytes' CPU ops go through torch.compile: eager is faster
        yield


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("peft_class", ["Linear4bit", "Linear"])
def test_bitsandbytes_4bit_parity(monkeypatch, eager_bitsandbytes, backend, peft_class):
    """PEFT's QLoRA layers (lora.bnb.Linear4bit over NF4 Linear4bit, fp32 compute) read as they are: outputs and every
    gradient match PEFT's, nothing re-quantized, the packed weight untouched. (In-features are multiples of the
    blocksize, where bitsandbytes' CPU dequantization follows the format exactly; see bnb_oracle.py.)"""
    theirs = peft_model(_bnb_mlp(loaded_in_4bit=peft_class == "Linear4bit"))
    assert type(theirs.base_model.model.up).__name__ == peft_class
    ours = from_peft(copy.deepcopy(theirs))
    packed = ours.base_model.model.up.base_layer.weight
    before = packed.detach().clone()
    calls = FusedCalls(monkeypatch)
    x, g = torch.randn(3, 4, 64), torch.randn(3, 4, 64)
    with use_backend(backend):
        result = run(ours, x, g)
    assert calls.n == 2
    assert_same_run(result, run(theirs, x, g), assert_close_fp32)
    assert ours.base_model.model.up.base_layer.weight is packed and torch.equal(packed, before)
    assert type(ours.base_model.model.up).__name__ == "Fused" + peft_class


def test_bitsandbytes_bf16_compute_with_fp32_activations_is_fp32_accurate(monkeypatch, eager_bitsandbytes):
    """QLoRA as PEFT sets it up without autocast: NF4 base computing in bf16, fp32 x (prepare_model_for_kbit_training
    upcasts the rest of the model), fp32 adapters. PEFT computes the base product in bf16 but the LoRA branch in
    fp32 and adds it in fp32; the fused call computes everything in x's dtype (one bf16 computation of the sum would
    round away a young adapter's term: B ~ 1e-3 here), so outputs and every gradient are fp32-accurate against
    float64 of the same values: at least as accurate as PEFT's (whose bf16 base products also enter the adapter
    gradients of the layers below)."""
    theirs = peft_model(_bnb_mlp(torch.bfloat16))
    with torch.no_grad():
        for name in ("up", "down"):
            getattr(theirs.base_model.model, name).lora_B["default"].weight.mul_(3e-3)
    ours = from_peft(copy.deepcopy(theirs))
    calls = FusedCalls(monkeypatch)
    x, g = torch.randn(3, 4, 64), torch.randn(3, 4, 64)
    y, dx, grads = run(ours, x, g)
    assert calls.n == 2 and y.dtype == torch.float32
    # the reference reads ours: its bias is now bf16, as bitsandbytes' first call leaves it (and PEFT's)
    y_ref, dx_ref, grads_ref = mlp_float64_reference(
        ours, x, g, lambda base: bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state))
    assert_close_fp32(y, y_ref, "y")
    assert_close_fp32(dx, dx_ref, "dx")
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
        assert_close_fp32(grad, grads_ref[name], name)


def test_bitsandbytes_trained_bias_keeps_peft_dtypes_and_files(tmp_path, eager_bitsandbytes):
    """bitsandbytes' Linear4bit.forward casts its bias Parameter to the compute dtype on its first call; the fused
    path makes that call itself, so a trained bias (bias="all") has PEFT's dtype, gradient dtype and saved file."""
    theirs = peft_model(_bnb_mlp(torch.bfloat16), bias="all")
    for name in ("up", "down"):  # as prepare_model_for_kbit_training leaves it: fp32, trainable
        bias = getattr(theirs.base_model.model, name).base_layer.bias
        bias.data = bias.data.float()
    ours = from_peft(copy.deepcopy(theirs))
    x, g = torch.randn(3, 64), torch.randn(3, 64)
    _, _, grads = run(ours, x, g)
    _, _, grads_peft = run(theirs, x, g)
    assert {n: t.dtype for n, t in grads.items()} == {n: t.dtype for n, t in grads_peft.items()}
    assert grads["base_model.model.up.base_layer.bias"].dtype == torch.bfloat16
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    from safetensors import safe_open

    def dtypes(path):
        with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
            return {k: f.get_tensor(k).dtype for k in f.keys()}

    assert dtypes(tmp_path / "ours") == dtypes(tmp_path / "theirs")


# ------------------------------------------------------------------------------------------------ saved tensors


def _saved_bytes_besides_x(model, x):
    """Bytes of the tensors autograd saves during one forward that have x's number of elements but are not x
    itself (a dropout mask, a masked copy of x, an fp32 copy of x)."""
    x = x.detach().clone().requires_grad_(True)
    extra = []

    def pack(t):
        if t.numel() == x.numel() and t.data_ptr() != x.data_ptr():
            extra.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(extra)


def test_dropout_saves_nothing_of_the_size_of_x_inside_peft_layers():
    """At p > 0 PEFT saves a mask and a dropped-out copy of x for each layer's LoRA branch; the fused path
    regenerates the mask from a seed and saves x only: proof that it runs inside PEFT's layers."""
    theirs = peft_model(nn.Sequential(nn.Linear(64, 64)), target_modules=["0"], lora_dropout=0.1)
    ours = from_peft(copy.deepcopy(theirs))
    theirs.train(), ours.train()
    x = torch.randn(32, 64)
    assert _saved_bytes_besides_x(theirs, x) >= 32 * 64 * (1 + 4)  # bool mask + fp32 dropout(x), at least
    assert _saved_bytes_besides_x(ours, x) == 0


# ------------------------------------------------------------------------------------------------ fallbacks


def _fallback_case(name):
    if name == "two adapters":
        pm = peft_model()
        pm.add_adapter("other", peft.LoraConfig(r=2, target_modules=["up", "down"]))
        randomize_adapters(pm, seed=1)
        pm.base_model.set_adapter(["default", "other"])
        return pm, {}
    if name == "adapter_names":
        pm = peft_model()
        pm.add_adapter("other", peft.LoraConfig(r=2, target_modules=["up", "down"]))
        randomize_adapters(pm, seed=1)
        pm.eval()  # PEFT refuses adapter_names in training mode
        return pm, {"adapter_names": ["default", "other", "__base__"]}
    if name == "lora_bias":
        pm = peft_model(lora_bias=True)
        with torch.no_grad():
            pm.base_model.model.up.lora_B["default"].bias.normal_()
        return pm, {}
    if name == "alora":  # another LoRA variant (DoRA is fused: tests/test_dora_peft.py)
        return peft_model(alora_invocation_tokens=[1, 2]), {}
    raise AssertionError(name)


@pytest.mark.parametrize("case,reason", [
    ("two adapters", "several adapters active at once (default, other)"),
    ("adapter_names", "adapter_names (mixed-adapter batch)"),
    ("lora_bias", "lora_bias=True"),
    ("alora", "LoRA variant ALora"),
])
def test_fallbacks_give_peft_numbers_and_show_in_the_summary(monkeypatch, case, reason):
    theirs, kwargs = _fallback_case(case)
    ours = copy.deepcopy(theirs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from_peft(ours)
        x, g = torch.randn(3, 48), torch.randn(3, 48)
        calls = FusedCalls(monkeypatch)
        result = run(ours, x, g, **kwargs)
    assert_same_run(result, run(theirs, x, g, **kwargs), exact)
    summary = fusion_summary(ours)
    assert not summary.all_fused
    per_call = case == "adapter_names"
    if per_call:  # a property of the call: the layers stay fused, the call is counted
        assert summary.fused == ["base_model.model.up", "base_model.model.down"]
        assert summary.fallback_calls == {name: {reason: 1} for name in summary.fused}
        assert calls.n == 0
    else:  # a property of the layer: listed with its reason (from_peft warned), and its calls counted
        assert any(r.startswith(reason) for r in summary.left_to_peft.values()), summary
        assert any("left to PEFT" in str(w.message) for w in caught)
        assert calls.n == 2 - len(summary.left_to_peft)
    assert reason.split(" (")[0] in str(summary)


def test_other_peft_layer_kinds_are_left_to_peft_with_a_reason(monkeypatch):
    """An Embedding LoRA layer is PEFT's; the Linear ones next to it are fused."""
    theirs = peft_model(target_modules=["emb", "up", "down"])
    ours = copy.deepcopy(theirs)
    with pytest.warns(UserWarning, match=r"2 of 3 PEFT LoRA layers fused[\s\S]*lora.layer.Embedding layers are not"):
        from_peft(ours)
    calls = FusedCalls(monkeypatch)
    ids = torch.randint(0, 16, (3, 5))
    g = torch.randn(3, 5, 48)
    assert_same_run(run(ours, ids, g), run(theirs, ids, g), assert_close_fp32)
    assert calls.n == 2
    assert list(fusion_summary(ours).left_to_peft) == ["base_model.model.emb"]


def test_input_peft_refuses_is_refused_the_same_way():
    """An input dtype nn.Linear refuses (float64 x on fp32 weights) goes to PEFT's forward, which raises its own
    error: the same error as unaccelerated PEFT."""
    theirs = peft_model()
    ours = from_peft(copy.deepcopy(theirs))
    x = torch.randn(2, 48, dtype=torch.float64)
    with pytest.raises(RuntimeError) as expected:
        theirs(x)
    with pytest.warns(UserWarning, match="x of dtype torch.float64"), pytest.raises(RuntimeError) as got:
        ours(x)
    assert str(got.value) == str(expected.value)


def test_disabled_and_merged_layers_run_the_base_layer_without_counting_a_fallback(monkeypatch):
    pm = from_peft(peft_model())
    x = torch.randn(2, 48)
    with torch.no_grad():
        expected = pm(x)
    calls = FusedCalls(monkeypatch)
    restored = restore_peft(copy.deepcopy(pm))
    with torch.no_grad(), pm.disable_adapter(), restored.disable_adapter():
        exact(pm(x), restored(x), "disabled")
    pm.merge_adapter()
    with torch.no_grad():
        assert_close_fp32(pm(x), expected, "merged")
    assert calls.n == 0  # the merged forward and the disabled one are the base layer's, computed by PEFT
    assert fusion_summary(pm).fallback_calls == {}
    pm.unmerge_adapter()
    with torch.no_grad():
        pm(x)
    assert calls.n == 2


def test_layers_added_later_show_until_from_peft_runs_again(monkeypatch):
    pm = from_peft(peft_model(target_modules=["up"]))
    pm.add_adapter("more", peft.LoraConfig(target_modules=["down"]))
    pm.set_adapter("more")
    summary = fusion_summary(pm)
    assert "call fused_lora.from_peft(model) again" in summary.left_to_peft["base_model.model.down"]
    from_peft(pm)
    assert fusion_summary(pm).all_fused


def test_restore_peft_gives_peft_forward_back(monkeypatch):
    pm = from_peft(peft_model())
    x = torch.randn(2, 48)
    with torch.no_grad():
        fused = pm(x)
    assert restore_peft(pm) is pm
    assert type(pm.base_model.model.up) is peft.tuners.lora.Linear
    calls = FusedCalls(monkeypatch)
    with torch.no_grad():
        assert_close_fp32(pm(x), fused, "restored")
    assert calls.n == 0
    assert "not accelerated" in next(iter(fusion_summary(pm).left_to_peft.values()))


def test_lora_model_and_injected_adapters_are_accelerated_too(monkeypatch):
    """from_peft takes what PEFT produces: a PeftModel, its LoraModel, or a model with injected adapters."""
    injected = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["up"]), MLP())
    assert from_peft(injected) is injected and fusion_summary(injected).fused == ["up"]
    lora_model = peft_model().base_model
    assert from_peft(lora_model) is lora_model and len(fusion_summary(lora_model).fused) == 2
    with pytest.warns(UserWarning, match="no PEFT LoRA layer"):
        from_peft(MLP())


def test_summary_is_printable():
    pm = from_peft(peft_model())
    text = str(fusion_summary(pm))
    assert text == "fused-lora: 2 of 2 PEFT LoRA layers fused"
    assert fusion_summary(pm).all_fused
    assert isinstance(fusion_summary(pm), fused_lora.FusionSummary)


def test_weight_repacked_by_bitsandbytes_cpu_inference_still_trains(monkeypatch, eager_bitsandbytes):
    """bitsandbytes' Linear4bit.forward in eval mode without grad repacks a CPU weight in place (AVX512-BF16
    CPUs); its training forward afterwards loses the input gradient. The fused path reads the repacked weight (a
    copy in the standard layout, exactly the values bitsandbytes computes with) and keeps every gradient. The
    repack is applied here with bitsandbytes' own function, so this runs on any CPU."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    pm = from_peft(peft_model(_bnb_mlp()))
    for name in ("up", "down"):
        weight = getattr(pm.base_model.model, name).base_layer.weight
        weight.data, weight.quant_state = _convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    assert fusion_summary(pm).all_fused
    calls = FusedCalls(monkeypatch)
    x, g = torch.randn(3, 64), torch.randn(3, 64)
    y, dx, grads = run(pm, x, g)
    assert calls.n == 2 and dx is not None

    # the values bitsandbytes computes with after the repack (test_nf4_format.py checks this reading exactly)
    y_ref, dx_ref, grads_ref = mlp_float64_reference(
        pm, x, g, lambda base: fused_lora.NF4Weight.from_bnb(base).dequantize(torch.float32))
    assert_close_fp32(y, y_ref, "y")
    assert_close_fp32(dx, dx_ref, "dx")
    for n, grad in grads.items():
        assert_close_fp32(grad, grads_ref[n], n)


def test_trained_base_biases_get_their_gradients(monkeypatch):
    """bias="all": PEFT trains the base layers' biases; the fused path computes their gradients too."""
    theirs = peft_model(bias="all")
    assert theirs.base_model.model.up.base_layer.bias.requires_grad
    ours = from_peft(copy.deepcopy(theirs))
    calls = FusedCalls(monkeypatch)
    x, g = torch.randn(5, 48), torch.randn(5, 48)
    result = run(ours, x, g)
    assert calls.n == 2 and "base_model.model.up.base_layer.bias" in result[2]
    assert_same_run(result, run(theirs, x, g), assert_close_fp32)


def test_other_peft_methods_have_nothing_to_accelerate():
    ia3 = peft.get_peft_model(MLP(), peft.IA3Config(target_modules=["up"], feedforward_modules=[]))
    with pytest.warns(UserWarning, match="no PEFT LoRA layer"):
        assert from_peft(ia3) is ia3


def test_disabled_input_dtype_casting_runs_peft(monkeypatch):
    """Under peft.helpers.disable_input_dtype_casting PEFT multiplies bf16 x with the fp32 adapters as they are
    (and nn.Linear refuses): the fused path leaves such calls to PEFT, which raises its own error."""
    from peft.helpers import disable_input_dtype_casting

    theirs = peft_model(MLP().to(torch.bfloat16))
    ours = from_peft(copy.deepcopy(theirs))
    x = torch.randn(2, 48).to(torch.bfloat16)
    with disable_input_dtype_casting(theirs), pytest.raises(RuntimeError) as expected:
        theirs(x)
    with disable_input_dtype_casting(ours), pytest.raises(RuntimeError) as got:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours(x)
    assert str(got.value) == str(expected.value)
    assert any("input dtype casting disabled" in r for calls in fusion_summary(ours).fallback_calls.values()
               for r in calls)


def test_global_module_hooks_run_peft(monkeypatch):
    """A hook registered for every module call sees PEFT's submodule calls: the fused path, which makes none, leaves
    such calls to PEFT."""
    theirs = peft_model()
    ours = from_peft(copy.deepcopy(theirs))
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(m))
    try:
        calls = FusedCalls(monkeypatch)
        x = torch.randn(2, 48)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exact(ours(x).detach(), theirs(x).detach(), "y")
    finally:
        handle.remove()
    assert calls.n == 0
    layer = ours.base_model.model.up
    assert any(m is layer.lora_A["default"] for m in seen) and any(m is layer.base_layer for m in seen)
    assert all("global module hooks" in next(iter(c)) for c in fusion_summary(ours).fallback_calls.values())


def test_multihead_attention_out_proj_is_not_listed_as_fused():
    """PEFT's lora.MultiheadAttention wraps its out_proj in a lora.Linear that it merges rather than calls: the
    outer layer is PEFT's, and the inner one is not reported as fused."""

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x)[0]

    pm = peft_model(Attn(), target_modules=["mha"])
    with pytest.warns(UserWarning, match="0 of 1 PEFT LoRA layers fused"):
        from_peft(pm)
    summary = fusion_summary(pm)
    assert summary.fused == [] and list(summary.left_to_peft) == ["base_model.model.mha"]
