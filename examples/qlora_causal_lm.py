"""QLoRA fine-tuning of a causal language model with Hugging Face's Trainer, accelerated by fused-lora in one line.

The QLoRA recipe as the Hugging Face and PEFT tutorials write it: the base loaded in 4 bits through
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
bnb_4bit_use_double_quant=True)``, ``peft.prepare_model_for_kbit_training``, ``LoraConfig(target_modules="all-linear",
task_type="CAUSAL_LM")``, a causal-LM collator and ``Trainer`` -- with one line added after ``get_peft_model``::

    model = fused_lora.from_peft(model)

fused-lora reads bitsandbytes' packed NF4 weight as it is (no copy, no re-quantization) and computes each LoRA
layer's base and adapter in one fused pass; the model stays the PeftModel it was (Trainer, ``save_model``, every PEFT
method). At the end the script times training steps with fused-lora and with PEFT's own forward on the same model
and batches (``step_timing.py``).

Offline (the default, or ``--tiny``): a tiny Llama (2 layers, hidden 64) built from a ``LlamaConfig`` and saved with a
word-level tokenizer, then loaded in 4 bits exactly as a hub model is, and a synthetic corpus made here (sentences
whose words after the subject are determined by it, so the loss visibly falls); runs on a CPU in well under a
minute::

    python examples/qlora_causal_lm.py --output-dir /tmp/qlora

A real model on a GPU (network access; ``pip install datasets``)::

    python examples/qlora_causal_lm.py --model meta-llama/Llama-3.2-1B --dataset Abirate/english_quotes \\
        --text-column quote --bf16 --optim paged_adamw_8bit --output-dir out/qlora

Written to ``--output-dir``: ``adapter/`` (``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
``peft.PeftModel.from_pretrained`` over the 4-bit base), ``base/`` (the tiny base and tokenizer, offline only),
``result.json``.

On a CPU with AVX512-BF16, bitsandbytes (0.50.2) repacks a 4-bit weight for its CPU kernel the first time the layer
runs an inference forward (``Trainer.evaluate`` with PEFT's own forward, say); fused-lora then leaves that layer to
PEFT (``fusion_summary`` says so), and bitsandbytes' training forward through a repacked weight has no backward (its
``gemv_4bit`` op has no autograd kernel): the gradient through the base weight is silently dropped. Hence
``from_peft`` comes before the first evaluation, as here.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

import fused_lora

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_timing import report  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a Hugging Face model id (e.g. meta-llama/Llama-3.2-1B); none: the tiny model")
    p.add_argument("--dataset", default="Abirate/english_quotes", help="with --model: a Hugging Face data set")
    p.add_argument("--text-column", default="quote")
    p.add_argument("--tiny", action="store_true", help="the tiny offline model and synthetic corpus (the default)")
    p.add_argument("--output-dir", default="out/qlora-causal-lm")
    p.add_argument("--steps", type=int, default=None, help="training steps (tiny: 100; with --model: 500)")
    p.add_argument("--batch-size", type=int, default=None, help="tiny: 16; with --model: 4")
    p.add_argument("--lr", type=float, default=None, help="tiny: 5e-3; with --model: 2e-4")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--bf16", action="store_true", help="mixed precision (TrainingArguments(bf16=True))")
    p.add_argument("--optim", default="adamw_torch", help="a Trainer optimizer, e.g. paged_adamw_8bit on a GPU")
    p.add_argument("--timing-steps", type=int, default=5, help="steps per round of the fused vs PEFT timing")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.tiny = args.tiny or args.model is None
    if args.tiny:
        args.steps, args.batch_size, args.lr = args.steps or 100, args.batch_size or 16, args.lr or 5e-3
    else:
        args.steps, args.batch_size, args.lr = args.steps or 500, args.batch_size or 4, args.lr or 2e-4
    return args


# --- offline: a tiny Llama, a word-level tokenizer and a synthetic corpus, all made here --------------------------

SUBJECTS = "cat dog bird fish horse cow fox owl bee frog".split()
VERBS = "chases follows eats watches finds hears likes fears sees hides".split()
OBJECTS = "mouse ball seed worm apple grass hen moon flower fly".split()
ADJECTIVES = "small big red old young quick".split()


def synthetic_corpus(n: int, rng: random.Random) -> list[str]:
    """Sentences 'the <subject> <verb> the [<adjective>] <object> .': the subject is random, its verb and object are
    fixed by it (cat -> chases -> mouse), the adjective is random: a pattern the adapters can learn quickly."""
    rows = []
    for _ in range(n):
        i = rng.randrange(len(SUBJECTS))
        adjective = [rng.choice(ADJECTIVES)] if rng.random() < 0.5 else []
        rows.append(" ".join(["the", SUBJECTS[i], VERBS[i], "the", *adjective, OBJECTS[i], "."]))
    return rows


def make_tiny_base(path: str, seed: int) -> None:
    """Save a tiny Llama (random weights) and a word-level tokenizer to ``path``. The feature sizes are multiples of
    64, bitsandbytes' NF4 block size (its AVX-512 CPU dequantization is wrong otherwise: see the README)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = sorted(set(["the", "."] + SUBJECTS + VERBS + OBJECTS + ADJECTIVES))
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
    )
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False, initializer_range=0.1,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def load_hub_corpus(name: str, column: str, seed: int):
    """(train texts, eval texts) of a Hugging Face data set; needs ``datasets``, online."""
    from datasets import load_dataset  # imported here: the offline example does not need it

    split = load_dataset(name, split="train").train_test_split(test_size=0.05, seed=seed)
    return split["train"][column], split["test"][column]


