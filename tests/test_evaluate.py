"""lad_jax.evaluate: pass@k / avg@k / distinct-n on hand-made inputs."""
import itertools
import math

import numpy as np
import pytest

from lad_jax.evaluate import (
    avg_at_k,
    distinct_correct_per_prompt,
    distinct_ngram_ratio,
    mean_pass_at_k,
    pass_at_k,
    prompt_distinct_ngram_ratio,
    summarize,
)


def test_pass_at_k_known_values_and_brute_force():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))  # 0.7
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0 and pass_at_k(4, 1, 1) == 0.25
    # brute force: fraction of k-subsets containing at least one correct sample
    for n, c, k in [(6, 2, 3), (7, 1, 2), (8, 5, 1), (8, 3, 4)]:
        labels = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        assert pass_at_k(n, c, k) == pytest.approx(np.mean([any(labels[i] for i in s) for s in subsets]))
    assert pass_at_k(200, 3, 100) == pytest.approx(1 - math.comb(197, 100) / math.comb(200, 100))
    with pytest.raises(ValueError, match="k <= num_samples"):
        pass_at_k(4, 1, 5)


def test_avg_at_k_and_mean_pass_at_k():
    correct = np.array([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]], bool)
    assert avg_at_k(correct) == pytest.approx(5 / 12)
    assert avg_at_k(correct, 2) == pytest.approx((0.5 + 0 + 1) / 3)
    assert mean_pass_at_k(correct, 1) == pytest.approx(5 / 12)  # pass@1 estimate == accuracy
    assert mean_pass_at_k(correct, 4) == pytest.approx(2 / 3)


def test_distinct_ngram_ratio():
    # prompt 1: "a b c d e" has 2 four-grams, "a b c d" has 1 (a repeat): 2 distinct / 3 total
    assert prompt_distinct_ngram_ratio(["a b c d e", "a b c d"], n=4) == pytest.approx(2 / 3)
    # n-grams never cross responses: ["a b", "c d"] has no bigram "b c"
    assert prompt_distinct_ngram_ratio(["a b", "c d", "a b"], n=2) == pytest.approx(2 / 3)
    assert prompt_distinct_ngram_ratio([[1, 2, 3], [1, 2, 3]], n=3) == 0.5  # token ids
    assert prompt_distinct_ngram_ratio(["a b"], n=4) is None
    groups = [["a b c d e", "a b c d"], ["w x y z", "z y x w"], ["too short"]]
    assert distinct_ngram_ratio(groups, n=4) == pytest.approx((2 / 3 + 1.0) / 2)
    assert math.isnan(distinct_ngram_ratio([["x"]], n=4))


