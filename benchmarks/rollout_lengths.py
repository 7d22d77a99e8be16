"""Rollouts with mixed response lengths: static batches vs continuous batching at the same slot count.

    python benchmarks/rollout_lengths.py                              # tiny + small, prints one JSON object
    python benchmarks/rollout_lengths.py --models small --limit 256 --repeats 2

Workload: P prompts x G samples = R requests (prompt ids random, no pad), temperature 1, fp32 Qwen2-style "tiny" /
"small" checkpoints with random weights (`benchmarks/sampler.py`). A random-weight model has no natural stopping
point, so each request's response length is its own budget (`max_new_tokens_r`), drawn per mix:
- `long_tailed`: log-normal with median limit/8 and sigma 1, clipped to [1, limit], the largest set to the limit (the
  shape of reasoning rollouts: most short, a few at the limit);
- `uniform_random`: uniform in [1, limit];
- `same_length`: every request exactly `limit` (nothing to refill: measures continuous batching's overhead).

Both systems decode S slots at a time:
- static: `sampler.generate` over consecutive chunks of S / G prompts (S rows), each chunk run to its longest row (the
  static sampler's batch ends when its last row ends; `max_new_tokens` = that row's length, compiled before timing);
- continuous: one `generate_continuous(..., decode_slots=S, max_new_tokens_r=...)` call.

Reported per model and mix: wall time (fastest of `--repeats` steady-state runs, all listed; static and continuous
runs alternate), tokens/s (= useful
tokens / wall time; useful tokens = the sum of response lengths), useful-slot fraction (= tokens drawn by model steps
/ (model steps x S); a request's token 0 comes from its prompt's prefill), and continuous/static ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sampler import MODELS, make_checkpoint  # noqa: E402


def budgets(mix: str, n: int, limit: int, rng) -> np.ndarray:
    if mix == "long_tailed":
        b = np.clip(np.round(np.exp(rng.normal(np.log(limit / 8), 1.0, n))), 1, limit).astype(np.int32)
        b[np.argmax(b)] = limit
        return b
    if mix == "uniform_random":
        return rng.integers(1, limit + 1, n).astype(np.int32)
    if mix == "same_length":
        return np.full(n, limit, np.int32)
    raise ValueError(mix)


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,small")
    ap.add_argument("--mixes", default="long_tailed,uniform_random,same_length")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--limit", default="tiny:512,small:256", help="response length limit per model")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import jax

    from lad_jax.models import from_pretrained
    from lad_jax.sampler import generate
    from lad_jax.sampler_continuous import generate_continuous

    limits = dict(kv.split(":") for kv in args.limit.split(","))
    g, s = args.group_size, args.slots
    if s % g:
        raise SystemExit("--slots must be a multiple of --group-size (a static chunk holds whole prompt groups)")
    chunk = s // g
    result = {
        "workload": {"prompts": args.prompts, "G": g, "requests": args.prompts * g, "slots": s,
                     "prompt_len": args.prompt_len, "temperature": 1.0, "dtype": "float32", "limits": limits},
        "machine": {"cpus": os.cpu_count(), "jax_backend": jax.default_backend(), "load_avg_start": os.getloadavg()},
        "models": {},
    }
    for kind in args.models.split(","):
        limit = int(limits[kind])
        rng = np.random.default_rng(0)
        with tempfile.TemporaryDirectory() as tmp:
            make_checkpoint(kind, tmp)
            model = from_pretrained(tmp)
        prompts = rng.integers(1, model.config.vocab_size, (args.prompts, args.prompt_len)).tolist()
        r: dict = {"config": MODELS[kind], "limit": limit}
        for mix in args.mixes.split(","):
            b_r = budgets(mix, args.prompts * g, limit, rng)
            useful = int(b_r.sum())
            drawn_by_steps = int((b_r - 1).sum())
            chunks = [(prompts[i: i + chunk], int(b_r[i * g: (i + chunk) * g].max()))
                      for i in range(0, args.prompts, chunk)]

            def static():
                outs = [generate(model, p, num_samples=g, max_new_tokens=m, temperature=1.0, seed=1) for p, m in chunks]
                jax.block_until_ready([o.tokens_bt for o in outs])

            stats: dict = {}

            def continuous():
                out = generate_continuous(model, prompts, num_samples=g, max_new_tokens=limit,
                                          max_new_tokens_r=b_r.tolist(), decode_slots=s, temperature=1.0, seed=1,
                                          stats=stats)
                jax.block_until_ready(out.tokens_bt)

            static()
            continuous()  # compile
            # interleaved repeats: load from other processes on a shared machine hits both systems alike
            st_all, ct_all = [], []
            for _ in range(args.repeats):
                st_all += timed(static, 1)[1]
                ct_all += timed(continuous, 1)[1]
            st_best, ct_best = min(st_all), min(ct_all)
            static_slot_steps = sum((m - 1) * s for _, m in chunks)
            entry = {
                "lengths": {"mean": float(b_r.mean()), "median": float(np.median(b_r)), "max": int(b_r.max()),
                            "sum": useful},
                "static": {"seconds": st_best, "all_seconds": st_all, "tokens_per_s": useful / st_best,
                           "model_steps": sum(m - 1 for _, m in chunks),
                           "useful_slot_fraction": drawn_by_steps / static_slot_steps},
                "continuous": {"seconds": ct_best, "all_seconds": ct_all, "tokens_per_s": useful / ct_best,
                               "model_steps": stats["steps"],
                               "useful_slot_fraction": drawn_by_steps / stats["slot_steps"]},
            }
            entry["tokens_per_s_ratio"] = st_best / ct_best
            r[mix] = entry
            print(f"# {kind} {mix}: static {st_best:.2f}s continuous {ct_best:.2f}s ratio {st_best / ct_best:.2f} "
                  f"useful {entry['continuous']['useful_slot_fraction']:.3f}", file=sys.stderr, flush=True)
        result["models"][kind] = r
    result["machine"]["load_avg_end"] = os.getloadavg()
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
