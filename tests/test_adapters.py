"""Adapter files (fused_lora.adapters): round trips with PEFT in both directions, rank/alpha patterns,
modules_to_save, the safetensors layout, bitwise round trips, and the error cases.

Tolerance: outputs of the same weights computed by PEFT and by fused-lora are compared with ``assert_close_fp32``
(``FP32_RTOL`` relative to the largest logit); the justification for a whole tiny Llama is in tests/test_model.py.
Tensors that only travel through files are compared bitwise.
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fused_lora import apply_lora, lora_layers
from fused_lora.adapters import CONFIG_NAME, SAFETENSORS_NAME, load_adapter, save_adapter

from helpers import assert_close_fp32

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft.tuners.lora import LoraLayer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PREFIX = "base_model.model."


def tiny_llama(seed=0, dtype=torch.float32):
    config = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=128, attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def tokens(batch=3, seq=11, seed=1):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def randomize(tensors, seed=5, std=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            t.copy_((torch.randn(t.shape, generator=gen) * std).to(t.dtype))


def our_adapted(base, **kwargs):
    """apply_lora on a copy of base, with random (non-zero) B so that every adapter shows in the outputs."""
    model = apply_lora(copy.deepcopy(base), kwargs.pop("target_modules", TARGETS), **kwargs)
    randomize([layer.lora_B for _, layer in lora_layers(model)])
    return model


def peft_adapted(base, **config):
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    randomize([m.lora_B["default"].weight for m in model.modules() if isinstance(m, LoraLayer)])
    return model


# ------------------------------------------------------------------------------------------------ ours -> PEFT


@pytest.mark.parametrize("kwargs", [
    dict(r=8, lora_alpha=16),
    dict(r=8, lora_alpha=16, use_rslora=True, lora_dropout=0.05,
         rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 2}, alpha_pattern={"v_proj": 32}),
    dict(target_modules=r".*layers\.0\.self_attn\.(q|v)_proj", r=4, lora_alpha=8),
    dict(target_modules="all-linear", r=4, lora_alpha=4),
])
def test_our_adapter_loads_in_peft(llama, tmp_path, kwargs):
    ours = our_adapted(llama, **kwargs)
    save_adapter(ours, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path).eval()
    relevant = [str(w.message) for w in caught if "is_gradient_checkpointing" not in str(w.message)]
    assert not relevant, relevant  # no unexpected-key, missing-key or config warnings
    root = theirs.base_model.model
    assert {n for n, m in root.named_modules() if isinstance(m, LoraLayer)} == {n for n, _ in lora_layers(ours)}
    for name, layer in lora_layers(ours):
        theirs_layer = root.get_submodule(name)
        assert torch.equal(theirs_layer.lora_A["default"].weight, layer.lora_A)
        assert torch.equal(theirs_layer.lora_B["default"].weight, layer.lora_B)
        assert theirs_layer.scaling["default"] == layer.scaling
    x = tokens()
    assert_close_fp32(logits(ours, x), logits(theirs, x), "logits")


def test_saved_config_and_tensor_layout(llama, tmp_path):
    ours = our_adapted(llama, r=8, lora_alpha=16, rank_pattern={"q_proj": 4}, alpha_pattern={"layers.0.mlp.up_proj": 8})
    save_adapter(ours, tmp_path, base_model_name_or_path="org/tiny-llama")
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, SAFETENSORS_NAME]
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] is None
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["use_rslora"]) == (8, 16, 0.0, False)
    assert config["target_modules"] == sorted(TARGETS)
    assert config["rank_pattern"] == {"model.layers.0.self_attn.q_proj": 4, "model.layers.1.self_attn.q_proj": 4}
    assert config["alpha_pattern"] == {"model.layers.0.mlp.up_proj": 8}
    assert config["base_model_name_or_path"] == "org/tiny-llama"
    assert (config["use_dora"], config["fan_in_fan_out"], config["bias"], config["init_lora_weights"]) == (
        False, False, "none", True)
    parsed = peft.LoraConfig.from_pretrained(tmp_path)  # PEFT accepts it as a whole
    assert parsed.r == 8 and set(parsed.target_modules) == set(TARGETS)

    with safe_open(str(tmp_path / SAFETENSORS_NAME), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    layers = dict(lora_layers(ours))
    assert keys == {f"{PREFIX}{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    stored = load_file(tmp_path / SAFETENSORS_NAME)
    for name, layer in layers.items():
        assert torch.equal(stored[f"{PREFIX}{name}.lora_A.weight"], layer.lora_A)
        assert stored[f"{PREFIX}{name}.lora_B.weight"].dtype == layer.lora_B.dtype


def test_target_modules_are_minimal_but_exact(llama, tmp_path):
    """Only layer 0's q_proj is adapted: the saved target_modules must not select layer 1's q_proj in PEFT."""
    ours = our_adapted(llama, target_modules=["layers.0.self_attn.q_proj", "down_proj"])
    save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["target_modules"] == ["0.self_attn.q_proj", "down_proj"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path)
    assert {n for n, m in theirs.base_model.model.named_modules() if isinstance(m, LoraLayer)} == {
        "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}


def test_modules_to_save_round_trip_with_peft(llama, tmp_path):
    ours = our_adapted(llama, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    randomize([ours.lm_head.weight], seed=9)
    save_adapter(ours, tmp_path / "ours")
    keys = set(load_file(tmp_path / "ours" / SAFETENSORS_NAME))
    assert f"{PREFIX}lm_head.weight" in keys  # PEFT's key for a modules_to_save module (no adapter name)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path / "ours").eval()
    assert torch.equal(theirs.base_model.model.lm_head.modules_to_save["default"].weight, ours.lm_head.weight)
    x = tokens()
    assert_close_fp32(logits(ours, x), logits(theirs, x), "logits")

    # and back: PEFT's own file of the same adapter loads into a fresh base
    theirs.save_pretrained(tmp_path / "peft")
    back = load_adapter(copy.deepcopy(llama), tmp_path / "peft")
    assert torch.equal(back.lm_head.weight, ours.lm_head.weight) and back.lm_head.weight.requires_grad
    assert_close_fp32(logits(back, x), logits(ours, x), "logits")


# ------------------------------------------------------------------------------------------------ PEFT -> ours


@pytest.mark.parametrize("config", [
    dict(target_modules=TARGETS, r=8, lora_alpha=16),
    dict(target_modules=TARGETS, r=8, lora_alpha=16, use_rslora=True, lora_dropout=0.1,
         rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 2}, alpha_pattern={r"layers\.0\..*": 32}),
    dict(target_modules="all-linear", r=4, lora_alpha=8),
    dict(target_modules=r".*\.(k|o)_proj", r=2, lora_alpha=2, exclude_modules=["layers.1.self_attn.o_proj"]),
])
def test_peft_adapter_loads_into_a_fresh_base(llama, tmp_path, config):
    theirs = peft_adapted(llama, **config).eval()
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(llama), tmp_path)
    root = theirs.base_model.model
    peft_layers = {n: m for n, m in root.named_modules() if isinstance(m, LoraLayer)}
    assert {n for n, _ in lora_layers(ours)} == set(peft_layers)
    for name, layer in lora_layers(ours):
        p = peft_layers[name]
        assert torch.equal(layer.lora_A, p.lora_A["default"].weight)
        assert torch.equal(layer.lora_B, p.lora_B["default"].weight)
        assert (layer.r, layer.lora_alpha, layer.scaling) == (p.r["default"], p.lora_alpha["default"], p.scaling["default"])
        assert layer.lora_dropout == config.get("lora_dropout", 0.0)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        f"{n}.lora_{ab}" for n in peft_layers for ab in "AB"}
    x = tokens()
    assert_close_fp32(logits(ours, x), logits(theirs, x), "logits")


def test_load_into_existing_layers(llama, tmp_path):
    theirs = peft_adapted(llama, target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8).eval()
    theirs.save_pretrained(tmp_path)
    ours = apply_lora(copy.deepcopy(llama), ["q_proj", "v_proj"], r=4, lora_alpha=8, lora_dropout=0.2)
    load_adapter(ours, tmp_path, is_trainable=False)
    assert all(layer.lora_dropout == 0.2 for _, layer in lora_layers(ours))  # the model's own dropout is kept
    assert not any(p.requires_grad for p in ours.parameters())
    x = tokens()
    assert_close_fp32(logits(ours, x), logits(theirs, x), "logits")

    other = apply_lora(copy.deepcopy(llama), ["q_proj", "v_proj"], r=4, lora_alpha=16)
    with pytest.raises(ValueError, match=r"q_proj' has r=4, lora_alpha=16.*config gives r=4, lora_alpha=8"):
        load_adapter(other, tmp_path)
    fewer = apply_lora(copy.deepcopy(llama), ["q_proj"], r=4, lora_alpha=8)
    with pytest.raises(ValueError, match=r"unexpected tensors.*v_proj\.lora_A\.weight"):
        load_adapter(fewer, tmp_path)


# ------------------------------------------------------------------------------------------------ bitwise round trip


@pytest.mark.parametrize("dtype,adapter_dtype,stored", [
    (torch.float32, None, torch.float32),
    (torch.bfloat16, None, torch.float32),  # PEFT's default: fp32 adapters over a bf16 model
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
])
def test_round_trip_is_bitwise(tmp_path, dtype, adapter_dtype, stored):
    base = tiny_llama(dtype=dtype)
    ours = our_adapted(base, r=8, lora_alpha=16, alpha_pattern={"o_proj": 4}, adapter_dtype=adapter_dtype)
    save_adapter(ours, tmp_path / "a")
    back = load_adapter(copy.deepcopy(base), tmp_path / "a", adapter_dtype=adapter_dtype)
    mine, theirs = dict(lora_layers(ours)), dict(lora_layers(back))
    assert mine.keys() == theirs.keys()
    for name in mine:
        for part in ("lora_A", "lora_B"):
            a, b = getattr(mine[name], part), getattr(theirs[name], part)
            assert a.dtype == b.dtype == stored and torch.equal(a, b), f"{name}.{part}"
        assert (mine[name].r, mine[name].lora_alpha, mine[name].scaling) == (
            theirs[name].r, theirs[name].lora_alpha, theirs[name].scaling)
    save_adapter(back, tmp_path / "b")  # and the files are identical
    assert (tmp_path / "a" / SAFETENSORS_NAME).read_bytes() == (tmp_path / "b" / SAFETENSORS_NAME).read_bytes()
    assert (tmp_path / "a" / CONFIG_NAME).read_text() == (tmp_path / "b" / CONFIG_NAME).read_text()


def test_saved_keys_and_dtypes_match_peft(tmp_path):
    """The same bf16 model adapted by PEFT (get_peft_model, default autocast_adapter_dtype: fp32 adapters) and by
    apply_lora (whose default follows it), PEFT's adapter values copied into ours: the two adapter files hold the same
    keys, each with the same dtype and the same values (lm_head in modules_to_save: bf16 in both)."""
    base = tiny_llama(dtype=torch.bfloat16)
    config = dict(r=8, lora_alpha=16, modules_to_save=["lm_head"])
    theirs = peft_adapted(base, target_modules=TARGETS, **config)
    ours = our_adapted(base, **config)
    root = theirs.base_model.model
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            layer.lora_A.copy_(root.get_submodule(name).lora_A["default"].weight)
            layer.lora_B.copy_(root.get_submodule(name).lora_B["default"].weight)
    theirs.save_pretrained(tmp_path / "peft")
    save_adapter(ours, tmp_path / "ours")
    files = {}
    for who in ("peft", "ours"):
        with safe_open(str(tmp_path / who / SAFETENSORS_NAME), "pt") as f:
            files[who] = {key: f.get_tensor(key) for key in f.keys()}
    assert files["ours"].keys() == files["peft"].keys()
    dtypes = {key: t.dtype for key, t in files["peft"].items()}
    assert {key: t.dtype for key, t in files["ours"].items()} == dtypes
    assert {dtypes[key] for key in dtypes if ".lora_" in key} == {torch.float32}
    assert dtypes[f"{PREFIX}lm_head.weight"] == torch.bfloat16
    for key, t in files["peft"].items():
        assert torch.equal(files["ours"][key], t), key


def test_bin_fallback(llama, tmp_path):
    ours = our_adapted(llama, target_modules=["q_proj"])
    save_adapter(ours, tmp_path)
    tensors = load_file(tmp_path / SAFETENSORS_NAME)
    torch.save(tensors, tmp_path / "adapter_model.bin")
    os.remove(tmp_path / SAFETENSORS_NAME)
    back = load_adapter(copy.deepcopy(llama), tmp_path)
    for (name, a), (_, b) in zip(lora_layers(ours), lora_layers(back)):
        assert torch.equal(a.lora_B, b.lora_B), name


# ------------------------------------------------------------------------------------------------ errors


@pytest.fixture
def saved(llama, tmp_path):
    """A valid adapter directory (q_proj, v_proj, r=4) to corrupt."""
    save_adapter(our_adapted(llama, target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8), tmp_path)
    return tmp_path


def edit_tensors(path, fn):
    tensors = load_file(path / SAFETENSORS_NAME)
    fn(tensors)
    save_file(tensors, path / SAFETENSORS_NAME, metadata={"format": "pt"})


def edit_config(path, **changes):
    config = json.loads((path / CONFIG_NAME).read_text())
    config.update(changes)
    (path / CONFIG_NAME).write_text(json.dumps(config))


Q0 = f"{PREFIX}model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("corrupt,match", [
    (lambda p: edit_tensors(p, lambda t: t.pop(f"{Q0}.lora_B.weight")),
     r"missing tensors.*layers\.0\.self_attn\.q_proj\.lora_B\.weight"),
    (lambda p: edit_tensors(p, lambda t: t.update({f"{PREFIX}model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 64)})),
     r"unexpected tensors.*mlp\.up_proj\.lora_A\.weight"),
    (lambda p: edit_tensors(p, lambda t: t.update({"lm_head.weight": torch.zeros(128, 64)})),
     r"unexpected key 'lm_head\.weight'"),
    (lambda p: edit_tensors(p, lambda t: t.update({f"{Q0}.lora_magnitude_vector": torch.zeros(64)})),
     r"unexpected key .*lora_magnitude_vector.*DoRA"),
    (lambda p: edit_tensors(p, lambda t: t.update({f"{Q0}.lora_A.weight": torch.zeros(3, 64)})),
     r"q_proj\.lora_A\.weight has shape \[3, 64\], the layer expects \[4, 64\]"),
    (lambda p: edit_config(p, use_dora=True), "use_dora=True"),
    (lambda p: edit_config(p, peft_type="IA3"), "peft_type='IA3'"),
    (lambda p: edit_config(p, fan_in_fan_out=True), "fan_in_fan_out=True"),
    (lambda p: edit_config(p, lora_bias=True), "lora_bias=True"),
    (lambda p: edit_config(p, bias="all"), "bias='all'"),
    (lambda p: edit_config(p, layer_replication=[[0, 2]]), "layer_replication"),
    (lambda p: edit_config(p, layers_to_transform=[0]), "layers_to_transform"),
    (lambda p: edit_config(p, init_lora_weights="pissa"), "init_lora_weights='pissa' modifies the base weights"),
    (lambda p: edit_config(p, some_future_option={"x": 1}), "unknown LoraConfig field some_future_option"),
    (lambda p: edit_config(p, target_modules=None), "target_modules is null"),
    (lambda p: edit_config(p, r=8), r"q_proj\.lora_A\.weight has shape \[4, 64\], the layer expects \[8, 64\]"),
    (lambda p: edit_config(p, target_modules=["q_proj"]), r"unexpected tensors.*v_proj"),
    (lambda p: edit_config(p, target_modules=["q_proj", "v_proj", "k_proj"]), r"missing tensors.*k_proj"),
    (lambda p: os.remove(p / SAFETENSORS_NAME), "no adapter_model.safetensors"),
    (lambda p: os.remove(p / CONFIG_NAME), "no adapter_config.json"),
])
def test_load_errors_name_the_problem(llama, saved, corrupt, match):
    corrupt(saved)
    model = copy.deepcopy(llama)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_adapter(model, saved)
    assert not list(lora_layers(model))  # nothing was applied


def test_save_errors(llama, tmp_path):
    with pytest.raises(ValueError, match="no fused-lora layers"):
        save_adapter(copy.deepcopy(llama), tmp_path)
    model = our_adapted(llama, target_modules=["q_proj", "v_proj"])
    model.model.layers[0].self_attn.q_proj.lora_dropout = 0.3
    with pytest.raises(ValueError, match="layers differ in lora_dropout"):
        save_adapter(model, tmp_path)
    model = our_adapted(llama, target_modules=["q_proj"])
    model.model.layers[1].self_attn.q_proj.scaling = 5.0
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.q_proj' has scaling=5\.0"):
        save_adapter(model, tmp_path)


def test_task_type_and_base_name_are_carried_through(llama, tmp_path):
    """A PEFT CAUSAL_LM adapter -> load_adapter -> save_adapter keeps task_type and base_model_name_or_path, and
    PEFT's task-specific wrapper loads the result."""
    theirs = peft_adapted(llama, target_modules=["q_proj"], task_type="CAUSAL_LM").eval()
    theirs.save_pretrained(tmp_path / "peft")
    edit_config(tmp_path / "peft", base_model_name_or_path="org/tiny")  # (set at save time, PEFT would query the Hub)
    ours = load_adapter(copy.deepcopy(llama), tmp_path / "peft")
    save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    assert (config["task_type"], config["base_model_name_or_path"], config["auto_mapping"]) == (
        "CAUSAL_LM", "org/tiny", None)
    again = peft.PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path / "ours").eval()
    assert type(again).__name__ == "PeftModelForCausalLM"
    x = tokens()
    assert_close_fp32(logits(again, x), logits(theirs, x), "logits")
