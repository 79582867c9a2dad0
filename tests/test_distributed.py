"""FusedLoraLinear under DDP, FSDP2 (``torch.distributed.fsdp.fully_shard``), FSDP1's full state dict and activation
checkpointing, on CPU.

DDP / FSDP2: two processes (``torch.multiprocessing`` spawn, gloo backend, a free TCP port, a deadline so that a hang
fails the test instead of blocking CI). Each rank runs half of a batch; the gradients (and, for FSDP2, the parameters
after one AdamW step) must equal a single-process run on the whole batch, computed inside each worker. With a mean
loss over equal halves, DDP's all-reduce average and FSDP2's reduce-scatter average give exactly the full-batch mean
gradient up to fp32 summation order, hence ``FP32_RTOL`` (tests/helpers.py: one fp32 reduction, relative to the
largest value). lora_dropout = 0 here (each rank would draw its own masks).

Activation checkpointing: the dropout seed of a FusedLoraLinear call is drawn from torch's default CPU generator;
``torch.utils.checkpoint`` (``preserve_rng_state=True``, the default) restores that generator before recomputing the
forward, so the recomputation draws the same seed and the same mask. A single checkpointed layer must give bitwise
the same gradients (same operations on the same values); a checkpointed transformer gets ``FP32_RTOL`` (the backward
adds the residual-stream gradient contributions in a different order). A negative control without RNG preservation
shows that the comparison detects a different mask.
"""

from __future__ import annotations

import copy
import gc
import socket
import time
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.checkpoint import checkpoint

from fused_lora import FusedLoraLinear, apply_lora, lora_layers

from helpers import assert_close_fp32

WORLD_SIZE = 2
# Each distributed test takes 7-20 s here (mostly the two workers importing torch); the deadline only turns a hang
# (e.g. a collective one rank never reaches) into a failure. Both limits leave room for a loaded 2-core machine:
# with 30 s, a rank starved by other processes once hit gloo's collective timeout (SIGABRT) before its peer arrived.
DEADLINE_S = 240.0
COLLECTIVE_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(fn, *args, deadline_s: float = DEADLINE_S) -> None:
    """Spawn WORLD_SIZE processes running ``fn(rank, port, *args)``; a worker's exception fails the test with its
    traceback; workers still running after ``deadline_s`` are killed and the test fails."""
    port = _free_port()
    ctx = mp.start_processes(fn, args=(port, *args), nprocs=WORLD_SIZE, join=False, start_method="spawn")
    end = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=max(0.1, end - time.monotonic())):
            if time.monotonic() >= end:
                pytest.fail(f"distributed workers still running after {deadline_s:.0f} s (hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)


def _quiesce() -> None:
    """Both ranks done with every collective before either tears its process group down: a rank destroying the
    group while its peer's gloo threads still talk to it aborted the process ("terminate called without an active
    exception", SIGABRT) in 2 of 4 full-suite runs on a loaded 2-core machine."""
    dist.barrier()


def _init(rank: int, port: int) -> None:
    torch.set_num_threads(1)  # two workers share the machine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def _model_and_data():
    """The same LoRA MLP (random non-zero B, so that A gets gradients too) and batch on every rank."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 32), nn.GELU(), nn.Linear(32, 8))
    apply_lora(model, ["0", "2", "4"], r=4, lora_alpha=8, lora_dropout=0.0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(0, 0.1)
    x, target = torch.randn(16, 3, 24), torch.randn(16, 3, 8)
    return model, x, target


def _loss(model, x, target):
    return nn.functional.mse_loss(model(x), target)


def _reference_grads(model, x, target):
    ref = copy.deepcopy(model)
    _loss(ref, x, target).backward()
    return ref, {n: p.grad.detach().clone() for n, p in ref.named_parameters() if p.requires_grad}


def _half(rank, *tensors):
    n = tensors[0].shape[0] // WORLD_SIZE
    return [t[rank * n:(rank + 1) * n] for t in tensors]


def _ddp_worker(rank, port):
    _init(rank, port)
    try:
        model, x, target = _model_and_data()
        _, ref_grads = _reference_grads(model, x, target)
        ddp = nn.parallel.DistributedDataParallel(model)
        _loss(ddp, *_half(rank, x, target)).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert grads.keys() == ref_grads.keys() == {f"{i}.lora_{ab}" for i in (0, 2, 4) for ab in "AB"}, grads.keys()
        for name, g in grads.items():
            assert_close_fp32(g, ref_grads[name], f"rank {rank} DDP grad {name}")
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        del ddp  # its reducer holds the process group: release it before the group goes
        _quiesce()
    finally:
        dist.destroy_process_group()


def _fsdp2_worker(rank, port):
    _init(rank, port)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model, x, target = _model_and_data()
        ref, ref_grads = _reference_grads(model, x, target)
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        for _, layer in lora_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _loss(model, *_half(rank, x, target)).backward()
        # FSDP2 warns when a wrapped module returns a view (in-place ops on it would bypass its hooks): ours do not
        views = [str(w.message) for w in caught if "view tensor" in str(w.message)]
        assert not views, views
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        assert grads.keys() == ref_grads.keys(), grads.keys()
        for name, g in grads.items():
            assert_close_fp32(g, ref_grads[name], f"rank {rank} FSDP2 grad {name}")

        # one AdamW step on the shards equals the step on the full parameters
        for m in (model, ref):
            torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2).step()
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            assert_close_fp32(p.full_tensor().detach(), ref_params[name].detach(), f"rank {rank} FSDP2 param {name}")
        del model, grads, p  # FSDP2's state holds the mesh's group: release it before the group goes (as DDP's)
        gc.collect()
        _quiesce()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed + gloo")
def test_ddp_gradients_match_single_process():
    _run_workers(_ddp_worker)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed + gloo")
def test_fsdp2_gradients_and_step_match_single_process():
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 (fully_shard) not in this torch")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) not in this torch")
    _run_workers(_fsdp2_worker)


def _fsdp1_state_dict_worker(rank, port):
    """FSDP1 (the wrapper Hugging Face's Trainer uses with fsdp=...) gathers a full state dict by the module tree's
    parameter names: the keys must be the plain model's, and the state dict must load back."""
    _init(rank, port)
    try:
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        model, x, target = _model_and_data()
        expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
        wrapped = FSDP(model, device_id=torch.device("cpu"), use_orig_params=True)
        _loss(wrapped, *_half(rank, x, target)).backward()
        full = FullStateDictConfig(rank0_only=False)
        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, full):
            state = wrapped.state_dict()
        assert state.keys() == expected.keys(), sorted(set(state) ^ set(expected))
        for key, value in expected.items():
            assert torch.equal(state[key], value), key
        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, full):
            wrapped.load_state_dict(state)
        del wrapped, model  # FSDP's state holds the process group: release it before the group goes
        gc.collect()
        _quiesce()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed + gloo")
