"""fused-lora: fused Triton kernels for LoRA / QLoRA fine-tuning, with a pure-PyTorch path that runs everywhere.

Public API::

    fused_lora_linear(x, weight, lora_A, lora_B, scaling, bias=None, dropout_p=0.0, training=True, seed=None,
                      *, magnitude=None, weight_norm_sq=None)          (magnitude: DoRA)
    FusedLoraLinear(in_features, out_features, r=8, lora_alpha=16, lora_dropout=0.0, bias=True, use_rslora=False,
                    device=None, dtype=None, adapter_dtype=None, use_dora=False)
    FusedLoraLinear.from_linear(linear, r=8, lora_alpha=16, lora_dropout=0.0, use_rslora=False,
                                quantize=None | "nf4", compute_dtype=None, adapter_dtype=None, use_dora=False)
    FusedLoraLinear.from_bnb(linear4bit, r=8, lora_alpha=16, lora_dropout=0.0, use_rslora=False, compute_dtype=None,
                             adapter_dtype=None, use_dora=False)
    (adapter_dtype=None: PEFT's default, fp32 adapters over fp16 / bf16 math; apply_lora takes it, and use_dora, too)
    quantize_nf4(weight, blocksize=64, double_quant=True) -> NF4Weight
    apply_lora(model, target_modules, r=8, lora_alpha=16, lora_dropout=0.0, use_rslora=False, quantize=None,
               ..., adapter_dtype=None)
    from_peft(peft_model) -> the same PeftModel, accelerated in place; restore_peft(model); fusion_summary(model)
    merge_and_unload(model), print_trainable_parameters(model)
    save_adapter(model, path, base_model_name_or_path=None), load_adapter(model, path)
    set_backend("auto" | "triton" | "torch"), use_backend(name), get_backend(), auto_choices()
    set_cpu_half_compute("auto" | "fp32" | "native"), use_cpu_half_compute(policy), get_cpu_half_compute()
"""

from ._autoselect import auto_choices, clear_auto_choices
from ._backend import get_backend, set_backend, use_backend
from .adapters import load_adapter, save_adapter
from .conversion import apply_lora, lora_layers, print_trainable_parameters, trainable_parameters_summary
from .functional import FusedLoraFunction, fused_lora_linear
from .layers import FusedLoraLinear
from .merging import merge_and_unload
from .nf4 import NF4Weight, quantize_nf4
from .peft_native import FusionSummary, from_peft, fusion_summary, restore_peft
from .torch_ops import get_cpu_half_compute, set_cpu_half_compute, use_cpu_half_compute

__version__ = "0.1.0"

__all__ = [
    "auto_choices",
    "clear_auto_choices",
    "FusedLoraFunction",
    "FusedLoraLinear",
    "FusionSummary",
    "NF4Weight",
    "apply_lora",
    "from_peft",
    "fusion_summary",
    "fused_lora_linear",
    "get_backend",
    "get_cpu_half_compute",
    "load_adapter",
    "lora_layers",
    "merge_and_unload",
    "print_trainable_parameters",
    "quantize_nf4",
    "restore_peft",
    "save_adapter",
    "set_backend",
    "set_cpu_half_compute",
    "trainable_parameters_summary",
    "use_backend",
    "use_cpu_half_compute",
]
