"""Every PEFT workflow keeps working after ``fused_lora.from_peft`` (issue 13, point 1), one API at a time, against
an unaccelerated PEFT twin.

Each test builds a tiny random Llama from a config (hidden 32, 2 layers, nothing downloaded), wraps it with PEFT's
``get_peft_model``, gives the LoRA B matrices random values (PEFT initialises B = 0, which would make every adapter
the identity and hide any bug), deep-copies it into an unaccelerated twin and accelerates the original in place. Both
get the same fresh random token ids. The fused path is shown to run (a counting wrapper around
``fused_lora.peft_native.fused_lora_linear``), so that no parity below can pass because nothing was fused.

Tolerances. Two kinds of comparisons:

* same code on the same parameters (PEFT's own forward on both sides: disabled adapters, merged layers,
  ``merge_and_unload`` / ``unload``, a model reloaded by PEFT against its twin; or the fused model against itself:
  resume, checkpointing, pickling, file round trips): deterministic CPU arithmetic gives the same bits, so these are
  exact (``rtol=0, atol=0``), except across processes, where the fp32 tolerance below is used (the BLAS of another
  process is not promised to block its sums identically).
* fused against PEFT (fp32): the two compute ``x W^T + s B(A x)`` with different operation orders, so they differ by
  fp32 summation order only. ``FP32_RTOL = 2e-5`` of the largest reference value (tests/helpers.py): one fp32 layer
  with reductions of length K <= 64 here has a typical relative error of sqrt(K) 2**-24 ~ 5e-7; the logits pass
  ~15 such operations in series (norms, q/k/v/o, attention, MLP per layer, then the head), ~sqrt(15) 5e-7 ~ 2e-6,
  so 2e-5 holds them with a ~10x margin, while a real difference (a wrong scaling, adapter, dropout mask or a
  missing layer) moves the logits by >= 1e-3 relative (with B ~ 0.1 the adapters change the logits by about their
  own size here: max |adapted - base| ~ max |base|). Gradients: the same rule, relative to the largest gradient of
  each parameter (measured: logits bit-identical, gradients within 1e-6 of their largest element).
  Trainer losses: each loss is one more reduction over the logits, compared with the same relative tolerance;
  AdamW's update m / (sqrt(v) + eps) is scale-invariant, so a relative gradient perturbation d moves a parameter by
  ~lr d = 1e-2 x 2e-6 per step, far below what the loss tolerance can see after 4 steps.
* bf16 base with PEFT's fp32 adapters (save_pretrained only): same-implementation comparisons only, all exact; the
  numerical parity of that case with PEFT is tests/test_peft_native.py's subject.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import fused_lora
from fused_lora import peft_native

from helpers import FP32_RTOL, assert_close_fp32

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import PeftModel  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLoraLinear  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning"),
]

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 128
N_LAYERS = 2


# ------------------------------------------------------------------------------------------------ set-up


def tiny_llama(seed: int = 0, dtype=torch.float32) -> nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=VOCAB, attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for this module (restored after it): the matrices here are 32 wide, a second thread gains
    nothing, and on a shared 2-core machine its OpenMP barriers cost more than the work (measured: the module took
    66-106 s with 2 threads under load, 24 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base():
    """One random tiny Llama per module (fp32); tests deep-copy it."""
    return tiny_llama()


def tokens(batch=2, seq=12, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def lora_config(**overrides):
    kwargs = dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, lora_dropout=0.0)
    kwargs.update(overrides)
    return peft.LoraConfig(**kwargs)


def randomize_B(model, adapter="default", std=0.1, seed=2):
    """PEFT initialises lora_B = 0 (the adapter is the identity); random values make every adapter visible."""
    gen = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"lora_B.{adapter}." in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * std)
                n += 1
    assert n > 0, f"no lora_B of adapter {adapter!r}"


def make_pair(base, dtype=torch.float32, **config):
    """(fused, twin): a PeftModel with random B, accelerated in place, and its unaccelerated deep copy."""
    model = copy.deepcopy(base).to(dtype)
    torch.manual_seed(1)  # lora_A's kaiming init
    peft_model = peft.get_peft_model(model, lora_config(**config))
    randomize_B(peft_model)
    twin = copy.deepcopy(peft_model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left to PEFT: from_peft would warn
        out = fused_lora.from_peft(peft_model)
    assert out is peft_model
    return peft_model, twin


def lora_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def loss_and_grads(model, ids, seed=None):
    """Train-mode causal-LM loss and the gradients of the trainable parameters (by name)."""
    model.train()
    model.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    model.eval()
    assert grads and all(g is not None for g in grads.values())
    return loss.detach(), grads


def assert_grads_close(ours, theirs, exact=False):
    assert ours.keys() == theirs.keys()
    for name in theirs:
        if exact:
            torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0, msg=name)
        else:
            assert_close_fp32(ours[name], theirs[name], name)


def assert_differ(a, b, what):
    """a and b differ by far more than the fp32 tolerance (the comparison that passed above could have failed)."""
    assert (a - b).abs().max().item() > 100 * FP32_RTOL * b.abs().max().item(), what


class FusedCalls:
    """Counts the calls of ``fused_lora_linear`` made by the fused PEFT layers, and which lora_A each one used."""

    def __init__(self):
        self.n = 0
        self.lora_A_ids = []

    def reset(self):
        self.n = 0
        self.lora_A_ids = []


def _install_counter(monkeypatch) -> FusedCalls:
    calls = FusedCalls()
    real = peft_native.fused_lora_linear

    def counting(x, weight, lora_A, *args, **kwargs):
        calls.n += 1
        calls.lora_A_ids.append(id(lora_A))
        return real(x, weight, lora_A, *args, **kwargs)

    monkeypatch.setattr(peft_native, "fused_lora_linear", counting)
    return calls


@pytest.fixture
def fused_calls(monkeypatch):
    return _install_counter(monkeypatch)


def n_lora_layers(model):
    return len(lora_modules(model))


def run_python(script: str, cwd, *args) -> str:
    """Run ``script`` in a fresh Python process (this interpreter and environment, working directory ``cwd``);
    return its stdout."""
    env = dict(os.environ, OMP_NUM_THREADS="1")  # as this module (see _one_thread)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], capture_output=True,
                          text=True, cwd=str(cwd), env=env, timeout=300)
    assert proc.returncode == 0, f"fresh process failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


# ------------------------------------------------------------------------------------------------ in place


def test_from_peft_keeps_module_tree_parameters_and_numbers(base, fused_calls):
    """from_peft returns the same PeftModel; parameter names and objects, module names and state-dict keys are
    unchanged; outputs and every gradient match the unaccelerated twin, computed by the fused path."""
    torch.manual_seed(1)
    model = peft.get_peft_model(copy.deepcopy(base), lora_config())
    randomize_B(model)
    twin = copy.deepcopy(model)
    params_before = list(model.named_parameters())
    modules_before = [(n, type(m)) for n, m in model.named_modules()]
    keys_before = list(model.state_dict().keys())
    trainable_before = [n for n, p in model.named_parameters() if p.requires_grad]

    assert fused_lora.from_peft(model) is model
    assert isinstance(model, PeftModel)
    params_after = list(model.named_parameters())
    assert [n for n, _ in params_after] == [n for n, _ in params_before]
    assert all(a is b for (_, a), (_, b) in zip(params_after, params_before))  # the same Parameter objects
    assert [n for n, _ in model.named_modules()] == [n for n, _ in modules_before]
    assert list(model.state_dict().keys()) == keys_before
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable_before
    layers = lora_modules(model)
    assert len(layers) == N_LAYERS * len(LLAMA_TARGETS)
    for _, layer in layers:
        assert type(layer) is peft_native.FusedLinear and isinstance(layer, PeftLoraLinear)
    summary = fused_lora.fusion_summary(model)
    assert summary.all_fused and sorted(summary.fused) == sorted(n for n, _ in layers)

    ids = tokens()
    out = logits(model, ids)
    assert fused_calls.n == len(layers)
    assert_close_fp32(out, logits(twin, ids), "logits")
    assert_differ(out, logits(base, ids), "the adapters change the logits")
    fused_calls.reset()
    loss, grads = loss_and_grads(model, ids)
    assert fused_calls.n == len(layers)
    twin_loss, twin_grads = loss_and_grads(twin, ids)
    assert abs(loss.item() - twin_loss.item()) <= FP32_RTOL * abs(twin_loss.item())
    assert_grads_close(grads, twin_grads)


def test_print_trainable_parameters_identical(base, capsys):
    torch.manual_seed(1)
    model = peft.get_peft_model(copy.deepcopy(base), lora_config(modules_to_save=["lm_head"]))
    model.print_trainable_parameters()
    before = capsys.readouterr().out
    twin = copy.deepcopy(model)
    fused_lora.from_peft(model)
    model.print_trainable_parameters()
    after = capsys.readouterr().out
    twin.print_trainable_parameters()
    assert after == before == capsys.readouterr().out
    assert before.startswith("trainable params: ")
    assert model.get_nb_trainable_parameters() == twin.get_nb_trainable_parameters()


def test_optimizer_state_saved_before_from_peft_loads_after(base, tmp_path, fused_calls):
    """An AdamW state saved before from_peft loads after it (same parameters, same order, same shapes), and the
    optimizer made before from_peft still steps the model's parameters; the next step equals the twin's."""
    torch.manual_seed(1)
    model = peft.get_peft_model(copy.deepcopy(base), lora_config())
    randomize_B(model)
    ids = tokens()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    twin = copy.deepcopy(model)

    fused_lora.from_peft(model)
    assert fused_calls.n == 0
    # the optimizer made before from_peft holds the model's parameters
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(opt.param_groups[0]["params"]) == len(trainable)
    assert all(a is b for a, b in zip(opt.param_groups[0]["params"], trainable))
    fresh = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    fresh.load_state_dict(torch.load(tmp_path / "optimizer.pt"))
    for p in fresh.param_groups[0]["params"]:
        assert fresh.state[p]["exp_avg"].shape == p.shape
    twin_opt = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2)
    twin_opt.load_state_dict(torch.load(tmp_path / "optimizer.pt"))

    ids2 = tokens(seed=3)
    for m, o in ((model, fresh), (twin, twin_opt)):
        m.train()
        m(input_ids=ids2, labels=ids2).loss.backward()
        o.step()
    assert fused_calls.n == n_lora_layers(model)
    ours = dict(model.named_parameters())
    for name, p in twin.named_parameters():
        if p.requires_grad:
            assert_close_fp32(ours[name].detach(), p.detach(), name)
            assert int(fresh.state[ours[name]]["step"]) == 2


# ------------------------------------------------------------------------------------------------ files


def _read_safetensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-base-fp32-adapters"])
def test_save_pretrained_same_files_as_peft(base, tmp_path, fused_calls, dtype):
    """save_pretrained of the fused model writes what unaccelerated PEFT writes (file names, adapter_config.json,
    safetensors keys / dtypes / shapes / bytes); PeftModel.from_pretrained of that directory computes the twin's
    outputs, and accelerated again, the fused model's outputs."""
    fused, twin = make_pair(base, dtype=dtype)
    if dtype != torch.float32:  # PEFT's default (autocast_adapter_dtype=True): fp32 adapters on a half base
        assert all(p.dtype == torch.float32 for n, p in fused.named_parameters() if "lora_" in n)
    ours, theirs = tmp_path / "fused", tmp_path / "peft"
    fused.save_pretrained(ours)
    twin.save_pretrained(theirs)

    assert sorted(os.listdir(ours)) == sorted(os.listdir(theirs))
    assert "adapter_model.safetensors" in os.listdir(ours)
    with open(ours / "adapter_config.json") as f, open(theirs / "adapter_config.json") as g:
        config, peft_config = json.load(f), json.load(g)
    # PEFT keeps target_modules as a set and writes it in the set's iteration order, which can differ between two
    # equal sets (a deep copy rebuilds the hash table): the same set, in either order
    assert sorted(config.pop("target_modules")) == sorted(peft_config.pop("target_modules"))
    assert config == peft_config
    a = _read_safetensors(ours / "adapter_model.safetensors")
    b = _read_safetensors(theirs / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    assert len(a) == 2 * N_LAYERS * len(LLAMA_TARGETS)
    for key in b:
        assert (a[key].dtype, a[key].shape) == (b[key].dtype, b[key].shape), key
        assert a[key].contiguous().view(torch.uint8).equal(b[key].contiguous().view(torch.uint8)), key
    assert (ours / "adapter_model.safetensors").read_bytes() == (theirs / "adapter_model.safetensors").read_bytes()
    assert fused_calls.n == 0

    ids = tokens()
    fused_out = logits(fused, ids)
    assert fused_calls.n == n_lora_layers(fused)
    twin_out = logits(twin, ids)
    if dtype == torch.float32:
        assert_close_fp32(fused_out, twin_out, "fused vs PEFT logits")

    reloaded = PeftModel.from_pretrained(copy.deepcopy(base).to(dtype), ours)
    assert all(type(m) is PeftLoraLinear for _, m in lora_modules(reloaded))
    torch.testing.assert_close(logits(reloaded, ids), twin_out, rtol=0, atol=0)  # PEFT's code, the same weights

    fused_calls.reset()
    reloaded_fused = fused_lora.from_peft(PeftModel.from_pretrained(copy.deepcopy(base).to(dtype), ours))
    assert fused_lora.fusion_summary(reloaded_fused).all_fused
    torch.testing.assert_close(logits(reloaded_fused, ids), fused_out, rtol=0, atol=0)  # fused code, same weights
    assert fused_calls.n == n_lora_layers(fused)


# ------------------------------------------------------------------------------------------------ Trainer

TRAIN_STEPS = 4
LR = 1e-2  # large enough for the loss curve and the adapters to move visibly in 4 steps


def _train_data():
    gen = torch.Generator().manual_seed(5)
    data = []
    for _ in range(8):
        ids = torch.randint(0, VOCAB, (16,), generator=gen)
        data.append({"input_ids": ids, "labels": ids.clone()})
    return data


def _train(model, output_dir, resume=None):
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=TRAIN_STEPS, per_device_train_batch_size=2, use_cpu=True, report_to=[],
        save_strategy="steps", save_steps=2, logging_steps=1, seed=0, learning_rate=LR,
        remove_unused_columns=False, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_train_data())
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer, losses


