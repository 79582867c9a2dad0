"""LoRA fine-tuning of a sequence classifier with Hugging Face's Trainer, accelerated by fused-lora in one line.

This is the script of the PEFT LoRA tutorials (RoBERTa, ``LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
lora_dropout=0.1, target_modules=["query", "value"])``, the classification head trained in full through
``modules_to_save``, an accuracy metric, ``Trainer.train`` / ``evaluate`` / ``save_model``) with one line added
after ``get_peft_model``::

    model = fused_lora.from_peft(model)

The model stays the PeftModel it was: the Trainer, ``save_model`` (PEFT's adapter files) and every PEFT method work
as before; only the LoRA layers' forward and backward go through fused-lora. At the end the script times training
steps with fused-lora and with PEFT's own forward on the same model and batches (``step_timing.py``).

Offline (the default, or ``--tiny``): a tiny RoBERTa built from a config, a word-level tokenizer and a synthetic
sentiment data set, all made here (the label is the sentiment of one adjective hidden among other words: the
accuracy rises from chance, 0.5, to about 0.9 in 300 steps); runs in well under a minute on a CPU::

    python examples/sequence_classification.py --output-dir /tmp/seq-cls

A real model and GLUE task on a GPU (needs ``pip install datasets`` and network access)::

    python examples/sequence_classification.py --model roberta-base --dataset glue/mrpc --output-dir out/mrpc
    python examples/sequence_classification.py --model roberta-large --dataset glue/sst2 --epochs 1 --bf16

``--dataset`` takes ``glue/<task>`` or any Hugging Face data set with ``text`` and ``label`` columns (``imdb``).
Written to ``--output-dir``: ``adapter/`` (``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
``peft.PeftModel.from_pretrained``), ``base/`` (the tiny base model and tokenizer, offline only), ``result.json``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import fused_lora

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_timing import report  # noqa: E402

GLUE_TEXT_KEYS = {
    "cola": ("sentence", None),
    "sst2": ("sentence", None),
    "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a Hugging Face model id (e.g. roberta-base); none: the tiny offline model")
    p.add_argument("--dataset", default="glue/mrpc", help="with --model: glue/<task>, or a data set with text/label")
    p.add_argument("--tiny", action="store_true", help="the tiny offline model and synthetic data (the default)")
    p.add_argument("--output-dir", default="out/sequence-classification")
    p.add_argument("--steps", type=int, default=None, help="training steps (tiny: 300; with --model: --epochs)")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=None, help="tiny: 16; with --model: 32")
    p.add_argument("--lr", type=float, default=None, help="tiny: 1e-2; with --model: 1e-3 (the PEFT tutorial's)")
    p.add_argument("--bf16", action="store_true", help="mixed precision (TrainingArguments(bf16=True))")
    p.add_argument("--timing-steps", type=int, default=10, help="steps per round of the fused vs PEFT timing")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.tiny = args.tiny or args.model is None
    if args.tiny:
        args.steps = 300 if args.steps is None else args.steps
        args.batch_size = args.batch_size or 16
        args.lr = args.lr or 1e-2
    else:
        args.batch_size = args.batch_size or 32
        args.lr = args.lr or 1e-3
    return args


# --- offline: a tiny RoBERTa, a word-level tokenizer and a synthetic sentiment data set, all made here ---------

POSITIVE = "good great excellent wonderful superb delightful brilliant lovely charming enjoyable".split()
NEGATIVE = "bad awful terrible dreadful boring dull poor horrible weak tedious".split()
NOUNS = "movie film plot acting story cast script ending music scene".split()
FILLERS = "the a this that was is really quite very and but so it i thought felt".split()


def synthetic_sentiment(n: int, rng: random.Random) -> list[dict]:
    """Sentences of 2-7 neutral words with one sentiment adjective at a random place; label 1 = positive."""
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        words = [rng.choice(FILLERS + NOUNS) for _ in range(rng.randint(2, 7))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append({"sentence": " ".join(words), "label": label})
    return rows


def make_tiny_base(path: str, seed: int) -> None:
    """Save a tiny RoBERTa classifier (random weights, 2 layers, hidden 64) and a word-level tokenizer to ``path``,
    so that the script loads it with ``from_pretrained`` exactly as it would load roberta-base."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaForSequenceClassification

    specials = ["<s>", "<pad>", "</s>", "<unk>"]  # RoBERTa's ids: bos 0, pad 1, eos 2
    vocab = {w: i for i, w in enumerate(specials + sorted(set(POSITIVE + NEGATIVE + NOUNS + FILLERS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        cls_token="<s>", sep_token="</s>", model_input_names=["input_ids", "attention_mask"],
    )
    config = RobertaConfig(
        vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
        initializer_range=0.1,  # a random tiny base mixes tokens more at a larger init than 0.02
    )
    torch.manual_seed(seed)
    RobertaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def load_hub_dataset(name: str):
    """(train rows, eval rows, text keys, label names) of a Hugging Face data set; needs ``datasets``, online."""
    from datasets import load_dataset  # imported here: the offline example does not need it

    if name.startswith("glue/"):
        task = name.split("/", 1)[1]
        ds, keys = load_dataset("glue", task), GLUE_TEXT_KEYS[task]
    else:
        ds, keys = load_dataset(name), ("text", None)
    eval_split = next(s for s in ("validation", "validation_matched", "test") if s in ds)
    return ds["train"], ds[eval_split], keys, ds["train"].features["label"].names


def compute_metrics(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)

    if args.tiny:
        model_name = os.path.join(args.output_dir, "base")
        make_tiny_base(model_name, args.seed)
        rng = random.Random(args.seed)
        train_rows, eval_rows = synthetic_sentiment(512, rng), synthetic_sentiment(256, rng)
        keys, labels = ("sentence", None), ["negative", "positive"]
    else:
        model_name = args.model
        train_rows, eval_rows, keys, labels = load_hub_dataset(args.dataset)

    tokenizer = AutoTokenizer.from_pretrained(model_name)

    def tokenize(rows):
        out = []
        for row in rows:
            enc = tokenizer(row[keys[0]], row[keys[1]] if keys[1] else None, truncation=True, max_length=256)
            out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": row["label"]})
        return out

    train_dataset, eval_dataset = tokenize(train_rows), tokenize(eval_rows)

    model = AutoModelForSequenceClassification.from_pretrained(
        model_name, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    peft_config = LoraConfig(
        task_type="SEQ_CLS",
        r=8,
        lora_alpha=16,
        lora_dropout=0.1,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],  # the new head is trained in full and saved with the adapter
    )
    model = get_peft_model(model, peft_config)
    model.print_trainable_parameters()

    model = fused_lora.from_peft(model)  # <- the one-line switch: same PeftModel, fused LoRA layers
    print(fused_lora.fusion_summary(model))

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size * 2,
        num_train_epochs=args.epochs,
        max_steps=args.steps if args.steps is not None else -1,
        weight_decay=0.01,
        eval_strategy="epoch",
        save_strategy="no",
        logging_steps=25,
        bf16=args.bf16,
        report_to="none",
        seed=args.seed,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer=tokenizer),
        compute_metrics=compute_metrics,
    )
    before = trainer.evaluate()
    train_output = trainer.train()
    after = trainer.evaluate()
    trainer.save_model(os.path.join(args.output_dir, "adapter"))
    print(f"eval accuracy: {before['eval_accuracy']:.3f} before training, {after['eval_accuracy']:.3f} after")

    # Logits of a few eval sentences, for checking the saved adapter (tests/test_examples.py reloads it).
    model.eval()
    probe = DataCollatorWithPadding(tokenizer=tokenizer)([{k: v for k, v in r.items() if k != "labels"}
                                                          for r in eval_dataset[:4]])
    with torch.no_grad():
        probe_logits = model(**probe.to(model.device)).logits.float().cpu()

    fields = {
        "example": "sequence_classification",
        "model": model_name,
        "tiny": args.tiny,
        "steps": train_output.global_step,
        "train_loss": train_output.training_loss,
        "accuracy_before": before["eval_accuracy"],
        "accuracy_after": after["eval_accuracy"],
        "eval_loss_before": before["eval_loss"],
        "eval_loss_after": after["eval_loss"],
    }
    return report(trainer, args.output_dir, fields, probe, probe_logits, args.timing_steps)


if __name__ == "__main__":
    main()
