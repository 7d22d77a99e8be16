"""The default experiment's task: "give a number with property P", many correct answers per prompt.

Prompts name a digit constraint ("first 3 =", "middle 0 =", "last 7 ="); the answer is any 3-digit number
(100..999) that meets it, written as digits followed by EOS. Every prompt has 90-100 valid answers, so a policy can be accurate and still diverse, which is what LAD keeps and
GRPO tends to lose. Everything here is deterministic from a seed: the JSONL data, the character-level tokenizer
and the reward (exact check of the property).
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

LOW, HIGH = 100, 999
WORDS = ("=", "first", "middle", "last") + tuple("0123456789")
SPECIALS = ("<pad>", "<eos>", "<unk>")
_POSITIONS = {"first": 0, "middle": 1, "last": 2}


def properties() -> list[tuple[str, str]]:
    """(spec, prompt text) for every property; spec is what the reward checks."""
    out = []
    for where, lo in (("first", 1), ("middle", 0), ("last", 0)):
        for d in range(lo, 10):
            out.append((f"{where}:{d}", f"{where} {d} ="))
    return out


def satisfies(spec: str, n: int) -> bool:
    where, _, digit = spec.partition(":")
    if where not in _POSITIONS or not digit.isdigit():
        raise ValueError(f"unknown numbers-task property {spec!r}")
    return str(n)[_POSITIONS[where]] == digit


def valid_answers(spec: str) -> list[int]:
    return [n for n in range(LOW, HIGH + 1) if satisfies(spec, n)]


def parse_answer(text: str) -> int | None:
    """The integer a completion names, or None when it is not exactly a 3-digit number."""
    text = text.strip()
    if not text.isdigit() or len(text) != 3 or text[0] == "0":
        return None
    return int(text)


def check(text: str, spec: str) -> bool:
    n = parse_answer(text)
    return n is not None and satisfies(spec, n)


def write_data(out_dir: str, *, num_train: int, num_eval: int, seed: int) -> tuple[str, str]:
    """Train/eval JSONL ({"prompt", "answer"=property spec}); eval holds each property once (then repeats)."""
    os.makedirs(out_dir, exist_ok=True)
    props = properties()
    rng = np.random.default_rng(seed)
    train_path, eval_path = os.path.join(out_dir, "train.jsonl"), os.path.join(out_dir, "eval.jsonl")
    with open(train_path, "w") as fh:
        for i in rng.integers(0, len(props), size=num_train):
            spec, prompt = props[int(i)]
            fh.write(json.dumps({"prompt": prompt, "answer": spec}) + "\n")
    with open(eval_path, "w") as fh:
        for j in range(num_eval):
            spec, prompt = props[j % len(props)]
            fh.write(json.dumps({"prompt": prompt, "answer": spec}) + "\n")
    return train_path, eval_path


def build_tokenizer(out_dir: str | None = None):
    """WordLevel tokenizer (words split on whitespace, digits split one per token) wrapped as a transformers
    PreTrainedTokenizerFast (saved to `out_dir`). "first 3 =" -> [first, 3, =]; "517" -> [5, 1, 7]."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast


def reward_fn(completions: Sequence[str], rows: Sequence[dict[str, Any]], num_tokens=None):
    """1.0 when the completion is a 3-digit number with the row's property, else 0.0 (registry signature)."""
    rewards = np.array([1.0 if check(c, r["answer"]) else 0.0 for c, r in zip(completions, rows)], np.float32)
    parsed = np.mean([parse_answer(c) is not None for c in completions]) if completions else 0.0
    return rewards, {"numbers/well_formed": float(parsed)}


def sft_examples(rng: np.random.Generator, batch: int, correct_fraction: float) -> list[tuple[str, str]]:
    """(prompt, answer text) pairs: a correct answer drawn uniformly from the valid set with prob
    `correct_fraction`, otherwise a uniformly random 3-digit number (mostly wrong)."""
    props = properties()
    out = []
    for _ in range(batch):
        spec, prompt = props[int(rng.integers(len(props)))]
        if rng.random() < correct_fraction:
            answers = _VALID.setdefault(spec, valid_answers(spec))
            n = answers[int(rng.integers(len(answers)))]
        else:
            n = int(rng.integers(LOW, HIGH + 1))
        out.append((prompt, str(n)))
    return out


_VALID: dict[str, list[int]] = {}
