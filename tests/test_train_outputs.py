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


def test_continuous_rollout_equals_static(remote_run):
    """rollout.decode_slots > 0 (continuous batching, fewer slots than rows) collects the same experience."""
    import dataclasses

    config, trainer, _, _, _ = remote_run
    rows = next(trainer.loader)
    s = trainer.s
    kwargs = dict(key=setup_lib.step_key(config.seed, 98), mesh=s.mesh, stop_ids=s.stop_ids)
    static = experience.collect(config, trainer.policy(), rows, s.tokenizer, s.reward_fn, **kwargs)
    slots = max(1, config.batch_size // 3)
    cont_config = dataclasses.replace(config, rollout=dataclasses.replace(config.rollout, decode_slots=slots))
    cont = experience.collect(cont_config, trainer.policy(), rows, s.tokenizer, s.reward_fn, **kwargs)
    for name in ("tokens_bt", "response_bt", "advantages_b"):
        np.testing.assert_array_equal(static.arrays[name], cont.arrays[name])
    np.testing.assert_allclose(static.arrays["old_logp_bt"], cont.arrays["old_logp_bt"], atol=1e-5)


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


@pytest.mark.parametrize("case", ["yaml", "row", "empty", "missing", "output_dir"])
def test_bad_input_is_one_line_before_the_model_is_built(tmp_path, capsys, monkeypatch, case):
    """Each user-fixable failure ends `python -m lad_jax.train` with one line naming the file or key."""
    from lad_jax import train, train_setup
    from lad_jax.cli_errors import main_with_clear_errors

    monkeypatch.delenv("LAD_DEBUG", raising=False)
    monkeypatch.setattr(train_setup, "build_model", lambda *a: pytest.fail("model built before the data was checked"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  num_samples: [4\n")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "digits summing to nine"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    base = ["--config", "configs/tiny_test.yaml", f"output_dir={tmp_path / 'runs'}"]
    argv, expected = {
        "yaml": (["--config", str(bad)], ["config error:", "bad.yaml: line 3", "malformed YAML"]),
        "row": (base + [f"data.train_files=[{rows}]"], ["data error:", "rows.jsonl:1", "'answer'",
                                                         "data.on_bad_row=skip"]),
        "empty": (base + [f"data.train_files=[{empty}]"], ["data error:", "empty.jsonl", "no train prompts"]),
        "missing": (base + [f"data.train_files=[{tmp_path / 'nope.jsonl'}]"], ["data error:", "does not exist"]),
        "output_dir": (["--config", "configs/tiny_test.yaml", "output_dir=/proc/lad_jax_nope"],
                       ["config error:", "output_dir='/proc/lad_jax_nope'", "writable"]),
    }[case]
    with pytest.raises(SystemExit) as exc:
        main_with_clear_errors(train.main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    for part in expected:
        assert part in err[0], (part, err[0])


def test_skipped_rows_are_counted_in_log_metrics_and_summary(tmp_path):
    from lad_jax.tasks import numbers
    from lad_jax.trainer import Trainer

    train, _ = numbers.write_data(str(tmp_path / "data"), num_train=64, num_eval=4, seed=0)
    with open(train, "a") as fh:
        fh.write('{"prompt": "no answer here"}\n{not json\n')
    config = load_config("configs/tiny_test.yaml", [
        f"output_dir={tmp_path}", "run_name=skip", "steps=1", f"data.train_files=[{train}]", "data.on_bad_row=skip",
        "checkpoint.export_hf=false"])
    lines = []
    summary = Trainer(config, log=lines.append).run()
    assert any("skipped 2 bad rows" in line for line in lines), lines
    assert summary["data"]["bad_rows"] == 2 and summary["data"]["kept"] == 64
    metrics = json.loads(open(os.path.join(config.run_dir, "metrics.jsonl")).readline())
    assert metrics["data/skipped_bad_rows"] == 2.0
