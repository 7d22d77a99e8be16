"""Math reward: extraction, equivalence via math-verify in the worker pool, format and overlong terms."""
import numpy as np
import pytest

from lad_jax.rewards import answer_line, last_boxed, math_reward, math_reward_batch, overlong_penalty

B = "The answer is $\\boxed{%s}$."
CASES = [
    # (completion, reference, expected reward)
    (B % "\\frac{1}{2}", "1/2", 1.0),
    (B % "1/2", "0.5", 1.0),
    (B % "0.5", "\\frac12", 1.0),
    (B % "\\frac12", "1/2", 1.0),
    (B % "\\dfrac{1}{2}", "0.5", 1.0),
    (B % "\\tfrac{3}{4}", "0.75", 1.0),
    (B % "-\\frac{3}{4}", "-0.75", 1.0),
    (B % "2\\sqrt{2}", "\\sqrt{8}", 1.0),
    (B % "\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2", 1.0),
    (B % "3\\sqrt{2}", "\\sqrt{8}", 0.0),
    (B % "(1, 2]", "(1,2]", 1.0),
    (B % "(1,2)", "(1,2]", 0.0),
    (B % "[0,\\infty)", "[0, \\infty)", 1.0),
    (B % "\\left( 1, 2\\right)", "(1,2)", 1.0),
    (B % "\\{1,2\\}", "\\{2,1\\}", 1.0),
    (B % "2,3", "3,2", 1.0),
    (B % "x = 5", "5", 1.0),
    (B % "x \\in [0,1]", "[0,1]", 1.0),
    (B % "5 \\text{ cm}", "5", 1.0),
    (B % "90^\\circ", "90", 1.0),
    (B % "10\\%", "10", 1.0),
    (B % "\\$5", "5", 1.0),
    (B % "1,000", "1000", 1.0),
    (B % "2^{10}", "1024", 1.0),
    (B % "x^2+2x+1", "(x+1)^2", 1.0),
    (B % "\\infty", "\\infty", 1.0),
    (B % "3.14", "\\pi", 0.0),
    (B % "0.3333", "1/3", 0.0),
    (B % "\\text{(B)}", "B", 1.0),
    (B % "B", "C", 0.0),
    (B % "\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", 1.0),
    (B % "42", "42", 1.0),
    (B % "41", "42", 0.0),
    (B % "-7", "-7", 1.0),
    (B % "7", "-7", 0.0),
    ("First \\boxed{3}, then correcting: \\boxed{4}", "4", 1.0),  # multiple boxed -> last
    ("First \\boxed{4}, then correcting: \\boxed{3}", "4", 0.0),
    ("No boxed answer here, I think it is 4.", "4", 0.0),  # no boxed / Answer: -> 0
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}", 1.0),  # nested braces
    ("\\boxed{\\frac{\\frac{1}{2}}{2}}", "1/4", 1.0),
    ("\\fbox{12}", "12", 1.0),
    ("\\boxed 7", "7", 1.0),
    ("Lots of work...\nAnswer: 34", "34", 1.0),  # DAPO-Math convention
    ("Lots of work...\nAnswer: $\\frac{2}{3}$", "2/3", 1.0),
    ("Answer: 5\nwait, no.\nAnswer: 6", "6", 1.0),
    ("Answer: 33", "34", 0.0),
    ("x" * 200_000 + "}{" * 1000 + "\\boxed{" + "(" * 5000, "1", 0.0),  # long garbage, unbalanced
    ("\\boxed{(" * 50_000 + "\\boxed{3}" + "\\boxed{(" * 50_000, "3", 0.0),  # many unbalanced: linear scan
    ("answer:" + " " * 100_000 + "x\n" + "Answer:" + " " * 100_000 + "\n", "1", 0.0),  # no regex blow-up
    ("\\boxed{" + "1+" * 60 + "1}", "61", 1.0),  # long answer
    ("", "1", 0.0),
]


def test_table_has_enough_cases():
    assert len(CASES) >= 40


def test_math_table_batch():
    completions, references, expected = zip(*CASES)
    rewards, metrics = math_reward_batch(list(completions), list(references), timeout_s=5.0)
    assert rewards.dtype == np.float32 and rewards.shape == (len(CASES),)
    wrong = [(c[:80], r, e, g) for (c, r, e), g in zip(CASES, rewards) if g != e]
    assert not wrong, wrong
    assert metrics["math/timeouts"] == 0 and metrics["math/errors"] == 0
    assert metrics["math/accuracy"] == pytest.approx(np.mean(expected))


