"""Builds notebooks/bandit.ipynb and notebooks/lad_quickstart.ipynb (no outputs, stable cell ids) with nbformat.

    python notebooks/make_notebooks.py [OUT_DIR]      # default: the notebooks/ directory

Edit the cells here and rebuild; tests/test_notebooks.py checks that the committed notebooks match this script.
"""
import os
import sys

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))

SETUP_INSTALL = r'''import glob
import importlib.util
import shutil
import subprocess
import sys


def detect_hardware() -> str:
    """tpu / gpu / cpu, from the machine itself (before jax is imported, so the right jax build is installed)."""
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or os.environ.get("TPU_ACCELERATOR_TYPE"):
        return "tpu"
    if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0:
        return "gpu"
    return "cpu"


HARDWARE = detect_hardware()
if importlib.util.find_spec("lad_jax") is None:
    if not LAD_REPO:
        raise RuntimeError("lad_jax is not installed here: set LAD_REPO in the first cell to the repository "
                           "(a git URL such as git+https://github.com/ORG/lad_jax, or a local checkout) and re-run")
    extra = {"tpu": "[tpu,gcs]", "gpu": "[cuda,gcs]", "cpu": ""}[HARDWARE]
    target = f"lad_jax{extra} @ {LAD_REPO}" if LAD_REPO.startswith("git+") else f"{LAD_REPO}{extra}"
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", target])
print(f"hardware: {HARDWARE}")'''


def bandit():
    cells = [
        new_markdown_cell(r'''# LAD on the 50-arm bandit: matching the advantage distribution keeps every mode

The paper's controlled experiment (LAD, arXiv 2602.20132). A policy over 50 arms (a plain logit vector) is trained
on a reward with three Gaussian bumps (centres 10, 25, 40; width 5; heights 4, 5, 4; scaled to [0, 1]).

* **LAD** (JS divergence) keeps $\pi_{old}$ at the initial uniform policy and trains $\pi_\theta/\pi_{old}$ towards
  $\exp(A/\eta)$, so the policy converges to $P_A = \mathrm{softmax}(A/\eta)$: all three bumps survive.
* **GRPO** and plain **policy gradient** maximize the expected advantage and pile the mass onto the highest bump.

Every method trains through `lad_jax.losses.policy_loss`, the loss the LLM trainer uses. The run takes seconds on a CPU;
set `LAD_NOTEBOOK_SMALL=1` for the smaller ablations CI uses.'''),
        new_code_cell(r'''import os

SMALL = os.environ.get("LAD_NOTEBOOK_SMALL", "0") == "1"  # CI: smaller ablations
# Where to pip-install lad_jax from when it is missing (Colab): a git URL (git+https://github.com/ORG/lad_jax) or
# a local checkout. Ignored when lad_jax is already installed.
LAD_REPO = os.environ.get("LAD_REPO", "")
print(f"small settings: {SMALL}")'''),
        new_code_cell(SETUP_INSTALL),
        new_code_cell(r'''%matplotlib inline
import jax
import matplotlib.pyplot as plt
import numpy as np

from lad_jax import bandit

print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
config = bandit.BanditConfig()  # the paper's setting: 50 arms, bumps at 10 / 25 / 40
reward = bandit.rewards(config)
target = bandit.target_distribution(config)
arms = np.arange(config.arms)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.2))
ax1.plot(arms, reward, marker=".")
ax1.set(title="reward r(a)", xlabel="arm")
ax2.bar(arms, target, color="0.6")
ax2.set(title=f"LAD's target P_A = softmax(A / eta), eta = {config.eta}", xlabel="arm")
plt.show()'''),
        new_markdown_cell("## LAD vs GRPO vs policy gradient"),
        new_code_cell(r'''result = bandit.run(config, methods=("lad", "grpo", "pg"))
print(f"{'method':>8} | TV to P_A | mass near bumps (10, 25, 40) | modes kept | seconds")
for method, entry in result["methods"].items():
    masses = ", ".join(f"{m:.3f}" for m in entry["bump_mass"])
    print(f"{method:>8} | {entry['tv_distance']:9.4f} | {masses:>28} | {sum(entry['modes_kept'])}/3        "
          f"| {entry['seconds']:.1f}")

fig, ax = plt.subplots(figsize=(10, 4))
ax.bar(arms, result["target"], color="0.85", label="target P_A")
for method, entry in result["methods"].items():
    ax.plot(arms, entry["policy"], marker=".", label=f"{method} (TV {entry['tv_distance']:.3f})")
ax.set(xlabel="arm", ylabel="probability", title=f"final policies after {config.steps} steps")
ax.legend()
plt.show()'''),
        new_code_cell(r'''lad, grpo = result["methods"]["lad"], result["methods"]["grpo"]
assert all(lad["modes_kept"]), "LAD should keep all three modes"
assert grpo["mass_near_top"] > 0.9, "GRPO should concentrate on the highest bump"
print(f"LAD keeps {sum(lad['modes_kept'])}/3 modes (TV to P_A {lad['tv_distance']:.3f}); GRPO puts "
      f"{grpo['mass_near_top']:.1%} of its mass within +-{config.width:g} arms of the top bump.")'''),
        new_markdown_cell(r'''## Which divergence?

The paper ablates the f-divergence generator; the "strict" ones (TV, Hellinger, JS, whose $f'(1) = 0$ gives a
built-in brake) do best. Each run below trains LAD with a different generator from the same start.'''),
        new_code_cell(r'''divergences = ("js", "hellinger") if SMALL else ("js", "hellinger", "tv", "kl", "reverse_kl", "jeffreys")
steps = 1000 if SMALL else config.steps
ablation = {}
for div in divergences:
    cfg = bandit.BanditConfig(divergence=div, steps=steps)
    ablation[div] = bandit.summarize(bandit.train("lad", cfg), target, cfg)
    print(f"{div:>11}: TV to P_A {ablation[div]['tv_distance']:.4f}, modes kept {sum(ablation[div]['modes_kept'])}/3")

fig, ax = plt.subplots(figsize=(7, 3))
ax.bar(list(ablation), [v["tv_distance"] for v in ablation.values()])
ax.set(ylabel="TV distance to P_A", title=f"LAD generators, {steps} steps")
plt.show()'''),
        new_markdown_cell(r'''## The temperature eta (kappa = 1/eta)

$\eta$ sets how sharp the target is: small $\eta$ approaches the argmax (GRPO-like), large $\eta$ flattens it.
LAD follows whichever target it is given.'''),
        new_code_cell(r'''etas = (0.1, 0.3) if SMALL else (0.05, 0.15, 0.5)
fig, axes = plt.subplots(1, len(etas), figsize=(4 * len(etas), 3), sharey=True)
for ax, eta in zip(axes, etas):
    cfg = bandit.BanditConfig(eta=eta, steps=steps)
    tgt = bandit.target_distribution(cfg)
    policy = bandit.train("lad", cfg)
    ax.bar(arms, tgt, color="0.85", label="P_A")
    ax.plot(arms, policy, marker=".", label="LAD")
    ax.set(title=f"eta = {eta} (kappa = {1 / eta:g})", xlabel="arm")
    print(f"eta {eta}: TV to P_A {0.5 * np.abs(policy - tgt).sum():.4f}")
axes[0].legend()
plt.show()'''),
    ]
    return cells


