"""A short CPU end-to-end run of the trainer (tiny model, numbers task): reward improves, nothing recompiles."""
import json
import os

import jax
import numpy as np
import pytest

from lad_jax.config import load_config
from lad_jax.trainer import Trainer
from shared import shared_dir


OVERRIDES = ["run_name=e2e", "steps=16", "rollout.prompts_per_step=16", "rollout.num_samples=8",
             "algorithm.minibatch_size=64", "algorithm.micro_batch_size=32", "model.hidden_size=64",
             "model.intermediate_size=192", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
             "task.sft_steps=100", "task.sft_lr=3e-3", "task.sft_batch_size=64", "eval.enabled=true",
             "eval.num_samples=8", "checkpoint.every=8", "eval.every=8", "optimizer.lr=1e-3",
             "logging.tensorboard=true"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One training run per test session, shared by the xdist workers (tests/shared.py); tests only read it."""
    with shared_dir(tmp_path_factory, "e2e") as (out, first):
        config = load_config("configs/tiny_test.yaml", [f"output_dir={out}", *OVERRIDES])
        if first:
            Trainer(config, log=lambda *a, **k: None).run()
    return config, json.loads(open(os.path.join(config.run_dir, "summary.json")).read())


def test_rerunning_a_finished_run_changes_nothing(run, capsys):
    from lad_jax import train

    config, summary = run
    files = _snapshot(config.run_dir)
    again = train.main(["--config", "configs/tiny_test.yaml", f"output_dir={config.output_dir}", *OVERRIDES])
    assert again == json.loads(json.dumps(summary))
    assert "already finished 16 steps" in capsys.readouterr().out
    assert _snapshot(config.run_dir) == files


def test_reevaluate_on_request_writes_only_the_eval_file(run):
    from lad_jax import train

    config, summary = run
    files = _snapshot(config.run_dir)
    ev = train.main(["--config", "configs/tiny_test.yaml", f"output_dir={config.output_dir}", *OVERRIDES,
                     "--reevaluate"])
    assert ev == summary["eval_after"]  # the final checkpoint, evaluated as the run's last eval did
    now = _snapshot(config.run_dir)
    assert {p: v[1] for p, v in now.items()} == {p: v[1] for p, v in files.items()}  # same files, same bytes
    # Only the eval file, config.yaml and the task's regenerated inputs (data/, tokenizer/) are rewritten; the run's record
    # (metrics.jsonl, TensorBoard, summary.json, checkpoints) is not touched.
    rewritten = {os.path.join(config.run_dir, name) for name in ("eval_step16.json", "config.yaml", "data", "tokenizer")}
    kept = [p for p in files if not any(p == r or p.startswith(r + os.sep) for r in rewritten)]
    assert any(p.endswith("metrics.jsonl") for p in kept) and any(p.endswith("summary.json") for p in kept)
    assert {p: now[p][0] for p in kept} == {p: files[p][0] for p in kept}


def _snapshot(root):
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            out[path] = (os.stat(path).st_mtime_ns, open(path, "rb").read())
    return out


def test_reward_improves(run):
    config, summary = run
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["avg@8"] > max(1.5 * before["avg@8"], before["avg@8"] + 0.03), (before, after)
    rows = [json.loads(line) for line in open(os.path.join(config.run_dir, "metrics.jsonl"))]
    acc = [r["rollout/accuracy"] for r in rows if "rollout/accuracy" in r]
    assert len(acc) == 16 and np.mean(acc[-3:]) > np.mean(acc[:3])


def test_metrics_and_no_recompilation(run):
    config, summary = run
    rows = [json.loads(line) for line in open(os.path.join(config.run_dir, "metrics.jsonl"))]
    train_rows = [r for r in rows if "rollout/accuracy" in r]
    for key in ("rollout/reward_mean", "rollout/reward_std", "rollout/zero_signal_frac", "rollout/response_len_mean",
                "rollout/response_len_max", "rollout/clip_frac_max_tokens", "train/ratio_mean",
                "train/above_target_frac", "train/approx_kl", "train/entropy", "train/grad_norm", "train/lr",
                "time/generate_s", "time/reward_s", "time/train_s", "throughput/train_tokens_per_s"):
        assert key in train_rows[-1], key
    assert summary["compiles_train_step"] == 1
    assert {r["compiles/train_step"] for r in train_rows} == {1.0}
    assert len({r["compiles/sampler"] for r in train_rows[1:]}) == 1  # sampler compiled in step 1 only
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(config.run_dir))


def test_outputs_written(run):
    config, _ = run
    d = config.run_dir
    for name in ("config.yaml", "summary.json", "eval_step0.json", "eval_step8.json", "eval_step16.json", "hf_export/config.json",
                 "hf_export/model.safetensors", "hf_export/tokenizer.json", "data/train.jsonl"):
        assert os.path.exists(os.path.join(d, name)), name
    assert max(int(n) for n in os.listdir(config.checkpoint_dir) if n.isdigit()) == 16
    from lad_jax.models import from_pretrained

    model = from_pretrained(os.path.join(d, "hf_export"))
    assert model.config.hidden_size == config.model.hidden_size


def test_init_from_hf_export(run, tmp_path):
    config, _ = run
    from lad_jax.config import load_config

    arch = ["model_type", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"]
    c = load_config("configs/tiny_test.yaml", [
        f"output_dir={tmp_path}", "run_name=ft", "steps=1", "task.sft_steps=0", "checkpoint.export_hf=false",
        f"init_from={os.path.join(config.run_dir, 'hf_export')}", *[f"model.{k}=null" for k in arch]])
    trainer = Trainer(c, log=lambda *a, **k: None)
    exported = trainer.s.params
    trainer.run()
    assert trainer.s.model_config.hidden_size == config.model.hidden_size
    assert len(jax.tree.leaves(exported)) == len(jax.tree.leaves(trainer.state["params"]))
