"""Group-relative advantages: hand-computed examples and groups without signal."""

import math

import jax
import numpy as np
import pytest

from lad_jax.advantages import group_advantages, zero_signal_groups

REWARDS = np.array([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0], [0.3, 0.3, 0.3, 0.3]], np.float32)


def test_grpo_hand_example():
    adv = np.asarray(group_advantages(REWARDS))
    assert adv.dtype == np.float32
    std0 = math.sqrt(4 * 0.25 / 3)  # unbiased std of [1, 0, 0, 1]
    np.testing.assert_allclose(adv[0], np.array([0.5, -0.5, -0.5, 0.5]) / (std0 + 1e-6), rtol=1e-6)
    std1 = math.sqrt((3 * 0.25**2 + 0.75**2) / 3)
    np.testing.assert_allclose(adv[1], np.array([-0.25, -0.25, -0.25, 0.75]) / (std1 + 1e-6), rtol=1e-6)
    np.testing.assert_array_equal(adv[2], 0.0)
    mean_only = np.asarray(group_advantages(REWARDS, normalize_std=False))
    np.testing.assert_allclose(mean_only[1], [-0.25, -0.25, -0.25, 0.75], rtol=1e-6)


def test_drgrpo_and_rloo_hand_examples():
    dr = np.asarray(group_advantages(REWARDS, method="drgrpo"))
    np.testing.assert_allclose(dr[0], [0.5, -0.5, -0.5, 0.5], rtol=1e-6)
    np.testing.assert_array_equal(dr[2], 0.0)
    rloo = np.asarray(group_advantages(REWARDS, method="rloo"))
    # r_i minus the mean of the other three rewards.
    np.testing.assert_allclose(rloo[1], [0 - 1 / 3, 0 - 1 / 3, 0 - 1 / 3, 1.0], rtol=1e-6)
    np.testing.assert_allclose(rloo[0], [1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3], rtol=1e-6)
    np.testing.assert_array_equal(rloo[2], 0.0)
    rloo_std = np.asarray(group_advantages(REWARDS, method="rloo", normalize_std=True))
    np.testing.assert_allclose(rloo_std[0], rloo[0] / (math.sqrt(1 / 3) + 1e-6), rtol=1e-6)


@pytest.mark.parametrize("method", ["grpo", "drgrpo", "rloo"])
def test_identical_rewards_give_exact_zeros(method):
    # 0.1 is not representable: the float32 mean of equal values may differ from them by an ulp, and dividing that
    # by eps would give a large spurious advantage. Identical groups must be exactly zero, for any eps.
    rewards = np.full((3, 7), 0.1, np.float32)
    rewards[1] = 1e6 + 0.1
    for eps in (1e-6, 0.0):
        adv = np.asarray(group_advantages(rewards, method=method, eps=eps))
        np.testing.assert_array_equal(adv, 0.0)
    # G = 1: no signal for grpo / drgrpo (rloo needs two samples).
    if method != "rloo":
        np.testing.assert_array_equal(np.asarray(group_advantages(np.ones((2, 1)), method=method)), 0.0)


def test_zero_signal_groups_and_jit():
    no_signal, count = zero_signal_groups(REWARDS)
    np.testing.assert_array_equal(np.asarray(no_signal), [False, False, True])
    assert int(count) == 1
    jitted = jax.jit(lambda r: group_advantages(r, method="grpo"))
    np.testing.assert_allclose(jitted(REWARDS), group_advantages(REWARDS), rtol=1e-6)
    # Advantages sum to zero within each group (for every method).
    for method in ("grpo", "drgrpo", "rloo"):
        np.testing.assert_allclose(np.asarray(group_advantages(REWARDS, method=method)).sum(axis=1), 0.0, atol=1e-5)


def test_validation():
    with pytest.raises(ValueError, match="'grpo', 'drgrpo', 'rloo'"):
        group_advantages(REWARDS, method="ppo")
    with pytest.raises(ValueError, match="drgrpo"):
        group_advantages(REWARDS, method="drgrpo", normalize_std=True)
    with pytest.raises(ValueError, match="rewards_pg"):
        group_advantages(np.ones(4))
    with pytest.raises(ValueError, match="G=1"):
        group_advantages(np.ones((2, 1)), method="rloo")
    with pytest.raises(ValueError, match="eps"):
        group_advantages(REWARDS, eps=-1.0)
