"""`rollout.decode_slots: auto`: how many decode slots the rollout gets, from the batch size and device memory.

The rule is vLLM's and SGLang's (`max_num_seqs` capped by the KV cache that fits in `gpu_memory_utilization`):
as many slots as the requests need, at most `MAX_SLOTS_PER_SHARD` per (data, fsdp) shard, and no more than fit in
`rollout.decode_memory_fraction` of the memory a device has free while the train state is resident. When every
request gets a slot the answer is 0, static batches: a continuous loop with a slot per request never refills and
only adds its phase bookkeeping. Otherwise the slots stream the requests (`sampler_continuous`), so a rollout whose
static batch would not fit (long responses, many requests) still runs, at the largest batch that does.

Bytes are counted per device: a slot's KV cache over the whole `prompt bucket + max_new_tokens` window (kv heads
split over `tensor` where they divide) plus the float32 vocabulary rows its step and refill keep live;
the fixed part is the rollout's copy of the weights in the compute dtype and continuous batching's per-request
buffers (tokens, log-probs, RNG draws) and prefix store.
`lad_jax.plan` resolves `auto` by the same function against the chip's HBM and compiles the result.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

MAX_SLOTS_PER_SHARD = 256  # vLLM's default max_num_seqs
# float32 vocabulary-sized rows a slot's step and refill keep live (logits, log-softmax, probabilities, the refill's
# prefill logits and the sampling transforms over them): the TPU compiler's temporaries for a continuous-batching
# phase of Qwen2.5-1.5B (vocabulary 151936) were 8.4-9.1 MiB per slot (29 slots x 8448, 32 x 2304, 234 x 1024 cache
# slots; 186 x 1024 gave 8.6), about 15 rows, whatever the window
VOCAB_ROWS_PER_SLOT = 16


@dataclasses.dataclass(frozen=True)
class SlotChoice:
    slots: int  # 0 = static batches
    requests: int
    shards: int  # devices the batch axis is split over (data x fsdp)
    slot_bytes: int  # per device, one slot
    fixed_bytes: int  # per device: the rollout's copy of the weights, the request buffers and the prefix store
    budget_bytes: int | None  # per device; None = no memory limit known (the cap alone decides)

    def describe(self) -> str:
        mib = lambda b: f"{b / 2 ** 20:.1f} MiB" if b >= 2 ** 20 else f"{b / 2 ** 10:.1f} KiB"  # noqa: E731
        budget = "no device memory limit" if self.budget_bytes is None else f"budget {mib(self.budget_bytes)}/device"
        how = "static batches" if self.slots == 0 else f"{self.slots} continuous-batching slots"
        return (f"rollout.decode_slots=auto -> {how} ({self.requests} requests over {self.shards} shard(s), "
                f"{mib(self.slot_bytes)}/slot/device, {budget}, cap {MAX_SLOTS_PER_SHARD}/shard)")


def kv_bytes(model_config, *, cache_len: int, tensor: int) -> int:
    """One row's KV cache over `cache_len` positions on one device, in the compute dtype (the sampler's cache dtype),
    kv heads split over `tensor` where they divide."""
    kv_heads = model_config.num_kv_heads
    local_heads = kv_heads // tensor if kv_heads % tensor == 0 else kv_heads
    itemsize = np.dtype(model_config.jnp_dtype).itemsize
    return 2 * model_config.num_layers * local_heads * model_config.head_dim * cache_len * itemsize


def slot_bytes(model_config, *, cache_len: int, tensor: int) -> int:
    """One slot's bytes on one device: KV cache over `cache_len` positions and `VOCAB_ROWS_PER_SLOT` float32
    vocabulary rows."""
    vocab_rows = VOCAB_ROWS_PER_SLOT * 4 * model_config.vocab_size
    return kv_bytes(model_config, cache_len=cache_len, tensor=tensor) + vocab_rows


def choose(requests: int, *, shards: int, slot_bytes: int, fixed_bytes: int, budget_bytes: int | None) -> SlotChoice:
    """The slot count for `requests` (see the module docstring). Raises ValueError naming the settings to change
    when not even one slot per shard fits."""
    per_shard_requests = -(-requests // shards)
    per_shard = MAX_SLOTS_PER_SHARD
    if budget_bytes is not None:
        fit = (budget_bytes - fixed_bytes) // slot_bytes
        if fit < 1:
            raise ValueError(
                f"rollout.decode_slots=auto: one decode slot needs {slot_bytes / 2 ** 20:.1f} MiB per device "
                f"(+{fixed_bytes / 2 ** 20:.1f} MiB of decode weights and request buffers) but the budget is "
                f"{budget_bytes / 2 ** 20:.1f} MiB (rollout.decode_memory_fraction of the free memory); lower "
                f"rollout.max_new_tokens or data.max_prompt_tokens, raise rollout.decode_memory_fraction, or shard "
                f"over more devices (mesh.fsdp / mesh.tensor)")
        per_shard = min(per_shard, int(fit))
    slots = 0 if per_shard >= per_shard_requests else per_shard * shards
    return SlotChoice(slots, requests, shards, slot_bytes, fixed_bytes, budget_bytes)


def decode_weights_bytes(params, model_config, tensor: int) -> int:
    """Per device, the copy of the weights a rollout makes (`sampler_loop.decode_weights`): float weights in the
    compute dtype, quantized ones as they are (int8, 4-bit codes), split over `tensor` (the decode weights are
    replicated over data and fsdp)."""
    compute_bits = jax.dtypes.itemsize_bits(model_config.jnp_dtype)
    bits = sum(int(np.prod(leaf.shape)) * (jax.dtypes.itemsize_bits(leaf.dtype)
                                           if jnp.issubdtype(leaf.dtype, jnp.integer) else compute_bits)
               for leaf in jax.tree.leaves(params))
    return bits // 8 // tensor


def for_rollout(c, model_config, mesh, free_bytes: int | None, params=None) -> SlotChoice:
    """`choose` for config `c`'s training rollout (prompts_per_step x num_samples requests) on `mesh`, with
    `free_bytes` free per device (None: no limit) besides the train state, from which the rollout also takes its copy
    of `params` (all the model's weights, arrays or shape structs; see `decode_weights_bytes`)."""
    from lad_jax.experience import prompt_bucket

    r = c.rollout
    shards = 1 if mesh is None else int(mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1))
    tensor = 1 if mesh is None else int(mesh.shape.get("tensor", 1))
    lp = prompt_bucket(c)
    requests = r.prompts_per_step * r.num_samples
    per_slot = slot_bytes(model_config, cache_len=lp + r.max_new_tokens, tensor=tensor)
    fixed = (-(-requests // shards) * r.max_new_tokens * 12  # tokens int32, log-probs and draws float32
             + -(-r.prompts_per_step // shards) * kv_bytes(model_config, cache_len=lp, tensor=tensor)  # prefix store
             + (0 if params is None else decode_weights_bytes(params, model_config, tensor)))
    budget = None if free_bytes is None else int(r.decode_memory_fraction * free_bytes)
    return choose(requests, shards=shards, slot_bytes=per_slot, fixed_bytes=fixed, budget_bytes=budget)


def free_bytes_per_device() -> int | None:
    """The least free memory of this job's devices: `bytes_limit - bytes_in_use` (TPU, GPU), or on CPU the host's
    available memory shared by its local devices. Every process gets the same answer (the minimum over processes),
    so the slot count, a global shape, agrees. None when no figure is known."""
    local = []
    for d in jax.local_devices():
        stats = d.memory_stats()
        if stats and "bytes_limit" in stats:
            local.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    if not local:
        host = _host_available_bytes()
        local = [] if host is None else [host // max(1, len(jax.local_devices()))]
    value = min(local) if local else -1
    if jax.process_count() > 1:
        from lad_jax import distributed

        values = distributed.allgather(np.asarray(value, np.int64)).reshape(-1)
        value = -1 if (values < 0).any() else int(values.min())
    return None if value < 0 else int(value)


def _host_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
