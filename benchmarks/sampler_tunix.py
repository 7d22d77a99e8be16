"""Tunix's native JAX sampler timed on an HF Qwen2 checkpoint (the baseline for benchmarks/sampler.py, issue 4).

Run with the Python of a separate venv that has google-tunix installed (Tunix pins its own dependency set, so it does
not live in the lad_jax venv); benchmarks/sampler.py calls this script with `--tunix-python PATH`. The venv used for
the numbers in the README (Tunix 0.1.7 works with lad_jax's jax 0.10.2 / flax 0.12.8):

    python3.11 -m venv /work/tunix-venv
    /work/tunix-venv/bin/pip install "google-tunix==0.1.7" "torch==2.13.0" "jax==0.10.2" "jaxlib==0.10.2" "flax==0.12.8"
    /work/tunix-venv/bin/python benchmarks/sampler_tunix.py --checkpoint DIR --prompts-file prompts.json \
        --new-tokens 128 --repeats 5 --modes greedy,sampled_t1

The checkpoint is loaded into Tunix's own Qwen2 (`tunix.models.qwen2`: ModelConfig built from config.json, Tunix's
safetensors loader, fp32) and generated with `tunix.generate.sampler.Sampler`. Tunix's sampler takes strings and a
tokenizer, so an id tokenizer maps "12 7 301" <-> [12, 7, 301] 1:1 (checked against the prompt ids); its pad and eos
ids lie outside the vocabulary, so no generated token stops a row or is masked as padding, and every row must come back
with exactly `--new-tokens` tokens (asserted). Greedy = Tunix's greedy mode; sampled_t1 = temperature 1, top_p 1,
no top-k (full vocabulary), a different seed per call. The first call compiles; then `--repeats` timed calls, each
ending with Tunix's own device_get of the tokens. Prints one JSON object.

Correctness (unless --skip-check): greedy tokens of Tunix vs transformers `generate` on the same checkpoint and
prompts (fraction of equal tokens, rows fully equal), and a teacher-forced check on prompt + Tunix's greedy tokens:
max |logit difference| between Tunix's Qwen2 forward and transformers' forward, and the fraction of positions whose
argmax agrees. The check needs torch + transformers in the Tunix venv.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import time

import numpy as np


def tunix_config(checkpoint: str):
    """Tunix's Qwen2 ModelConfig from the checkpoint's config.json (no field guessed from a model name)."""
    import jax.numpy as jnp
    from tunix.models.qwen2 import model as qwen2_model

    with open(os.path.join(checkpoint, "config.json")) as f:
        hf = json.load(f)
    if hf.get("model_type") != "qwen2":
        raise ValueError(f"config.json model_type={hf.get('model_type')!r}: this benchmark loads Qwen2 only")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}: Tunix's Qwen2 MLP is SiLU-gated")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type != "default":
        raise ValueError(f"config.json rope_type={rope_type!r}: Tunix's Qwen2 implements only default RoPE")
    layer_types = hf.get("layer_types") or ["full_attention"]
    if hf.get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
        raise ValueError("config.json uses sliding-window attention: Tunix's Qwen2 implements full attention only")
    heads = hf["num_attention_heads"]
    return qwen2_model.ModelConfig(
        num_layers=hf["num_hidden_layers"],
        vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"],
        num_heads=heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=hf["rms_norm_eps"],
        use_tied_embedding=bool(hf.get("tie_word_embeddings", False)),
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    )


def load_model(checkpoint: str, cfg):
    """Tunix's safetensors loader; every parameter must come from the file (the loader keeps unmapped ones abstract)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from safetensors import safe_open
    from tunix.models.qwen2 import params as qwen2_params

    model = qwen2_params.create_model_from_safe_tensors(checkpoint, cfg, mesh=None, dtype=jnp.float32)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    not_loaded = [x for x in leaves if not isinstance(x, jax.Array)]
    if not_loaded:
        raise RuntimeError(f"{len(not_loaded)} Tunix Qwen2 parameters were not found in the checkpoint")
    n_file = 0
    for name in os.listdir(checkpoint):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(checkpoint, name), framework="numpy") as f:
                n_file += len(list(f.keys()))
    if n_file != len(leaves):
        raise RuntimeError(f"checkpoint has {n_file} tensors but Tunix's Qwen2 has {len(leaves)} parameters")
    if any(x.dtype != jnp.float32 for x in leaves):
        raise RuntimeError("expected fp32 parameters")
    return model


