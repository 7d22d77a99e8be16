"""Evaluation metrics: pass@k, avg@k, the distinct-n-gram diversity ratio, and a per-run summary.

Definitions (for one prompt with n sampled responses of which c are correct; a response is correct when its
reward >= `correct_threshold`):
  * pass@k: the unbiased estimator of Chen et al. (2021, "Codex"): 1 - C(n - c, k) / C(n, k), i.e. the probability
    that at least one of k responses drawn without replacement from the n is correct; averaged over prompts.
  * avg@k: the mean accuracy c / k over k responses, averaged over prompts (avg@n with all n responses; it equals
    pass@1's estimate).
  * distinct-n ratio (the paper's diversity metric): for one prompt, the n-grams of every response are pooled
    (n-grams never span two responses); ratio = number of distinct n-grams / total number of n-grams. Texts are split
    on whitespace into words, token-id sequences are used as they are. The reported value is the mean over prompts;
    prompts whose responses are all shorter than n have no n-grams and are left out of the mean (NaN if no prompt
    has any).
  * distinct correct per prompt: the number of different correct responses (exact match after stripping
    surrounding whitespace for texts), averaged over prompts.

`evaluate_policy` samples and scores a policy on held-out rows (used by the trainer's periodic eval and the CLI):

    python -m lad_jax.evaluate [--config CFG] [key.sub=value ...] [--checkpoint DIR | --hf_model DIR]
        --data FILE [FILE ...] --out results.json [--k 8]

`--checkpoint` takes a trainer checkpoint directory (or a run directory holding `checkpoints/`); without `--config`
the run's own config is read from the checkpoint. `--hf_model` takes a `save_pretrained` directory (e.g. the
trainer's `hf_export/`). Model, tokenizer and reward are built exactly as `lad_jax.train` builds them.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k for one prompt: 1 - C(n - c, k) / C(n, k), computed as a stable product."""
    n, c = int(num_samples), int(num_correct)
    if not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 < k <= num_samples, got k={k}, num_samples={n}")
    if not 0 <= c <= n:
        raise ValueError(f"num_correct={c} must be in [0, num_samples={n}]")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def _correct_pg(rewards_pg: Any, correct_threshold: float) -> np.ndarray:
    rewards = np.asarray(rewards_pg, dtype=np.float64)
    if rewards.ndim != 2 or rewards.shape[1] == 0:
        raise ValueError(f"rewards_pg must be [num_prompts, num_samples], got shape {rewards.shape}")
    return rewards >= correct_threshold


def mean_pass_at_k(correct_pg: Any, k: int) -> float:
    """pass@k averaged over prompts, from a boolean [prompts, samples] correctness array."""
    correct = np.asarray(correct_pg, dtype=bool)
    n = correct.shape[1]
    return float(np.mean([pass_at_k(n, int(c), k) for c in correct.sum(axis=1)]))


def avg_at_k(correct_pg: Any, k: int | None = None) -> float:
    """Mean accuracy over the first k samples of each prompt (all samples when k is None), averaged over prompts."""
    correct = np.asarray(correct_pg, dtype=np.float64)
    k = correct.shape[1] if k is None else int(k)
    if not 0 < k <= correct.shape[1]:
        raise ValueError(f"avg@k needs 0 < k <= num_samples={correct.shape[1]}, got k={k}")
    return float(correct[:, :k].mean())


def _units(response: Any) -> tuple:
    if isinstance(response, str):
        return tuple(response.split())
    return tuple(int(t) for t in np.asarray(response).reshape(-1))


def prompt_distinct_ngram_ratio(responses: Sequence[Any], n: int = 4) -> float | None:
    """Distinct / total n-grams pooled over one prompt's responses; None when there are no n-grams."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    distinct, total = set(), 0
    for response in responses:
        units = _units(response)
        grams = [units[i : i + n] for i in range(len(units) - n + 1)]
        total += len(grams)
        distinct.update(grams)
    return len(distinct) / total if total else None


def distinct_ngram_ratio(responses_per_prompt: Sequence[Sequence[Any]], n: int = 4) -> float:
    """The paper's diversity metric: `prompt_distinct_ngram_ratio` averaged over prompts (see module doc)."""
    ratios = [r for r in (prompt_distinct_ngram_ratio(group, n) for group in responses_per_prompt) if r is not None]
    return float(np.mean(ratios)) if ratios else math.nan


def distinct_correct_per_prompt(correct_pg: Any, responses_per_prompt: Sequence[Sequence[Any]]) -> float:
    """Number of different correct responses per prompt, averaged over prompts."""
    counts = []
    for correct, group in zip(np.asarray(correct_pg, dtype=bool), responses_per_prompt):
        keys = {r.strip() if isinstance(r, str) else _units(r) for r, ok in zip(group, correct) if ok}
        counts.append(len(keys))
    return float(np.mean(counts))


