"""lad_jax.data: JSONL/Parquet reading, bad rows, length filter, shuffling, epochs, sharding, resumable state."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lad_jax.data import DataError, PromptLoader, load_rows

WORDS = "<unk> <bos> <eos> <pad> user system assistant : what is plus long".split() + [str(i) for i in range(100)]


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    hf.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    return hf


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _rows(n):
    return [{"question": f"what is {i} plus 1", "solution": str(i + 1), "id": i} for i in range(n)]


def _loader(rows, tokenizer, **kw):
    args = dict(tokenizer=tokenizer, batch_size=4, seed=0, max_prompt_tokens=None, use_chat_template=False,
                shard_index=0, shard_count=1, num_epochs=None)
    args.update(kw)
    return PromptLoader(rows, **args)


def test_jsonl_and_parquet_read_with_glob_and_nested_fields(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", _rows(3))
    (tmp_path / "b.jsonl").write_text(json.dumps(_rows(1)[0]) + "\n\n")  # blank lines are ignored
    pq.write_table(
        pa.Table.from_pylist([{"question": "what is 7", "meta": {"gt": "7"}, "id": 9}]), tmp_path / "c.parquet"
    )
    rows, stats = load_rows(str(tmp_path / "*.jsonl"), prompt_field="question", answer_field="solution",
                            extra_fields=("id",))
    assert stats == {"files": 2, "rows": 4, "bad_rows": 0}
    assert rows[0] == {"prompt": "what is 0 plus 1", "answer": "1", "id": 0}
    prows, _ = load_rows([str(tmp_path / "c.parquet")], prompt_field="question", answer_field="meta.gt",
                         extra_fields=("id",))
    assert prows == [{"prompt": "what is 7", "answer": "7", "id": 9}]


def test_bad_row_error_names_file_and_line_and_skip_counts(tmp_path):
    records = _rows(3)
    del records[1]["solution"]
    path = _write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(DataError, match=r"d\.jsonl:2: .*'solution'"):
        load_rows(path, prompt_field="question", answer_field="solution")
    with open(path, "a") as f:
        f.write("{not json\n")
    rows, stats = load_rows(path, prompt_field="question", answer_field="solution", on_bad_row="skip")
    assert [r["answer"] for r in rows] == ["1", "3"] and stats["bad_rows"] == 2
    with pytest.raises(DataError, match=r"d\.jsonl:4: invalid JSON"):
        load_rows(path, prompt_field="question", answer_field=None)
    pq.write_table(pa.Table.from_pylist([{"question": "a"}, {"question": None}]), tmp_path / "e.parquet")
    with pytest.raises(DataError, match=r"e\.parquet:row 2: .*'question'"):
        load_rows(str(tmp_path / "e.parquet"), prompt_field="question", answer_field=None)
    with pytest.raises(DataError, match="matched no files"):
        load_rows(str(tmp_path / "*.txt"), prompt_field="question", answer_field=None)


def test_chat_template_tokenize_and_drop_too_long(tokenizer):
    rows = _rows(10) + [{"prompt": "long " * 30, "answer": "x"}]
    rows = [{"prompt": r.get("question", r.get("prompt")), "answer": r.get("solution", r.get("answer"))}
            for r in rows]
    loader = _loader(rows, tokenizer, use_chat_template=True, max_prompt_tokens=12, load_stats={"bad_rows": 3})
    assert loader.stats == {"rows": 11, "bad_rows": 3, "dropped_too_long": 1, "kept": 10, "shard_rows": 10}
    batch = next(loader)
    assert len(batch) == 4
    row = batch[0]
    assert row["prompt_text"] == f"user : {row['prompt']} assistant : "
    assert row["prompt_ids"] == tokenizer(row["prompt_text"], add_special_tokens=False)["input_ids"]
    assert row["answer"] == str(int(row["prompt"].split()[2]) + 1)
    plain = next(_loader(rows[:10], tokenizer))
    assert plain[0]["prompt_text"] == plain[0]["prompt"]
    with pytest.raises(DataError, match="need at least batch_size"):
        _loader(rows, tokenizer, max_prompt_tokens=2)


def _ids(loader, n):
    return [[r["id"] for r in next(loader)] for _ in range(n)]


def test_shuffle_deterministic_by_seed_and_epochs_repeat(tokenizer):
    rows = [{"prompt": f"what is {i}", "answer": str(i), "id": i} for i in range(8)]
    a = _ids(_loader(rows, tokenizer, seed=1), 6)
    assert a == _ids(_loader(rows, tokenizer, seed=1), 6)
    assert a != _ids(_loader(rows, tokenizer, seed=2), 6)
    for epoch in range(3):  # every epoch is a permutation of all rows ...
        assert sorted(a[2 * epoch] + a[2 * epoch + 1]) == list(range(8))
    assert a[0] + a[1] != a[2] + a[3]  # ... reshuffled each epoch
    assert a[0] + a[1] != list(range(8))
    finite = _loader(rows, tokenizer, seed=1, num_epochs=2)
    assert [[r["id"] for r in b] for b in finite] == a[:4]


def test_sharding_gives_disjoint_equal_shards(tokenizer):
    rows = [{"prompt": f"what is {i}", "answer": str(i), "id": i} for i in range(26)]
    shards = [_loader(rows, tokenizer, batch_size=2, shard_index=s, shard_count=3, num_epochs=1) for s in range(3)]
    seen = [sorted(r["id"] for b in loader for r in b) for loader in shards]
    assert [len(s) for s in seen] == [8, 8, 8]
    assert not set(seen[0]) & set(seen[1]) and not set(seen[1]) & set(seen[2]) and not set(seen[0]) & set(seen[2])


def test_state_roundtrip_gives_identical_continuation(tokenizer):
    rows = [{"prompt": f"what is {i}", "answer": str(i), "id": i} for i in range(10)]
    loader = _loader(rows, tokenizer, batch_size=3, seed=5)
    _ids(loader, 4)
    state = json.loads(json.dumps(loader.get_state()))
    expected = _ids(loader, 5)
    fresh = _loader(rows, tokenizer, batch_size=3, seed=5)
    fresh.set_state(state)
    assert _ids(fresh, 5) == expected
    with pytest.raises(DataError, match="seed"):
        _loader(rows, tokenizer, batch_size=3, seed=6).set_state(state)
