"""Continuous batching (`generate_continuous`): same tokens as the static sampler and transformers, whatever the slot
count; per-request budgets; slot refill without recompiling; sharded over (data, fsdp)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lad_jax import sampler  # noqa: E402
from lad_jax.models import from_pretrained, tiny_config  # noqa: E402
from lad_jax.sampler import generate  # noqa: E402
from lad_jax.sampler_continuous import default_decode_slots, generate_continuous  # noqa: E402
from lad_jax.sharding import make_mesh  # noqa: E402
from tests.test_sampler import _hf_checkpoint, _hf_greedy  # noqa: E402

PAD = 0
PROMPTS = [[5, 17, 33, 2, 9], [100, 7, 56, 201, 3, 88, 12, 41, 19, 250, 6, 77], [42]]
MAX_NEW = 24
G = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    config = tiny_config("qwen2", tie_word_embeddings=False, pad_token_id=PAD)
    directory = str(tmp_path_factory.mktemp("cb_ckpt"))
    hf = _hf_checkpoint(directory, config)
    return hf, from_pretrained(directory), directory


def _same(a, b, atol=1e-5):
    assert a.responses() == b.responses()
    assert a.finish_reasons() == b.finish_reasons()
    np.testing.assert_array_equal(np.asarray(a.tokens_bt), np.asarray(b.tokens_bt))
    np.testing.assert_allclose(np.asarray(a.logprobs_bt), np.asarray(b.logprobs_bt), atol=atol)
    np.testing.assert_array_equal(np.asarray(a.prompt_index_b), np.asarray(b.prompt_index_b))
    np.testing.assert_array_equal(np.asarray(a.prompt_tokens_bs), np.asarray(b.prompt_tokens_bs))


def test_greedy_equals_transformers_and_static(models):
    hf, model, _ = models
    static = generate(model, PROMPTS, max_new_tokens=MAX_NEW, temperature=0.0, pad_id=PAD)
    stop = static.responses()[0][5]  # from the middle of row 0's response: rows stop at different steps
    stops = (stop, 255)
    ref = _hf_greedy(hf, PROMPTS, MAX_NEW, stops)
    static = generate(model, PROMPTS, max_new_tokens=MAX_NEW, temperature=0.0, pad_id=PAD, stop_token_ids=stops)
    for slots in (2,):  # fewer slots than requests: slots are refilled mid-loop
        out = generate_continuous(model, PROMPTS, max_new_tokens=MAX_NEW, temperature=0.0, pad_id=PAD,
                                  stop_token_ids=stops, decode_slots=slots)
        assert out.responses() == ref
        _same(out, static)
    assert "stop" in static.finish_reasons() and "length" in static.finish_reasons()


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.8, top_k=20, top_p=0.9)])
def test_sampled_tokens_do_not_depend_on_scheduling(models, sampling):
    """Sampled: identical tokens at every slot count (1 slot per request down to 2 slots for 9 requests)."""
    _, model, _ = models
    kw = dict(max_new_tokens=MAX_NEW, num_samples=G, pad_id=PAD, seed=7, **sampling)
    static = generate(model, PROMPTS, **kw)
    stop = static.responses()[4][3]  # from the middle of one response: rows stop at different steps
    static = generate(model, PROMPTS, stop_token_ids=[stop], **kw)
    lengths = np.asarray(static.lengths_b)
    assert lengths.min() < MAX_NEW and len(set(lengths.tolist())) > 2  # a real mix of lengths
    stats = {}
    for slots in (2, 9):
        out = generate_continuous(model, PROMPTS, stop_token_ids=[stop], decode_slots=slots, stats=stats, **kw)
        _same(out, static)
        assert out.num_samples == G
        # each model step serves every live slot: a request of n tokens takes n - 1 steps after its prefill token
        assert stats["steps"] >= (lengths - 1).sum() / slots
    assert stats["steps"] == (lengths - 1).max()  # one slot per request: as many steps as the longest row
    other = generate_continuous(model, PROMPTS, stop_token_ids=[stop], decode_slots=2, **dict(kw, seed=8))
    assert other.responses() != static.responses()


def test_per_request_budgets_and_no_recompilation(models):
    _, model, _ = models
    kw = dict(max_new_tokens=MAX_NEW, num_samples=G, pad_id=PAD, seed=3, temperature=1.0, decode_slots=4)
    full = generate(model, PROMPTS, **{k: v for k, v in kw.items() if k != "decode_slots"})
    budgets = np.random.default_rng(0).integers(1, MAX_NEW + 1, len(PROMPTS) * G)
    budgets[0] = 1
    stats = {}
    out = generate_continuous(model, PROMPTS, max_new_tokens_r=budgets.tolist(), stats=stats, **kw)
    for r, (got, ref) in enumerate(zip(out.responses(), full.responses())):
        assert got == ref[: budgets[r]]  # a budget truncates the request's stream, nothing else changes
        np.testing.assert_allclose(np.asarray(out.logprobs_bt)[r, : budgets[r]],
                                   np.asarray(full.logprobs_bt)[r, : budgets[r]], atol=1e-5)
    assert out.finish_reasons() == ["length"] * len(budgets)
    assert stats["slot_steps"] < budgets.sum() * 1.5
    traces = sampler.compile_counts()["continuous"]
    generate_continuous(model, [[3, 1, 4], [1, 5], [6, 2, 2, 2]], max_new_tokens_r=budgets[::-1].tolist(),
                        **dict(kw, seed=11))
    # new prompts (same count and bucket), budgets and seed: the same program
    assert sampler.compile_counts()["continuous"] == traces
    with pytest.raises(ValueError, match="max_new_tokens_r"):
        generate_continuous(model, PROMPTS, max_new_tokens_r=[MAX_NEW + 1] * len(budgets), **kw)


def test_sharded_equals_single_device(models):
    _, model, directory = models
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = from_pretrained(directory, mesh=mesh)
    prompts = PROMPTS + [[9, 8, 7]]
    kw = dict(max_new_tokens=MAX_NEW, num_samples=2, pad_id=PAD, seed=5, temperature=1.0, stop_token_ids=[7])
    single = generate(model, prompts, **kw)
    assert default_decode_slots(len(prompts) * 2, 4) == 4  # 8 requests over 4 slots, one per (data, fsdp) shard
    out = generate_continuous(sharded, prompts, mesh=mesh, **kw)
    _same(out, single)


def test_windows_grow_and_shrink(models):
    """Over several attention windows (64 new tokens: windows of 32 and 64 response slots) a phase ends when a slot
    outgrows its window or the longest slot retires and the smaller window covers the rest; tokens stay the static
    sampler's."""
    _, model, _ = models
    kw = dict(max_new_tokens=64, num_samples=G, pad_id=PAD, seed=4, temperature=1.0)
    full = generate(model, PROMPTS, **kw)
    # 2 slots (no stop ids: the budgets fix the schedule): slot 0 serves request 0 and slot 1 requests 1-5, so
    # request 0 runs past 32 tokens (phase 2: grow), retires at step 63 while request 5 is at ~17 tokens (phase 3:
    # shrink), and request 5 runs past 32 (phase 4: grow)
    budgets = [64, 5, 3, 40, 2, 64, 7, 1, 9]
    stats = {}
    out = generate_continuous(model, PROMPTS, max_new_tokens_r=budgets, decode_slots=2, stats=stats, **kw)
    for r, (got, ref) in enumerate(zip(out.responses(), full.responses())):
        assert got == ref[: budgets[r]]
        np.testing.assert_allclose(np.asarray(out.logprobs_bt)[r, : budgets[r]],
                                   np.asarray(full.logprobs_bt)[r, : budgets[r]], atol=1e-5)
    assert stats["phases"] == 4, stats