def test_summarize():
    rewards = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    responses = [[" 12", "nope", "14 "], ["a", "b", "7"]]
    out = summarize(rewards, responses, ngram=1)
    assert out["pass@1"] == pytest.approx(0.5)
    assert out["pass@3"] == 1.0
    assert out["avg@3"] == pytest.approx(0.5)
    assert out["mean_reward"] == pytest.approx(0.5)
    assert out["distinct_1gram_ratio"] == 1.0
    assert out["distinct_correct_per_prompt"] == pytest.approx(1.5)
    assert distinct_correct_per_prompt([[True, True]], [["5", " 5"]]) == 1.0
    assert summarize(rewards, responses, ks=(2,), correct_threshold=0.5)["pass@2"] == pytest.approx((1 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="groups of 3"):
        summarize(rewards, responses[:1])


@pytest.fixture(scope="module")
def tiny_policy():
    from lad_jax.models import create_model, tiny_config
    from lad_jax.tasks import numbers

    tokenizer = numbers.build_tokenizer()
    config = tiny_config("qwen2", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=64)
    return create_model(config, seed=0), tokenizer


def test_evaluate_policy_aligns_prompts_rewards_and_summary(tiny_policy):
    from lad_jax.evaluate import evaluate_policy

    model, tokenizer = tiny_policy
    rows = [{"prompt": f"multiple of {k} =", "answer": str(k)} for k in (6, 7, 8, 9, 11)]
    seen = []

    def reward_fn(completions, rows_):
        seen.extend(zip(completions, (r["answer"] for r in rows_)))
        return np.array([float(len(c) % 2 == 0) for c in completions]), {}

    summary, samples = evaluate_policy(model, tokenizer, rows, reward_fn, num_samples=3, max_new_tokens=4,
                                       temperature=1.0, seed=1, prompts_per_batch=2, ngram=1)
    assert len(seen) == 15 and [a for _, a in seen] == [r["answer"] for r in rows for _ in range(3)]
    assert [s["responses"] for s in samples] == [[c for c, _ in seen[3 * p: 3 * p + 3]] for p in range(5)]
    assert [s["prompt"] for s in samples] == [r["prompt"] for r in rows]
    rewards = np.array([s["rewards"] for s in samples])
    assert summary == {**summarize(rewards, [s["responses"] for s in samples], ngram=1),
                       "response_length_mean": summary["response_length_mean"],
                       "response_length_max": summary["response_length_max"],
                       "clip_fraction": summary["clip_fraction"]}
    assert 1 <= summary["response_length_max"] <= 4 and 0 <= summary["clip_fraction"] <= 1
    again, _ = evaluate_policy(model, tokenizer, rows, reward_fn, num_samples=3, max_new_tokens=4, seed=1,
                               prompts_per_batch=2, ngram=1)
    assert again == summary  # seeded: reproducible
    greedy, gsamples = evaluate_policy(model, tokenizer, rows, reward_fn, num_samples=3, max_new_tokens=4,
                                       temperature=0.0, prompts_per_batch=5)
    assert all(len(set(s["responses"])) == 1 for s in gsamples)
    assert greedy["pass@1"] == greedy["pass@3"]


def test_cli_checkpoint_and_hf_model_match_direct_evaluation(tmp_path, monkeypatch):
    import json

    import jax
    from flax import nnx

    from lad_jax import evaluate
    from lad_jax.checkpoint import CheckpointManager
    from lad_jax.config import load_config, mesh_shape
    from lad_jax.data import load_rows
    from lad_jax.models import save_pretrained
    from lad_jax.sharding import make_mesh
    from lad_jax.tasks import numbers
    from lad_jax.train_setup import build_model

    overrides = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1", "model.num_heads=2",
                 "model.num_kv_heads=1", "model.head_dim=16", "run_name=ev", f"output_dir={tmp_path}"]
    c = load_config(None, overrides)
    tokenizer = numbers.build_tokenizer()
    model = build_model(c, tokenizer, None)
    ckpt = CheckpointManager(tmp_path / "ev" / "checkpoints", save_every=1, keep_last=1)
    ckpt.save(3, {"params": nnx.to_pure_dict(nnx.split(model)[1]), "step": jax.numpy.int32(3)},
              meta={"config": c.to_dict(), "data": {}})
    ckpt.close()
    save_pretrained(model, str(tmp_path / "hf"))  # weights only: the tokenizer then comes from the config's task
    _, eval_file = numbers.write_data(str(tmp_path / "data"), num_train=4, num_eval=8, seed=0)

    common = ["--data", eval_file, "--k", "3", "--max_prompts", "5"]
    monkeypatch.chdir(tmp_path)  # relative paths on the command line, as a user types them
    from_ckpt = evaluate.main(["--checkpoint", "ev", "--out", "a.json"] + common)
    from_hf = evaluate.main(["--hf_model", str(tmp_path / "hf"), "--out", str(tmp_path / "b.json")] + common
                            + overrides)
    assert from_ckpt["source"] == {"checkpoint": "ev", "step": 3}
    assert json.loads((tmp_path / "a.json").read_text())["metrics"] == from_ckpt["metrics"]
    assert {"pass@1", "pass@3", "avg@3", f"distinct_{c.eval.ngram}gram_ratio"} <= set(from_ckpt["metrics"])
    assert from_ckpt["data"]["num_prompts"] == 5 and from_ckpt["sampling"]["k"] == 3

    rows, _ = load_rows(eval_file, prompt_field="prompt", answer_field="answer")
    direct, samples = evaluate.evaluate_policy(
        model, tokenizer, rows[:5], numbers.reward_fn, num_samples=3, max_new_tokens=c.rollout.max_new_tokens,
        temperature=c.eval.temperature, seed=c.seed + 1, stop_token_ids=(tokenizer.eos_token_id,),
        pad_id=tokenizer.pad_token_id, ngram=c.eval.ngram, mesh=make_mesh(*mesh_shape(c, jax.device_count())))
    assert from_ckpt["metrics"] == direct and from_hf["metrics"] == direct
    assert from_ckpt["examples"] == samples and from_hf["examples"] == samples
    with pytest.raises(SystemExit, match="nothing to evaluate"):
        evaluate.main(["--out", str(tmp_path / "c.json")] + common)
