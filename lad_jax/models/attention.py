"""Attention kernels behind `ModelConfig.attention`: dense (the reference), blockwise online softmax, splash, cudnn.

The dense path materialises `[b, h, t, s]` float32 scores; at the recipes' 8-9k tokens that is the largest buffer of
the train step. The blockwise path visits the keys in blocks of `BLOCK` slots with a running max / sum in float32
(flash-attention's online softmax), so forward and backward never hold more than `[b, h, t, BLOCK]`: its custom VJP
saves only the output and the per-row max and sum and recomputes each block's probabilities in the backward pass.

Masks are passed compactly as a `SlotMask` (which key slots hold real tokens, and each query's slot) and each
kernel builds the part it needs; `SlotMask.dense()` is the `[b, t, s]` bool the dense path has always used.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools

import jax
import jax.numpy as jnp

from lad_jax.models.config import ATTENTION_IMPLS

BLOCK = 512
# `auto` keeps dense attention up to this many key slots (measured on CPU: benchmarks/attention_long.py and DESIGN.md
# "Attention"); longer sequences use blockwise (CPU/GPU) or splash (TPU).
AUTO_DENSE_MAX_SLOTS = 1024

_NEG = float(jnp.finfo(jnp.float32).min)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotMask:
    """Which keys each query sees, without a `[b, t, s]` array.

    Query i of row b (at cache slot `q_slot_bt[b, i]`) sees key slot j iff j <= q_slot and (`valid_bs[b, j]` or, with
    `self_visible`, j == q_slot). `self_visible` keeps a padding query's softmax row non-empty (the train step's
    convention); without it, a padding query sees nothing and the dense reference averages all values (its output is
    never read).
    """

    valid_bs: jax.Array  # bool [b, s]: slot j holds a real token
    q_slot_bt: jax.Array  # int32 [b, t]: the cache slot of each query
    self_visible: bool = dataclasses.field(default=False, metadata={"static": True})
    # the queries' slots are known at trace time to be q_start + arange(t) (train step, prefill): kernels with a
    # static mask structure (splash) need it; None = traced (a cache index)
    q_start: int | None = dataclasses.field(default=None, metadata={"static": True})

    def block(self, start, size: int):
        """bool `[b, t, size]` for key slots `start .. start + size` (start may be traced)."""
        slots = start + jnp.arange(size)
        valid = jax.lax.dynamic_slice_in_dim(self.valid_bs, start, size, axis=1)
        q = self.q_slot_bt[:, :, None]
        seen = valid[:, None, :]
        if self.self_visible:
            seen = seen | (slots[None, None, :] == q)
        return (slots[None, None, :] <= q) & seen

    def dense(self):
        """The full bool `[b, t, s]` mask (the dense path's input)."""
        return self.block(0, self.valid_bs.shape[1])


def causal_mask(b: int, t: int, s: int, start=0, valid_bs=None, *, self_visible: bool = False) -> SlotMask:
    """Queries at slots `start .. start + t` (start: an int, or a traced cache index); `valid_bs` None = all valid."""
    q_slot_bt = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    valid_bs = jnp.ones((b, s), bool) if valid_bs is None else valid_bs
    return SlotMask(valid_bs, q_slot_bt, self_visible, start if isinstance(start, int) else None)


def dense_attention(q_bthx, k_all, v_all, mask_bts, kv_layout=("bskx", "bskx")):
    """Grouped-query attention without repeating K/V; scores and softmax in float32.

    `kv_layout`: the (keys, values) axis orders: "bskx" for both (the stacked cache's layer slice, or no cache) or
    the per-layer decode cache's `LAYER_CACHE_LAYOUT` (batch and kv-head leading, so the t=1 score and value
    products read the cache where it lies, without a transposed copy).
    """
    k_layout, v_layout = kv_layout
    b, t, h, x = q_bthx.shape
    kh = k_all.shape[k_layout.index("k")]
    q = q_bthx.reshape(b, t, kh, h // kh, x)
    if k_layout == "bkxs":
        # as one [g*t, x] @ [x, s] product per (b, k): XLA:CPU lowers the 5-d form with t to a much slower dot
        q_bkmx = q.transpose(0, 2, 3, 1, 4).reshape(b, kh, (h // kh) * t, x)
        scores = jnp.einsum("bkmx,bkxs->bkms", q_bkmx, k_all, preferred_element_type=jnp.float32)
        scores = scores.reshape(b, kh, h // kh, t, -1)
    else:
        scores = jnp.einsum(f"btkgx,{k_layout}->bkgts", q, k_all, preferred_element_type=jnp.float32)
    scores = scores * (x ** -0.5)
    scores = jnp.where(mask_bts[:, None, None, :, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_all.dtype)
    # the product keeps (b, k) leading as in its operands; XLA:CPU lowers a "->btkgx" output to a slower dot
    out = jnp.einsum(f"bkgts,{v_layout}->bkgtx", probs, v_all)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, x)


# ---- blockwise online softmax -------------------------------------------------------------------------------------

def _blocks(k_bskx, v_bskx, mask: SlotMask, block: int):
    """Keys/values/valid padded to whole blocks and split `[n, b, block, k, x]`; padded slots are out of range."""
    b, s, kh, x = k_bskx.shape
    n = -(-s // block)
    pad = n * block - s
    if pad:
        k_bskx = jnp.pad(k_bskx, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v_bskx = jnp.pad(v_bskx, ((0, 0), (0, pad), (0, 0), (0, 0)))
        mask = dataclasses.replace(mask, valid_bs=jnp.pad(mask.valid_bs, ((0, 0), (0, pad))))
    split = lambda a: a.reshape(b, n, block, kh, x).swapaxes(0, 1)  # noqa: E731
    return split(k_bskx), split(v_bskx), mask, n


def _block_scores(q_btkgx, k_blk, mask: SlotMask, j, block: int, s: int, scale: float):
    """Masked float32 scores `[b, k, g, t, block]` of key block j: masked slots get the dense path's finite minimum
    (so a row with no visible key averages like dense does), slots past `s` (block padding) get -inf (never seen).
    Also returns the visibility `[b, 1, 1, t, block]`."""
    start = j * block
    scores = jnp.einsum("btkgx,bskx->bkgts", q_btkgx, k_blk, preferred_element_type=jnp.float32) * scale
    seen = mask.block(start, block)[:, None, None]
    scores = jnp.where(seen, scores, _NEG)
    in_range = (start + jnp.arange(block)) < s
    return jnp.where(in_range, scores, -jnp.inf), seen


def _blockwise_fwd_impl(q_bthx, k_bskx, v_bskx, mask: SlotMask, block: int):
    b, t, h, x = q_bthx.shape
    s, kh = k_bskx.shape[1], k_bskx.shape[2]
    q = q_bthx.reshape(b, t, kh, h // kh, x)
    k_n, v_n, pmask, n = _blocks(k_bskx, v_bskx, mask, block)
    scale = x ** -0.5

    def body(carry, xs):
        m, l, acc = carry
        k_blk, v_blk, j = xs
        scores, _ = _block_scores(q, k_blk, pmask, j, block, s, scale)
        m_new = jnp.maximum(m, scores.max(-1))
        p = jnp.exp(scores - m_new[..., None])
        corr = jnp.exp(m - m_new)
        l = l * corr + p.sum(-1)
        pv = jnp.einsum("bkgts,bskx->bkgtx", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
        return (m_new, l, acc * corr[..., None] + pv), None

    g = h // kh
    init = (jnp.full((b, kh, g, t), -jnp.inf, jnp.float32), jnp.zeros((b, kh, g, t), jnp.float32),
            jnp.zeros((b, kh, g, t, x), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(body, init, (k_n, v_n, jnp.arange(n)))
    out_bkgtx = acc / l[..., None]
    out = out_bkgtx.transpose(0, 3, 1, 2, 4).reshape(b, t, h, x).astype(v_bskx.dtype)
    # max and sum kept apart, not as m + log(l): for a row with no visible key m is float32's minimum and adding
    # log(l) to it rounds away
    return out, (m, l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blockwise(q_bthx, k_bskx, v_bskx, mask: SlotMask, block: int):
    return _blockwise_fwd_impl(q_bthx, k_bskx, v_bskx, mask, block)[0]


def _blockwise_fwd(q_bthx, k_bskx, v_bskx, mask, block):
    out, (m, l) = _blockwise_fwd_impl(q_bthx, k_bskx, v_bskx, mask, block)
    return out, (q_bthx, k_bskx, v_bskx, mask, out, m, 1.0 / l)


def _blockwise_bwd(block, res, dout_bthx):
    """Flash-attention backward: per key block, p = exp(scores - max) / sum is recomputed; dq accumulates in the carry,
    dk / dv are the scan's per-block outputs."""
    q_bthx, k_bskx, v_bskx, mask, out_bthx, m_bkgt, inv_l_bkgt = res
    b, t, h, x = q_bthx.shape
    s, kh = k_bskx.shape[1], k_bskx.shape[2]
    g = h // kh
    q = q_bthx.reshape(b, t, kh, g, x)
    do = dout_bthx.reshape(b, t, kh, g, x)
    # D_i = sum_x dout * out = sum_j p_ij dp_ij (the softmax Jacobian's diagonal correction)
    d_bkgt = jnp.einsum("btkgx,btkgx->bkgt", do.astype(jnp.float32),
                        out_bthx.reshape(b, t, kh, g, x).astype(jnp.float32))
    k_n, v_n, pmask, n = _blocks(k_bskx, v_bskx, mask, block)
    scale = x ** -0.5

    def body(dq, xs):
        k_blk, v_blk, j = xs
        scores, seen = _block_scores(q, k_blk, pmask, j, block, s, scale)
        p = jnp.exp(scores - m_bkgt[..., None]) * inv_l_bkgt[..., None]
        dp = jnp.einsum("btkgx,bskx->bkgts", do, v_blk, preferred_element_type=jnp.float32)
        # masked scores are constants (as jnp.where makes them in the dense path): no gradient to q or k
        ds = jnp.where(seen, p * (dp - d_bkgt[..., None]) * scale, 0.0)
        dq = dq + jnp.einsum("bkgts,bskx->btkgx", ds.astype(k_blk.dtype), k_blk, preferred_element_type=jnp.float32)
        dk = jnp.einsum("bkgts,btkgx->bskx", ds.astype(q.dtype), q, preferred_element_type=jnp.float32)
        dv = jnp.einsum("bkgts,btkgx->bskx", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
        return dq, (dk, dv)

    dq, (dk_n, dv_n) = jax.lax.scan(body, jnp.zeros((b, t, kh, g, x), jnp.float32), (k_n, v_n, jnp.arange(n)))
    unsplit = lambda a: a.swapaxes(0, 1).reshape(b, n * block, kh, x)[:, :s]  # noqa: E731
    return (dq.reshape(b, t, h, x).astype(q_bthx.dtype), unsplit(dk_n).astype(k_bskx.dtype),
            unsplit(dv_n).astype(v_bskx.dtype), None)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(q_bthx, k_bskx, v_bskx, mask: SlotMask, *, block: int = BLOCK):
    """`dense_attention` with online softmax over key blocks: never builds `[t, s]` in the forward or backward."""
    block = max(1, min(int(block), k_bskx.shape[1]))
    return _blockwise(q_bthx, k_bskx, v_bskx, mask, block)


# ---- splash (TPU Pallas kernel) -----------------------------------------------------------------------------------

def splash_attention(q_bthx, k_bskx, v_bskx, mask: SlotMask, *, block: int = BLOCK, interpret: bool = False):
    """`jax.experimental.pallas.ops.tpu.splash_attention`: causal mask (static, from `mask.q_start`) and padding as
    segment ids (real tokens 1, padding 0), GQA as the MQA kernel vmapped over kv heads (K/V never repeated).

    Padding queries see the padding keys before them instead of only themselves (`self_visible`) or nothing: splash
    needs a non-empty row, and their outputs are never read. t and s are padded at the end to multiples of 128 (the
    train step attends over t - 1 tokens): the extra key slots lie after every real query, the extra query rows are
    cut off. Under a mesh the kernel runs in `shard_map` over the
    batch axes (and the kv heads over `tensor` when they divide); `interpret=True` runs it on CPU (tests).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    from lad_jax.sharding import current_mesh, spec_for_shape

    b, t, h, x = q_bthx.shape
    s, kh = k_bskx.shape[1], k_bskx.shape[2]
    g = h // kh
    if mask.q_start is None:
        raise ValueError("model.attention=splash needs the queries' slots at trace time (SlotMask.q_start); this "
                         "call attends from a traced cache index: use blockwise or dense")
    tp, sp = -(-t // 128) * 128, -(-s // 128) * 128
    bq, bkv = _divisor_block(tp, block), _divisor_block(sp, block)
    sizes = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                          block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    causal = sm.MultiHeadMask([sm.CausalMask((tp, sp), offset=mask.q_start) for _ in range(g)])
    kernel = sk.make_splash_mqa(causal, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    q_start = mask.q_start

    def run(q_btkgx, k_bskx, v_bskx, valid_bs):
        seg_kv = valid_bs.astype(jnp.int32)
        seg_q = jax.lax.dynamic_slice_in_dim(jnp.pad(seg_kv, ((0, 0), (0, tp))), q_start, tp, axis=1)
        q_bkgtx = (q_btkgx * (x ** -0.5)).astype(q_btkgx.dtype).transpose(0, 2, 3, 1, 4)

        # vmapped axes lead every operand: a vmap over an inner axis becomes a squeezed block dim between the
        # sequence and head dims, which Mosaic (the TPU lowering; interpret mode does not check) refuses.
        k_bksx, v_bksx = k_bskx.transpose(0, 2, 1, 3), v_bskx.transpose(0, 2, 1, 3)

        def one_row(q_kgtx, k_ksx, v_ksx, sq_t, skv_s):
            seg = sk.SegmentIds(q=sq_t, kv=skv_s)
            per_head = lambda q_gtx, k_sx, v_sx: kernel(q_gtx, k_sx, v_sx, segment_ids=seg)  # noqa: E731
            return jax.vmap(per_head)(q_kgtx, k_ksx, v_ksx)

        out_bkgtx = jax.vmap(one_row)(q_bkgtx, k_bksx, v_bksx, seg_q, seg_kv)
        return out_bkgtx.transpose(0, 3, 1, 2, 4)

    q_btkgx = jnp.pad(q_bthx.reshape(b, t, kh, g, x), ((0, 0), (0, tp - t), (0, 0), (0, 0), (0, 0)))
    k_bskx, v_bskx = (jnp.pad(a, ((0, 0), (0, sp - s), (0, 0), (0, 0))) for a in (k_bskx, v_bskx))
    valid_bs = jnp.pad(mask.valid_bs, ((0, 0), (0, sp - s)))
    mesh = current_mesh()
    if mesh is not None:
        kv_spec = spec_for_shape(("batch", None, "act_kv_heads", None), k_bskx.shape, mesh)
        q_spec = jax.sharding.PartitionSpec(kv_spec[0], None, kv_spec[2], None, None)
        run = jax.shard_map(run, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, jax.sharding.PartitionSpec(kv_spec[0])),
                            out_specs=q_spec, check_vma=False)
    return run(q_btkgx, k_bskx, v_bskx, valid_bs)[:, :t].reshape(b, t, h, x)


def _divisor_block(n: int, block: int) -> int:
    """The largest multiple of 128 <= block that divides n (n a multiple of 128)."""
    size = max(128, block // 128 * 128)
    while n % size:
        size -= 128
    return size


# ---- cudnn (GPU) --------------------------------------------------------------------------------------------------

def cudnn_attention(q_bthx, k_bskx, v_bskx, mask: SlotMask):
    """`jax.nn.dot_product_attention(implementation="cudnn")` (fused flash attention on NVIDIA GPUs, GQA native).

    The padding mask goes in as a bool `[b, 1, t, s]` (1 byte per entry and no head axis, against the dense path's
    float32 `[b, h, t, s]` scores); cuDNN's own length arguments only describe right padding.
    """
    return jax.nn.dot_product_attention(q_bthx, k_bskx, v_bskx, mask=mask.dense()[:, None],
                                        scale=q_bthx.shape[-1] ** -0.5, implementation="cudnn")


# ---- selection ----------------------------------------------------------------------------------------------------

# The platform `auto` picks kernels for while compiling for devices that are not this process's backend (the plan
# compiles for a TPU topology from a CPU process); None = jax's default backend.
_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("attention_platform", default=None)


@contextlib.contextmanager
def target_platform(platform: str | None):
    """Within this block `auto` resolves for `platform` ('tpu', 'gpu', 'cpu'). Set it around tracing only: a jitted
    function traced under one platform is not retraced under another."""
    token = _TARGET_PLATFORM.set(platform)
    try:
        yield
    finally:
        _TARGET_PLATFORM.reset(token)


def current_platform() -> str:
    """The platform being compiled for: `target_platform`'s, else jax's default backend."""
    return _TARGET_PLATFORM.get() or jax.default_backend()


def resolve_attention(impl: str, s: int, platform: str | None = None) -> str:
    """The kernel `impl` means for `s` key slots on `platform` (default: `target_platform`'s, else jax's backend)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention={impl!r} is not supported; use one of {ATTENTION_IMPLS}")
    if impl != "auto":
        return impl
    if s <= AUTO_DENSE_MAX_SLOTS:
        return "dense"
    platform = platform or current_platform()
    return "splash" if platform == "tpu" else "blockwise"


def make_attend(impl: str, mask):
    """`attend(q_bthx, k_bskx, v_bskx) -> o_bthx` for `impl` with `mask` bound: a `SlotMask`, or an explicit bool
    `[b, t, s]` array (then dense)."""
    if not isinstance(mask, SlotMask):
        return lambda q, k, v: dense_attention(q, k, v, mask)
    kind = resolve_attention(impl, mask.valid_bs.shape[1])
    if kind == "splash" and impl == "auto" and mask.q_start is None:
        kind = "blockwise"  # e.g. a chunk against a cache at a traced index: splash needs a static mask
    if kind == "dense":
        mask_bts = mask.dense()  # built once, outside the layer scan
        return lambda q, k, v: dense_attention(q, k, v, mask_bts)
    fn = {"blockwise": blockwise_attention, "splash": splash_attention, "cudnn": cudnn_attention}[kind]
    return lambda q, k, v: fn(q, k, v, mask)