def _trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """The same PeftModel (same seed, dropout 0) trained 4 Trainer steps unaccelerated and accelerated, with
    checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("trainer")
    fused, twin = make_pair(base)
    initial = copy.deepcopy(twin)
    with pytest.MonkeyPatch.context() as mp:
        calls = _install_counter(mp)
        peft_trainer, peft_losses = _train(twin, root / "peft")
        assert calls.n == 0
        fused_trainer, fused_losses = _train(fused, root / "fused")
        fused_call_count = calls.n
    return dict(root=root, initial=initial, peft_trainer=peft_trainer, peft_losses=peft_losses,
                fused_trainer=fused_trainer, fused_losses=fused_losses, fused_call_count=fused_call_count,
                fused_model=fused, peft_model=twin)


def test_trainer_loss_curve_matches_peft(trained):
    fused, theirs = trained["fused_losses"], trained["peft_losses"]
    assert len(fused) == len(theirs) == TRAIN_STEPS
    for step, (a, b) in enumerate(zip(fused, theirs)):
        assert abs(a - b) <= FP32_RTOL * abs(b), f"step {step + 1}: loss {a!r} vs PEFT {b!r}"
    # every step ran the fused layers: forward (14 layers) per step; the backward does not call the function again
    n = n_lora_layers(trained["fused_model"])
    assert trained["fused_call_count"] == TRAIN_STEPS * n
    model = trained["fused_trainer"].model
    assert model is trained["fused_model"] and isinstance(model, PeftModel)
    assert fused_lora.fusion_summary(model).all_fused
    # the adapters moved (the curve is a training run, not a constant)
    moved = _trainable_state(model)
    start = _trainable_state(trained["initial"])
    assert all(not torch.equal(moved[k], start[k]) for k in start)
    # the checkpoints hold the same files
    for step in (2, 4):
        ours = trained["root"] / "fused" / f"checkpoint-{step}"
        theirs = trained["root"] / "peft" / f"checkpoint-{step}"
        assert sorted(os.listdir(ours)) == sorted(os.listdir(theirs))
        a = _read_safetensors(ours / "adapter_model.safetensors")
        b = _read_safetensors(theirs / "adapter_model.safetensors")
        assert {k: (v.dtype, v.shape) for k, v in a.items()} == {k: (v.dtype, v.shape) for k, v in b.items()}


# One fresh process (an interpreter start with torch + transformers + PEFT costs seconds) answers two questions, each
# part on its own so that one failing does not hide the other: (1) the adapter Trainer.save_model wrote, loaded by
# plain transformers + PEFT (fused_lora not imported), and (2) the whole fused model unpickled with torch.load.
_FRESH_SCRIPT = """
    import sys, traceback
    import torch
    d = sys.argv[1]
    ids = torch.load(d + "/ids.pt")["ids"]
    results = {}
    try:
        import transformers
        from peft import PeftModel
        model = transformers.LlamaForCausalLM.from_pretrained(d + "/base", attn_implementation="eager")
        model = PeftModel.from_pretrained(model, d + "/adapter").eval()
        with torch.no_grad():
            out = model(input_ids=ids).logits
        results["reload"] = {"logits": out, "fused_lora_imported": "fused_lora" in sys.modules}
    except Exception:
        results["reload"] = {"error": traceback.format_exc()}
    try:
        model = torch.load(d + "/model.pt", weights_only=False).eval()  # imports fused_lora.peft_native by name
        import fused_lora
        from fused_lora import peft_native
        calls = []
        real = peft_native.fused_lora_linear
        peft_native.fused_lora_linear = lambda *a, **k: calls.append(1) or real(*a, **k)
        with torch.no_grad():
            out = model(input_ids=ids).logits
        classes = sorted({type(m).__module__ + "." + type(m).__name__ for m in model.modules()
                          if hasattr(m, "lora_A")})
        results["unpickle"] = {"logits": out, "calls": len(calls), "classes": classes,
                               "all_fused": fused_lora.fusion_summary(model).all_fused}
    except Exception:
        results["unpickle"] = {"error": traceback.format_exc()}
    torch.save(results, d + "/results.pt")
    print("ok")
