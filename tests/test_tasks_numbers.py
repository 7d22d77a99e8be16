"""The default experiment's task (lad_jax/tasks/numbers.py): properties, reward, tokenizer, warm-start data, probes."""
import json

import numpy as np
import pytest

from lad_jax.tasks import numbers


def test_properties_have_few_correct_answers_with_distinct_first_digits():
    props = numbers.properties()
    assert len(props) == 12 and props[0] == ("sum:4", "digits summing to four")
    counts = []
    for spec, _ in props:
        answers = numbers.valid_answers(spec)
        counts.append(len(answers))
        assert len({str(n)[0] for n in answers}) == len(answers)  # the first digit picks the answer
        assert all(sum(map(int, str(n))) == int(spec[4:]) for n in answers)
    assert min(counts) == 4 and max(counts) == 9
    assert numbers.valid_answers("sum:9") == [18, 27, 36, 45, 54, 63, 72, 81, 90]


def test_check_and_reward():
    assert numbers.check("57", "sum:12") and numbers.check(" 39 ", "sum:12")
    assert not numbers.check("58", "sum:12") and not numbers.check("057", "sum:12")
    assert not numbers.check("5712", "sum:15") and not numbers.check("", "sum:4") and not numbers.check("4", "sum:4")
    rows = [{"answer": "sum:4"}] * 4
    rewards, metrics = numbers.reward_fn(["13", "40", "14", "x"], rows)
    assert rewards.tolist() == [1.0, 1.0, 0.0, 0.0] and metrics["numbers/well_formed"] == 0.75
    with pytest.raises(ValueError, match="sum:S"):
        numbers.satisfies("first:3", 31)


def test_tokenizer_numbers_are_single_tokens():
    tok = numbers.build_tokenizer()
    assert len(tok("digits summing to twelve")["input_ids"]) == 4
    ids = tok("57", add_special_tokens=False)["input_ids"]
    assert len(ids) == 1 and tok.unk_token_id not in ids
    assert tok.decode(ids + tok("12", add_special_tokens=False)["input_ids"]) == "5712"  # two tokens read wrong
    assert numbers.parse_answer(tok.decode(ids)) == 57


def test_answer_weights_are_fixed_zipf_per_prompt():
    favourites = set()
    for spec, _ in numbers.properties():
        answers, w = numbers.answer_weights(spec)
        assert answers == numbers.valid_answers(spec) and w.sum() == pytest.approx(1.0)
        ranks = np.arange(1, len(answers) + 1)
        expected = 1.0 / ranks ** numbers.ZIPF_EXPONENT
        np.testing.assert_allclose(np.sort(w)[::-1], expected / expected.sum())
        again = numbers.answer_weights(spec)[1]
        np.testing.assert_array_equal(w, again)
        favourites.add(int(np.argmax(w)))
    assert len(favourites) > 1


def test_sft_examples_mix_zipf_correct_answers_and_near_misses():
    rng = np.random.default_rng(0)
    pairs = numbers.sft_examples(rng, 6000, correct_fraction=0.4)
    prompts = {p: s for s, p in numbers.properties()}
    correct = [numbers.check(a, prompts[p]) for p, a in pairs]
    assert np.mean(correct) == pytest.approx(0.4, abs=0.03)
    for p, a in pairs:
        if not numbers.check(a, prompts[p]):
            assert int(a) in numbers.near_misses(prompts[p])
    spec = "sum:9"
    answers, w = numbers.answer_weights(spec)
    got = [int(a) for p, a in pairs if prompts[p] == spec and numbers.check(a, spec)]
    freq = np.array([got.count(n) for n in answers]) / len(got)
    assert np.abs(freq - w).max() < 0.06
    same = [numbers.sft_examples(np.random.default_rng(1), 5, 1.0) for _ in range(2)]
    assert same[0] == same[1]


def test_write_data_train_and_eval(tmp_path):
    train, evalf = numbers.write_data(str(tmp_path), num_train=50, num_eval=14, seed=3)
    rows = [json.loads(line) for line in open(evalf)]
    assert [r["answer"] for r in rows[:12]] == [s for s, _ in numbers.properties()] and rows[12] == rows[0]
    train_rows = [json.loads(line) for line in open(train)]
    assert len(train_rows) == 50 and all(numbers.valid_answers(r["answer"]) for r in train_rows)


def test_diversity_stats_by_hand():
    p = np.zeros(90)
    p[13 - 10], p[22 - 10], p[14 - 10] = 0.3, 0.3, 0.4  # two correct answers equally likely, one wrong
    stats = numbers.diversity_stats({"sum:4": p})
    assert stats["accuracy"] == pytest.approx(0.6)
    assert stats["correct_entropy"] == pytest.approx(np.log(2))
    assert stats["effective_correct"] == pytest.approx(2.0) and stats["top_share"] == pytest.approx(0.5)


def test_answer_distribution_of_a_tiny_model():
    from flax import nnx

    from lad_jax.models import create_model, tiny_config

    tok = numbers.build_tokenizer()
    config = tiny_config("qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=16)
    graphdef, params = nnx.split(create_model(config, seed=0))
    params = nnx.to_pure_dict(params)
    dist = numbers.answer_distribution(graphdef, params, tok, ["sum:4", "sum:9"])
    assert set(dist) == {"sum:4", "sum:9"} and dist["sum:4"].shape == (90,)
    total = dist["sum:4"].sum()
    assert 0 < total < 1  # malformed responses hold the rest
    # p("13" then EOS) from one unpadded sequence [prompt, 13, EOS] scored on its own.
    from lad_jax.train_step import sequence_logprobs

    prompt = tok("digits summing to four")["input_ids"]
    ids = np.array([prompt + tok("13", add_special_tokens=False)["input_ids"]], np.int32)
    logp, _ = sequence_logprobs(graphdef, params, np.concatenate([ids, [[tok.eos_token_id]]], 1),
                                np.arange(6, dtype=np.int32)[None], np.ones((1, 6), bool), temperature=1.0)
    assert dist["sum:4"][3] == pytest.approx(float(np.exp(logp[0, 4] + logp[0, 5])), rel=1e-5)
