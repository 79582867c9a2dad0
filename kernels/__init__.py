"""Triton kernels of fused-lora, installed as ``fused_lora.kernels`` (never as a top-level ``kernels``).

``lora_forward`` / ``lora_backward`` launch the fused LoRA kernels (``lora.py``; dense or NF4 base weights) and
mirror ``fused_lora.torch_ops``. ``nf4_dequantize`` and the tile decoder ``nf4_decode_tile`` (``nf4.py``) handle
bitsandbytes' NF4 format. ``INTERPRETING`` records whether the kernels were built for the Triton interpreter
(``TRITON_INTERPRET=1`` when triton decorated them), in which case they run on CPU tensors.
"""

import os
import sys

if __name__ == "kernels":
    # Imported as a top-level ``kernels``: the repository root is on sys.path (it is the working directory of
    # `python -m ...` or `python -c ...`). That name belongs to Hugging Face's package, which bitsandbytes and
    # transformers import: hand the import over to it. Where it is not installed, leave what Python makes of a
    # folder without __init__.py -- an empty namespace package, which those importers treat as absent.
    import importlib.machinery
    import importlib.util

    # Real paths: the repository may be on sys.path under several spellings (symlinks), each of which must be
    # skipped, or two copies of this folder would hand over to each other forever.
    _here = os.path.realpath(__file__)
    _root = os.path.dirname(os.path.dirname(_here))
    _elsewhere = [p for p in sys.path if os.path.realpath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is not None and _spec.origin and os.path.realpath(_spec.origin) == _here:
        _spec = None
    if _spec is None:
        _spec = importlib.machinery.ModuleSpec(__name__, None, is_package=True)
        _spec.submodule_search_locations = []
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module  # what the import statement returns
    if _spec.loader is not None:
        _spec.loader.exec_module(_module)
else:
    INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

    from .lora import dora_backward, dora_forward, lora_backward, lora_forward  # noqa: E402
    from .nf4 import nf4_decode_tile, nf4_dequantize  # noqa: E402

    __all__ = ["INTERPRETING", "lora_forward", "lora_backward", "dora_forward", "dora_backward", "nf4_decode_tile",
               "nf4_dequantize"]
