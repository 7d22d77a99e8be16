"""Prompt data: JSONL/Parquet rows -> tokenized, shuffled, sharded, checkpointable prompt batches (grain).

Two steps:

* `load_rows(paths, prompt_field=..., answer_field=...)` reads every file (local or remote URL such as
  ``gs://bucket/x-*.parquet``; paths may be glob patterns) through fsspec and returns plain row dicts
  ``{"prompt", "answer", <extra fields>}`` plus load statistics. Field names may be dotted paths into nested
  records (``reward_model.ground_truth``). A row missing a required field raises `DataError` naming the file and
  line (JSONL) or row (Parquet), unless ``on_bad_row="skip"``, which skips and counts it.
* `PromptLoader(rows, tokenizer=..., batch_size=..., seed=...)` renders the optional chat template, tokenizes,
  drops (and counts) prompts longer than ``max_prompt_tokens``, optionally shards the kept rows, and iterates
  batches (lists of row dicts) of a grain ``MapDataset`` pipeline ``source -> shuffle(seed) -> repeat -> batch``.
  Each epoch is reshuffled; ``num_epochs=None`` repeats forever. `get_state()` returns a JSON-serialisable dict
  and `set_state()` restores the exact position, so the data iterator can live in a checkpoint.

Tokenization convention: with the chat template the template text already carries any BOS token, so it is
tokenized with ``add_special_tokens=False``; without a template the tokenizer's own special tokens are added
(``add_special_tokens=True``), as a plain ``tokenizer(prompt)`` call would.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Iterator, Sequence

import fsspec
import grain
import numpy as np

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_PARQUET_SUFFIXES = (".parquet", ".pq")
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
_MISSING = object()


class DataError(ValueError):
    """Bad input data: unreadable file, unknown format or a row missing a required field."""


def _file_format(path: str) -> str:
    name = path.lower()
    for suffix in _COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    raise DataError(
        f"{path}: unknown data file type; use one of {_JSONL_SUFFIXES + _PARQUET_SUFFIXES} "
        f"(JSONL may be compressed with {_COMPRESSION_SUFFIXES})"
    )


def expand_paths(paths: str | Sequence[str]) -> list[str]:
    """Expands glob patterns (local or remote) into a sorted, de-duplicated list of file URLs."""
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise DataError("no data paths given; set the data file path(s)")
    files: list[str] = []
    for pattern in paths:
        fs, _ = fsspec.core.url_to_fs(pattern)
        if any(ch in pattern for ch in "*?["):
            matches = sorted(fs.glob(pattern))
            if not matches:
                raise DataError(f"{pattern}: glob pattern matched no files")
            files.extend(fs.unstrip_protocol(m) if "://" in pattern else m for m in matches)
        else:
            if not fs.exists(pattern):
                raise DataError(f"{pattern}: data file does not exist")
            files.append(pattern)
    return list(dict.fromkeys(files))


def _get_field(record: Any, field: str) -> Any:
    value = record
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _iter_records(path: str) -> Iterator[tuple[str, Any]]:
    """Yields (location, record) with location like 'file:LINE' (JSONL) or 'file:row N' (Parquet)."""
    fmt = _file_format(path)
    if fmt == "jsonl":
        with fsspec.open(path, "rt", encoding="utf-8", compression="infer") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})")
    else:
        import pyarrow.parquet as pq

        with fsspec.open(path, "rb") as f:
            table = pq.read_table(f)
        for row_no, record in enumerate(table.to_pylist(), start=1):
            yield f"{path}:row {row_no}", record


def load_rows(
    paths: str | Sequence[str],
    *,
    prompt_field: str,
    answer_field: str | None,
    extra_fields: Sequence[str] = (),
    on_bad_row: str = "error",
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Reads JSONL/Parquet rows into dicts {"prompt", "answer", *extra_fields}.

    `prompt_field`, `answer_field` and `extra_fields` are required in every row (a missing key or null value is a
    bad row); `answer_field=None` means rows carry no answer ("answer" is None). Values are kept as read (the
    prompt may be a string or a list of chat messages {"role", "content"}). Extra fields keep their dotted name.
    Returns (rows, stats) with stats {"files", "rows", "bad_rows"}.
    """
    if on_bad_row not in ("error", "skip"):
        raise DataError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if not prompt_field:
        raise DataError("prompt_field must name the prompt column")
    required = [("prompt", prompt_field)]
    if answer_field is not None:
        required.append(("answer", answer_field))
    required += [(name, name) for name in extra_fields]
    files = expand_paths(paths)
    rows: list[dict[str, Any]] = []
    bad = 0
    for path in files:
        for where, record in _iter_records(path):
            problem = None
            if isinstance(record, DataError):
                problem = str(record)
            elif not isinstance(record, dict):
                problem = f"{where}: expected a JSON object per line, got {type(record).__name__}"
            else:
                row: dict[str, Any] = {"answer": None}
                for key, field in required:
                    value = _get_field(record, field)
                    if value is _MISSING or value is None:
                        have = sorted(record)
                        problem = (
                            f"{where}: row is missing required field {field!r} (fields present: {have}); "
                            "fix the data, set the field name (data.prompt_field / data.answer_field), "
                            "or set data.on_bad_row=skip"
                        )
                        break
                    row[key] = value
                prompt = row.get("prompt")
                if problem is None and not (isinstance(prompt, str) or _is_messages(prompt)):
                    problem = (
                        f"{where}: field {prompt_field!r} must be a string or a list of "
                        f"{{'role', 'content'}} messages, got {type(prompt).__name__}"
                    )
            if problem is not None:
                if on_bad_row == "error":
                    raise DataError(problem)
                bad += 1
                continue
            rows.append(row)
    return rows, {"files": len(files), "rows": len(rows), "bad_rows": bad}


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )


def render_prompt(
    prompt: str | list[dict[str, str]], tokenizer: Any, *, use_chat_template: bool, system_prompt: str | None
) -> str:
    """The exact text the policy sees for a prompt (chat template applied when requested)."""
    if not use_chat_template:
        if not isinstance(prompt, str):
            raise DataError("a prompt given as chat messages needs use_chat_template=True")
        if system_prompt:
            raise DataError("system_prompt needs use_chat_template=True")
        return prompt
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("use_chat_template=True but the tokenizer has no chat_template; set it or disable it")
    messages = list(prompt) if not isinstance(prompt, str) else [{"role": "user", "content": prompt}]
    if system_prompt:
        messages = [{"role": "system", "content": system_prompt}] + messages
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def tokenize_prompts(
    rows: Sequence[dict[str, Any]], tokenizer: Any, *, use_chat_template: bool, system_prompt: str | None = None
) -> tuple[list[str], list[list[int]]]:
    """(rendered prompt texts, token ids) for rows' "prompt" values (see the module doc's tokenization rule)."""
    texts = [
        render_prompt(r["prompt"], tokenizer, use_chat_template=use_chat_template, system_prompt=system_prompt)
        for r in rows
    ]
    if not texts:
        return [], []
    ids = tokenizer(texts, add_special_tokens=not use_chat_template)["input_ids"]
    return texts, [[int(t) for t in x] for x in ids]


class PromptLoader:
    """Iterator over batches of prompt rows; each batch is a list of `batch_size` dicts.

    Each row dict holds "prompt" (as read), "prompt_text" (what was tokenized), "prompt_ids" (list[int]),
    "answer" and the extra fields. By default (`shard_count=1`) every process iterates the same global batches (what
    the trainer does: hosts hold the whole batch). With `shard_count > 1` the kept rows (after the length filter)
    are sharded round-robin and truncated to equal shard sizes, so every shard has the same number of batches. Batches may span an epoch
    boundary; with a finite `num_epochs` the trailing partial batch is dropped and iteration then stops.
    """

    def __init__(
        self,
        rows: Sequence[dict[str, Any]],
        *,
        tokenizer: Any,
        batch_size: int,
        seed: int,
        max_prompt_tokens: int | None,
        use_chat_template: bool,
        shard_index: int = 0,
        shard_count: int = 1,
        num_epochs: int | None = None,
        system_prompt: str | None = None,
        load_stats: dict[str, int] | None = None,
    ):
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= shard_index < shard_count:
            raise DataError(f"shard_index {shard_index} must be in [0, shard_count={shard_count})")
        if num_epochs is not None and num_epochs <= 0:
            raise DataError(f"num_epochs must be positive or None (forever), got {num_epochs}")
        if max_prompt_tokens is not None and max_prompt_tokens <= 0:
            raise DataError(f"max_prompt_tokens must be positive or None, got {max_prompt_tokens}")

        texts, ids = tokenize_prompts(
            rows, tokenizer, use_chat_template=use_chat_template, system_prompt=system_prompt
        )
        kept = []
        for row, text, prompt_ids in zip(rows, texts, ids):
            if max_prompt_tokens is not None and len(prompt_ids) > max_prompt_tokens:
                continue
            kept.append({**row, "prompt_text": text, "prompt_ids": prompt_ids})
        dropped = len(rows) - len(kept)
        per_shard = len(kept) // shard_count
        self._rows = kept[shard_index::shard_count][:per_shard]
        if len(self._rows) < batch_size:
            raise DataError(
                f"shard {shard_index}/{shard_count} has {len(self._rows)} prompts after dropping {dropped} longer "
                f"than max_prompt_tokens={max_prompt_tokens}; need at least batch_size={batch_size}"
            )
        self.stats = {
            "rows": len(rows),
            "bad_rows": int((load_stats or {}).get("bad_rows", 0)),
            "dropped_too_long": dropped,
            "kept": len(kept),
            "shard_rows": len(self._rows),
        }
        self.batch_size = batch_size
        self._fingerprint = {
            "seed": int(seed),
            "batch_size": batch_size,
            "shard_index": shard_index,
            "shard_count": shard_count,
            "shard_rows": len(self._rows),
            "num_epochs": num_epochs,
        }
        dataset = (
            grain.MapDataset.range(len(self._rows))
            .shuffle(seed=int(seed))
            .repeat(num_epochs)
            .batch(batch_size, drop_remainder=True, batch_fn=np.asarray)
        )
        # The rows are already in memory: no worker threads or prefetch buffer needed.
        self._iter = iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))

    @property
    def batches_per_epoch(self) -> float:
        return len(self._rows) / self.batch_size

    def __iter__(self) -> "PromptLoader":
        return self

    def __next__(self) -> list[dict[str, Any]]:
        indices = next(self._iter)
        return [copy.deepcopy(self._rows[int(i)]) for i in indices]

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable iterator position (plus a fingerprint checked on restore)."""
        return {"grain": dict(self._iter.get_state()), **self._fingerprint}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a `get_state()` position; the loader must be built from the same data and settings."""
        for key, value in self._fingerprint.items():
            if state.get(key) != value:
                raise DataError(
                    f"data iterator state does not match this loader: {key}={state.get(key)!r} in the checkpoint "
                    f"but {value!r} now; resume with the same data files and data settings"
                )
        self._iter.set_state(state["grain"])
