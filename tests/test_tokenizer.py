"""Tokenizer loading with a chat template from a locally trained tiny BPE tokenizer directory."""
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lad_jax.tokenizer import apply_chat_template, load_tokenizer

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["What is 2 + 3? The answer is 5.", "Solve x + 1 = 2, so x = 1."] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(str(d))
    return str(d)


def test_load_and_apply_chat_template(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert tok.padding_side == "left"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = apply_chat_template(tok, "What is 2 + 3?", system="Reason step by step.")
    assert text == ("<|im_start|>system\nReason step by step.<|im_end|>\n"
                    "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    ids = apply_chat_template(tok, [{"role": "user", "content": "x + 1 = 2"}], tokenize=True)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(ids) == "<|im_start|>user\nx + 1 = 2<|im_end|>\n<|im_start|>assistant\n"
    batch = tok(["What is 2 + 3?", "x"], padding=True)
    assert batch["input_ids"][1][0] == tok.pad_token_id  # left padded


def test_template_override_and_missing_template(tok_dir, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    tok = load_tokenizer(tok_dir, chat_template=str(path))
    assert apply_chat_template(tok, "hi", add_generation_prompt=False) == "[hi]"
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        apply_chat_template(tok, "hi")


def test_custom_tokenizer_beside_model_config_keeps_its_ids(tmp_path):
    """An hf_export holds config.json (model_type qwen2) next to our own tokenizer: ids must not change."""
    import json

    from tokenizers import Regex

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "<eos>": 1, "first": 2, "3": 3, "=": 4}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s+"), behavior="removed")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.save_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.encode("first 3 =", add_special_tokens=False) == [2, 3, 4]