"""


@pytest.fixture(scope="module")
def fresh_process(trained, base, tmp_path_factory):
    """Writes Trainer.save_model of the trained fused model, the base model, and a pickled fused model (torch.save
    of the whole PeftModel); runs _FRESH_SCRIPT on them in a fresh process; returns its results."""
    d = tmp_path_factory.mktemp("fresh")
    trained["fused_trainer"].save_model(str(d / "adapter"))
    base.save_pretrained(str(d / "base"))
    pickled, _ = make_pair(base)
    torch.save(pickled, d / "model.pt")
    ids = tokens(batch=3, seq=10, seed=7)
    torch.save({"ids": ids}, d / "ids.pt")
    assert run_python(_FRESH_SCRIPT, d, d).strip().endswith("ok")
    return dict(dir=d, ids=ids, pickled=pickled, results=torch.load(d / "results.pt"))


def _part(fresh_process, name):
    result = fresh_process["results"][name]
    assert "error" not in result, f"fresh process, {name}:\n{result.get('error')}"
    return result


def test_trainer_save_model_reloads_in_fresh_process(trained, base, fresh_process):
    """trainer.save_model(dir); a fresh process (plain transformers + PEFT, no fused_lora) loading the base model and
    PeftModel.from_pretrained(dir) computes the trained model's logits."""
    adapter_dir = fresh_process["dir"] / "adapter"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(adapter_dir))
    result = _part(fresh_process, "reload")
    assert result["fused_lora_imported"] is False
    ids = fresh_process["ids"]
    ours = logits(trained["fused_trainer"].model, ids)
    # fused in this process vs PEFT in another: fp32 tolerance (module docstring)
    assert_close_fp32(result["logits"], ours, "reloaded logits")
    # the trained adapter, not the initial one nor none, was saved
    assert_differ(result["logits"], logits(trained["initial"], ids), "trained vs initial adapter")
    assert_differ(result["logits"], logits(base, ids), "adapter vs base model")


