"""The default experiment's task: "give a two-digit number whose digits sum to S" (several correct answers each).

Prompts read "digits summing to S" for S in 4..15 (S spelled as one word: "digits summing to twelve"); an answer is
a two-digit number (10..99) whose digit sum is S, followed by EOS. Each prompt has 4-9 correct answers (S=4:
13 22 31 40; S=9 and S=10: nine each). Every two-digit number is a single token, so the first response token picks
the answer: the task is LAD.md's bandit over answers, with a transformer conditioned on the prompt.

Why this design shows what LAD is for (see LAD.md):
  * Few correct answers per prompt, so G=16 samples per prompt cover the likely ones every step and the rare ones
    often. (With ~100 valid answers per prompt, an earlier version, both methods mostly pushed the handful of
    sampled answers and collapsed alike.)
  * A skewed warm-start. `sft_examples` draws a correct answer from fixed Zipf weights (rank r gets weight
    1/r^ZIPF_EXPONENT, ranks a fixed permutation per prompt) with probability `correct_fraction`, otherwise a
    near miss (digit sum off by one), so the RL start is ~40% accurate and already prefers some correct answers.
  * Among equally rewarded answers, the expected policy-gradient step on a logit is proportional to the answer's
    probability, so GRPO amplifies the skew onto the favourites (rich get richer) while it raises accuracy.
    LAD's per-step target pi_old * exp(A/eta) / Z scales every correct answer by the same factor, so when the
    brake engages (eta and lr chosen so the target is reachable within the mu passes) the ratios among correct
    answers are largely kept: LAD reaches a similar or higher accuracy with more distinct correct answers.
    Measured numbers (5 seeds each) and the commands are in configs/default.yaml.

Everything is deterministic from a seed: the JSONL data, the word-level tokenizer, the warm-start weights and
the reward (exact check of the digit sum). `answer_distribution` computes a policy's exact probability of every
two-digit answer per prompt; `diversity_stats` turns it into accuracy and the effective number of correct
answers (exp of the entropy over correct answers), a diversity measure free of sampling noise.
"""
from __future__ import annotations

import json
import os
import zlib
from typing import Any, Sequence

import numpy as np

LOW, HIGH = 10, 99
SUMS = tuple(range(4, 16))
# The target sum is one word token and ends the prompt, so the answer is predicted right at the token that names the
# sum: a from-scratch model learns to read the prompt within the short warm-start (no multi-digit parsing, no
# attention plateau).
SUM_WORDS = ("four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "thirteen", "fourteen",
             "fifteen")
ZIPF_EXPONENT = 1.0
# Every two-digit number is one token, so the first response token picks the answer and LAD's per-token ratio is
# the per-answer ratio (LAD.md's bandit setting, with a transformer conditioned on the prompt).
WORDS = ("digits", "summing", "to") + SUM_WORDS + tuple(str(n) for n in range(LOW, HIGH + 1))
SPECIALS = ("<pad>", "<eos>", "<unk>")


def properties() -> list[tuple[str, str]]:
    """(spec, prompt text) for every property; spec is what the reward checks."""
    return [(f"sum:{s}", f"digits summing to {w}") for s, w in zip(SUMS, SUM_WORDS)]


def _target(spec: str) -> int:
    kind, _, value = spec.partition(":")
    if kind != "sum" or not value.isdigit():
        raise ValueError(f"unknown numbers-task property {spec!r}; expected 'sum:S' with S an integer")
    return int(value)


def satisfies(spec: str, n: int) -> bool:
    return LOW <= n <= HIGH and sum(int(d) for d in str(n)) == _target(spec)


def valid_answers(spec: str) -> list[int]:
    return [n for n in range(LOW, HIGH + 1) if satisfies(spec, n)]


def answer_weights(spec: str) -> tuple[list[int], np.ndarray]:
    """The warm-start's preference over a prompt's correct answers: (answers, Zipf weights summing to 1).
    Ranks are a fixed permutation per prompt (seeded by the spec), so the favourite answer differs by prompt."""
    answers = valid_answers(spec)
    order = np.random.default_rng(zlib.crc32(spec.encode())).permutation(len(answers))
    weights = np.empty(len(answers))
    weights[order] = 1.0 / np.arange(1, len(answers) + 1) ** ZIPF_EXPONENT
    return answers, weights / weights.sum()