def quickstart():
    cells = [
        new_markdown_cell(r'''# lad_jax quickstart: LAD post-training in a few minutes

1. installs lad_jax (when it is not installed yet) with the right jax build for the machine,
2. detects TPU / GPU / CPU,
3. trains with LAD: on a TPU or GPU a ~0.5B HF model (`Qwen/Qwen2.5-0.5B-Instruct`) on a task with many correct
   answers per prompt; on a CPU the built-in tiny model on the "number with property P" task,
4. plots the reward and diversity curves from the run's `metrics.jsonl`,
5. loads the exported HF checkpoint back with `transformers`.

On Colab: *Runtime > Change runtime type > TPU (or GPU)*, set `LAD_REPO` below, then *Run all*.
`LAD_NOTEBOOK_SMALL=1` shrinks everything to a smoke test (what CI runs on CPU).'''),
        new_code_cell(r'''import os

SMALL = os.environ.get("LAD_NOTEBOOK_SMALL", "0") == "1"  # CI / smoke test: a few steps, tiny batches
# Where to pip-install lad_jax from when it is missing (Colab): a git URL (git+https://github.com/ORG/lad_jax) or
# a local checkout. Ignored when lad_jax is already installed.
LAD_REPO = os.environ.get("LAD_REPO", "")
# The HF model trained on an accelerator; LAD_NOTEBOOK_INIT_FROM may name a local checkpoint directory (it also
# selects the HF-model path on a CPU).
INIT_FROM = os.environ.get("LAD_NOTEBOOK_INIT_FROM", "Qwen/Qwen2.5-0.5B-Instruct")
RUNS = os.path.abspath(os.environ.get("LAD_NOTEBOOK_RUNS", "runs"))
print(f"small settings: {SMALL}; runs under {RUNS}")'''),
        new_code_cell(SETUP_INSTALL),
        new_code_cell(r'''import jax

import lad_jax

devices = jax.devices()
PLATFORM = devices[0].platform
USE_HF_MODEL = PLATFORM in ("tpu", "gpu") or "LAD_NOTEBOOK_INIT_FROM" in os.environ
print(f"jax {jax.__version__}: {len(devices)} x {devices[0].device_kind} ({PLATFORM}); lad_jax at "
      f"{os.path.dirname(lad_jax.__file__)}")
print("training", INIT_FROM if USE_HF_MODEL else "the built-in tiny model (configs/default.yaml)")'''),
        new_markdown_cell(r'''## The task

LAD's point is diversity: on prompts with many correct answers, GRPO tends to collapse onto one answer per
prompt while LAD keeps several. Both tasks here have many correct answers per prompt:

* HF model: *"Give a three-digit number whose digits add up to S"* (S in 5..22), answered in `\boxed{}`; the reward
  below checks the property (registered as `digit_sum`, so the config can name it).
* tiny model: the built-in `numbers` task ("digits summing to twelve": any two-digit number whose digits sum to 12), data and tokenizer
  generated by the trainer itself.'''),
        new_code_cell(r'''import json

import numpy as np

from lad_jax.rewards import extract_math_answer, register_reward, registered_rewards


def digit_sum_correct(completion: str, target: int) -> bool:
    answer = extract_math_answer(completion, ("boxed", "answer_line"))
    answer = (answer or "").strip().replace(",", "")
    return answer.isdigit() and len(answer) == 3 and answer[0] != "0" and sum(map(int, answer)) == target


def digit_sum_reward(completions, rows, num_tokens=None):
    rewards = np.array([float(digit_sum_correct(c, int(r["answer"]))) for c, r in zip(completions, rows)], np.float32)
    return rewards, {}


if "digit_sum" not in registered_rewards():
    register_reward("digit_sum")(digit_sum_reward)


def write_digit_sum_data(directory: str, num_train: int, seed: int = 0) -> tuple[str, str]:
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    template = "Give a three-digit number whose digits add up to {s}. Put the number in \\boxed{{}}."
    paths = []
    for name, targets in (("train", rng.integers(5, 23, size=num_train)), ("eval", np.arange(5, 23))):
        path = os.path.join(directory, f"{name}.jsonl")
        with open(path, "w") as f:
            for s in targets:
                f.write(json.dumps({"prompt": template.format(s=int(s)), "answer": str(int(s))}) + "\n")
        paths.append(path)
    return tuple(paths)


assert digit_sum_correct("The digits 5, 1, 2 sum to 8: \\boxed{512}", 8)
assert not digit_sum_correct("\\boxed{099}", 18)'''),
        new_markdown_cell("## Configure and train"),
        new_code_cell(r'''import yaml

if USE_HF_MODEL:
    RUN_NAME = "quickstart-hf-lad"
    train_file, eval_file = write_digit_sum_data(os.path.join(RUNS, "digit_sum_data"), 64 if SMALL else 4096)
    n = len(devices)
    config = {
        "run_name": RUN_NAME, "output_dir": RUNS, "seed": 0, "steps": 2 if SMALL else 40,
        "init_from": INIT_FROM,
        "model": {"param_dtype": "float32", "dtype": "float32" if PLATFORM == "cpu" else "bfloat16"},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
        "rollout": {"prompts_per_step": 2 * n if SMALL else 16 * n, "num_samples": 4 if SMALL else 8,
                    "max_new_tokens": 8 if SMALL else 128, "temperature": 1.0},
        "algorithm": {"loss": "lad", "divergence": "js", "eta": 0.25,
                      "minibatch_size": 8 * n if SMALL else 64 * n, "micro_batch_size": 8 * n if SMALL else 16 * n},
        "optimizer": {"lr": 3e-6, "warmup_steps": 0 if SMALL else 5, "weight_decay": 0.0, "max_grad_norm": 1.0},
        "data": {"train_files": [train_file], "eval_files": [eval_file], "use_chat_template": True,
                 "max_prompt_tokens": 96},
        "reward": {"functions": [{"name": "digit_sum"}]},
        "checkpoint": {"every": 0, "keep": 1, "export_hf": True},
        "eval": {"every": 0, "num_samples": 4 if SMALL else 16, "max_prompts": 4 if SMALL else 18,
                 "at_start": not SMALL},
    }
    config_path = os.path.join(RUNS, f"{RUN_NAME}.yaml")
    os.makedirs(RUNS, exist_ok=True)
    with open(config_path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    args = ["--config", config_path]
else:
    RUN_NAME = "quickstart-tiny-lad"
    small = ["steps=3", "task.sft_steps=0", "task.num_train_prompts=64", "rollout.prompts_per_step=4",
             "rollout.num_samples=4", "algorithm.minibatch_size=16", "algorithm.micro_batch_size=16",
             "eval.num_samples=4", "eval.max_prompts=4", "eval.at_start=false"]
    args = [f"output_dir={RUNS}", f"run_name={RUN_NAME}", "logging.progress_bar=true"] + (small if SMALL else [])
RUN_DIR = os.path.join(RUNS, RUN_NAME)
print("python -m lad_jax.train", " ".join(args))'''),
        new_code_cell(r'''from lad_jax.train import main as train

summary = train(args)  # the same entry point as `python -m lad_jax.train`; re-running resumes the run
print(json.dumps({k: summary[k] for k in ("steps", "eval_before", "eval_after") if k in summary}, indent=1,
                 default=str))'''),
        new_markdown_cell(r'''## Reward and diversity curves

From `metrics.jsonl` in the run directory (TensorBoard event files sit next to it:
`%load_ext tensorboard` then `%tensorboard --logdir runs`). `rollout/distinct_frac` is the fraction of distinct
responses among the G samples of a prompt, averaged over prompts.'''),
        new_code_cell(r'''%matplotlib inline
import matplotlib.pyplot as plt

with open(os.path.join(RUN_DIR, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
train_log = [r for r in records if "rollout/reward_mean" in r]  # one line per RL step
eval_log = [r for r in records if "eval/pass@1" in r]  # evaluation lines (eval.every and the final one)
steps = [r["step"] for r in train_log]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.2))
ax1.plot(steps, [r["rollout/reward_mean"] for r in train_log], marker="o", label="rollout reward mean")
ax1.plot(steps, [r["rollout/accuracy"] for r in train_log], marker=".", label="rollout accuracy")
ax1.plot([r["step"] for r in eval_log], [float(r["eval/pass@1"]) for r in eval_log], "s", label="eval pass@1")
ax1.set(xlabel="step", title="reward")
ax1.legend()
ax2.plot(steps, [r["rollout/distinct_frac"] for r in train_log], marker="o", color="C2",
         label="distinct responses per prompt / G")
# The paper's diversity metric on held-out prompts: distinct n-gram ratio (n = 4, or smaller for short answers).
ngram_key = next((k for r in eval_log for k in sorted(r) if k.startswith("eval/distinct_") and k.endswith("gram_ratio")),
                 None)
if ngram_key:
    ax2.plot([r["step"] for r in eval_log], [float(r.get(ngram_key, "nan")) for r in eval_log], "s", color="C3",
             label=ngram_key)
ax2.set(xlabel="step", ylim=(0, 1.05), title="diversity")
ax2.legend()
fig.tight_layout()
fig.savefig(os.path.join(RUN_DIR, "curves.png"), dpi=100)
plt.show()
print(f"{len(train_log)} steps logged; last: reward {train_log[-1]['rollout/reward_mean']:.3f}, "
      f"distinct {train_log[-1]['rollout/distinct_frac']:.3f}")'''),
        new_markdown_cell(r'''## The exported HF checkpoint

The trainer writes the final policy with `save_pretrained` (config.json + safetensors + tokenizer) to
`<run dir>/hf_export`; `transformers` (with PyTorch) loads it like any hub model.'''),
        new_code_cell(r'''EXPORT = os.path.join(RUN_DIR, "hf_export")
print(sorted(os.listdir(EXPORT)))
if importlib.util.find_spec("torch") is None:
    print("PyTorch is not installed: skipping the transformers round trip")
else:
    import torch
    from transformers import AutoModelForCausalLM

    from lad_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(EXPORT)  # keeps a custom tokenizer's ids even beside the model's config.json
    hf_model = AutoModelForCausalLM.from_pretrained(EXPORT, dtype=torch.float32)
    prompt = "Give a three-digit number whose digits add up to 12. Put the number in \\boxed{}." if USE_HF_MODEL \
        else "digits summing to twelve"
    if USE_HF_MODEL and tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=not USE_HF_MODEL)
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=8 if SMALL else 64, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    print(repr(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)))'''),
    ]
    return cells


for name, cells in (("bandit.ipynb", bandit()), ("lad_quickstart.ipynb", quickstart())):
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        **({"accelerator": "TPU"} if name == "lad_quickstart.ipynb" else {}),
        "colab": {"provenance": []},
    })
    for i, cell in enumerate(nb.cells):  # stable ids: rebuilding gives the same file
        cell["id"] = f"{name.split('.')[0]}-{i:02d}"
    nbformat.validate(nb)
    nbformat.write(nb, f"{OUT}/{name}")
    print("wrote", f"{OUT}/{name}")