def test_trainer_resume_from_checkpoint(trained, base, tmp_path, fused_calls):
    """Resuming from checkpoint-2 reaches the uninterrupted run's adapter weights and losses exactly: first PEFT
    alone (what the Trainer promises), then the fused model, which must do the same (and stay fused)."""
    root = trained["root"]
    # PEFT alone
    _, twin = make_pair(base)
    peft_resumed, peft_losses = _train(twin, tmp_path / "peft", resume=root / "peft" / "checkpoint-2")
    assert peft_losses == trained["peft_losses"]
    uninterrupted = _trainable_state(trained["peft_model"])
    resumed = _trainable_state(peft_resumed.model)
    assert resumed.keys() == uninterrupted.keys()
    for k in uninterrupted:
        torch.testing.assert_close(resumed[k], uninterrupted[k], rtol=0, atol=0, msg=k)

    # fused
    fused, _ = make_pair(base)
    fused_calls.reset()
    fused_resumed, fused_losses = _train(fused, tmp_path / "fused", resume=root / "fused" / "checkpoint-2")
    assert fused_resumed.model is fused
    assert fused_calls.n == (TRAIN_STEPS - 2) * n_lora_layers(fused)  # steps 3 and 4, fused
    assert fused_lora.fusion_summary(fused).all_fused
    assert fused_losses == trained["fused_losses"]
    uninterrupted = _trainable_state(trained["fused_model"])
    resumed = _trainable_state(fused)
    assert resumed.keys() == uninterrupted.keys()
    for k in uninterrupted:
        torch.testing.assert_close(resumed[k], uninterrupted[k], rtol=0, atol=0, msg=k)
    # and the resumed fused run ends where PEFT's does
    assert abs(fused_losses[-1] - peft_losses[-1]) <= FP32_RTOL * abs(peft_losses[-1])
    ids = tokens(seed=8)
    assert_close_fp32(logits(fused, ids), logits(peft_resumed.model, ids), "resumed logits")


