"""The ``"auto"`` backend on CUDA: per pass and problem, the faster of the Triton kernels and the torch path.

Both implementations compute the same function with the same dropout masks and the same rounding points (``xa`` and
``gb`` in the activation dtype, fp32 accumulation), and their forward and backward exchange the same saved tensors,
so the forward and the backward of one call may each take either: a switch changes nothing beyond rounding. Like
Triton's autotuner, the first call of each problem times both candidates on its real arguments (the time of that
first call grows accordingly) and the choice is kept for the process; :func:`auto_choices` shows what was chosen and
why. ``set_backend("triton")`` / ``"torch"`` bypass the choice.

A problem is keyed by the pass, the device, the token count rounded up to a power of two (as the kernels' autotuning
key), the other dimensions, the dtype (and whether fp32 matmuls may use tf32), the variant (bias, dropout, NF4 base,
which gradients), whether x is contiguous and whether deterministic algorithms are requested (:class:`ProblemKey`).
The choice rests on timings, so two processes may choose differently and differ in the last bits; for bit-for-bit
reproducible runs choose a backend (``set_backend("triton")`` or ``"torch"``). A candidate that runs out of memory
while being timed loses.
"""

from __future__ import annotations

import statistics
import threading
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Tuple

import torch


CANDIDATES = ("triton", "torch")


@dataclass(frozen=True)
class AutoChoice:
    """One decision of the ``"auto"`` backend: ``key`` (see the module docstring), the ``winner`` and the measured
    milliseconds per candidate."""

    key: Tuple
    winner: str
    times_ms: Dict[str, float]


def _cuda_time_ms(key: "ProblemKey", candidate: str, fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` (``candidate`` for problem ``key``) over a few runs, with CUDA events on the
    problem's device. The first run is not timed: Triton compiles and autotunes in it. Deliberately light (no L2
    flush buffer, few runs): it happens inside a training step, wherever a new problem first appears."""
    device = torch.device(key.device)
    with torch.cuda.device(device):
        fn()
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


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
        times, errors = {}, {}
        for name, fn in candidates.items():
            try:
                times[name] = float(self.timer(key, name, fn))
            except torch.cuda.OutOfMemoryError as exc:  # the other candidate may fit: it wins
                errors[name] = exc
                torch.cuda.empty_cache()
        if not times:
            raise next(iter(errors.values()))
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


class ProblemKey(NamedTuple):
    """What one choice of the ``"auto"`` backend is for."""

    pass_name: str  # "lora_forward" or "lora_backward"
    device: str
    tokens_bucket: int  # M rounded up to a power of two
    in_features: int
    out_features: int
    r: int
    dtype: str
    adapter_dtype: str  # fp32 adapters on half activations are converted in the kernels' registers: another cost
    tf32: bool
    nf4: bool
    dropout: bool
    x_contiguous: bool
    deterministic: bool  # torch.use_deterministic_algorithms: the kernels' backward reduces differently
    variant: Tuple  # forward: (has bias,); backward: which gradients


def problem_key(name: str, args: tuple) -> ProblemKey:
    """The key of a ``lora_forward`` / ``lora_backward`` / ``dora_forward`` / ``dora_backward`` call (``name``) with
    the launch wrappers' arguments."""
    if name in ("lora_forward", "dora_forward"):
        x, weight, lora_A, lora_B, bias, _scaling, dropout = args[:7]
        variant = (bias is not None,)
    elif name == "lora_backward":
        _g, x, weight, lora_A, lora_B, _xa, _scaling, dropout, needs = args
        variant = tuple(needs)
    else:
        _g, x, weight, lora_A, lora_B, _xa, _z, _scale, _norm, _scaling, dropout, needs = args
        variant = tuple(needs)
    tf32 = x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return ProblemKey(name, str(x.device), _pow2(x.shape[0]), x.shape[1], weight.shape[0], lora_A.shape[0],
                      str(x.dtype), str(lora_A.dtype), tf32, not isinstance(weight, torch.Tensor), dropout is not None, x.is_contiguous(),
                      torch.are_deterministic_algorithms_enabled(), variant)


def shape_matches(key: ProblemKey, tokens: int, in_features: int, out_features: int, r: int,
                  dtype: torch.dtype) -> bool:
    """Whether ``key`` is a problem of that shape (any pass and variant)."""
    return (key.tokens_bucket, key.in_features, key.out_features, key.r, key.dtype) == (
        _pow2(tokens), in_features, out_features, r, str(dtype))


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