def bnb_4bit_config() -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)

    if args.tiny:
        model_name = os.path.join(args.output_dir, "base")
        make_tiny_base(model_name, args.seed)
        rng = random.Random(args.seed)
        train_texts, eval_texts = synthetic_corpus(512, rng), synthetic_corpus(128, rng)
    else:
        model_name = args.model
        train_texts, eval_texts = load_hub_corpus(args.dataset, args.text_column, args.seed)

    tokenizer = AutoTokenizer.from_pretrained(model_name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def tokenize(texts):
        return [tokenizer(text, truncation=True, max_length=args.max_length) for text in texts]

    train_dataset, eval_dataset = tokenize(train_texts), tokenize(eval_texts)

    model = AutoModelForCausalLM.from_pretrained(
        model_name, quantization_config=bnb_4bit_config(), device_map={"": 0} if torch.cuda.is_available() else "cpu"
    )
    # Norms and other non-quantized weights in fp32, input gradients on, gradient checkpointing (non-reentrant).
    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_config = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", bias="none", task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, peft_config)
    model.print_trainable_parameters()

    model = fused_lora.from_peft(model)  # <- the one-line switch: same PeftModel, fused (4-bit) LoRA layers
    print(fused_lora.fusion_summary(model))

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr,
        optim=args.optim,
        logging_steps=20,
        eval_strategy="no",
        save_strategy="no",
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
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    before = trainer.evaluate()
    train_output = trainer.train()
    after = trainer.evaluate()
    trainer.save_model(os.path.join(args.output_dir, "adapter"))
    print(f"eval loss: {before['eval_loss']:.3f} before training, {after['eval_loss']:.3f} after "
          f"(perplexity {math.exp(before['eval_loss']):.1f} -> {math.exp(after['eval_loss']):.1f})")

    # Logits of a few eval texts, for checking the saved adapter (tests/test_examples.py reloads it).
    model.eval()
    probe = DataCollatorForLanguageModeling(tokenizer, mlm=False)(eval_dataset[:4])
    with torch.no_grad():
        probe_logits = model(input_ids=probe["input_ids"].to(model.device),
                             attention_mask=probe["attention_mask"].to(model.device)).logits.float().cpu()

    fields = {
        "example": "qlora_causal_lm",
        "model": model_name,
        "tiny": args.tiny,
        "steps": train_output.global_step,
        "train_loss": train_output.training_loss,
        "eval_loss_before": before["eval_loss"],
        "eval_loss_after": after["eval_loss"],
    }
    return report(trainer, args.output_dir, fields, probe, probe_logits, args.timing_steps)


if __name__ == "__main__":
    main()
