"""notebooks/*.ipynb execute top to bottom on CPU under LAD_NOTEBOOK_SMALL=1 (nbclient, the venv's python3 kernel).

The quickstart runs its HF-model path (the one Colab TPU/GPU users take) against a tiny random Qwen2 checkpoint
and tokenizer built here, so it needs no network: init_from, chat template, the notebook's own reward, LAD
training, the curves from metrics.jsonl and the transformers round trip of the HF export all run for real.
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
    corpus = [f"Give a three-digit number whose digits add up to {s}. Put the number in \\boxed{{{100 + 7 * s}}}."
              for s in range(5, 23)] + ["user assistant system 0123456789"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    config = tiny_config("qwen2", vocab_size=len(fast), max_position_embeddings=256,
                         eos_token_ids=(fast.eos_token_id,), pad_token_id=fast.pad_token_id)
    save_pretrained(create_model(config, seed=0), str(directory))
    return directory


def test_quickstart_notebook_hf_path(tmp_path, tiny_hf_checkpoint):
    runs = tmp_path / "runs"
    env = kernel_env(LAD_NOTEBOOK_INIT_FROM=str(tiny_hf_checkpoint), LAD_NOTEBOOK_RUNS=str(runs))
    nb = execute("lad_quickstart.ipynb", tmp_path, env)
    text = outputs_text(nb)
    assert f"training {tiny_hf_checkpoint}" in text
    run_dir = runs / "quickstart-hf-lad"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in lines if "rollout/reward_mean" in r]
    assert [r["step"] for r in records] == [1, 2]
    assert any("eval/pass@1" in r for r in lines)  # the final evaluation
    assert all(0.0 <= r["rollout/distinct_frac"] <= 1.0 for r in records)
    assert (run_dir / "curves.png").stat().st_size > 0 and images(nb) >= 1
    export = run_dir / "hf_export"
    assert (export / "config.json").exists() and (export / "tokenizer.json").exists()
    assert any(p.suffix == ".safetensors" for p in export.iterdir())
    assert "2 steps logged" in text


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
