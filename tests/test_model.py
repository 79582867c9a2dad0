"""Model-level API: apply_lora's module selection and freezing against PEFT's get_peft_model, parameter counts,
training parity with PEFT, merge_and_unload, and the error cases (from_peft: test_peft_native.py).

Models: a tiny random Llama built from a config (nothing downloaded) and small hand-written modules.

Tolerances. All comparisons are fp32. ``FP32_RTOL`` (tests/helpers.py) bounds one fp32 layer's error relative to the
largest reference value; a model's logits pass through ~15 such operations in series (2 decoder layers: norms,
q/k/v/o, attention, MLP; then the head), each contributing a typical relative error of ~sqrt(K) * 2**-24 ~ 7e-7
(K <= 128), so the expected end-to-end error is ~sqrt(15) * 7e-7 ~ 3e-6 and ``FP32_RTOL = 2e-5`` still holds it with a
~7x margin while any real difference (a wrong scaling, a missing layer, a dropout mask in eval) moves logits by >= 1e-3
relative. Training parity compares losses with the same relative tolerance: the loss is one more reduction over the
logits, and AdamW's update ``m / (sqrt(v) + eps)`` is scale-invariant, so a relative gradient perturbation d moves a
parameter by ~lr * d: after 5 steps at lr = 1e-2 the parameters differ by ~5e-2 * 3e-6, far below what the loss
tolerance can see.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fused_lora import (
    FusedLoraLinear,
    apply_lora,
    lora_layers,
    merge_and_unload,
    print_trainable_parameters,
    trainable_parameters_summary,
)

from helpers import FP32_RTOL, assert_close_fp32

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft.tuners.lora import LoraLayer  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, **overrides) -> nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=128, attn_implementation="eager", **overrides,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama():
    """One random tiny Llama per module; tests deep-copy it."""
    return tiny_llama()


def tokens(batch=4, seq=16, seed=1):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def peft_lora(model, **config):
    return peft.get_peft_model(model, peft.LoraConfig(**config))


def peft_lora_names(peft_model) -> set:
    return {n for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}


def our_names(model) -> set:
    return {n for n, _ in lora_layers(model)}


def randomize_B(model, std=0.05, seed=2):
    """PEFT initialises B = 0 (identity adapter); a random B makes every adapter visible in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * std)


def copy_peft_adapters_into_ours(peft_model, ours):
    root = peft_model.base_model.model
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            theirs = root.get_submodule(name)
            layer.lora_A.copy_(theirs.lora_A["default"].weight)
            layer.lora_B.copy_(theirs.lora_B["default"].weight)