# ------------------------------------------------------------------------------------------------ adapters on / off


def test_disable_adapter_context(base, fused_calls):
    fused, twin = make_pair(base)
    ids = tokens()
    base_out = logits(base, ids)
    with fused.disable_adapter():
        inside = logits(fused, ids)
        assert fused_calls.n == 0
        assert not fused_lora.fusion_summary(fused).fallback_calls  # only the base layer: not a fallback
    torch.testing.assert_close(inside, base_out, rtol=0, atol=0)  # PEFT's forward = the base linear
    after = logits(fused, ids)
    assert fused_calls.n == n_lora_layers(fused)
    assert_close_fp32(after, logits(twin, ids), "after disable_adapter")
    assert_differ(after, base_out, "the adapter is back")


def test_merge_unmerge_adapter(base, fused_calls):
    fused, twin = make_pair(base)
    ids = tokens()
    unmerged = logits(twin, ids)
    fused.merge_adapter()
    twin.merge_adapter()
    for (name, a), (_, b) in zip(lora_modules(fused), lora_modules(twin)):
        assert a.merged and torch.equal(a.get_base_layer().weight, b.get_base_layer().weight), name
    merged = logits(fused, ids)
    assert fused_calls.n == 0  # merged layers are the base layer
    torch.testing.assert_close(merged, logits(twin, ids), rtol=0, atol=0)
    assert_close_fp32(merged, unmerged, "merged vs unmerged")

    fused.unmerge_adapter()
    twin.unmerge_adapter()
    for (name, a), (_, b) in zip(lora_modules(fused), lora_modules(twin)):
        assert not a.merged and torch.equal(a.get_base_layer().weight, b.get_base_layer().weight), name
    out = logits(fused, ids)
    assert fused_calls.n == n_lora_layers(fused)
    assert_close_fp32(out, logits(twin, ids), "after unmerge")


