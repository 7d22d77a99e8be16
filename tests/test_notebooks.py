"""notebooks/*.ipynb execute top to bottom on CPU under LAD_NOTEBOOK_SMALL=1 (nbclient, the venv's python3 kernel).

The quickstart runs its HF-model path (the one Colab TPU/GPU users take) against a tiny random Qwen2 checkpoint
and tokenizer and a tiny GSM8K copy (parquet files with the hub's names and schema) built here, so it needs no
network: init_from, chat template and system prompt, GSM8K rows through the data loader, the math reward on
'#### N' references, LAD training, the curves from metrics.jsonl, pass@k before/after and the transformers round
trip of the HF export all run for real. Only the hub download itself (hf:// through fsspec) is not exercised.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
# GSM8K-shaped rows: a question and a worked solution whose last line is '#### N'.
GSM8K_ROWS = [
    {"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
     "answer": f"Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
    for a, b in [(3, 4), (12, 9), (5, 30), (7, 8), (21, 2), (6, 6), (40, 15), (11, 1)]
]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def kernel_env(**extra: str) -> dict:
    env = dict(os.environ)
    # One CPU device in the kernel: the notebooks scale their batches to the device count, and 8 fake devices
    # would only slow compilation down.
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if not f.startswith("--xla_force_host_platform_device_count"))
    env.update(JAX_PLATFORMS="cpu", LAD_NOTEBOOK_SMALL="1", MPLBACKEND="Agg", **extra)
    return env


def execute(name: str, workdir: Path, env: dict) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in nb.cells:
        assert not cell.get("outputs") and not cell.get("execution_count"), f"{name} is committed with outputs"
    client = NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(workdir)}})
    client.execute(env=env)
    return nb


def outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out["text"])
            elif "data" in out and "text/plain" in out["data"]:
                parts.append(out["data"]["text/plain"])
    return "\n".join(parts)


def images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


def test_bandit_notebook(tmp_path):
    nb = execute("bandit.ipynb", tmp_path, kernel_env())
    text = outputs_text(nb)
    assert "LAD keeps 3/3 modes" in text  # the notebook's own assertions passed on the way here
    assert "TV to P_A" in text and "hellinger" in text
    assert images(nb) >= 4  # reward/target, policies, divergence ablation, eta sweep


@pytest.fixture(scope="module")
def tiny_hf_checkpoint(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lad_jax.models import create_model, save_pretrained, tiny_config

    directory = tmp_path_factory.mktemp("tiny_qwen")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [r["question"] + " " + r["answer"] for r in GSM8K_ROWS] + [SYSTEM_PROMPT,
                                                                        "user assistant system 0123456789"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    config = tiny_config("qwen2", vocab_size=len(fast), max_position_embeddings=256,
                         eos_token_ids=(fast.eos_token_id,), pad_token_id=fast.pad_token_id)
    save_pretrained(create_model(config, seed=0), str(directory))
    return directory


def write_gsm8k(directory: Path) -> None:
    """The hub's file names (openai/gsm8k, config main) with its two string columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir()
    for split, rows in (("train", GSM8K_ROWS), ("test", GSM8K_ROWS[::-1][:5])):
        table = pa.table({"question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows]})
        pq.write_table(table, directory / f"{split}-00000-of-00001.parquet")


def test_quickstart_notebook_hf_path(tmp_path, tiny_hf_checkpoint):
    runs, data = tmp_path / "runs", tmp_path / "gsm8k"
    write_gsm8k(data)
    env = kernel_env(LAD_NOTEBOOK_INIT_FROM=str(tiny_hf_checkpoint), LAD_NOTEBOOK_RUNS=str(runs),
                     LAD_NOTEBOOK_DATA=str(data))
    nb = execute("lad_quickstart.ipynb", tmp_path, env)
    text = outputs_text(nb)
    assert f"training {tiny_hf_checkpoint}" in text
    # the data cell read the local GSM8K copy: the first test question and its '#### N' answer
    assert f"test-00000-of-00001.parquet: 5 rows\nquestion: {GSM8K_ROWS[-1]['question']}" in text
    run_dir = runs / "quickstart-gsm8k-lad"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in lines if "rollout/reward_mean" in r]
    assert [r["step"] for r in records] == [1, 2]
    assert all("reward/math/accuracy" in r for r in records)  # the math reward scored the rollouts
    assert all(0.0 <= r["rollout/distinct_frac"] <= 1.0 for r in records)
    # held-out evaluation before and after, on the test split's questions rendered with the system prompt
    for step in (0, 2):
        ev = json.loads((run_dir / f"eval_step{step}.json").read_text())
        assert ev["summary"]["num_prompts"] == 4 and ev["summary"]["num_samples"] == 4
        assert SYSTEM_PROMPT in ev["samples"][0]["prompt"] and GSM8K_ROWS[-1]["question"] in ev["samples"][0]["prompt"]
        assert ev["samples"][0]["answer"] == GSM8K_ROWS[-1]["answer"]
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("pass@1", "pass@4"):
        before, after = summary["eval_before"][key], summary["eval_after"][key]
        assert f"{key:28s} before {before:.3f} -> after {after:.3f}" in text
    assert "4 held-out prompts x 4 samples" in text
    assert "2 steps logged" in text
    assert (run_dir / "curves.png").stat().st_size > 0 and (run_dir / "pass_at_k.png").stat().st_size > 0
    assert images(nb) >= 2  # the curves and the pass@k bars
    export = run_dir / "hf_export"
    assert (export / "config.json").exists() and (export / "tokenizer.json").exists()
    assert any(p.suffix == ".safetensors" for p in export.iterdir())


def test_notebooks_match_their_jupytext_sources():
    """Each .ipynb is paired with a percent-format .py (the file to edit and review); `jupytext --sync notebooks/*.py`
    rewrites the notebook. A notebook whose cells differ from its source fails here."""
    import jupytext

    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names == ["bandit.ipynb", "lad_quickstart.ipynb"]
    for name in names:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        assert nb.metadata["jupytext"]["formats"] == "ipynb,py:percent", f"notebooks/{name} is not paired"
        source = jupytext.read(NOTEBOOKS / name.replace(".ipynb", ".py"))
        cells = [(c.cell_type, c.source) for c in nb.cells]
        assert cells == [(c.cell_type, c.source) for c in source.cells], (
            f"notebooks/{name} differs from its .py source: edit the .py and run `jupytext --sync notebooks/*.py`")
