# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # LAD on the 50-arm bandit: matching the advantage distribution keeps every mode
#
# The paper's controlled experiment (LAD, arXiv 2602.20132). A policy over 50 arms (a plain logit vector) is trained
# on a reward with three Gaussian bumps (centres 10, 25, 40; width 5; heights 4, 5, 4; scaled to [0, 1]).
#
# * **LAD** (JS divergence) keeps $\pi_{old}$ at the initial uniform policy and trains $\pi_\theta/\pi_{old}$ towards
#   $\exp(A/\eta)$, so the policy converges to $P_A = \mathrm{softmax}(A/\eta)$: all three bumps survive.
# * **GRPO** and plain **policy gradient** maximize the expected advantage and pile the mass onto the highest bump.
#
# Every method trains through `lad_jax.losses.policy_loss`, the loss the LLM trainer uses. The run takes seconds on a CPU;
# set `LAD_NOTEBOOK_SMALL=1` for the smaller ablations CI uses.

# %%
import os

SMALL = os.environ.get("LAD_NOTEBOOK_SMALL", "0") == "1"  # CI: smaller ablations
# Where to pip-install lad_jax from when it is missing (Colab): a git URL (git+https://github.com/ORG/lad_jax) or
# a local checkout. Ignored when lad_jax is already installed.
LAD_REPO = os.environ.get("LAD_REPO", "")
print(f"small settings: {SMALL}")

# %%
import glob
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
print(f"hardware: {HARDWARE}")

# %%
# %matplotlib inline
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
plt.show()

# %% [markdown]
# ## LAD vs GRPO vs policy gradient

# %%
result = bandit.run(config, methods=("lad", "grpo", "pg"))
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
plt.show()

# %%
lad, grpo = result["methods"]["lad"], result["methods"]["grpo"]
assert all(lad["modes_kept"]), "LAD should keep all three modes"
assert grpo["mass_near_top"] > 0.9, "GRPO should concentrate on the highest bump"
print(f"LAD keeps {sum(lad['modes_kept'])}/3 modes (TV to P_A {lad['tv_distance']:.3f}); GRPO puts "
      f"{grpo['mass_near_top']:.1%} of its mass within +-{config.width:g} arms of the top bump.")

# %% [markdown]
# ## Which divergence?
#
# The paper ablates the f-divergence generator; the "strict" ones (TV, Hellinger, JS, whose $f'(1) = 0$ gives a
# built-in brake) do best. Each run below trains LAD with a different generator from the same start.

# %%
divergences = ("js", "hellinger") if SMALL else ("js", "hellinger", "tv", "kl", "reverse_kl", "jeffreys")
steps = 1000 if SMALL else config.steps
ablation = {}
for div in divergences:
    cfg = bandit.BanditConfig(divergence=div, steps=steps)
    ablation[div] = bandit.summarize(bandit.train("lad", cfg), target, cfg)
    print(f"{div:>11}: TV to P_A {ablation[div]['tv_distance']:.4f}, modes kept {sum(ablation[div]['modes_kept'])}/3")

fig, ax = plt.subplots(figsize=(7, 3))
ax.bar(list(ablation), [v["tv_distance"] for v in ablation.values()])
ax.set(ylabel="TV distance to P_A", title=f"LAD generators, {steps} steps")
plt.show()

# %% [markdown]
# ## The temperature eta (kappa = 1/eta)
#
# $\eta$ sets how sharp the target is: small $\eta$ approaches the argmax (GRPO-like), large $\eta$ flattens it.
# LAD follows whichever target it is given.

# %%
etas = (0.1, 0.3) if SMALL else (0.05, 0.15, 0.5)
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
plt.show()