def test_merge_and_unload_and_unload(base, fused_calls):
    fused, twin = make_pair(base)
    ids = tokens()
    adapted = logits(fused, ids)
    assert fused_calls.n == n_lora_layers(fused)
    fused_calls.reset()

    merged = fused.merge_and_unload()
    merged_twin = twin.merge_and_unload()
    assert isinstance(merged, transformers.LlamaForCausalLM)
    for name, module in merged.named_modules():
        assert not isinstance(module, (LoraLayer, peft_native._FusedForward)), name
        if name.split(".")[-1] in LLAMA_TARGETS:
            assert type(module) is nn.Linear, name
    torch.testing.assert_close(logits(merged, ids), logits(merged_twin, ids), rtol=0, atol=0)
    assert_close_fp32(logits(merged, ids), adapted, "merge_and_unload vs adapted")
    assert fused_calls.n == 0

    fused, twin = make_pair(base)
    unloaded = fused.unload()
    assert all(type(m) is nn.Linear for n, m in unloaded.named_modules() if n.split(".")[-1] in LLAMA_TARGETS)
    torch.testing.assert_close(logits(unloaded, ids), logits(base, ids), rtol=0, atol=0)
    torch.testing.assert_close(logits(unloaded, ids), logits(twin.unload(), ids), rtol=0, atol=0)
    assert fused_calls.n == 0


# ------------------------------------------------------------------------------------------------ several adapters


def _adapter_A_ids(model, adapter):
    return {id(m.lora_A[adapter].weight) for _, m in lora_modules(model) if adapter in m.lora_A}


