"""Trainer plumbing: a URL run directory (fsspec memory:// standing in for gs://), `rollout.old_logprobs=recompute`
and the multi-host agreement on stopping."""
import json
import os
import uuid

import fsspec
import numpy as np
import pytest
import yaml

from lad_jax import experience, run_files
from lad_jax import train_setup as setup_lib
from lad_jax.config import load_config
from lad_jax.trainer import Trainer, agreed_stop


@pytest.fixture(scope="module")
def remote_run(tmp_path_factory):
    """Two recompute steps with output_dir=memory://...; orbax keeps a local checkpoint dir (it has no memory://)."""
    cwd = tmp_path_factory.mktemp("cwd")
    ckpt = tmp_path_factory.mktemp("ckpt")
    url = f"memory://bucket-{uuid.uuid4().hex}/runs"
    config = load_config("configs/tiny_test.yaml", [
        f"output_dir={url}", "run_name=remote", "steps=2", f"checkpoint.dir={ckpt}", "checkpoint.every=1",
        "rollout.old_logprobs=recompute", "rollout.temperature=0.7", "logging.tensorboard=true",
        "eval.enabled=true", "eval.num_samples=2", "eval.max_prompts=4", "eval.every=1", "steps=2"])
    old = os.getcwd()
    os.chdir(cwd)  # a local file call on the URL would create ./memory:/... here
    try:
        trainer = Trainer(config, log=lambda *a, **k: None)
        calls = []
        recompute = trainer.recompute
        trainer.recompute = lambda *arrays: calls.append(1) or recompute(*arrays)
        summary = trainer.run()
    finally:
        os.chdir(old)
    return config, trainer, summary, cwd, calls


def test_url_run_dir_writes_everything_remotely(remote_run):
    config, _, summary, cwd, _ = remote_run
    assert summary["steps"] == 2
    assert list(cwd.iterdir()) == [], list(cwd.iterdir())  # nothing named "memory:" (or anything else) locally
    fs, root = fsspec.core.url_to_fs(config.run_dir)
    for name in ("config.yaml", "summary.json", "eval_step0.json", "eval_step1.json", "eval_step2.json",
                 "metrics.jsonl", "hf_export/config.json", "hf_export/model.safetensors", "hf_export/tokenizer.json",
                 "data/train.jsonl", "tokenizer/tokenizer.json"):
        assert fs.exists(f"{root}/{name}"), name
    assert yaml.safe_load(fs.cat_file(f"{root}/config.yaml"))["rollout"]["old_logprobs"] == "recompute"
    assert json.loads(fs.cat_file(f"{root}/summary.json"))["steps"] == 2
    rows = [json.loads(x) for x in fs.cat_file(f"{root}/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows if "rollout/accuracy" in r] == [1, 2]
    assert any("events.out.tfevents" in p for p in fs.ls(root, detail=False))
    assert run_files.read_text(run_files.join(config.run_dir, "nope.txt")) is None


def test_recompute_matches_sampler_logprobs(remote_run):
    """The recomputed pi_old equals the sampler's behaviour log-probs (same weights, fp32) on response tokens."""
    config, trainer, _, _, calls = remote_run
    assert len(calls) == 2  # the run really used the recompute path, once per step
    rows = next(trainer.loader)
    s = trainer.s
    kwargs = dict(key=setup_lib.step_key(config.seed, 99), mesh=s.mesh, stop_ids=s.stop_ids)
    sampled = experience.collect(config, trainer.policy(), rows, s.tokenizer, s.reward_fn, **kwargs)
    recomputed = experience.collect(config, trainer.policy(), rows, s.tokenizer, s.reward_fn,
                                    recompute=trainer.recompute, **kwargs)
    np.testing.assert_array_equal(sampled.arrays["tokens_bt"], recomputed.arrays["tokens_bt"])
    resp = sampled.arrays["response_bt"]
    assert resp.sum() > 0
    a, b = sampled.arrays["old_logp_bt"], recomputed.arrays["old_logp_bt"]
    assert np.all(a[resp] < 0)
    assert np.max(np.abs(a - b)) <= 1e-4, np.max(np.abs(a - b))
    assert np.all(b[~resp] == 0)


def test_stop_decision_is_agreed_across_processes():
    calls = []

    def fake_allgather(flags_by_host):
        def gather(x):
            calls.append(np.asarray(x).tolist())
            return np.asarray(flags_by_host, np.int32).reshape(-1, 1)
        return gather

    # one process: the local flag, no communication at all
    assert agreed_stop(True, process_count=1, allgather=fake_allgather([0])) is True
    assert agreed_stop(False, allgather=fake_allgather([1])) is False  # this pytest process is alone
    assert calls == []
    # several: any host's SIGTERM stops every host; the local flag is what gets gathered
    assert agreed_stop(False, process_count=4, allgather=fake_allgather([0, 0, 1, 0])) is True
    assert agreed_stop(True, process_count=2, allgather=fake_allgather([1, 0])) is True
    assert agreed_stop(False, process_count=2, allgather=fake_allgather([0, 0])) is False
    assert calls == [[0], [1], [0]]
