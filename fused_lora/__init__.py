"""fused-lora: fused Triton kernels for LoRA / QLoRA fine-tuning, with a pure-PyTorch path that runs everywhere.

Public API::

    fused_lora_linear(x, weight, lora_A, lora_B, scaling, bias=None, dropout_p=0.0, training=True, seed=None)
    FusedLoraLinear(in_features, out_features, r=8, lora_alpha=16, lora_dropout=0.0, bias=True, use_rslora=False)
    FusedLoraLinear.from_linear(linear, r=8, lora_alpha=16, lora_dropout=0.0, use_rslora=False)
    set_backend("auto" | "triton" | "torch"), use_backend(name), get_backend()
"""

from ._backend import get_backend, set_backend, use_backend
from .functional import FusedLoraFunction, fused_lora_linear
from .layers import FusedLoraLinear

__version__ = "0.1.0"

__all__ = [
    "FusedLoraFunction",
    "FusedLoraLinear",
    "fused_lora_linear",
    "get_backend",
    "set_backend",
    "use_backend",
]