def test_add_set_delete_adapter(base, fused_calls):
    """The active adapter, whichever it is, is the fused one; layers an added adapter creates are left to PEFT
    until from_peft runs again; outputs follow PEFT's all along."""
    fused, twin = make_pair(base, target_modules=["q_proj", "v_proj"])
    second = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj"])
    for m in (fused, twin):
        torch.manual_seed(3)
        m.add_adapter("second", lora_config(**second))
        randomize_B(m, "second", seed=4)
    for (_, a), (_, b) in zip(lora_modules(fused), lora_modules(twin)):
        for adapter in a.lora_A:
            assert torch.equal(a.lora_A[adapter].weight, b.lora_A[adapter].weight)
    ids = tokens()

    # "default" is still active; the k_proj / o_proj layers that add_adapter created are PEFT's, not accelerated
    summary = fused_lora.fusion_summary(fused)
    new_layers = {n for n, m in lora_modules(fused) if n.endswith(("k_proj", "o_proj"))}
    assert set(summary.left_to_peft) == new_layers and len(new_layers) == 2 * N_LAYERS
    assert all("not accelerated" in r for r in summary.left_to_peft.values())
    assert_close_fp32(logits(fused, ids), logits(twin, ids), "default, after add_adapter")
    assert set(fused_calls.lora_A_ids) == _adapter_A_ids(fused, "default")

    for m in (fused, twin):
        m.set_adapter("second")
    fused_calls.reset()
    out = logits(fused, ids)
    assert set(fused_calls.lora_A_ids) == {id(m.lora_A["second"].weight) for n, m in lora_modules(fused)
                                           if n.endswith("q_proj")}  # k/o: not accelerated yet
    assert_close_fp32(out, logits(twin, ids), "second")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_lora.from_peft(fused)  # again: accelerates the layers added since
    assert fused_lora.fusion_summary(fused).all_fused
    fused_calls.reset()
    out = logits(fused, ids)
    assert set(fused_calls.lora_A_ids) == _adapter_A_ids(fused, "second")
    assert fused_calls.n == 3 * N_LAYERS
    assert_close_fp32(out, logits(twin, ids), "second, all fused")
    assert_differ(out, logits(base, ids), "the second adapter changes the logits")

    for m in (fused, twin):
        m.set_adapter("default")
    fused_calls.reset()
    assert_close_fp32(logits(fused, ids), logits(twin, ids), "default again")
    assert set(fused_calls.lora_A_ids) == _adapter_A_ids(fused, "default")

    for m in (fused, twin):
        m.delete_adapter("second")
    assert all("second" not in m.lora_A for _, m in lora_modules(fused))
    fused_calls.reset()
    assert_close_fp32(logits(fused, ids), logits(twin, ids), "after delete_adapter")
    assert set(fused_calls.lora_A_ids) == _adapter_A_ids(fused, "default")
    assert fused_calls.n == 2 * N_LAYERS
    assert not fused_lora.fusion_summary(fused).fallback_calls


