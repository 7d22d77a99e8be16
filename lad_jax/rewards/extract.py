"""Pull the final answer or program out of a model completion (pure string functions, linear time)."""
from __future__ import annotations

import re

_BOXED = ("\\boxed", "\\fbox")
_ANSWER_LINE = re.compile(r"(?im)^[^\w\n]*answer[ \t]*:(.*)$")
_BOXED_SPACE = re.compile(r" +([^\s$]+)")


def last_boxed(text: str, max_chars: int = 10_000, max_tries: int = 8) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (nested braces balanced), or `\\boxed 5`; None if absent.

    An unbalanced occurrence is skipped for the one before it; at most `max_tries` occurrences are tried, each
    scanned over at most `max_chars`, so adversarial text stays linear."""
    pos, cmd = max((text.rfind(c), c) for c in _BOXED)
    for _ in range(max_tries):
        if pos < 0:
            return None
        i = pos + len(cmd)
        if text.startswith("{", i):
            depth = 0
            for j in range(i, min(len(text), i + max_chars)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1:j].strip()
        elif text.startswith(" ", i):  # "\boxed 5": up to the next whitespace or $
            m = _BOXED_SPACE.match(text, i, i + max_chars)
            if m:
                return m.group(1)
        pos, cmd = max((text.rfind(c, 0, pos), c) for c in _BOXED)
    return None


def answer_line(text: str) -> str | None:
    """DAPO-Math convention: the text after the last line starting with 'Answer:' (surrounding $ and '.' removed)."""
    matches = _ANSWER_LINE.findall(text)
    if not matches:
        return None
    answer = matches[-1].strip().strip("*").strip().rstrip(".").rstrip()  # also "**Answer:** 5"
    if len(answer) >= 2 and answer.startswith("$") and answer.endswith("$"):
        answer = answer.strip("$").strip()
    return answer or None


MATH_EXTRACTORS = {"boxed": last_boxed, "answer_line": answer_line}


def extract_math_answer(text: str, extractors: tuple[str, ...] = ("boxed", "answer_line")) -> str | None:
    """The answer found by the first extractor (in the given order) that finds one."""
    for name in extractors:
        if name not in MATH_EXTRACTORS:
            raise ValueError(f"unknown math extractor {name!r}; choose from {sorted(MATH_EXTRACTORS)}")
        answer = MATH_EXTRACTORS[name](text)
        if answer:
            return answer
    return None


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.S)


def last_code_block(text: str, languages: tuple[str, ...] | None = ("python", "py", "python3"),
                    allow_untagged: bool = False) -> str | None:
    """Body of the last fenced block whose tag is in `languages` (any tag when None; untagged if allowed)."""
    found = None
    for m in _FENCE.finditer(text):
        tag = m.group(1).lower()
        if languages is None or tag in languages or (allow_untagged and not tag):
            found = m.group(2)
    return found
