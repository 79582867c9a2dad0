"""Choosing a launch configuration: autotuned on GPUs, one fixed small configuration in the interpreter."""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional, Sequence

import torch
import triton

from . import INTERPRETING


def config(*, num_warps: int, num_stages: int, **meta) -> triton.Config:
    """One launch configuration; keyword arguments only, so every number in a table says what it is. ``meta``:
    the kernel's block-size constexprs, in the order the configuration's name lists them."""
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


FAMILIES = ("half", "tf32", "ieee")


def config_family(dtype: torch.dtype, precision: str, nf4: bool = False, fp32_adapters: bool = False,
                  dora: int = 0) -> str:
    """Configurations differ by operand kind: 16-bit and tf32 operands run on tensor cores, fp32 with "ieee"
    precision on FMA units (whose register-resident operands need smaller tiles to avoid spills). GEMMs that
    dequantize an NF4 weight in their main loop (short inputs only) have their own, "-nf4", configurations, and so
    do the dense GEMMs whose LoRA seed converts fp32 adapter tiles over 16-bit activations ("-fp32a";
    ``fp32_adapters``). DoRA's GEMMs (``dora``: 1 without dropout, 2 with dropout, whose two accumulators need
    smaller tiles) have families of their own, the same names with "-dora" / "-dora2" appended."""
    family = "half" if dtype != torch.float32 else ("tf32" if precision == "tf32" else "ieee")
    if nf4:
        family += "-nf4"
    elif fp32_adapters:
        family += "-fp32a"
    return family + ("", "-dora", "-dora2")[dora]


class Launcher:
    """A ``@triton.jit`` kernel with its shipped configurations.

    ``configs`` maps a family (:func:`config_family`) to the configurations the autotuner may pick; every one of
    them is compiled for sm_80 and sm_90 by the ahead-of-time check (tests/test_aot_compile.py), which requires zero
    spills and shared memory within the target's limit. In the interpreter, ``interpreter_config`` runs instead
    (small tiles, so small test shapes still cover several tiles and every boundary mask).
    """

    def __init__(
        self,
        kernel,
        configs: Dict[str, List[triton.Config]],
        key: Sequence[str],
        interpreter_config: triton.Config,
        reset_to_zero: Sequence[str] = (),
    ):
        self.kernel = kernel
        self.configs = configs
        self.key = list(key)
        self.interpreter_config = interpreter_config
        self.reset_to_zero = list(reset_to_zero)
        self._tuners: Dict[str, object] = {}
        self._forced: List[triton.Config] = []

    @property
    def name(self) -> str:
        return self.kernel.__name__ if hasattr(self.kernel, "__name__") else self.kernel.fn.__name__

    @contextlib.contextmanager
    def forced(self, cfg: triton.Config):
        """Run every launch inside the block with ``cfg`` (tests run each shipped configuration this way)."""
        self._forced.append(cfg)
        try:
            yield
        finally:
            self._forced.pop()

    def fixed_config(self) -> Optional[triton.Config]:
        """The configuration used without autotuning, or None when the autotuner decides."""
        if self._forced:
            return self._forced[-1]
        if INTERPRETING:
            return self.interpreter_config
        return None

    def __call__(self, grid: Callable, family: str, cfg: Optional[triton.Config] = None, **args):
        # Triton launches on the current CUDA device: make it the tensors' device (multi-GPU processes).
        device = next((a.device for a in args.values() if isinstance(a, torch.Tensor)), None)
        guard = torch.cuda.device(device) if device is not None and device.type == "cuda" else contextlib.nullcontext()
        with guard:
            self._launch(grid, family, cfg, args)

    def _launch(self, grid, family, cfg, args) -> None:
        cfg = cfg or self.fixed_config()
        if cfg is not None:
            self.kernel[grid](**args, **cfg.all_kwargs())
            return
        tuner = self._tuners.get(family)
        if tuner is None:
            tuner = triton.autotune(
                configs=self.configs[family], key=self.key, reset_to_zero=self.reset_to_zero or None
            )(self.kernel)
            self._tuners[family] = tuner
        tuner[grid](**args)