class IdTokenizer:
    """Maps a string of space-separated token ids to those ids and back, so Tunix sees exactly our prompt ids.

    pad and eos are ids outside the vocabulary: Tunix masks tokens equal to pad_id in decode attention and stops rows
    at eos, and neither may touch a generated token here.
    """

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str, **kw) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids, **kw) -> str:
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self):
        return None  # Tunix prepends bos_id when it is truthy

    def eos_id(self) -> int:
        return self.vocab_size + 1

    def pad_id(self) -> int:
        return self.vocab_size


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for pkg in ("google-tunix", "jax", "jaxlib", "flax", "qwix", "numpy", "torch", "transformers"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def check_vs_transformers(checkpoint, model, prompts, greedy_tokens):
    """Tunix greedy vs transformers greedy, and teacher-forced logits of both on prompt + Tunix's greedy tokens."""
    import jax.numpy as jnp
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    hf = transformers.Qwen2ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = torch.tensor(prompts, dtype=torch.long)
    n = greedy_tokens.shape[1]
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                          min_new_tokens=n, pad_token_id=0, eos_token_id=None)
    hf_tokens = out[:, ids.shape[1]:].numpy()
    equal = hf_tokens == greedy_tokens
    first_diff = [int(np.argmin(r)) if not r.all() else n for r in equal]

    seq = np.concatenate([np.asarray(prompts), greedy_tokens], axis=1)
    with torch.no_grad():
        hf_logits = hf(torch.tensor(seq, dtype=torch.long)).logits.numpy()
    b, t = seq.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), dtype=jnp.bool_)), (b, t, t))
    tx_logits, _ = model(jnp.asarray(seq, jnp.int32), positions, None, causal)
    tx_logits = np.asarray(tx_logits)
    return {
        "reference": f"transformers {transformers.__version__} generate (greedy, fp32, torch CPU)",
        "greedy_token_match_fraction": float(equal.mean()),
        "greedy_rows_fully_equal": int(equal.all(axis=1).sum()),
        "rows": int(b),
        "first_mismatch_index_per_row": first_diff,
        "teacher_forced_max_abs_logit_diff": float(np.abs(tx_logits - hf_logits).max()),
        "teacher_forced_max_abs_logit": float(np.abs(hf_logits).max()),
        "teacher_forced_argmax_agreement": float((tx_logits.argmax(-1) == hf_logits.argmax(-1)).mean()),
    }