def summarize(
    rewards_pg: Any,
    responses_per_prompt: Sequence[Sequence[Any]],
    *,
    ks: Sequence[int] | None = None,
    ngram: int = 4,
    correct_threshold: float = 1.0,
) -> dict[str, float]:
    """pass@k for each k in `ks` (default (1, G)), avg@G, mean reward and diversity for a [P, G] rollout."""
    correct = _correct_pg(rewards_pg, correct_threshold)
    num_prompts, num_samples = correct.shape
    if len(responses_per_prompt) != num_prompts or any(len(g) != num_samples for g in responses_per_prompt):
        raise ValueError(
            f"responses_per_prompt must hold {num_prompts} groups of {num_samples} responses to match rewards_pg"
        )
    ks = (1, num_samples) if ks is None else tuple(ks)
    out: dict[str, float] = {"num_prompts": float(num_prompts), "num_samples": float(num_samples)}
    for k in dict.fromkeys(ks):
        out[f"pass@{k}"] = mean_pass_at_k(correct, k)
    out[f"avg@{num_samples}"] = avg_at_k(correct)
    out["mean_reward"] = float(np.mean(np.asarray(rewards_pg, dtype=np.float64)))
    out[f"distinct_{ngram}gram_ratio"] = distinct_ngram_ratio(responses_per_prompt, ngram)
    out["distinct_correct_per_prompt"] = distinct_correct_per_prompt(correct, responses_per_prompt)
    return out


