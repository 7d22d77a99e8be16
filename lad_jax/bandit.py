"""The paper's controlled experiment: a 50-arm bandit whose reward has three Gaussian bumps.

The policy is a vector of logits (uniform at start). LAD, with pi_old held at the initial policy, learns the
advantage-induced distribution P_A = softmax(A / eta) (A = r - mean over arms) and keeps all three modes; GRPO and
plain policy gradient (on-policy: pi_old is the current policy every step) maximize the expected advantage and pile
their mass onto the highest bump. Every method trains through ``lad_jax.losses.policy_loss`` on sampled arms, the
same code the LLM trainer uses; the whole run of one method is a single jitted ``lax.scan``.

    python -m lad_jax.bandit --out runs/bandit          # writes result.json and bandit.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lad_jax.advantages import group_advantages
from lad_jax.losses import DIVERGENCES, policy_loss

METHODS = ("lad", "grpo", "pg")
# With rewards min-max scaled to [0, 1] the side bumps peak at 0.77 and the valleys between bumps sit at 0.52, so
# eta = 0.15 gives a clearly three-mode target: side modes hold 15.5% of the mass each (+-5 arms), the middle 64%,
# and the valleys are 5x below the side peaks. (eta = 0.05 leaves 1% per side mode; eta = 0.25 nearly flattens it.)
DEFAULT_ETA = 0.15


@dataclasses.dataclass(frozen=True)
class BanditConfig:
    arms: int = 50
    centers: tuple[float, ...] = (10.0, 25.0, 40.0)
    heights: tuple[float, ...] = (4.0, 5.0, 4.0)
    width: float = 5.0
    eta: float = DEFAULT_ETA
    divergence: str = "js"
    steps: int = 4000
    lr: float = 5e-3
    samples: int = 32
    seed: int = 0

    def __post_init__(self):
        if self.arms < 2:
            raise ValueError(f"arms must be >= 2 (got {self.arms})")
        if not self.centers or len(self.centers) != len(self.heights):
            raise ValueError(f"centers {self.centers} and heights {self.heights} must be non-empty and equally long")
        if any(not 0 <= c <= self.arms - 1 for c in self.centers):
            raise ValueError(f"centers {self.centers} must lie in [0, arms - 1] = [0, {self.arms - 1}]")
        for name in ("width", "eta", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 (got {getattr(self, name)})")
        if self.steps < 1 or self.samples < 2:
            raise ValueError(f"steps must be >= 1 and samples >= 2 (got {self.steps}, {self.samples})")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence={self.divergence!r} is not supported; use one of {DIVERGENCES}")


def rewards(config: BanditConfig) -> np.ndarray:
    """r(a) = sum_k h_k exp(-(a - c_k)^2 / (2 w^2)), min-max scaled to [0, 1]; float32 [arms]."""
    arms = np.arange(config.arms, dtype=np.float64)[:, None]
    bumps = np.exp(-((arms - np.asarray(config.centers)) ** 2) / (2 * config.width**2))
    raw = np.sum(np.asarray(config.heights) * bumps, axis=1)
    span = raw.max() - raw.min()
    if span <= 0:
        raise ValueError("the reward is constant over the arms; change centers / heights / width")
    return ((raw - raw.min()) / span).astype(np.float32)


def target_distribution(config: BanditConfig) -> np.ndarray:
    """P_A = softmax(A / eta) with A = r - mean over arms."""
    r = rewards(config).astype(np.float64)
    z = (r - r.mean()) / config.eta
    p = np.exp(z - z.max())
    return p / p.sum()


def train(method: str, config: BanditConfig) -> np.ndarray:
    """Trains one method from the uniform policy; returns the final policy (float64 [arms])."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; use one of {', '.join(METHODS)}")
    r = jnp.asarray(rewards(config))
    advantage = r - jnp.mean(r)  # the exact A of every arm: LAD's target is defined by it
    initial = jnp.zeros(config.arms, jnp.float32)
    optimizer = optax.adam(config.lr)
    mask = jnp.ones((config.samples, 1), bool)

    def loss_fn(logits, old_logits, arms, adv):
        logp = jax.nn.log_softmax(logits)[arms][:, None]
        old = jax.nn.log_softmax(old_logits)[arms][:, None]
        if method == "lad":
            num, den, _ = policy_loss(logp, old, adv, mask, loss="lad", divergence=config.divergence, eta=config.eta)
        else:
            num, den, _ = policy_loss(logp, old, adv, mask, loss=method)
        return num / den

    def step(carry, key):
        logits, opt_state = carry
        # LAD keeps pi_old at the initial policy; GRPO and PG are on-policy (pi_old = the current policy).
        old_logits = initial if method == "lad" else jax.lax.stop_gradient(logits)
        arms = jax.random.categorical(key, old_logits, shape=(config.samples,))
        if method == "lad":
            adv = advantage[arms]
        else:  # group-relative advantages over the sampled arms, as in the LLM trainer
            adv = group_advantages(r[arms][None, :], method="grpo" if method == "grpo" else "rloo")[0]
        grads = jax.grad(loss_fn)(logits, old_logits, arms, adv)
        updates, opt_state = optimizer.update(grads, opt_state, logits)
        return (optax.apply_updates(logits, updates), opt_state), None

    @jax.jit
    def run(key):
        keys = jax.random.split(key, config.steps)
        (logits, _), _ = jax.lax.scan(step, (initial, optimizer.init(initial)), keys)
        return jax.nn.softmax(logits)

    policy = np.asarray(run(jax.random.key(config.seed)), np.float64)
    return policy / policy.sum()


