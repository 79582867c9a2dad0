"""torch.compile(fullgraph=True) captures FusedLoraLinear in one graph: the forward and backward run as registered
custom operators with fake implementations, and the dropout seed is a tensor (no .item() graph break)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fused_lora import FusedLoraLinear, use_backend

from conftest import DEVICE_BACKENDS
from helpers import assert_close_fp32


class _Block(nn.Module):
    def __init__(self, dim, hidden, p):
        super().__init__()
        self.up = FusedLoraLinear(dim, hidden, r=4, lora_alpha=8, lora_dropout=p)
        self.down = FusedLoraLinear(hidden, dim, r=4, lora_alpha=8, lora_dropout=p, bias=False)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def _compiled_backends():
    # The interpreter is not a compile target: compile with the torch path on CPU and the kernels on CUDA.
    return [db for db in DEVICE_BACKENDS if not (db[0] == "cpu" and db[1] == "triton")]


@pytest.mark.gpu_check
@pytest.mark.parametrize("device,backend", _compiled_backends())
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_fullgraph_compile_matches_eager(device, backend, p):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Block(32, 48, p).to(device)
    for layer in (model.up, model.down):
        nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(2, 5, 32, device=device)
    compiled = torch.compile(model, fullgraph=True)
    # fallback_random: the compiled graph draws the dropout seeds with eager's RNG, so both runs use the same masks
    # (by default inductor's own generator gives different, equally valid, seeds).
    with use_backend(backend), torch._inductor.config.patch(fallback_random=True):
        results = []
        for fn in (model, compiled):
            torch.manual_seed(123)  # same dropout seeds drawn in both runs
            xi = x.clone().requires_grad_(True)
            y = fn(xi)
            y.square().sum().backward()
            results.append([y.detach(), xi.grad] + [t.grad.clone() for t in (model.up.lora_A, model.up.lora_B,
                                                                            model.down.lora_A, model.down.lora_B)])
            model.zero_grad(set_to_none=True)
    for name, eager, comp in zip(["y", "x", "up.A", "up.B", "down.A", "down.B"], *results):
        assert_close_fp32(comp, eager, name)
