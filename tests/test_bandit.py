"""The bandit reproduction: LAD matches the three-mode target, GRPO collapses onto the highest bump."""

import dataclasses
import json

import numpy as np
import pytest

from lad_jax.bandit import BanditConfig, main, rewards, summarize, target_distribution, train

DEFAULT = BanditConfig()  # the CLI defaults: 50 arms, 4000 steps, 32 samples, Adam 5e-3, eta 0.15


@pytest.fixture(scope="module")
def target():
    return target_distribution(DEFAULT)


def test_reward_and_target(target):
    r = rewards(DEFAULT)
    assert r.shape == (50,) and r.min() == 0.0 and r.max() == 1.0 and int(np.argmax(r)) == 25
    assert target.sum() == pytest.approx(1.0)
    summary = summarize(target, target, DEFAULT)
    assert summary["modes_kept"] == [True, True, True]
    # Three visible modes: every side bump holds >= 10% of the mass.
    assert min(summary["bump_mass"]) > 0.1


@pytest.mark.parametrize("divergence", ["js", "hellinger"])
def test_lad_matches_target_and_keeps_modes(divergence, target):
    policy = train("lad", dataclasses.replace(DEFAULT, divergence=divergence))
    summary = summarize(policy, target, DEFAULT)
    assert summary["tv_distance"] <= 0.05, summary["tv_distance"]
    assert summary["modes_kept"] == [True, True, True], summary["bump_mass"]


def test_grpo_collapses_onto_highest_bump(target):
    summary = summarize(train("grpo", DEFAULT), target, DEFAULT)
    assert summary["mass_near_top"] >= 0.9, summary["mass_near_top"]
    assert summary["modes_kept"] == [False, True, False]
    assert summary["tv_distance"] > 0.5


def test_cli_writes_result_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    main(["--method", "lad,grpo,pg", "--divergence", "hellinger", "--steps", "30", "--samples", "8",
          "--arms", "20", "--centers", "5,14", "--heights", "1,2", "--width", "2", "--eta", "0.3", "--out", str(out)])
    result = json.loads((out / "result.json").read_text())
    assert set(result["methods"]) == {"lad", "grpo", "pg"}
    assert len(result["target"]) == 20
    for entry in result["methods"].values():
        assert len(entry["policy"]) == 20 and abs(sum(entry["policy"]) - 1) < 1e-6
        assert 0 <= entry["tv_distance"] <= 1
    assert result["config"]["divergence"] == "hellinger" and result["config"]["eta"] == 0.3
    assert (out / "bandit.png").stat().st_size > 1000
    assert "lad-hellinger: TV to target" in capsys.readouterr().out


def test_bad_arguments():
    with pytest.raises(SystemExit):
        main(["--method", "lad,ppo"])
    with pytest.raises(SystemExit):
        main(["--centers", "10,25", "--heights", "1,2,3"])
    with pytest.raises(ValueError, match="eta"):
        BanditConfig(eta=0.0)
    with pytest.raises(ValueError, match="method"):
        train("ppo", DEFAULT)
