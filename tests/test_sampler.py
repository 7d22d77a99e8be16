"""generate(): greedy parity with transformers, on-policy log-probs, groups, seeds, compile counts, sharding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lad_jax import sampler  # noqa: E402
from lad_jax.models import from_pretrained, tiny_config, token_logprobs  # noqa: E402
from lad_jax.sampler import generate  # noqa: E402
from lad_jax.sharding import make_mesh  # noqa: E402

PAD = 0
# different lengths -> left padding inside the 16-token bucket
PROMPTS = [[5, 17, 33, 2, 9], [100, 7, 56, 201, 3, 88, 12, 41, 19, 250, 6, 77], [42]]
MAX_NEW = 12


def _hf_checkpoint(directory, config, seed=0):
    hf_config = transformers.AutoConfig.for_model(**config.to_hf_config())
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    with torch.no_grad():
        # larger-than-default random weights: well-separated logits, so greedy ties cannot flip the argmax
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    model = model.eval()
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    config = tiny_config("qwen2", tie_word_embeddings=False, pad_token_id=PAD)
    directory = str(tmp_path_factory.mktemp("sampler_ckpt"))
    hf = _hf_checkpoint(directory, config)
    return hf, from_pretrained(directory), directory


def _hf_greedy(hf, prompts, max_new, stop_ids):
    lp = max(map(len, prompts))
    ids = np.full((len(prompts), lp), PAD, np.int64)
    attn = np.zeros((len(prompts), lp), np.int64)
    for i, p in enumerate(prompts):
        ids[i, lp - len(p):] = p
        attn[i, lp - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(attn), do_sample=False,
            max_new_tokens=max_new, eos_token_id=list(stop_ids) or None, pad_token_id=PAD,
        )
    out = out[:, lp:].numpy()
    res = []
    for row in out:
        row = row.tolist()
        for j, t in enumerate(row):
            if t in stop_ids:
                row = row[: j + 1]
                break
        res.append(row)
    return res


def test_greedy_matches_transformers_with_padding_and_stops(models):
    hf, model, _ = models
    free = generate(model, PROMPTS, max_new_tokens=MAX_NEW, temperature=0.0, pad_id=PAD)
    assert free.responses() == _hf_greedy(hf, PROMPTS, MAX_NEW, ())
    assert free.finish_reasons() == ["length"] * 3
    # stop tokens: one taken from the middle of row 0's response, so row 0 stops early
    first = free.responses()[0]
    stop = first[4]
    out = generate(model, PROMPTS, max_new_tokens=MAX_NEW, temperature=0.0, pad_id=PAD, stop_token_ids=[stop, 255])
    ref = _hf_greedy(hf, PROMPTS, MAX_NEW, (stop, 255))
    assert out.responses() == ref
    lengths = np.asarray(out.lengths_b)
    assert lengths[0] == first.index(stop) + 1 < MAX_NEW
    for i, r in enumerate(out.responses()):
        assert out.finish_reasons()[i] == ("stop" if r[-1] in (stop, 255) else "length")
    # padding after the end: pad tokens and zero log-probs
    toks, logp, mask = np.asarray(out.tokens_bt), np.asarray(out.logprobs_bt), np.asarray(out.mask_bt)
    assert np.all(toks[~mask] == PAD) and np.all(logp[~mask] == 0.0) and np.all(logp[mask] < 0.0)


def _training_logprobs(model, out, temperature):
    """Recompute the response log-probs with the training forward (no cache) over prompt + response."""
    prompt, resp = np.asarray(out.prompt_tokens_bs), np.asarray(out.tokens_bt)
    lp = prompt.shape[1]
    plen = np.asarray(out.prompt_lengths_b)
    valid = np.concatenate([np.arange(lp)[None, :] >= lp - plen[:, None], np.asarray(out.mask_bt)], axis=1)
    tokens = np.concatenate([prompt, resp], axis=1)
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    t = tokens.shape[1]
    mask = np.tril(np.ones((t, t), bool))[None] & valid[:, None, :]
    targets = np.concatenate([tokens[:, 1:], np.zeros_like(tokens[:, :1])], axis=1)
    logp = jax.jit(lambda *a: token_logprobs(model, *a, temperature=temperature, chunk_size=8))(
        jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask), jnp.asarray(targets))
    return np.asarray(logp)[:, lp - 1: lp - 1 + resp.shape[1]]


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 0.9), (1.0, 20, 1.0), (0.0, 0, 1.0)])
def test_behaviour_logprobs_equal_training_forward(models, temperature, top_k, top_p):
    _, model, _ = models
    out = generate(model, PROMPTS, num_samples=3, max_new_tokens=MAX_NEW, temperature=temperature, top_k=top_k,
                   top_p=top_p, stop_token_ids=[3], seed=7, pad_id=PAD)
    ref = _training_logprobs(model, out, temperature if temperature > 0 else 1.0)
    mask = np.asarray(out.mask_bt)
    diff = np.abs(np.asarray(out.logprobs_bt) - ref)[mask].max()
    print(f"sampler vs training-forward log-prob max-abs-diff: {diff:.2e}")
    assert diff <= 1e-4


def test_decode_windows():
    assert sampler.decode_windows(64, 128, 4) == ((32, 96), (64, 128), (96, 160), (128, 192))
    assert sampler.decode_windows(16, 100, 4) == ((48, 64), (80, 96), (100, 116))
    assert sampler.decode_windows(16, 12, 4) == ((12, 28),)  # too short to split
    assert sampler.decode_windows(32, 128, 1) == ((128, 160),)


def test_phased_decode_equals_one_window_and_transformers(models):
    """96 new tokens = 3 attention windows: same tokens as transformers and as a single full-cache window, including
    rows that stop in the first window and rows that stop in the second."""
    hf, model, _ = models
    new = 96
    free = generate(model, PROMPTS, max_new_tokens=new, temperature=0.0, pad_id=PAD)
    assert free.responses() == _hf_greedy(hf, PROMPTS, new, ())
    r0, r1 = free.responses()[:2]
    # a stop token ending prompt 0 inside window 1 and one ending prompt 1 inside window 2 (first occurrences)
    a = next(r0[i] for i in range(4, 30) if r0[i] not in r0[:i] and r0[i] not in r1[:64])
    b = next(r1[j] for j in range(33, 64) if r1[j] not in r1[:j] and r1[j] not in r0[: r0.index(a)])
    stops = (a, b)
    for kw in (dict(temperature=0.0), dict(temperature=1.0, top_p=0.9, seed=5)):
        before = sampler.compile_counts().get("decode", 0)
        phased = generate(model, PROMPTS, num_samples=2, max_new_tokens=new, stop_token_ids=stops, pad_id=PAD, **kw)
        assert sampler.compile_counts().get("decode", 0) - before in (0, 3)  # one compile per window
        whole = generate(model, PROMPTS, num_samples=2, max_new_tokens=new, stop_token_ids=stops, pad_id=PAD,
                         decode_phases=1, **kw)
        assert phased.responses() == whole.responses()
        np.testing.assert_allclose(np.asarray(phased.logprobs_bt), np.asarray(whole.logprobs_bt), atol=1e-5)
        np.testing.assert_array_equal(np.asarray(phased.stopped_b), np.asarray(whole.stopped_b))
        if kw["temperature"] == 0.0:  # prompt 0 stops in window 1 (steps < 32), prompt 1 in window 2 (32..63)
            lengths = np.asarray(phased.lengths_b)
            assert lengths[0] == lengths[1] < 32 < lengths[2] == lengths[3] < 64, lengths
    # a batch that stops inside the first window runs no steps in the later ones
    early = generate(model, PROMPTS[:1], max_new_tokens=new, stop_token_ids=[a], temperature=0.0, pad_id=PAD)
    assert early.responses() == [r0[: r0.index(a) + 1]]


def test_groups_prefill_once_and_attribution(models):
    _, model, _ = models
    g = 4
    before = sampler.prefill_rows()
    out = generate(model, PROMPTS, num_samples=g, max_new_tokens=MAX_NEW, temperature=1.0, seed=3, pad_id=PAD)
    after = sampler.prefill_rows()
    assert after["calls"] - before.get("calls", 0) == 1
    assert after["rows"] - before.get("rows", 0) == len(PROMPTS)  # not len(PROMPTS) * g
    np.testing.assert_array_equal(np.asarray(out.prompt_index_b), np.repeat(np.arange(3), g))
    prompt_rows = np.asarray(out.prompt_tokens_bs)
    for r in range(3 * g):
        p = PROMPTS[r // g]
        assert prompt_rows[r, -len(p):].tolist() == p and np.all(prompt_rows[r, : -len(p)] == PAD)
    assert out.tokens_bt.shape == (3 * g, MAX_NEW)
    # each sample of a group has its own noise
    resp = out.responses()
    assert len({tuple(r) for r in resp[:g]}) > 1
    # greedy rows of a group equal the prompt decoded alone, and prefilling every copy gives the same result
    grouped = generate(model, PROMPTS, num_samples=g, max_new_tokens=MAX_NEW, temperature=0.0, pad_id=PAD)
    every = generate(model, PROMPTS, num_samples=g, max_new_tokens=MAX_NEW, temperature=0.0, pad_id=PAD,
                     share_prefix=False)
    assert sampler.prefill_rows()["rows"] - after["rows"] == len(PROMPTS) + len(PROMPTS) * g
    alone = [generate(model, [p], max_new_tokens=MAX_NEW, temperature=0.0, pad_id=PAD).responses()[0]
             for p in PROMPTS]
    assert grouped.responses() == every.responses() == [alone[r // g] for r in range(3 * g)]
    np.testing.assert_allclose(np.asarray(grouped.logprobs_bt), np.asarray(every.logprobs_bt), atol=1e-5)


def test_seeds_and_no_recompilation(models):
    _, model, _ = models
    kw = dict(num_samples=2, max_new_tokens=MAX_NEW, top_p=0.95, pad_id=PAD)
    a = generate(model, PROMPTS, temperature=1.0, seed=11, **kw)
    counts = sampler.compile_counts()
    b = generate(model, PROMPTS, temperature=1.0, seed=11, **kw)
    c = generate(model, PROMPTS, temperature=0.8, seed=12, **kw)
    d = generate(model, PROMPTS, temperature=1.0, seed=None, **kw)
    e = generate(model, PROMPTS, temperature=1.0, seed=None, **kw)
    # another prompt length inside the same 16-token bucket
    generate(model, [p[:2] for p in PROMPTS], temperature=1.3, seed=1, **dict(kw, top_p=0.5))
    assert sampler.compile_counts() == counts
    np.testing.assert_array_equal(np.asarray(a.tokens_bt), np.asarray(b.tokens_bt))
    np.testing.assert_array_equal(np.asarray(a.logprobs_bt), np.asarray(b.logprobs_bt))
    for x, y in ((a, c), (a, d), (d, e)):
        assert (np.asarray(x.tokens_bt) != np.asarray(y.tokens_bt)).mean() > 0.3
    # a new static shape does compile (the counter is live)
    generate(model, PROMPTS, temperature=1.0, seed=1, **dict(kw, max_new_tokens=MAX_NEW + 1))
    assert sampler.compile_counts()["decode"] == counts["decode"] + 1


def test_sharded_greedy_equals_single_device(models):
    _, model, directory = models
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = from_pretrained(directory, mesh=mesh)
    prompts = PROMPTS + [[9, 8, 7]]  # 4 prompts x 2 samples = 8 rows over data*fsdp = 4
    # 64 new tokens: two attention windows, so the sharded cache is also grown between decode phases
    single = generate(model, prompts, num_samples=2, max_new_tokens=64, temperature=0.0, pad_id=PAD)
    out = generate(sharded, prompts, num_samples=2, max_new_tokens=64, temperature=0.0, pad_id=PAD, mesh=mesh)
    assert len(out.tokens_bt.sharding.device_set) == 8
    assert out.responses() == single.responses()
    np.testing.assert_allclose(np.asarray(out.logprobs_bt), np.asarray(single.logprobs_bt), atol=1e-5)
    # also under jax.set_mesh, with a row count that does not divide the data axes (3 prompts)
    with jax.set_mesh(mesh):
        ctx = generate(sharded, PROMPTS, max_new_tokens=MAX_NEW, temperature=0.0, pad_id=PAD)
    assert ctx.responses() == generate(model, PROMPTS, max_new_tokens=MAX_NEW, temperature=0.0,
                                       pad_id=PAD).responses()


def test_bad_input_is_rejected(models):
    _, model, _ = models
    with pytest.raises(ValueError, match="prompts\\[1\\] is empty"):
        generate(model, [[1], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="stop_token_ids"):
        generate(model, [[1]], max_new_tokens=4, stop_token_ids=[10**6])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], max_new_tokens=4, top_p=0.0)


def test_generate_text_applies_chat_template(models):
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lad_jax.tokenizer import apply_chat_template

    words = "<pad> <unk> <eos> user system assistant : what is plus".split() + [str(i) for i in range(100)]
    raw = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}assistant : {% endif %}")
    _, model, _ = models
    prompts = ["what is 2 plus 3", "what is 10 plus 20 plus 30"]
    out, texts = sampler.generate_text(model, tok, prompts, max_new_tokens=MAX_NEW, temperature=0.0)
    ids = [apply_chat_template(tok, p, tokenize=True) for p in prompts]
    assert ids[0][:3] == tok.convert_tokens_to_ids(["user", ":", "what"])
    direct = generate(model, ids, max_new_tokens=MAX_NEW, temperature=0.0, stop_token_ids=[tok.eos_token_id],
                      pad_id=tok.pad_token_id)
    assert out.responses() == direct.responses()
    for i, p in enumerate(ids):
        assert np.asarray(out.prompt_tokens_bs)[i, -len(p):].tolist() == p
        assert texts[i] == tok.decode(out.responses()[i], skip_special_tokens=True)