def summarize(policy: np.ndarray, target: np.ndarray, config: BanditConfig) -> dict:
    """TV distance to the target, mass near each bump (+-width arms), and which modes the policy keeps.

    A mode is kept when the policy's mass within +-width arms of its centre is at least half the target's there
    and the policy peaks near the centre: its maximum within +-width/2 arms exceeds 1.5x its minimum on the way
    to each neighbouring centre.
    """
    arms = np.arange(config.arms)
    radius = config.width
    bump_mass, modes_kept = [], []
    order = np.argsort(config.centers)
    centers = [config.centers[i] for i in order]
    for k, c in enumerate(centers):
        near = np.abs(arms - c) <= radius
        mass = float(policy[near].sum())
        peak = policy[np.abs(arms - c) <= radius / 2].max()
        neighbours = centers[k - 1:k] + centers[k + 1:k + 2]
        valleys = [policy[(arms >= min(c, n)) & (arms <= max(c, n))].min() for n in neighbours]
        kept = mass >= 0.5 * float(target[near].sum()) and all(peak > 1.5 * v for v in valleys)
        bump_mass.append(mass)
        modes_kept.append(bool(kept))
    top = config.centers[int(np.argmax(config.heights))]
    return {
        "policy": policy.tolist(),
        "tv_distance": float(0.5 * np.abs(policy - target).sum()),
        "mass_near_top": float(policy[np.abs(arms - top) <= radius].sum()),
        "bump_mass": bump_mass,
        "modes_kept": modes_kept,
    }


def run(config: BanditConfig, methods=("lad", "grpo")) -> dict:
    target = target_distribution(config)
    result = {"config": dataclasses.asdict(config), "target": target.tolist(), "methods": {}}
    result["target_summary"] = {k: v for k, v in summarize(target, target, config).items() if k != "policy"}
    for method in methods:
        start = time.perf_counter()
        policy = train(method, config)
        entry = summarize(policy, target, config)
        entry["seconds"] = round(time.perf_counter() - start, 3)
        result["methods"][method] = entry
    return result


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = result["config"]
    arms = np.arange(config["arms"])
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(arms, result["target"], color="0.8", label=f"target P_A = softmax(A/eta), eta={config['eta']}")
    for method, entry in result["methods"].items():
        name = f"lad-{config['divergence']}" if method == "lad" else method
        ax.plot(arms, entry["policy"], marker=".", label=f"{name} (TV {entry['tv_distance']:.3f})")
    ax.set_xlabel("arm")
    ax.set_ylabel("probability")
    ax.set_title(f"bandit: {config['steps']} steps, {config['samples']} samples/step, Adam lr {config['lr']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m lad_jax.bandit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="lad,grpo", help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--divergence", default="js", choices=DIVERGENCES, help="LAD generator")
    parser.add_argument("--eta", type=float, default=DEFAULT_ETA, help="temperature of P_A = softmax(A / eta)")
    parser.add_argument("--arms", type=int, default=50)
    parser.add_argument("--centers", type=_floats, default=(10.0, 25.0, 40.0))
    parser.add_argument("--heights", type=_floats, default=(4.0, 5.0, 4.0))
    parser.add_argument("--width", type=float, default=5.0, help="standard deviation of each bump, in arms")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate")
    parser.add_argument("--samples", type=int, default=32, help="arms sampled per step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bandit", help="output directory for result.json and bandit.png")
    args = parser.parse_args(argv)
    methods = tuple(m.strip() for m in args.method.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        parser.error(f"--method: unknown {unknown or 'empty'}; use a comma-separated subset of {', '.join(METHODS)}")
    try:
        config = BanditConfig(
            arms=args.arms, centers=args.centers, heights=args.heights, width=args.width, eta=args.eta,
            divergence=args.divergence, steps=args.steps, lr=args.lr, samples=args.samples, seed=args.seed,
        )
    except ValueError as error:
        parser.error(str(error))

    start = time.perf_counter()
    result = run(config, methods)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(args.out, "bandit.png"))
    target = result["target_summary"]
    print(f"target: eta={config.eta}, mass near bumps {np.round(target['bump_mass'], 3).tolist()}")
    for method, entry in result["methods"].items():
        name = f"lad-{config.divergence}" if method == "lad" else method
        print(
            f"{name:>14}: TV to target {entry['tv_distance']:.4f}, mass near bumps "
            f"{np.round(entry['bump_mass'], 3).tolist()}, mass +-{config.width:g} arms of the top bump "
            f"{entry['mass_near_top']:.3f}, modes kept {sum(entry['modes_kept'])}/{len(entry['modes_kept'])} "
            f"({entry['seconds']:.1f} s)"
        )
    print(f"wrote {args.out}/result.json and {args.out}/bandit.png in {time.perf_counter() - start:.1f} s")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
