"""Scaled dot-product attention: a fused kernel where one applies, else written out in XLA ops.

On a GPU with half-precision inputs and head sizes cuDNN accepts, `jax.nn.dot_product_attention`
runs the cuDNN fused (flash) kernel (key sequences that are not a multiple of 64, such as SD's 77
text tokens, padded to one and masked by length); on a TPU, attention without a general mask runs JAX's Pallas
flash-attention kernel (`_pallas_attention`). Everywhere else the attention is written out here,
with fp32 logits and softmax: the same computation as
`jax.nn.dot_product_attention(implementation="xla")`, but laid out for XLA's CPU backend, where
that function made the SD 1.5 U-Net forward 1.4x slower.
Its logits are scaled after q.k, a (B, N, T, S)-sized multiply the CPU backend materialises as an
array of that size; here q is scaled instead, and the heads are moved ahead of the sequence
(B, N, L, H) so that one attention is one fused batched matmul-softmax-matmul. On the CPU, large
attentions also run in cache-sized blocks (`_cpu_blocked`).
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp

Implementation = Literal["auto", "xla", "cudnn", "pallas"]


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


# cuDNN's fused attention takes sequence lengths in multiples of this; its backward pass refuses
# others (seen on an H200: "Unsupported sequence length Q 1024, KV 77" for SD's 77-token
# cross-attention), so shorter key sequences are padded up to it and masked by length.
_CUDNN_SEQ = 64
_CUDNN_PAD_KEYS = [True]  # see `cudnn_key_padding()`


def _cudnn_ok(q: jax.Array, k: jax.Array, is_causal: bool = False) -> bool:
  if jax.default_backend() != "gpu":
    return False
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return False
  head_dim = q.shape[-1]
  if head_dim % 8 or head_dim > 128 or q.shape[1] % _CUDNN_SEQ:
    return False
  return k.shape[1] % _CUDNN_SEQ == 0 or (_CUDNN_PAD_KEYS[0] and not is_causal)


@contextlib.contextmanager
def cudnn_key_padding(enabled: bool):
  """While tracing inside it, key sequences that are not a multiple of 64 (SD's 77 text tokens) are
  padded for cuDNN (`enabled`, the default) or leave that attention to XLA (for benchmarks that
  compare the two). Not thread-safe; trace a fresh function inside."""
  before = _CUDNN_PAD_KEYS[0]
  _CUDNN_PAD_KEYS[0] = enabled
  try:
    yield
  finally:
    _CUDNN_PAD_KEYS[0] = before


def _padded_keys(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """(k, v, key lengths): keys and values zero-padded along the sequence to a multiple of 64, with
  the true length per batch row for `jax.nn.dot_product_attention(key_value_seq_lengths=...)`,
  which masks the padding out (its logits get -inf-like values, so softmax gives them 0 weight and
  they get zero gradient); lengths None when no padding is needed."""
  s = k.shape[1]
  sp = _round_up(s, _CUDNN_SEQ)
  if sp == s:
    return k, v, None
  pad = ((0, 0), (0, sp - s), (0, 0), (0, 0))
  return jnp.pad(k, pad), jnp.pad(v, pad), jnp.full((q.shape[0],), s, jnp.int32)


def _cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, is_causal: bool, mask: jax.Array | None) -> jax.Array:
  if mask is None and not is_causal:
    k, v, lengths = _padded_keys(q, k, v)
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation="cudnn")


def _last_level_cache_bytes(cpu_dir: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
  """The size of the largest data or unified cache Linux reports for the first CPU, or None (no sysfs)."""
  sizes = []
  for entry in sorted(glob.glob(os.path.join(cpu_dir, "index*"))):
    try:
      with open(os.path.join(entry, "type")) as f:
        if f.read().strip() == "Instruction":
          continue
      with open(os.path.join(entry, "size")) as f:
        text = f.read().strip()
    except OSError:
      continue
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
    digits = text[:-1] if scale > 1 else text
    if digits.isdigit():
      sizes.append(int(digits) * scale)
  return max(sizes) if sizes else None


def _block_logits(cache_bytes: int | None) -> int:
  """Logits per step of the CPU loop: 2**22 fp32 values (16 MiB) where the last-level cache holds twice
  that, else 2**20 (4 MiB). Larger steps pay the loop's per-step cost (five kernel launches) less often:
  on a 2-core Xeon with 480 MiB of L3, 2**22 made the SD 1.5 b2 U-Net forward 3-4.5% faster than 2**20
  (same outputs), 2**23 2.5%, and 2**24 13.5% slower (docs/benchmarks.md); a laptop's 8-16 MiB L3 keeps
  the 4 MiB step that fits it."""
  if cache_bytes is not None and cache_bytes >= 2 * 4 * 2**22:
    return 2**22
  return 2**20


_CPU_BLOCK_LOGITS = _block_logits(_last_level_cache_bytes())
# Below this many logits in all, one fused attention beats the loop's per-step overhead.
_CPU_BLOCKED_FROM = 2**22
# Key sequences of a text's length (SD's and SDXL's 77 tokens) are attended to with the softmax's division applied
# to the output (`_short_keys_attention`), and on the CPU in one piece up to 4x `_CPU_BLOCKED_FROM` logits.
_SHORT_KEYS = (65, 128)


def _short_keys(keys: int) -> bool:
  return _SHORT_KEYS[0] <= keys <= _SHORT_KEYS[1]


def _softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """softmax(q k^T) v over the last two axes, any leading axes; q already scaled; fp32 logits and softmax."""
  if mask is None:
    return (_short_keys_attention if _short_keys(k.shape[-2]) else _unmasked_attention)(q, k, v)
  return _attention_forward(q, k, v, mask)[0]


def _attention_forward(q, k, v, mask=None):
  """(output, fp32 probabilities)."""
  logits = jnp.einsum("...th,...sh->...ts", q, k, preferred_element_type=jnp.float32)
  if mask is not None:
    # jax.nn's value: finite, so a fully masked row gives a uniform average rather than NaN.
    logits = jnp.where(mask, logits, -0.7 * jnp.finfo(jnp.float32).max)
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("...ts,...sh->...th", probs.astype(v.dtype), v), probs


@jax.custom_vjp
def _unmasked_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  return _attention_forward(q, k, v)[0]


def _unmasked_attention_fwd(q, k, v):
  out, probs = _attention_forward(q, k, v)
  return out, (q, k, v, probs, out)


def _unmasked_attention_bwd(res, g):
  """The softmax backward as FlashAttention writes it (Dao et al., 2022, arXiv:2205.14135, eq. in
  sec. B.2): dS = P * (dP - D) with D = rowsum(dO * O), a (T, H) reduction, instead of autodiff's
  rowsum(P * dP) over the (T, S) logits; on XLA's CPU backend those big reductions were the
  slowest part of the attention backward."""
  q, k, v, probs, out = res
  dq, dk, dv = _probs_backward(q, k, v, probs, _out_grad_rowsum(out, g), g)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _out_grad_rowsum(out, g):
  """FlashAttention's D = rowsum(dO * O), fp32, (..., T); on the CPU its own kernel.

  XLA:CPU fused this (T, H) reduction into YNNPACK's fusion of the (T, S) matmul dO V^T that consumes it, and
  that fusion then took 3.4x the matmul's time: forward + backward 6.3 against 4.7 ms at 256 tokens x 32, and
  70 against 65 ms at 1024 tokens x 16 (the blocked loop), b2 x 8 heads (docs/benchmarks.md). The barrier keeps
  it out; the blocked backward also computes it once for all rows, before its loop."""
  d = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  return jax.lax.optimization_barrier(d) if jax.default_backend() == "cpu" else d


def _probs_backward(q, k, v, probs, d, g):
  """fp32 (dq, dk, dv) of softmax(q k^T) v from its probabilities, the output gradient `g` and
  D = `_out_grad_rowsum(out, g)`."""
  dv = jnp.einsum("...ts,...th->...sh", probs.astype(g.dtype), g, preferred_element_type=jnp.float32)
  dp = jnp.einsum("...th,...sh->...ts", g, v, preferred_element_type=jnp.float32)
  ds = probs * (dp - d[..., None])
  dq = jnp.einsum("...ts,...sh->...th", ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
  dk = jnp.einsum("...ts,...th->...sh", ds.astype(q.dtype), q, preferred_element_type=jnp.float32)
  return dq, dk, dv


_unmasked_attention.defvjp(_unmasked_attention_fwd, _unmasked_attention_bwd)


@jax.custom_vjp
def _short_keys_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """`_unmasked_attention` with the division applied to the (T, H) output rather than to the (T, S) probabilities
  (`_block_output`), where that measured faster: for key sequences of a text's length. Forward on the CPU, b2 x 8
  heads, queries x keys x head size: 1024 x 77 x 80 5.6-6.0 -> 3.5-3.8 ms, 256 x 77 x 160 2.5-2.7 -> 1.8-2.0,
  4096 x 77 x 40 22-26 -> 19-21 (not blocked), SDXL's 10 heads at 4096 x 77 x 64 46 -> 23-28; with 4-32 keys (an
  IP-Adapter's image tokens) 1.04-1.23x slower, and with long key sequences, where YNNPACK fuses the whole attention,
  up to 2.7x slower (1 x 4 heads x 1024 x 1024 x 16) (docs/benchmarks.md). Gradients as `_unmasked_attention`'s:
  its forward rule, which keeps the probabilities for the backward."""
  return _block_output(q, k, v)


_short_keys_attention.defvjp(_unmasked_attention_fwd, _unmasked_attention_bwd)


def _largest_divisor(n: int, at_most: int) -> int:
  return max(d for d in range(1, n + 1) if n % d == 0 and d <= max(at_most, 1))


def _cpu_blocks(b: int, n: int, t: int, s: int) -> tuple[int, int]:
  """How `_cpu_blocked` splits the work: (batch x head slices per step, queries per step)."""
  if t * s <= _CPU_BLOCK_LOGITS:  # several (batch, head) slices per step
    return _largest_divisor(b * n, _CPU_BLOCK_LOGITS // (t * s)), t
  return 1, _largest_divisor(t, _CPU_BLOCK_LOGITS // s)  # one slice, blocks of queries per step


def _block_forward(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One block's output and its rows' fp32 logsumexp. The softmax's division is applied to the
  (T, H) output rather than to the (T, S) probabilities (one pass less over the block's logits)."""
  logits = jnp.einsum("...th,...sh->...ts", q, k, preferred_element_type=jnp.float32)
  m = jnp.max(logits, axis=-1, keepdims=True)
  e = jnp.exp(logits - m)
  total = jnp.sum(e, axis=-1, keepdims=True)
  out = jnp.einsum("...ts,...sh->...th", e.astype(v.dtype), v, preferred_element_type=jnp.float32) / total
  return out.astype(v.dtype), (m + jnp.log(total))[..., 0]


def _block_output(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  return _block_forward(q, k, v)[0]


def _over_blocks(fn: Callable, q: jax.Array, k: jax.Array, v: jax.Array) -> Any:
  """`fn(q, k, v)` of each of `_cpu_blocks`' blocks, in a loop; its outputs (.., T, ...) reassembled as
  (B, N, T, ...)."""
  b, n, t, h = q.shape
  g, c = _cpu_blocks(b, n, t, k.shape[2])
  if c == t:
    qb, kb, vb = (x.reshape(b * n // g, g, *x.shape[2:]) for x in (q, k, v))
    res = jax.lax.map(lambda a: fn(*a), (qb, kb, vb))
  else:
    qb = q.reshape(b * n, t // c, c, h)
    kb, vb = (x.reshape(b * n, *x.shape[2:]) for x in (k, v))
    res = jax.lax.map(lambda a: jax.lax.map(lambda qc: fn(qc, a[1], a[2]), a[0]), (qb, kb, vb))
  return jax.tree.map(lambda x: x.reshape(b, n, t, *x.shape[3:]), res)


def _block_backward(q, k, v, d, lse, g):
  """One block's fp32 (dq, dk, dv), its probabilities recomputed from the logsumexp (FlashAttention's
  backward, Dao et al., 2022, arXiv:2205.14135, alg. 4); `d` is the block's `_out_grad_rowsum`."""
  logits = jnp.einsum("...th,...sh->...ts", q, k, preferred_element_type=jnp.float32)
  return _probs_backward(q, k, v, jnp.exp(logits - lse[..., None]), d, g)


@jax.custom_vjp
def _cpu_blocked(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Loops over blocks of (batch x head) slices, or of queries, so each block's logits stay in cache.

  XLA's CPU backend runs a fused matmul-softmax-matmul one whole op after another: with SD 1.5's
  4096 latent tokens that is a 512 MiB logits array per attention, written and re-read from memory;
  the loop makes that self-attention about 3x faster. The backward loops over the same blocks and
  recomputes each block's probabilities from the forward's logsumexp instead of keeping them (a
  (B, N, T, S) residual, 64 MiB per attention for the small benchmark model's 1024 tokens, that XLA
  also zero-filled and copied). Arrays are (B, N, L, H).
  """
  return _over_blocks(_block_output, q, k, v)


def _cpu_blocked_fwd(q, k, v):
  out, lse = _over_blocks(_block_forward, q, k, v)
  return out, (q, k, v, out, lse)


def _cpu_blocked_bwd(res, g_out):
  q, k, v, out, lse = res
  b, n, t, h = q.shape
  s, hv = k.shape[2], v.shape[3]
  g, c = _cpu_blocks(b, n, t, s)
  d = _out_grad_rowsum(out, g_out)  # for all rows, before the loop
  if c == t:
    blocks = lambda x: x.reshape(b * n // g, g, *x.shape[2:])
    dq, dk, dv = jax.lax.map(lambda a: _block_backward(*a), tuple(blocks(x) for x in (q, k, v, d, lse, g_out)))
  else:
    chunks = lambda x: x.reshape(b * n, t // c, c, *x.shape[3:])

    def per_slice(a):
      qs, ks, vs, ds, ls, gs = a

      def step(acc, xs):  # one block of queries: its dq, and its share of dk and dv
        dq_c, dk_c, dv_c = _block_backward(xs[0], ks, vs, xs[1], xs[2], xs[3])
        return (acc[0] + dk_c, acc[1] + dv_c), dq_c

      zeros = (jnp.zeros((s, h), jnp.float32), jnp.zeros((s, hv), jnp.float32))
      (dk_s, dv_s), dq_s = jax.lax.scan(step, zeros, (qs, ds, ls, gs))
      return dq_s, dk_s, dv_s

    sliced = (chunks(q), k.reshape(b * n, s, h), v.reshape(b * n, s, hv), chunks(d), chunks(lse), chunks(g_out))
    dq, dk, dv = jax.lax.map(per_slice, sliced)
  return (dq.reshape(q.shape).astype(q.dtype), dk.reshape(k.shape).astype(k.dtype), dv.reshape(v.shape).astype(v.dtype))


_cpu_blocked.defvjp(_cpu_blocked_fwd, _cpu_blocked_bwd)

_WRITTEN_OUT = [False]  # set by `written_out()`


@contextlib.contextmanager
def written_out():
  """While tracing inside it, every attention is one XLA softmax(q k^T) v: no cuDNN or Pallas call,
  no CPU blocking loop. For FLOP counting (`jaxsd.flops`): XLA's cost analysis counts a library
  call as nothing and a loop body once. Not thread-safe; a trace cache keyed on the function
  ignores it, so trace a fresh function inside."""
  _WRITTEN_OUT[0] = True
  try:
    yield
  finally:
    _WRITTEN_OUT[0] = False


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, is_causal: bool, mask: jax.Array | None) -> jax.Array:
  # Scaling q (T x H values) rather than the logits (T x S) is a rounding step in q's dtype: exact
  # for fp32 parity; for bf16 within the rounding q already carries.
  q = q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # (B, N, L, H)
  b, n, t, _ = q.shape
  if is_causal:
    causal = jnp.tril(jnp.ones((t, k.shape[2]), dtype=bool))
    mask = causal if mask is None else jnp.logical_and(mask, causal)
  blocked_from = _CPU_BLOCKED_FROM * (4 if _short_keys(k.shape[2]) else 1)
  blocked = mask is None and jax.default_backend() == "cpu" and b * n * t * k.shape[2] > blocked_from
  if blocked and not _WRITTEN_OUT[0]:
    out = _cpu_blocked(q, k, v)
  else:
    out = _softmax_attention(q, k, v, mask)
  return jnp.swapaxes(out, 1, 2)


# The Pallas TPU kernel (jax.experimental.pallas.ops.tpu.flash_attention) works in tiles of 128
# lanes: key blocks must be multiples of 128 that divide the key length (the forward also takes one
# block of any length, the backward does not), head_dim must be a multiple of 128 above 128, and
# the backward's query blocks must divide the query length.
_PALLAS_LANES = 128
_PALLAS_BLOCKS = (512, 256, 128)  # tried largest first; 512 x 512 fp32 logits are 1 MiB of VMEM


def _pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, is_causal: bool) -> jax.Array:
  """The Pallas TPU flash-attention kernel on (B, L, N, H) arrays, padded to its 128-lane tiles.

  Lengths are zero-padded up to multiples of 128 and head_dim up to a multiple of 128 (SD 1.5's
  40 / 80 / 160; the kernel accepts head_dim < 128 unpadded, but then runs lane-sparse tiles, and
  rejects 160 once the keys span several blocks). Padding is exact: zero head_dim columns add
  nothing to q.k and their output columns are sliced off; padded queries' rows are sliced off (and
  get zero gradient); padded keys are masked out with segment ids (queries in segment 1, real keys
  1, padding 0), where the kernel adds -0.7 * float32 max to their logits, so exp() gives exactly 0:
  every query row has a real key (the padding is under 128 keys, and lies within the last key
  block). Masking them is needed, not just zeroing: a zero key still has logit 0 and would take
  softmax weight. For cross-attention on 77 text tokens, falling back to XLA would also be exact,
  but would take that attention out of the kernel for the sake of 51 padded keys.

  The logits are scaled inside the kernel (`sm_scale`, in fp32) rather than by pre-scaling q as
  `_xla_attention` does; for bf16 this skips the rounding of q * scale. Checked on the CPU only, in
  Pallas' TPU interpret mode (run under `jax.experimental.pallas.tpu.force_tpu_interpret_mode()`);
  the block sizes are not tuned on a TPU.
  """
  from jax.experimental.pallas.ops.tpu import flash_attention as fa  # only imported where used

  b, t, n, h = q.shape
  s = k.shape[1]
  tp, sp, hp = _round_up(t, _PALLAS_LANES), _round_up(s, _PALLAS_LANES), _round_up(h, _PALLAS_LANES)

  def prepare(x: jax.Array, length: int) -> jax.Array:  # (B, L, N, H) -> padded (B, N, L', H')
    x = jnp.swapaxes(x, 1, 2)
    if (length, hp) != x.shape[2:]:
      x = jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, hp - h)))
    return x

  q, k, v = prepare(q, tp), prepare(k, sp), prepare(v, sp)
  segment_ids = None
  if sp != s:
    kv_ids = jnp.broadcast_to((jnp.arange(sp) < s).astype(jnp.int32), (b, sp))
    segment_ids = fa.SegmentIds(q=jnp.ones((b, tp), jnp.int32), kv=kv_ids)
  bq = next(blk for blk in _PALLAS_BLOCKS if tp % blk == 0)
  bk = next(blk for blk in _PALLAS_BLOCKS if sp % blk == 0)
  blocks = fa.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1, block_q_major_dkv=bq,
                         block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq, block_k_major_dq=bk, block_k_dq=bk,
                         block_q_dq=bq)
  out = fa.flash_attention(q, k, v, segment_ids=segment_ids, causal=is_causal, sm_scale=1.0 / math.sqrt(h),
                           block_sizes=blocks)
  return jnp.swapaxes(out[:, :, :t, :h], 1, 2)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    is_causal: bool = False,
    mask: jax.Array | None = None,
    implementation: Implementation = "auto",
) -> jax.Array:
  """Multi-head attention on (batch, length, heads, head_dim) arrays; returns the same layout.

  Args:
    q, k, v: queries (B, T, N, H), keys and values (B, S, N, H).
    is_causal: mask out keys after each query (the CLIP text transformer).
    mask: optional boolean mask broadcastable to (B, N, T, S), True where attention is allowed.
    implementation: "auto" picks Pallas on a TPU and cuDNN on a GPU where they apply, else XLA;
      "xla", "cudnn" and "pallas" force one, except that "pallas" with a `mask` runs XLA (the
      kernel's segment ids cannot express a general mask).
  """
  if implementation == "auto" or _WRITTEN_OUT[0]:
    if mask is not None or _WRITTEN_OUT[0]:
      implementation = "xla"
    elif jax.default_backend() == "tpu":
      implementation = "pallas"
    else:
      implementation = "cudnn" if _cudnn_ok(q, k, is_causal) else "xla"
  if implementation == "pallas" and mask is not None:
    implementation = "xla"
  if implementation == "xla":
    return _xla_attention(q, k, v, is_causal, mask)
  if implementation == "cudnn":
    return _cudnn_attention(q, k, v, is_causal, mask)
  if implementation == "pallas":
    return _pallas_attention(q, k, v, is_causal)
  raise ValueError(f"attention implementation must be 'auto', 'xla', 'cudnn' or 'pallas', got {implementation!r}")
