"""The `Task` interface: the built-in numbers task behind it, and a task registered from outside driving the trainer's
set-up (data files, tokenizer, default reward) with no special case for its name."""
import json
import os

import pytest

from lad_jax import tasks
from lad_jax.config import TASKS, load_config


def test_registry_and_config_agree():
    assert TASKS == tasks.task_names() == ("none", "numbers")
    assert tasks.get_task("none") is None
    numbers = tasks.get_task("numbers")
    assert numbers.name == "numbers" and numbers.reward == "lad_jax.tasks.numbers:reward_fn"
    with pytest.raises(ValueError, match="task.name='sudoku' is not a built-in task"):
        tasks.get_task("sudoku")


def test_numbers_warm_start_follows_sft_steps():
    numbers = tasks.get_task("numbers")
    c = load_config("configs/tiny_test.yaml")  # task.sft_steps=0
    assert numbers.warm_start(None, {}, None, c.task, 0, print) is None


def test_a_registered_task_drives_the_setup(tmp_path, monkeypatch):
    from lad_jax import train_setup
    from lad_jax.tasks import numbers

    calls = []

    def write_data(out_dir, t, seed):
        calls.append(("data", seed, t.num_train_prompts))
        os.makedirs(out_dir, exist_ok=True)
        paths = [os.path.join(out_dir, f"{split}.jsonl") for split in ("train", "eval")]
        for p in paths:
            with open(p, "w") as f:
                f.write(json.dumps({"prompt": "digits summing to twelve", "answer": "sum12"}) + "\n")
        return tuple(paths)

    def build_tokenizer(out_dir):
        calls.append(("tokenizer", out_dir is not None))
        return numbers.build_tokenizer(out_dir)

    toy = tasks.Task(name="numbers", write_data=write_data, build_tokenizer=build_tokenizer,
                     reward="my_rewards:score")
    monkeypatch.setitem(tasks._REGISTRY, "numbers", lambda: toy)
    c = load_config("configs/tiny_test.yaml", [f"output_dir={tmp_path}", "seed=7"])
    train, evalf, tok = train_setup.task_files(c)
    assert calls == [("data", 7, c.task.num_train_prompts), ("tokenizer", True)]
    assert train == (os.path.join(c.run_dir, "data", "train.jsonl"),) and os.path.isfile(evalf[0])
    assert tok == os.path.join(c.run_dir, "tokenizer") and os.path.isfile(os.path.join(tok, "tokenizer.json"))
    assert train_setup.reward_specs(c) == [("my_rewards:score", 1.0, {})]
