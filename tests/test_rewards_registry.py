"""Reward registry: names, import paths, per-item adapter, weighted combination, row fields."""
import numpy as np
import pytest

from lad_jax.rewards import SandboxLimits, build_reward_fn, per_item, register_reward, registered_rewards


@register_reward("test_length_bonus")
def length_bonus(completions, rows, *, scale=1.0):
    return np.array([scale * len(c) for c in completions], np.float32), {"length/mean": 1.0}


def starts_with_row_prefix(completion, row):
    return float(completion.startswith(row["prefix"]))


batch_prefix = per_item(starts_with_row_prefix)


def test_builtin_names_registered():
    assert {"math", "code", "exact_match", "test_length_bonus"} <= set(registered_rewards())


def test_weighted_combination_and_row_fields():
    fn = build_reward_fn([("math", 1.0, {"answer_key": "solution"}),
                          ("exact_match", 0.5, {"answer_key": "solution"}),
                          ("test_length_bonus", 0.01, {"scale": 1.0})])
    completions = ["\\boxed{0.5}", "\\boxed{1/2}", "\\boxed{3}"]
    rows = [{"solution": "1/2"}, {"solution": "1/2"}, {"solution": "1/2"}]
    rewards, metrics = fn(completions, rows)
    lengths = np.array([len(c) for c in completions], np.float32)
    np.testing.assert_allclose(rewards, np.array([1.0, 1.5, 0.0]) + 0.01 * lengths, rtol=1e-6)
    assert rewards.dtype == np.float32
    assert metrics["math"] == pytest.approx(2 / 3)
    assert metrics["exact_match"] == pytest.approx(1 / 3)
    assert "math/accuracy" in metrics and "length/mean" in metrics and "total" in metrics


def test_metric_labels_are_short_and_unique():
    from lad_jax.rewards.registry import reward_label

    assert reward_label("math") == "math"
    assert reward_label("lad_jax.tasks.numbers:reward_fn") == "numbers"
    assert reward_label("my_pkg.rewards:format_bonus") == "format_bonus"
    fn = build_reward_fn([("math", 1.0, {}), ("math", 0.5, {"answer_key": "other"})])
    _, metrics = fn(["\\boxed{1}"], [{"answer": "1", "other": "2"}])
    assert metrics["math"] == 1.0 and metrics["math_1"] == 0.0 and metrics["total"] == 1.0


def test_num_tokens_reaches_math_overlong():
    fn = build_reward_fn([("math", 1.0, {"overlong_max_tokens": 100, "overlong_buffer_tokens": 20})])
    rewards, _ = fn(["\\boxed{1}", "\\boxed{1}"], [{"answer": "1"}, {"answer": "1"}], num_tokens=[10, 90])
    np.testing.assert_allclose(rewards, [1.0, 0.5])


def test_import_path_and_per_item():
    fn = build_reward_fn([(f"{__name__}:batch_prefix", 2.0, None)])
    rewards, _ = fn(["abc", "xbc"], [{"prefix": "ab"}, {"prefix": "ab"}])
    assert rewards.tolist() == [2.0, 0.0]


def test_code_by_name_with_custom_key():
    fn = build_reward_fn([("code", 1.0, {"tests_key": "unit_tests", "limits": SandboxLimits(timeout_s=3.0)})])
    rows = [{"unit_tests": {"inputs": ["2\n"], "outputs": ["4"]}}] * 2
    rewards, metrics = fn(["```python\nprint(int(input())**2)\n```", "```python\nprint(5)\n```"], rows)
    assert rewards.tolist() == [1.0, 0.0] and "code/batch_seconds" in metrics


def test_errors():
    with pytest.raises(ValueError, match="registered"):
        build_reward_fn([("no_such_reward", 1.0, {})])
    with pytest.raises(ValueError, match="cannot import"):
        build_reward_fn([("no_such_pkg.mod:fn", 1.0, {})])
    with pytest.raises(ValueError, match="no callable"):
        build_reward_fn([(f"{__name__}:missing", 1.0, {})])
    with pytest.raises(ValueError, match="already registered"):
        register_reward("math")(length_bonus)
    fn = build_reward_fn([("math", 1.0, {})])
    with pytest.raises(KeyError, match="answer_key"):
        fn(["\\boxed{1}"], [{"solution": "1"}])
    with pytest.raises(ValueError, match="rows"):
        fn(["a", "b"], [{"answer": "1"}])