def test_bad_input_is_rejected_as_in_generate(models):
    """The argument checks are `sampler.prompt_batch`'s, shared with `generate`."""
    _, model, _ = models
    with pytest.raises(ValueError, match="generate_continuous: prompts\\[1\\] is empty"):
        generate_continuous(model, [[1], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="generate_continuous: stop_token_ids"):
        generate_continuous(model, [[1]], max_new_tokens=4, stop_token_ids=[10**6])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate_continuous(model, [[1]], max_new_tokens=model.config.max_position_embeddings)
    with pytest.raises(ValueError, match="decode_phases"):
        generate_continuous(model, [[1]], max_new_tokens=4, decode_phases=0)


def test_the_tpu_write_form_gives_the_same_tokens(models):
    """On TPU the step writes each slot's key/value by a one-hot select over the window (a scatter made the TPU
    compiler copy the slot caches); traced for "tpu" here on CPU, it gives the scatter form's tokens and log-probs."""
    import jax

    from lad_jax import sampler_loop
    from lad_jax.models.attention import target_platform

    _, model, _ = models
    kw = dict(max_new_tokens=MAX_NEW, num_samples=G, pad_id=PAD, seed=5, temperature=1.0, decode_slots=2)
    cpu = generate_continuous(model, PROMPTS, **kw)
    jax.clear_caches()  # the phase was traced for CPU with these shapes; trace it again for the TPU form
    before = sampler_loop.TRACES["continuous"]
    with target_platform("tpu"):
        tpu = generate_continuous(model, PROMPTS, **kw)
    assert sampler_loop.TRACES["continuous"] > before
    _same(tpu, cpu)