def evaluate_policy(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    reward_fn: Any,
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    use_chat_template: bool = False,
    system_prompt: str | None = None,
    prompts_per_batch: int = 32,
    stop_token_ids: Sequence[int] | None = None,
    pad_id: int | None = None,
    ks: Sequence[int] | None = None,
    ngram: int = 4,
    correct_threshold: float = 1.0,
    mesh: Any = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Samples `num_samples` responses per row with `lad_jax.sampler.generate`, scores them, summarizes.

    `rows` are `load_rows` dicts ({"prompt", "answer", ...}); `reward_fn(completions, rows)` returns rewards (or
    `(rewards, metrics)`) for decoded completions, one row per completion. Prompts are processed in chunks of
    `prompts_per_batch` (the last chunk is padded with repeats so every chunk has one compiled shape). Stop tokens
    default to the tokenizer's EOS. Diversity is computed on the decoded texts (whitespace words).
    Returns (summary from `summarize` plus response length stats, per-prompt samples for inspection).
    Several processes: every process passes the same rows and the global `mesh`; each prompt is sampled once over the
    whole mesh and each completion scored once (`lad_jax.distributed.score_rows`); every process gets the summary.
    """
    import jax

    from lad_jax import distributed
    from lad_jax.data import tokenize_prompts
    from lad_jax.sampler import generate

    if not rows:
        raise ValueError("evaluate_policy: no evaluation rows")
    if stop_token_ids is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        stop_token_ids = () if eos is None else (int(eos),)
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_token_id", None)
        pad_id = 0 if pad_id is None else int(pad_id)
    texts, ids = tokenize_prompts(rows, tokenizer, use_chat_template=use_chat_template, system_prompt=system_prompt)
    rewards_pg, responses_pg, samples = [], [], []
    lengths, clipped = [], []
    base_key = jax.random.key(int(seed))
    for chunk, start in enumerate(range(0, len(rows), prompts_per_batch)):
        chunk_rows = list(rows[start : start + prompts_per_batch])
        chunk_ids = ids[start : start + prompts_per_batch]
        real = len(chunk_ids)
        chunk_ids = chunk_ids + [chunk_ids[0]] * (min(prompts_per_batch, len(rows)) - real)
        out = generate(
            model, chunk_ids, max_new_tokens=max_new_tokens, num_samples=num_samples, temperature=temperature,
            top_k=top_k, top_p=top_p, stop_token_ids=stop_token_ids, seed=jax.random.fold_in(base_key, chunk),
            pad_id=pad_id, mesh=mesh,
        )
        tokens = out.responses()[: real * num_samples]
        completions = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        row_per_completion = [r for r in chunk_rows for _ in range(num_samples)]
        rewards = distributed.score_rows(reward_fn, completions, row_per_completion)[0].astype(np.float64)
        lengths.extend(len(t) for t in tokens)
        clipped.extend(~np.asarray(out.stopped_b)[: real * num_samples])
        for p, row in enumerate(chunk_rows):
            group = slice(p * num_samples, (p + 1) * num_samples)
            rewards_pg.append(rewards[group])
            responses_pg.append(completions[group])
            samples.append({
                "prompt": texts[start + p],
                "answer": row.get("answer"),
                "responses": completions[group],
                "rewards": rewards[group].tolist(),
            })
    summary = summarize(np.stack(rewards_pg), responses_pg, ks=ks, ngram=ngram, correct_threshold=correct_threshold)
    summary["response_length_mean"] = float(np.mean(lengths))
    summary["response_length_max"] = float(np.max(lengths))
    summary["clip_fraction"] = float(np.mean(clipped))
    return summary, samples


# ---- command line ------------------------------------------------------------------------------------------------


def _parse_args(argv):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lad_jax.evaluate",
                                     description="pass@1 / pass@k / avg@k / distinct-n of a policy on held-out data")
    parser.add_argument("--config", default=None, help="YAML config (default: the checkpoint's, else the default)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default=None, help="trainer checkpoint dir, or a run dir with checkpoints/")
    source.add_argument("--hf_model", default=None, help="HF save_pretrained dir (weights, config.json, tokenizer)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--data", nargs="+", required=True, help="held-out JSONL/Parquet files (globs allowed)")
    parser.add_argument("--out", required=True, help="where to write the results JSON")
    parser.add_argument("--k", type=int, default=None, help="samples per prompt (default: eval.num_samples)")
    parser.add_argument("--max_prompts", type=int, default=None, help="evaluate only the first N prompts")
    parser.add_argument("--temperature", type=float, default=None, help="default: eval.temperature")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="default: rollout.max_new_tokens")
    parser.add_argument("--batch_prompts", type=int, default=64, help="prompts per generate call")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: seed + 1, as in training)")
    parser.add_argument("--num_examples", type=int, default=8, help="per-prompt samples to include in the JSON")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    return parser.parse_args(argv)


def _checkpoint_dir(path: str) -> str:
    import os

    sub = os.path.join(path, "checkpoints")
    return sub if os.path.isdir(sub) else path


def _load_config(args):
    import os
    import tempfile

    import yaml

    from lad_jax.checkpoint import CheckpointManager
    from lad_jax.config import load_config

    if args.config is not None or args.checkpoint is None:
        return load_config(args.config, args.overrides)
    meta = CheckpointManager(_checkpoint_dir(args.checkpoint), save_every=1, keep_last=1,
                             read_only=True).read_meta(args.step)
    if meta is None:
        raise SystemExit(f"no finished checkpoint in {args.checkpoint}")
    if "config" not in meta:
        raise SystemExit(f"checkpoint {args.checkpoint} holds no config; pass --config")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.yaml")
        with open(path, "w") as fh:
            yaml.safe_dump(meta["config"], fh)
        return load_config(path, args.overrides)


def _tokenizer(c, hf_model: str | None):
    import os

    from lad_jax.tokenizer import load_tokenizer

    if hf_model is not None and os.path.exists(os.path.join(hf_model, "tokenizer_config.json")):
        return load_tokenizer(hf_model)
    if c.model.tokenizer is None and c.task.name != "none":
        from lad_jax.tasks import get_task

        return get_task(c.task.name).build_tokenizer(None)  # deterministic: the one the trainer wrote to its run dir
    path = c.model.tokenizer or c.init_from
    if path is None:
        raise SystemExit("no tokenizer: set model.tokenizer=DIR (or pass --hf_model with tokenizer files)")
    return load_tokenizer(path)


def _model(c, tokenizer, mesh, args):
    """(model, source description) from --hf_model, --checkpoint or the config's init_from."""
    from flax import nnx

    from lad_jax.checkpoint import CheckpointManager
    from lad_jax.models import Transformer, from_pretrained, load_config
    from lad_jax.train_setup import build_model
    from lad_jax.train_step import param_shardings

    m = c.model
    if args.hf_model is not None:
        model = from_pretrained(args.hf_model, dtype=m.dtype, param_dtype=m.param_dtype, mesh=mesh, remat=m.remat,
                                attention=m.attention)
        return model, {"hf_model": args.hf_model}
    if args.checkpoint is None:
        if c.init_from is None:
            raise SystemExit("nothing to evaluate: pass --checkpoint DIR or --hf_model DIR (or set init_from)")
        model = from_pretrained(c.init_from, dtype=m.dtype, param_dtype=m.param_dtype, mesh=mesh, remat=m.remat,
                                attention=m.attention)
        return model, {"hf_model": c.init_from}
    import jax

    manager = CheckpointManager(_checkpoint_dir(args.checkpoint), save_every=1, keep_last=1, read_only=True)
    step = manager.latest_step() if args.step is None else args.step
    if step is None:
        raise SystemExit(f"no finished checkpoint in {args.checkpoint}")
    if c.model.lora.rank > 0:
        # A LoRA checkpoint holds only the adapters: the base is rebuilt as the run built it (init_from or seed).
        from lad_jax.models import lora

        graphdef, abs_state = nnx.split(build_model(c, tokenizer, mesh))
        trainable, frozen = lora.split_params(nnx.to_pure_dict(abs_state), True)
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), trainable)
        state, _ = manager.restore(step, {"params": target}, partial=True)
        nnx.replace_by_pure_dict(abs_state, lora.merge_params(frozen, state["params"]))
        return nnx.merge(graphdef, abs_state), {"checkpoint": args.checkpoint, "step": int(step)}
    if c.init_from is not None:  # the architecture comes from the checkpoint the run started from
        arch = load_config(c.init_from, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                           attention=m.attention)
        abstract = nnx.eval_shape(lambda: Transformer(arch, rngs=nnx.Rngs(0)))
    else:
        abstract = nnx.eval_shape(lambda: build_model(c, tokenizer, None))
    graphdef, abs_state = nnx.split(abstract)
    shardings = param_shardings(abs_state, mesh)
    target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                          nnx.to_pure_dict(abs_state), shardings)
    state, _ = manager.restore(step, {"params": target}, partial=True)
    nnx.replace_by_pure_dict(abs_state, state["params"])
    return nnx.merge(graphdef, abs_state), {"checkpoint": args.checkpoint, "step": int(step)}