@pytest.mark.filterwarnings("ignore:fused-lora. PEFT's own forward computes:UserWarning")
def test_two_active_adapters_fall_back_to_peft(base, fused_calls):
    """Two adapters active at once (base_model.set_adapter([a, b])): PEFT's forward computes those layers (PEFT's
    numbers), and fusion_summary shows them in left_to_peft and their calls in fallback_calls."""
    fused, twin = make_pair(base, target_modules=["q_proj", "v_proj"])
    for m in (fused, twin):
        torch.manual_seed(3)
        m.add_adapter("second", lora_config(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        randomize_B(m, "second", seed=4)
        m.base_model.set_adapter(["default", "second"])
    assert fused.active_adapters == ["default", "second"]
    summary = fused_lora.fusion_summary(fused)
    names = {n for n, _ in lora_modules(fused)}
    assert summary.fused == [] and set(summary.left_to_peft) == names
    assert all(r == "several adapters active at once (default, second)" for r in summary.left_to_peft.values())

    ids = tokens()
    out = logits(fused, ids)
    assert fused_calls.n == 0
    torch.testing.assert_close(out, logits(twin, ids), rtol=0, atol=0)  # PEFT's forward on both sides
    for m in (fused, twin):
        m.base_model.set_adapter("default")
    assert_differ(out, logits(twin, ids), "the second adapter counts")
    counts = fused_lora.fusion_summary(fused).fallback_calls
    assert set(counts) == names
    assert all(c == {"several adapters active at once (default, second)": 1} for c in counts.values())


# ----------------------------------------------------------------------------------------------- checkpointing, compile


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_regenerates_dropout_masks(base, fused_calls, use_reentrant):
    """gradient_checkpointing_enable on the fused PeftModel with lora_dropout > 0: the recomputation regenerates
    the same dropout masks, so the gradients equal the run without checkpointing (exactly: the same computation)."""
    fused, twin = make_pair(base, lora_dropout=0.25)
    ids = tokens(batch=2, seq=16)
    assert_close_fp32(logits(fused, ids), logits(twin, ids), "eval: no dropout")
    fused_calls.reset()
    checkpointed = copy.deepcopy(fused)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert checkpointed.base_model.model.model.gradient_checkpointing
    n = n_lora_layers(fused)

    loss, grads = loss_and_grads(fused, ids, seed=123)
    assert fused_calls.n == n
    fused_calls.reset()
    ck_loss, ck_grads = loss_and_grads(checkpointed, ids, seed=123)
    assert fused_calls.n == 2 * n  # forward, and the recomputation in backward
    assert torch.equal(ck_loss, loss)
    assert_grads_close(ck_grads, grads, exact=True)
    assert fused_lora.fusion_summary(checkpointed).all_fused

    # the masks matter: another seed gives other gradients (so the equality above could have failed)
    _, other = loss_and_grads(fused, ids, seed=124)
    name = next(k for k in grads if "lora_A" in k)
    assert_differ(other[name], grads[name], "dropout masks depend on the seed")


def test_torch_compile_matches_eager(base, fused_calls):
    """torch.compile (aot_eager: dynamo + AOTAutograd, no code generation, fast on CPU) of the fused PeftModel:
    the same logits and gradients as eager, with lora_dropout > 0 (the seeds come from the same generator in
    the same order); a fused LoRA layer compiles with fullgraph=True (no graph break inside it)."""
    torch._dynamo.reset()
    fused, _ = make_pair(base, lora_dropout=0.25)
    ids = tokens()
    n = n_lora_layers(fused)

    def run(fn, module, *inputs, **kwargs):
        module.train()
        module.zero_grad(set_to_none=True)
        torch.manual_seed(123)
        out = fn(*inputs, **kwargs)
        (out.loss if hasattr(out, "loss") else out.square().sum()).backward()
        y = out.logits if hasattr(out, "logits") else out
        grads = {k: p.grad.clone() for k, p in module.named_parameters() if p.requires_grad}
        module.zero_grad(set_to_none=True)
        return y.detach(), grads

    eager = run(fused, fused, input_ids=ids, labels=ids)
    assert fused_calls.n == n
    compiled = run(torch.compile(fused, backend="aot_eager"), fused, input_ids=ids, labels=ids)
    assert fused_calls.n >= 2 * n  # the compiled graph was traced through the fused path
    assert_close_fp32(compiled[0], eager[0], "compiled logits")
    assert_grads_close(compiled[1], eager[1])
    assert not fused_lora.fusion_summary(fused).fallback_calls

    # one fused layer alone, fullgraph=True: dynamo raises on any graph break inside the layer's forward
    layer = fused.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 32)
    eager = run(layer, layer, x)
    compiled = run(torch.compile(layer, backend="aot_eager", fullgraph=True), layer, x)
    assert_close_fp32(compiled[0], eager[0], "compiled layer")
    assert_grads_close(compiled[1], eager[1])
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------ restore, pickle


def test_restore_peft(base, fused_calls):
    fused, twin = make_pair(base)
    ids = tokens()
    accelerated = logits(fused, ids)
    assert fused_calls.n == n_lora_layers(fused)
    params = list(fused.named_parameters())
    assert fused_lora.restore_peft(fused) is fused
    for name, layer in lora_modules(fused):
        assert type(layer) is PeftLoraLinear, name
        assert not any(k.startswith("_fused_lora") for k in layer.__dict__), name
    assert all(a is b for (_, a), (_, b) in zip(fused.named_parameters(), params))
    fused_calls.reset()
    restored = logits(fused, ids)
    assert fused_calls.n == 0
    torch.testing.assert_close(restored, logits(twin, ids), rtol=0, atol=0)  # PEFT's code on both sides
    assert_close_fp32(restored, accelerated, "restored vs accelerated")
    assert set(fused_lora.fusion_summary(fused).left_to_peft) == {n for n, _ in lora_modules(fused)}


def test_pickle_whole_fused_model(fresh_process, fused_calls):
    """torch.save / torch.load of the whole accelerated PeftModel: in this process and in a fresh one (the fused
    classes are found by name, before any from_peft call there)."""
    fused, ids = fresh_process["pickled"], fresh_process["ids"]
    ours = logits(fused, ids)
    fused_calls.reset()
    loaded = torch.load(fresh_process["dir"] / "model.pt", weights_only=False)
    assert isinstance(loaded, PeftModel)
    assert all(type(m) is peft_native.FusedLinear for _, m in lora_modules(loaded))
    torch.testing.assert_close(logits(loaded, ids), ours, rtol=0, atol=0)
    assert fused_calls.n == n_lora_layers(loaded)

    result = _part(fresh_process, "unpickle")
    assert result["classes"] == ["fused_lora.peft_native.FusedLinear"]
    assert result["calls"] == n_lora_layers(fused) and result["all_fused"]
    assert_close_fp32(result["logits"], ours, "logits in a fresh process")
