"""Loading HF tokenizer directories (tokenizer.json / chat template) and rendering chat prompts."""
from __future__ import annotations

import json
import os

# Classes that mean "the tokenizer.json is the whole truth". transformers 5's AutoTokenizer picks the class from
# config.json's model_type when one sits beside the tokenizer (e.g. an hf_export of a qwen2 policy) and a class such
# as Qwen2Tokenizer rebuilds the pre-tokenizer, which silently changes the ids of a custom tokenizer.
_GENERIC_FAST_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def _declared_class(path: str) -> str | None:
    cfg = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(cfg):
        return None
    with open(cfg) as f:
        return json.load(f).get("tokenizer_class")


def load_tokenizer(path_or_repo_id: str, *, chat_template: str | None = None, padding_side: str = "left"):
    """An HF fast tokenizer from a local directory (no network) or a hub repo id (cache / offline respected).

    `chat_template` overrides the directory's template (a jinja string, or a path to a .jinja file). Padding is on
    the left by default because prompts are left-padded for generation.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if not os.path.isdir(path_or_repo_id) and os.path.exists(path_or_repo_id):
        raise ValueError(f"{path_or_repo_id!r} is a file; pass the tokenizer directory")
    if os.path.isdir(path_or_repo_id) and _declared_class(path_or_repo_id) in _GENERIC_FAST_CLASSES:
        tok = PreTrainedTokenizerFast.from_pretrained(path_or_repo_id, padding_side=padding_side)
    else:
        tok = AutoTokenizer.from_pretrained(path_or_repo_id, padding_side=padding_side)
    if chat_template is not None:
        if os.path.isfile(chat_template):
            with open(chat_template) as f:
                chat_template = f.read()
        tok.chat_template = chat_template
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer {path_or_repo_id!r} defines neither pad_token nor eos_token; "
                             "set pad_token in tokenizer_config.json")
        tok.pad_token = tok.eos_token
    return tok


def apply_chat_template(tokenizer, messages: list[dict] | str, *, system: str | None = None,
                        add_generation_prompt: bool = True, tokenize: bool = False, **template_kwargs):
    """Render `messages` (or a single user string) with the tokenizer's chat template.

    Returns the prompt string, or a list of token ids with `tokenize=True`. Raises if the tokenizer has no template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer has no chat_template; pass chat_template= to load_tokenizer or use a raw "
                         "prompt format")
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if system is not None:
        messages = [{"role": "system", "content": system}] + list(messages)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **template_kwargs)
    if not tokenize:
        return text
    # The template already contains any BOS / special tokens it wants.
    return tokenizer.encode(text, add_special_tokens=False)
