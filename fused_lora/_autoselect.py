"""The ``"auto"`` backend on CUDA: per pass and problem, the faster of the Triton kernels and the torch path.

Both implementations compute the same function with the same dropout masks and the same rounding points (``xa`` and
``gb`` in the activation dtype, fp32 accumulation), and their forward and backward exchange the same saved tensors,
so the forward and the backward of one call may each take either: a switch changes nothing beyond rounding. Like
Triton's autotuner, the first call of each problem times both candidates on its real arguments (the time of that
first call grows accordingly) and the choice is kept for the process; :func:`auto_choices` shows what was chosen and
why. ``set_backend("triton")`` / ``"torch"`` bypass the choice.

A problem is keyed by the pass, the device, the token count rounded up to a power of two (as the kernels' autotuning
key), the other dimensions, the dtype (and whether fp32 matmuls may use tf32), the variant (bias, dropout, NF4 base,
which gradients) and whether x is contiguous.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .nf4 import NF4Weight

CANDIDATES = ("triton", "torch")


@dataclass(frozen=True)
class AutoChoice:
    """One decision of the ``"auto"`` backend: ``key`` (see the module docstring), the ``winner`` and the measured
    milliseconds per candidate."""

    key: Tuple
    winner: str
    times_ms: Dict[str, float]


def _cuda_time_ms(key: Tuple, candidate: str, fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` (``candidate`` for problem ``key``) on the current CUDA stream; warm-up runs
    first (Triton compiles and autotunes in the first one)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=30, return_mode="median"))


class AutoSelector:
    """Times the candidates of a problem once and remembers the winner (thread-safe). ``timer(key, candidate, fn)
    -> ms`` is replaceable (tests inject timings)."""

    def __init__(self, timer: Callable[[Tuple, str, Callable[[], object]], float] = _cuda_time_ms):
        self.timer = timer
        self._choices: Dict[Tuple, AutoChoice] = {}
        self._lock = threading.Lock()

    def choose(self, key: Tuple, candidates: Dict[str, Callable[[], object]]) -> str:
        with self._lock:
            known = self._choices.get(key)
        if known is not None:
            return known.winner
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return "triton"  # no timing inside a CUDA graph capture: the kernels, as before "auto" chose
        times = {name: float(self.timer(key, name, fn)) for name, fn in candidates.items()}
        winner = min(times, key=lambda name: (times[name], CANDIDATES.index(name)))  # ties: the kernels
        with self._lock:
            self._choices.setdefault(key, AutoChoice(key, winner, times))
            return self._choices[key].winner

    def choices(self) -> List[AutoChoice]:
        with self._lock:
            return list(self._choices.values())

    def clear(self) -> None:
        with self._lock:
            self._choices.clear()


SELECTOR = AutoSelector()


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def problem_key(name: str, args: tuple) -> Tuple:
    """The key of a ``lora_forward`` / ``lora_backward`` call (``name``) with the launch wrappers' arguments."""
    if name == "lora_forward":
        x, weight, lora_A, lora_B, bias, _scaling, dropout = args
        variant = (bias is not None,)
    else:
        _g, x, weight, lora_A, lora_B, _xa, _scaling, dropout, needs = args
        variant = tuple(needs)
    nf4 = isinstance(weight, NF4Weight)
    tf32 = x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return (name, str(x.device), _pow2(x.shape[0]), x.shape[1], weight.shape[0], lora_A.shape[0], str(x.dtype), tf32,
            nf4, dropout is not None, x.is_contiguous(), variant)


def auto_choices() -> List[AutoChoice]:
    """What the ``"auto"`` backend chose so far in this process, one :class:`AutoChoice` per problem."""
    return SELECTOR.choices()


def clear_auto_choices() -> None:
    """Forget the choices (the next call of each problem times the candidates again)."""
    SELECTOR.clear()


def run_fastest(name: str, args: tuple, implementations: Dict[str, Callable]) -> object:
    """``implementations[winner].<name>(*args)``, the winner chosen by :data:`SELECTOR` for this problem."""
    candidates = {c: (lambda impl=implementations[c]: getattr(impl, name)(*args)) for c in CANDIDATES}
    winner = SELECTOR.choose(problem_key(name, args), candidates)
    return getattr(implementations[winner], name)(*args)