def test_fsdp1_full_state_dict_round_trip():
    _run_workers(_fsdp1_state_dict_worker)


# ------------------------------------------------------------------------------------------------ checkpointing


def _grads_after(layer, x, g, seed, ckpt, preserve_rng_state=True):
    layer.zero_grad(set_to_none=True)
    xl = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    if ckpt:
        y = checkpoint(layer, xl, use_reentrant=False, preserve_rng_state=preserve_rng_state)
    else:
        y = layer(xl)
    torch.rand(7)  # the generator moves on between forward and backward, as it does in a real model
    y.backward(g)
    return {"x": xl.grad, "lora_A": layer.lora_A.grad.clone(), "lora_B": layer.lora_B.grad.clone()}


def test_checkpointing_replays_the_dropout_mask():
    layer = FusedLoraLinear(48, 40, r=8, lora_alpha=16, lora_dropout=0.3)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.2)
    layer.train()
    x, g = torch.randn(5, 7, 48), torch.randn(5, 7, 40)
    plain = _grads_after(layer, x, g, seed=123, ckpt=False)
    ckpt = _grads_after(layer, x, g, seed=123, ckpt=True)
    for name in plain:
        assert torch.equal(ckpt[name], plain[name]), name
    # controls: another seed gives another mask; a recomputation that does not restore the RNG state draws another
    # seed and the gradients no longer match -- the comparison above can fail
    other_seed = _grads_after(layer, x, g, seed=124, ckpt=False)
    assert not torch.allclose(other_seed["lora_A"], plain["lora_A"], rtol=1e-3, atol=0)
    not_replayed = _grads_after(layer, x, g, seed=123, ckpt=True, preserve_rng_state=False)
    assert not torch.allclose(not_replayed["lora_A"], plain["lora_A"], rtol=1e-3, atol=0)


def test_transformers_gradient_checkpointing_with_lora_dropout():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=128, attn_implementation="eager",
    )
    torch.manual_seed(0)
    base = apply_lora(transformers.LlamaForCausalLM(config), ["q_proj", "v_proj", "down_proj"], lora_dropout=0.2)
    with torch.no_grad():
        for _, layer in lora_layers(base):
            layer.lora_B.normal_(0, 0.05)
    batch = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))

    def grads(model, seed=7):
        model.train()
        torch.manual_seed(seed)
        model(input_ids=batch, labels=batch).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain = grads(copy.deepcopy(base))

    def checkpointed(**kwargs):
        model = copy.deepcopy(base)
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x naming
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False, **kwargs})
            assert model.is_activation_checkpointing
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False, **kwargs})
            assert model.is_gradient_checkpointing
        return model

    ckpt = grads(checkpointed())
    assert plain.keys() == ckpt.keys() and len(plain) == 12
    for name in plain:
        assert_close_fp32(ckpt[name], plain[name], name)
    # controls: other masks (another seed, or a recomputation that does not replay the RNG state) change the
    # gradients far beyond the tolerance
    probe = "model.layers.0.self_attn.q_proj.lora_A"
    for other in (grads(copy.deepcopy(base), seed=8), grads(checkpointed(preserve_rng_state=False))):
        with pytest.raises(AssertionError):
            assert_close_fp32(other[probe], plain[probe])