def main(argv=None) -> dict[str, Any]:
    import json
    import sys

    import jax

    from lad_jax.config import ConfigError, mesh_shape
    from lad_jax.data import load_rows, tokenize_prompts
    from lad_jax.rewards import build_reward_fn
    from lad_jax.sharding import make_mesh
    from lad_jax import distributed
    from lad_jax.train_setup import reward_specs

    args = _parse_args(sys.argv[1:] if argv is None else argv)
    try:
        c = _load_config(args)
        distributed.initialize(c.mesh)
        mesh = make_mesh(*mesh_shape(c, jax.device_count()))
        reward_fn = build_reward_fn(reward_specs(c))
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    for name in ("k", "max_prompts", "max_new_tokens", "batch_prompts"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise SystemExit(f"--{name} must be positive, got {value}")
    tokenizer = _tokenizer(c, args.hf_model)
    model, source = _model(c, tokenizer, mesh, args)
    d = c.data
    rows, load_stats = load_rows(args.data, prompt_field=d.prompt_field, answer_field=d.answer_field,
                                 extra_fields=d.extra_fields, on_bad_row=d.on_bad_row)
    _, ids = tokenize_prompts(rows, tokenizer, use_chat_template=d.use_chat_template, system_prompt=d.system_prompt)
    kept = [r for r, x in zip(rows, ids) if len(x) <= d.max_prompt_tokens]
    dropped = len(rows) - len(kept)
    kept = kept[: args.max_prompts] if args.max_prompts else kept
    if not kept:
        raise SystemExit(f"no prompts left to evaluate ({dropped} longer than data.max_prompt_tokens="
                         f"{d.max_prompt_tokens})")
    k = args.k or c.eval.num_samples
    temperature = c.eval.temperature if args.temperature is None else args.temperature
    max_new_tokens = args.max_new_tokens or c.rollout.max_new_tokens
    seed = c.seed + 1 if args.seed is None else args.seed
    stop = tuple(model.config.eos_token_ids) or (tokenizer.eos_token_id,)
    summary, samples = evaluate_policy(
        model, tokenizer, kept, reward_fn, num_samples=k, max_new_tokens=max_new_tokens, temperature=temperature,
        seed=seed, use_chat_template=d.use_chat_template, system_prompt=d.system_prompt,
        prompts_per_batch=min(len(kept), args.batch_prompts), stop_token_ids=stop, pad_id=tokenizer.pad_token_id,
        ks=(1, k), ngram=c.eval.ngram, correct_threshold=c.reward.correct_threshold, mesh=mesh)
    result = {
        "metrics": summary,
        "source": source,
        "data": {"files": list(args.data), "bad_rows": load_stats["bad_rows"], "dropped_too_long": dropped,
                 "num_prompts": len(kept)},
        "sampling": {"k": k, "temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed},
        "config": c.to_dict(),
        "examples": samples[: args.num_examples],
    }
    if jax.process_index() == 0:
        from lad_jax import run_files

        run_files.write_text(args.out, json.dumps(result, indent=1))  # a local path or a URL (gs://...)
        shown = {key: round(v, 4) for key, v in summary.items()
                 if key.startswith(("pass@", "avg@", "distinct")) or key == "mean_reward"}
        print(json.dumps(shown))
    return result


if __name__ == "__main__":
    from lad_jax.cli_errors import main_with_clear_errors

    main_with_clear_errors(main)
