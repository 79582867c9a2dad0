"""The examples' closing report (``report``): fused vs PEFT time per training step, measured on the machine the
example runs on, and ``fused_lora.fusion_summary``, printed and written to ``result.json``.

Like is compared with like: the same model, the same batches (taken once from the Trainer's own train dataloader),
the same number of steps, each step being the Trainer's own ``training_step`` (its autocast, loss scaling and
gradient checkpointing: forward + backward). The optimizer step is left out of both: it updates the same parameters
whichever forward computed the gradients, and leaving it out keeps the trained weights untouched. Warm-up steps
are run, untimed, after every switch; fused and PEFT rounds alternate, and the median round counts, so that a
machine shared with other work affects both alike.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import time

import torch

import fused_lora


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_steps(trainer, model, batches, warmup: int) -> float:
    """Seconds per step over ``batches[warmup:]`` (the first ``warmup`` run untimed); gradients are discarded."""
    device = next(p for p in model.parameters()).device
    for i, batch in enumerate(batches):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        trainer.training_step(model, batch)
        model.zero_grad(set_to_none=True)
    _sync(device)
    return (time.perf_counter() - start) / (len(batches) - warmup)


def compare_step_times(trainer, steps: int = 10, warmup: int = 2, rounds: int = 3) -> dict:
    """Time ``steps`` training steps with fused-lora and with PEFT's own forward (``fused_lora.restore_peft``), in
    ``rounds`` alternating rounds; returns milliseconds per step (medians) and the speed-up. The model is left
    accelerated, as it was."""
    model = trainer.model
    loader = trainer.get_train_dataloader()
    batches = list(itertools.islice(itertools.cycle(loader), warmup + steps))
    fused, peft = [], []
    for _ in range(rounds):
        fused.append(_timed_steps(trainer, model, batches, warmup))
        fused_lora.restore_peft(model)
        peft.append(_timed_steps(trainer, model, batches, warmup))
        fused_lora.from_peft(model)
    fused_ms, peft_ms = 1e3 * statistics.median(fused), 1e3 * statistics.median(peft)
    return {
        "steps": steps,
        "warmup": warmup,
        "rounds": rounds,
        "fused_ms_per_step": fused_ms,
        "peft_ms_per_step": peft_ms,
        "speedup": peft_ms / fused_ms,
        "device": str(next(model.parameters()).device),
    }


def format_step_times(t: dict) -> str:
    return (
        f"time per training step (forward + backward, optimizer step excluded in both; {t['steps']} steps x "
        f"{t['rounds']} alternating rounds, median, on {t['device']}):\n"
        f"  fused-lora {t['fused_ms_per_step']:8.2f} ms\n"
        f"  PEFT       {t['peft_ms_per_step']:8.2f} ms\n"
        f"  speed-up   {t['speedup']:8.2f}x"
    )


def fusion_counts(summary) -> dict:
    """The numbers of a ``fused_lora.fusion_summary(model)``: layers fused, layers left to PEFT, calls PEFT computed."""
    return {
        "fused": len(summary.fused),
        "left_to_peft": len(summary.left_to_peft),
        "fallback_calls": sum(n for calls in summary.fallback_calls.values() for n in calls.values()),
    }


def report(trainer, output_dir: str, fields: dict, probe, probe_logits, timing_steps: int) -> dict:
    """Time the steps (``compare_step_times``), print the fusion summary and the step times, and write
    ``output_dir/result.json``: ``fields`` (the example's own numbers), the fusion counts and summary, the timing, and
    the probe inputs with their logits (tests/test_examples.py reloads the saved adapter and compares them)."""
    timing = compare_step_times(trainer, steps=timing_steps)
    summary = fused_lora.fusion_summary(trainer.model)
    print(summary)
    print(format_step_times(timing))
    result = {
        **fields,
        "fusion": fusion_counts(summary),
        "fusion_summary": str(summary),
        "timing": timing,
        "probe": {"input_ids": probe["input_ids"].tolist(), "attention_mask": probe["attention_mask"].tolist(),
                  "logits": probe_logits.tolist()},
    }
    with open(os.path.join(output_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result
