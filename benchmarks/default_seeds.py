"""The seed sweep behind the numbers in `configs/default.yaml`'s header: LAD vs GRPO on the default experiment.

    python benchmarks/default_seeds.py                    # seeds 0-4, LAD and GRPO, 2 runs at a time, prints JSON
    python benchmarks/default_seeds.py --seeds 0,1 --parallel 1 --out /tmp/sweep

Each run is the quickstart command with `seed=N` (and `algorithm.loss=grpo` for GRPO) in its own run directory.
Reported per run: eval accuracy (avg@32) and distinct correct answers per prompt before and after RL (from the run's
`summary.json`), and the effective number of correct answers after RL: exp(entropy) of the trained policy's exact
distribution over each prompt's correct answers (`lad_jax.tasks.numbers.answer_distribution` on the HF export),
averaged over prompts. Means over seeds per algorithm.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time


def run_one(out_dir: str, seed: int, loss: str) -> dict:
    name = f"{loss}_seed{seed}"
    cmd = [sys.executable, "-m", "lad_jax.train", f"seed={seed}", f"run_name={name}", f"output_dir={out_dir}"]
    if loss != "lad":
        cmd.append(f"algorithm.loss={loss}")
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    run_dir = os.path.join(out_dir, name)
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    return {"seed": seed, "loss": loss, "wall_s": time.perf_counter() - t, "run_dir": run_dir,
            "accuracy": [summary["eval_before"]["avg@32"], summary["eval_after"]["avg@32"]],
            "distinct_correct": [summary["eval_before"]["distinct_correct_per_prompt"],
                                 summary["eval_after"]["distinct_correct_per_prompt"]]}


def effective_correct(run_dir: str) -> float:
    from flax import nnx

    from lad_jax.models import from_pretrained
    from lad_jax.tasks import numbers
    from lad_jax.tokenizer import load_tokenizer

    model = from_pretrained(os.path.join(run_dir, "hf_export"))
    tokenizer = load_tokenizer(os.path.join(run_dir, "tokenizer"))
    graphdef, params = nnx.split(model)
    return numbers.diversity_stats(numbers.answer_distribution(graphdef, params, tokenizer))["effective_correct"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--losses", default="lad,grpo")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--out", default="runs/default_seeds")
    args = ap.parse_args(argv)
    jobs = [(int(s), loss) for s in args.seeds.split(",") for loss in args.losses.split(",")]
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        runs = list(pool.map(lambda j: run_one(args.out, *j), jobs))
    for r in runs:
        r["effective_correct_after"] = effective_correct(r["run_dir"])
    means = {}
    for loss in args.losses.split(","):
        rows = [r for r in runs if r["loss"] == loss]
        means[loss] = {key: sum(f(r) for r in rows) / len(rows) for key, f in (
            ("accuracy_after", lambda r: r["accuracy"][1]),
            ("distinct_correct_after", lambda r: r["distinct_correct"][1]),
            ("effective_correct_after", lambda r: r["effective_correct_after"]))}
    json.dump({"runs": runs, "means": means, "load_avg": os.getloadavg()}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