def parse_answer(text: str) -> int | None:
    """The integer a completion names, or None when it is not exactly a two-digit number."""
    text = text.strip()
    if not text.isdigit() or len(text) != 2 or text[0] == "0":
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
    """WordLevel tokenizer (split on whitespace; every two-digit number is one word) wrapped as a transformers
    PreTrainedTokenizerFast (saved to `out_dir`). "digits summing to twelve" -> [digits, summing, to, twelve];
    "57" -> [57]; decoding fuses tokens, so a response of two number tokens reads as a four-digit number (wrong)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast


def reward_fn(completions: Sequence[str], rows: Sequence[dict[str, Any]], num_tokens=None):
    """1.0 when the completion is a two-digit number with the row's digit sum, else 0.0 (registry signature)."""
    rewards = np.array([1.0 if check(c, r["answer"]) else 0.0 for c, r in zip(completions, rows)], np.float32)
    parsed = np.mean([parse_answer(c) is not None for c in completions]) if completions else 0.0
    return rewards, {"numbers/well_formed": float(parsed)}


def near_misses(spec: str) -> list[int]:
    """Wrong answers the warm-start teaches: two-digit numbers whose digit sum is off by one."""
    s = _target(spec)
    return valid_answers(f"sum:{s - 1}") + valid_answers(f"sum:{s + 1}")


def sft_examples(rng: np.random.Generator, batch: int, correct_fraction: float) -> list[tuple[str, str]]:
    """(prompt, answer text) pairs: with prob `correct_fraction` a correct answer drawn from the prompt's Zipf
    weights (`answer_weights`), otherwise a uniformly drawn near miss (digit sum off by one). Both depend on the
    prompt, so the model learns to read it as fast as from all-correct data."""
    props = properties()
    out = []
    for _ in range(batch):
        spec, prompt = props[int(rng.integers(len(props)))]
        if rng.random() < correct_fraction:
            answers, weights = _weights(spec)
            n = answers[int(rng.choice(len(answers), p=weights))]
        else:
            wrong = near_misses(spec)
            n = wrong[int(rng.integers(len(wrong)))]
        out.append((prompt, str(n)))
    return out


_WEIGHTS: dict[str, tuple[list[int], np.ndarray]] = {}


def _weights(spec: str) -> tuple[list[int], np.ndarray]:
    if spec not in _WEIGHTS:
        _WEIGHTS[spec] = answer_weights(spec)
    return _WEIGHTS[spec]


def answer_distribution(graphdef, params, tokenizer, specs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Exact policy probability (temperature 1) of every answer "10".."99" + EOS, per prompt spec: {spec: [90]}.
    The remaining mass (1 - sum) is on malformed responses."""
    import jax

    from lad_jax.tasks.sft import encode_pairs
    from lad_jax.train_step import sequence_logprobs

    specs = [s for s, _ in properties()] if specs is None else list(specs)
    prompts = dict(properties())
    pairs = [(prompts[s], str(n)) for s in specs for n in range(LOW, HIGH + 1)]
    tokens, positions, valid, target = encode_pairs(tokenizer, pairs, 8)
    logp_fn = jax.jit(lambda p, t, q, v: sequence_logprobs(graphdef, p, t, q, v, temperature=1.0)[0])
    logp = np.asarray(logp_fn(params, tokens, positions, valid))
    seq = np.exp(np.where(target, logp, 0.0).sum(1)).reshape(len(specs), HIGH - LOW + 1)
    return dict(zip(specs, seq))


def diversity_stats(dist: dict[str, np.ndarray]) -> dict[str, float]:
    """From `answer_distribution`: mean accuracy (mass on correct answers), mean entropy (nats) and effective
    number exp(entropy) of the distribution over correct answers renormalised, and the mean top-answer share."""
    acc, ent, top = [], [], []
    for spec, p in dist.items():
        ok = np.array([satisfies(spec, n) for n in range(LOW, HIGH + 1)])
        pc = p[ok]
        acc.append(pc.sum())
        q = pc / max(pc.sum(), 1e-30)
        ent.append(float(-(q * np.log(np.maximum(q, 1e-30))).sum()))
        top.append(float(q.max()))
    return {"accuracy": float(np.mean(acc)), "correct_entropy": float(np.mean(ent)),
            "effective_correct": float(np.mean(np.exp(ent))), "top_share": float(np.mean(top))}


def _write_data(out_dir: str, t, seed: int) -> tuple[str, str]:
    return write_data(out_dir, num_train=t.num_train_prompts, num_eval=t.num_eval_prompts, seed=seed)


def _warm_start(graphdef, params, tokenizer, t, seed: int, log):
    """The supervised prelude (`lad_jax.tasks.sft`) for `task.sft_steps` steps; None when that is 0."""
    if t.sft_steps <= 0:
        return None
    from lad_jax.tasks import sft

    return sft.warm_start(graphdef, params, tokenizer, steps=t.sft_steps, batch_size=t.sft_batch_size, lr=t.sft_lr,
                          correct_fraction=t.sft_correct_fraction, seed=seed, log=log)


def _task():
    from lad_jax.tasks import Task

    return Task(name="numbers", write_data=_write_data, build_tokenizer=build_tokenizer,
                reward="lad_jax.tasks.numbers:reward_fn", warm_start=_warm_start)


TASK = _task()