def train(model, batch, steps, lr=1e-2, optimizer=torch.optim.AdamW):
    """``optimizer`` (AdamW) on the trainable parameters, causal-LM loss on a fixed batch; returns the per-step
    losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def assert_losses_close(ours, theirs):
    assert len(ours) == len(theirs)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert abs(a - b) <= FP32_RTOL * abs(b), f"step {step}: loss {a!r} vs PEFT {b!r}"


# ------------------------------------------------------------------------------------------------ apply_lora


def test_apply_lora_replaces_targets_and_freezes_the_rest(llama):
    model = copy.deepcopy(llama)
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    x = tokens()
    before = model(x).logits
    out = apply_lora(model, LLAMA_TARGETS, r=8, lora_alpha=16)
    assert out is model

    expected = {f"model.layers.{i}.{blk}.{p}" for i in range(2) for blk, ps in
                (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))
                for p in ps}
    assert our_names(model) == expected
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, FusedLoraLinear)
    for name, layer in lora_layers(model):
        assert layer.weight is originals[name].weight  # shared, not copied
        assert (layer.r, layer.lora_alpha, layer.scaling) == (8, 16, 2.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{ab}" for n in expected for ab in ("lora_A", "lora_B")}
    # B = 0: the adapted model computes exactly what the base model did
    torch.testing.assert_close(model(x).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("target_modules,extra", [
    (LLAMA_TARGETS, {}),
    (["q_proj", "v_proj"], {}),
    (r".*\.(q|v)_proj", {}),
    (r".*layers\.1\..*_proj", {}),
    ("all-linear", {}),
    ("ALL-LINEAR", {}),
    (["layers.0.self_attn.q_proj", "down_proj"], {}),
    (["down_proj", "up_proj"], {"exclude_modules": ["layers.1.mlp.down_proj"]}),
    (["q_proj", "k_proj"], {"exclude_modules": r".*layers\.0\..*"}),
    (r".*_proj", {"modules_to_save": ["layers.1.mlp"]}),
])
def test_target_selection_matches_peft(llama, target_modules, extra):
    ours = apply_lora(copy.deepcopy(llama), target_modules, **extra)
    theirs = peft_lora(copy.deepcopy(llama), target_modules=target_modules, **extra)
    assert our_names(ours) == peft_lora_names(theirs)


def test_rank_and_alpha_patterns_match_peft(llama):
    kwargs = dict(r=8, lora_alpha=16, rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 2},
                  alpha_pattern={r"layers\.0\..*": 32}, use_rslora=True)
    ours = apply_lora(copy.deepcopy(llama), LLAMA_TARGETS, **kwargs)
    theirs = peft_lora(copy.deepcopy(llama), target_modules=LLAMA_TARGETS, **kwargs)
    root = theirs.base_model.model
    got = {n: (l.r, l.lora_alpha, l.scaling, tuple(l.lora_A.shape)) for n, l in lora_layers(ours)}
    want = {n: (root.get_submodule(n).r["default"], root.get_submodule(n).lora_alpha["default"],
                root.get_submodule(n).scaling["default"], tuple(root.get_submodule(n).lora_A["default"].weight.shape))
            for n in peft_lora_names(theirs)}
    assert got == want
    assert {v[0] for v in got.values()} == {2, 4, 8}  # the patterns did something


@pytest.mark.parametrize("target_modules,kwargs", [
    (LLAMA_TARGETS, dict(r=8, lora_alpha=16)),
    ("all-linear", dict(r=4, lora_alpha=8, rank_pattern={"down_proj": 2})),
])
def test_print_trainable_parameters_matches_peft(llama, capsys, target_modules, kwargs):
    theirs = peft_lora(copy.deepcopy(llama), target_modules=target_modules, **kwargs)
    theirs.print_trainable_parameters()
    peft_line = capsys.readouterr().out
    ours = apply_lora(copy.deepcopy(llama), target_modules, **kwargs)
    print_trainable_parameters(ours)
    assert capsys.readouterr().out == peft_line
    assert peft_line.startswith("trainable params: ")
    trainable, total, pct = trainable_parameters_summary(ours)
    assert (trainable, total) == theirs.get_nb_trainable_parameters()
    assert pct == pytest.approx(100 * trainable / total)


def test_modules_to_save_trained_in_place(llama):
    """Trainable counts equal PEFT's; PEFT's total also counts the copy of the saved module, ours does not."""
    ours = apply_lora(copy.deepcopy(llama), LLAMA_TARGETS, modules_to_save=["lm_head"])
    theirs = peft_lora(copy.deepcopy(llama), target_modules=LLAMA_TARGETS, modules_to_save=["lm_head"])
    trainable, total, _ = trainable_parameters_summary(ours)
    peft_trainable, peft_total = theirs.get_nb_trainable_parameters()
    assert trainable == peft_trainable
    assert total == peft_total - ours.lm_head.weight.numel()
    assert ours.lm_head.weight.requires_grad and not ours.model.embed_tokens.weight.requires_grad


# ------------------------------------------------------------------------------------------------ errors


class Tiny(nn.Module):
    """emb -> proj -> act -> head, small enough for the error cases."""

    def __init__(self, conv1d=False, tied=False):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.proj = Conv1D(8, 8) if conv1d else nn.Linear(8, 8)
        self.act = nn.Tanh()
        self.head = nn.Linear(8, 10, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.act(self.proj(self.emb(x))))


def assert_unchanged(model):
    assert not list(lora_layers(model))


@pytest.mark.parametrize("call,exc,match", [
    (lambda m: apply_lora(m, ["nonexistent"]), ValueError, r"matched no module.*q_proj"),
    (lambda m: apply_lora(m, r"model\.layers\.0\.mlp"), TypeError, r"model\.layers\.0\.mlp.*LlamaMLP.*not an nn\.Linear"),
    (lambda m: apply_lora(m, r".*(q_proj|layers\.0\.mlp)"), TypeError, "LlamaMLP"),
    (lambda m: apply_lora(m, ["q_proj"], quantize="int8"), ValueError, "quantize='int8'"),
    (lambda m: apply_lora(m, None), ValueError, "target_modules is required"),
    (lambda m: apply_lora(m, []), ValueError, "target_modules is empty"),
    (lambda m: apply_lora(m, ["q_proj"], r=0), ValueError, "positive int"),
    (lambda m: apply_lora(m, ["q_proj"], rank_pattern={"q_proj": -1}), ValueError, "q_proj.*positive int"),
    (lambda m: apply_lora(m, ["q_proj"], lora_dropout=1.0), ValueError, r"lora_dropout must be in \[0, 1\)"),
    (lambda m: apply_lora(m, ["q_proj"], modules_to_save=["score"]), ValueError, r"\['score'\] match no module"),
])
def test_apply_lora_errors_leave_the_model_unchanged(llama, call, exc, match):
    model = copy.deepcopy(llama)
    with pytest.raises(exc, match=match):
        call(model)
    assert_unchanged(model)
    assert all(p.requires_grad for p in model.parameters())


def test_apply_lora_twice_on_the_same_module():
    model = apply_lora(Tiny(), ["proj"])
    with pytest.raises(ValueError, match="'proj' is already a FusedLoraLinear"):
        apply_lora(model, ["proj"])
    apply_lora(model, ["head"])  # another module is fine
    assert our_names(model) == {"proj", "head"}


def test_apply_lora_refuses_conv1d_and_tied_modules_to_save():
    with pytest.raises(TypeError, match="'proj' is a transformers Conv1D.*fan_in_fan_out"):
        apply_lora(Tiny(conv1d=True), ["proj"])
    with pytest.raises(ValueError, match="head.weight is shared with emb.weight"):
        apply_lora(Tiny(tied=True), ["proj"], modules_to_save=["head"])


# ------------------------------------------------------------------------------------------------ training parity


@pytest.mark.parametrize("optimizer", [torch.optim.AdamW, torch.optim.SGD])
def test_training_matches_peft_without_dropout(llama, optimizer):
    """Same initial A (PEFT's kaiming draw), B = 0, fp32: per-step losses equal PEFT's (AdamW and SGD); with SGD the
    final A, B too.

    Final parameters are compared after SGD only: its update is linear in the gradient, so parameter differences
    stay at the fp32 rounding level of the gradients (FP32_RTOL). Adam divides each update by the gradient's own
    magnitude, which turns rounding-level differences of near-zero gradient entries (B starts at 0) into
    differences of up to the learning rate: a tolerance for that would be meaningless, the losses are the check.
    """
    theirs = peft_lora(copy.deepcopy(llama), target_modules=LLAMA_TARGETS, r=8, lora_alpha=16, lora_dropout=0.0)
    ours = apply_lora(copy.deepcopy(llama), LLAMA_TARGETS, r=8, lora_alpha=16, lora_dropout=0.0)
    copy_peft_adapters_into_ours(theirs, ours)
    batch = tokens()
    lr = 1e-2 if optimizer is torch.optim.AdamW else 2.0
    peft_losses = train(theirs, batch, steps=5, lr=lr, optimizer=optimizer)
    our_losses = train(ours, batch, steps=5, lr=lr, optimizer=optimizer)
    assert_losses_close(our_losses, peft_losses)
    assert our_losses[-1] < our_losses[0] - 0.05  # the adapters learned something: the comparison is not vacuous
    if optimizer is not torch.optim.SGD:
        return
    root = theirs.base_model.model
    for name, layer in lora_layers(ours):
        theirs_layer = root.get_submodule(name)
        assert_close_fp32(layer.lora_A.detach(), theirs_layer.lora_A["default"].weight.detach(), f"{name}.lora_A")
        assert_close_fp32(layer.lora_B.detach(), theirs_layer.lora_B["default"].weight.detach(), f"{name}.lora_B")


def test_training_with_dropout_decreases_the_loss_like_peft(llama):
    """With lora_dropout = 0.1 the masks differ by design (different generators): compare the trend only. Ours must
    decrease the loss like PEFT does and must differ from the same run without dropout (the masks are applied)."""
    batch = tokens()
    theirs = peft_lora(copy.deepcopy(llama), target_modules=LLAMA_TARGETS, lora_dropout=0.1)
    ours = apply_lora(copy.deepcopy(llama), LLAMA_TARGETS, lora_dropout=0.1)
    no_dropout = apply_lora(copy.deepcopy(llama), LLAMA_TARGETS, lora_dropout=0.0)
    copy_peft_adapters_into_ours(theirs, ours)
    copy_peft_adapters_into_ours(theirs, no_dropout)
    peft_losses = train(theirs, batch, steps=6)
    our_losses = train(ours, batch, steps=6)
    plain_losses = train(no_dropout, batch, steps=6)
    for losses in (peft_losses, our_losses):
        assert losses[-1] < losses[0] - 0.05, losses
        assert sum(losses[-3:]) < sum(losses[:3]), losses
    assert our_losses[0] == plain_losses[0]  # B = 0 at step 0: dropout cannot change the first loss
    assert our_losses[1:] != plain_losses[1:]


# ------------------------------------------------------------------------------------------------ merge_and_unload


def test_merge_and_unload_matches_the_unmerged_model(llama):
    model = apply_lora(copy.deepcopy(llama), LLAMA_TARGETS)
    randomize_B(model)
    x = tokens()
    with torch.no_grad():
        before = model(x).logits
    adapted = {n: (l.weight.detach().clone(), l.delta_weight()) for n, l in lora_layers(model)}
    out = merge_and_unload(model)
    assert out is model and not list(lora_layers(model))
    for name, (w, delta) in adapted.items():
        merged = model.get_submodule(name)
        assert type(merged) is nn.Linear and not merged.weight.requires_grad
        assert_close_fp32(merged.weight.detach(), w.double() + delta.double(), f"{name}.weight")
    with torch.no_grad():
        assert_close_fp32(model(x).logits, before, "logits")


def test_merge_and_unload_keeps_bias_and_leaves_tied_weights_alone():
    model = Tiny(tied=True)
    emb_before = model.emb.weight.detach().clone()
    apply_lora(model, ["proj", "head"])
    randomize_B(model)
    bias = model.proj.bias
    merge_and_unload(model)
    assert model.proj.bias is bias
    assert torch.equal(model.emb.weight, emb_before)  # the head was tied to it: merged into a new tensor
    assert not torch.equal(model.head.weight, emb_before)


def test_merge_rounds_once_in_bf16():
    """bf16 base and bf16 adapters: W + s * B @ A is formed in fp32 and rounded once, so every merged element is
    within half a bf16 ulp of the float64 value, up to the fp32 error of the r-term product of bf16 values (orders of
    magnitude below a bf16 ulp). (fp32 adapters: test_adapter_dtype.py.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 80)).to(torch.bfloat16)
    apply_lora(model, ["0"], r=8, lora_alpha=16, adapter_dtype=torch.bfloat16)
    randomize_B(model, std=0.05)
    layer = model[0]
    exact = layer.weight.double() + layer.scaling * (layer.lora_B.double() @ layer.lora_A.double())
    merge_and_unload(model)
    merged = model[0].weight.detach()
    assert merged.dtype == torch.bfloat16
    ulp = torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))))
    assert ((merged.double() - exact).abs() <= 0.5 * ulp * (1 + 1e-3)).all()
    assert torch.count_nonzero(merged != exact.to(torch.bfloat16)) <= merged.numel() // 1000  # near-ties only