@pytest.mark.parametrize("completion,reference,expected", CASES[:6] + CASES[35:38])
def test_math_reward_single(completion, reference, expected):
    assert math_reward(completion, reference) == expected


def test_extractors():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{a}{b}} c") == "\\frac{a}{b}"
    assert last_boxed("\\boxed{1} then \\boxed{2") == "1"  # unbalanced last one is skipped
    assert last_boxed("nothing") is None
    assert answer_line("blah\nAnswer: $12$.") == "12"
    assert answer_line("the answer: is here") is None  # only a line that starts with Answer:
    # only the Answer: convention enabled: a boxed answer is ignored
    assert math_reward("\\boxed{5}", "5", extractors=("answer_line",)) == 0.0
    assert math_reward("Answer: 5", "5", extractors=("boxed",)) == 0.0
    with pytest.raises(ValueError, match="unknown math extractor"):
        math_reward("\\boxed{5}", "5", extractors=("bogus",))


def test_reference_list_numbers_and_worked_solution():
    assert math_reward("\\boxed{6}", ["5", "6"]) == 1.0
    assert math_reward("Answer: 0.5", "So we get $\\boxed{\\frac{1}{2}}$.") == 1.0
    assert math_reward("\\boxed{6}", 6) == 1.0


GSM8K_GOLD = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
              "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


def test_gsm8k_reference_is_its_final_answer():
    """GSM8K's `answer` field is a worked solution ending in '#### N': N is the reference, matched on the exact-match
    fast path (no verifier call), and the intermediate 24 is not accepted."""
    completions = ["so \\boxed{72}", "Answer: 72", "\\boxed{24}", "no answer"]
    rewards, metrics = math_reward_batch(completions, [GSM8K_GOLD] * 4)
    assert rewards.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert metrics["math/verifier_calls"] == 1  # only the wrong "24" goes to math-verify
    assert math_reward("\\boxed{1000}", "Half of 2,000 is 1,000.\n#### 1,000") == 1.0
    assert math_reward("\\boxed{-3}", "3 - 6 = -3\n#### -3") == 1.0
    assert math_reward("\\boxed{3}", "3 - 6 = -3\n#### -3") == 0.0


def test_format_reward_and_dapo_values():
    rewards, _ = math_reward_batch(["\\boxed{1}", "\\boxed{2}", "no answer"], ["1", "1", "1"],
                                   correct_reward=1.0, incorrect_reward=-1.0, format_reward=0.1)
    np.testing.assert_allclose(rewards, [1.1, -0.9, -1.0], rtol=1e-6)


def test_overlong_penalty_in_tokens():
    assert overlong_penalty(50, 100, 20) == 0.0
    assert overlong_penalty(80, 100, 20) == 0.0
    assert overlong_penalty(90, 100, 20) == pytest.approx(-0.5)
    assert overlong_penalty(100, 100, 20) == pytest.approx(-1.0)
    assert overlong_penalty(150, 100, 20) == -1.0
    rewards, metrics = math_reward_batch(["\\boxed{1}"] * 3, ["1"] * 3, num_tokens=[10, 90, 200],
                                         overlong_max_tokens=100, overlong_buffer_tokens=20)
    np.testing.assert_allclose(rewards, [1.0, 0.5, 0.0])
    assert metrics["math/overlong_penalty_mean"] == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="num_tokens"):
        math_reward_batch(["\\boxed{1}"], ["1"], overlong_max_tokens=100, overlong_buffer_tokens=20)
    with pytest.raises(ValueError, match="buffer_tokens"):
        overlong_penalty(5, 10, 0)


def test_timeout_counts_and_gives_zero():
    # A check that needs ~0.25-1 s (a 400-term sum, depending on load) under a 0.05 s hard per-item deadline: the
    # worker is killed and replaced, the item scores 0 and is counted, nothing raises. ("7" vs "7" is an exact string
    # match and never reaches the pool, so the tight deadline cannot touch it.)
    heavy = "\\boxed{" + "1+" * 400 + "1}"
    rewards, metrics = math_reward_batch([heavy, "\\boxed{7}"], ["401", "7"], timeout_s=0.05)
    assert rewards.tolist() == [0.0, 1.0] and metrics["math/timeouts"] == 1
    # and the pool recovers afterwards
    assert math_reward("\\boxed{2\\sqrt{2}}", "\\sqrt{8}") == 1.0


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="references"):
        math_reward_batch(["a", "b"], ["1"])
