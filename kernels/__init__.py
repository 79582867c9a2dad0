"""Triton kernels of fused-lora, installed as ``fused_lora.kernels`` (never as a top-level ``kernels``).

``lora_forward`` / ``lora_backward`` launch the fused LoRA kernels (see ``lora.py``) and mirror
``fused_lora.torch_ops``. ``INTERPRETING`` records whether the kernels were built for the Triton interpreter
(``TRITON_INTERPRET=1`` when triton decorated them), in which case they run on CPU tensors.
"""

import os

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

from .lora import lora_backward, lora_forward  # noqa: E402

__all__ = ["INTERPRETING", "lora_forward", "lora_backward"]