def jitted_share(sampler, run, repeats):
    """Separate calls (not in the timings above) with Tunix's jitted prefill and decode loop blocked on and timed:
    how much of a call is compiled work and how much is Tunix's eager per-call host work (state setup, tokenizing,
    output slicing). Blocking after prefill adds one sync, so this slightly overstates the jitted time."""
    import jax

    spent = {"prefill_s": 0.0, "decode_loop_s": 0.0}

    def timed_fn(fn, key):
        def call(*a, **kw):
            t = time.perf_counter()
            out = jax.block_until_ready(fn(*a, **kw))
            spent[key] += time.perf_counter() - t
            return out
        return call

    prefill, decode = sampler._compiled_prefill_fn, sampler._compiled_decode_fn
    sampler._compiled_prefill_fn = timed_fn(prefill, "prefill_s")
    sampler._compiled_decode_fn = timed_fn(decode, "decode_loop_s")
    best = None
    try:
        for _ in range(repeats):
            spent.update(prefill_s=0.0, decode_loop_s=0.0)
            t = time.perf_counter()
            run()
            r = dict(spent, call_s=time.perf_counter() - t)
            if best is None or r["call_s"] < best["call_s"]:
                best = r
    finally:
        sampler._compiled_prefill_fn, sampler._compiled_decode_fn = prefill, decode
    best["host_overhead_s"] = best["call_s"] - best["prefill_s"] - best["decode_loop_s"]
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="HF Qwen2 directory (config.json + *.safetensors)")
    ap.add_argument("--prompts-file", required=True, help="JSON list of token-id lists, all the same length")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--modes", default="greedy,sampled_t1")
    ap.add_argument("--skip-check", action="store_true", help="skip the transformers correctness check")
    args = ap.parse_args(argv)

    import jax
    from tunix.generate import sampler as tunix_sampler

    modes = args.modes.split(",")
    unknown = sorted(set(modes) - {"greedy", "sampled_t1"})
    if unknown:
        raise ValueError(f"--modes: unknown {unknown}; choose from greedy,sampled_t1")
    with open(args.prompts_file) as f:
        prompts = json.load(f)
    prompt_len = len(prompts[0])
    if any(len(p) != prompt_len for p in prompts):
        raise ValueError("--prompts-file: all prompts must have the same length (no padding in this workload)")

    cfg = tunix_config(args.checkpoint)
    if any(not 0 <= t < cfg.vocab_size for p in prompts for t in p):
        raise ValueError(f"--prompts-file: token ids must lie in [0, {cfg.vocab_size})")
    model = load_model(args.checkpoint, cfg)
    tok = IdTokenizer(cfg.vocab_size)
    cache = tunix_sampler.CacheConfig(cache_size=prompt_len + args.new_tokens, num_layers=cfg.num_layers,
                                      num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
    sampler = tunix_sampler.Sampler(transformer=model, tokenizer=tok, cache_config=cache)
    strings = [tok.decode(p) for p in prompts]
    for s, p in zip(strings, prompts):
        if list(sampler.tokenize(s)) != list(p):
            raise AssertionError("Tunix's tokenization of a prompt differs from its token ids")

    seeds = iter(range(10_000))
    mode_kw = {"greedy": dict(temperature=0.0),
               "sampled_t1": dict(temperature=1.0, top_p=1.0, top_k=None)}

    def run(mode):
        out = sampler(strings, max_generation_steps=args.new_tokens, max_prompt_length=prompt_len, echo=False,
                      eos_tokens=[tok.eos_id()], seed=next(seeds), **mode_kw[mode])
        # Sampler.__call__ ends with jax.device_get of the token buffer: the result is on the host when it returns
        tokens = np.stack([np.asarray(t) for t in out.tokens])
        assert tokens.shape == (len(prompts), args.new_tokens), tokens.shape
        assert (np.asarray(out.padded_prompt_tokens) == np.asarray(prompts)).all()
        return tokens

    result = {"system": "tunix.generate.sampler.Sampler", "versions": versions(),
              "jax_backend": jax.default_backend(), "checkpoint_config": {
                  k: getattr(cfg, k) for k in ("num_layers", "vocab_size", "embed_dim", "hidden_dim", "num_heads",
                                               "head_dim", "num_kv_heads", "rope_theta", "norm_eps",
                                               "use_tied_embedding")},
              "rows": len(prompts), "prompt_len": prompt_len, "new_tokens": args.new_tokens,
              "cache_size": cache.cache_size}
    greedy_tokens = None
    for mode in modes:
        t = time.perf_counter()
        tokens = run(mode)
        first = time.perf_counter() - t
        if mode == "greedy":
            greedy_tokens = tokens
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            tokens = run(mode)
            times.append(time.perf_counter() - t)
            if mode == "greedy" and not (tokens == greedy_tokens).all():
                raise AssertionError("Tunix greedy generation is not deterministic across calls")
        best = min(times)
        result[mode] = {"tokens_per_s": len(prompts) * args.new_tokens / best, "seconds": best,
                        "all_seconds": times, "compile_s": max(0.0, first - best), "first_call_s": first,
                        "jitted_share": jitted_share(sampler, lambda: run(mode), args.repeats)}
    if not args.skip_check:
        if greedy_tokens is None:
            greedy_tokens = run("greedy")
        result["check"] = check_vs_transformers(args.checkpoint, model, prompts, greedy_tokens)
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
