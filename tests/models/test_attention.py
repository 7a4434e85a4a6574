"""Our attention against jax.nn.dot_product_attention, including the CPU-blocked path."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.models import attention


def _qkv(b, t, s, n, h, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0],
                            (b, t, n, h)), jax.random.normal(ks[1],
                                                             (b, s, n, h)), jax.random.normal(ks[2], (b, s, n, h)))


@pytest.mark.parametrize("causal", [False, True])
def test_matches_jax_nn(causal):
  q, k, v = _qkv(2, 7, 7, 4, 8)
  ours = attention.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
  ref = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
  np.testing.assert_allclose(ours, ref, atol=2e-6)


def test_mask_matches_jax_nn():
  q, k, v = _qkv(2, 5, 9, 2, 8)
  mask = jnp.arange(9)[None, None, None, :] < jnp.array([9, 4])[:, None, None, None]
  ours = attention.dot_product_attention(q, k, v, mask=mask, implementation="xla")
  ref = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
  np.testing.assert_allclose(ours, ref, atol=2e-6)


@pytest.mark.parametrize(
    "shape",
    [
        (2, 64, 64, 4, 8),  # one (batch, head) slice per block
        (4, 32, 32, 4, 8),  # four slices per block
        (1, 256, 128, 2, 8)
    ])  # blocks of queries within one slice
def test_cpu_blocked_path_matches_and_has_gradients(monkeypatch, shape):
  # Shrink the thresholds so small arrays take the blocked path the SD 1.5 sizes take.
  monkeypatch.setattr(attention, "_CPU_BLOCK_LOGITS", 2**12)
  monkeypatch.setattr(attention, "_CPU_BLOCKED_FROM", 2**13)
  b, t, s, n, h = shape
  q, k, v = _qkv(b, t, s, n, h, seed=1)
  f = lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="xla")
  g = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
  assert "while" in str(jax.jit(f).lower(q, k, v).as_text()), "the blocked (lax.map) path was not taken"
  assert attention._cpu_blocks(b, n, t, s) == {64: (1, 64), 32: (4, 32), 256: (1, 32)}[t]
  np.testing.assert_allclose(jax.jit(f)(q, k, v), g(q, k, v), atol=2e-6)
  loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))
  grad = lambda fn: jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))  # one compile, not one per eager op
  ours = grad(f)(q, k, v)
  for a, ref in zip(ours, grad(g)(q, k, v)):
    np.testing.assert_allclose(a, ref, atol=1e-5)
  # bf16 inputs through the blocked backward: bf16 gradients, within bf16 rounding of the fp32 ones.
  for a, b in zip(grad(f)(*(x.astype(jnp.bfloat16) for x in (q, k, v))), ours):
    assert a.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(a.astype(jnp.float32) - b))) <= 0.05 * float(jnp.max(jnp.abs(b)))


def test_cpu_block_size_follows_the_last_level_cache(tmp_path):
  # sysfs as Linux writes it: index0-1 L1 data / instruction, index2 L2, index3 the shared L3.
  for i, (kind, size) in enumerate([("Data", "48K"), ("Instruction", "64K"), ("Unified", "2048K"),
                                    ("Unified", "491520K")]):
    (tmp_path / f"index{i}").mkdir()
    (tmp_path / f"index{i}" / "type").write_text(kind + "\n")
    (tmp_path / f"index{i}" / "size").write_text(size + "\n")
  assert attention._last_level_cache_bytes(str(tmp_path)) == 480 * 2**20
  (tmp_path / "index3" / "size").write_text("16M\n")
  assert attention._last_level_cache_bytes(str(tmp_path)) == 16 * 2**20
  assert attention._last_level_cache_bytes(str(tmp_path / "absent")) is None  # no sysfs (macOS, Windows)
  # 16 MiB steps where the cache holds two of them, else the 4 MiB step; unknown -> the 4 MiB step.
  assert attention._block_logits(480 * 2**20) == attention._block_logits(32 * 2**20) == 2**22
  assert attention._block_logits(16 * 2**20) == attention._block_logits(None) == 2**20
  # SD 1.5's 4096-token self-attention at batch 2: 1024 queries per step with the large step, 256 with the small.
  assert attention._cpu_blocks(2, 8, 4096, 4096) == (1, {2**22: 1024, 2**20: 256}[attention._CPU_BLOCK_LOGITS])


@pytest.mark.parametrize("shape", [(2, 16, 16, 4, 8), (2, 33, 77, 2, 40)])  # self; cross on 77 tokens
def test_hand_written_backward_matches_autodiff(shape):
  # The unmasked path's custom VJP (D = rowsum(dO * O)) against autodiff through jax.nn's attention.
  q, k, v = _qkv(*shape, seed=2)
  f = lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="xla")
  g = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
  loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)) * jnp.arange(a[0].shape[-1]))
  grad = lambda fn: jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))  # one compile, not one per eager op
  ours = grad(f)(q, k, v)
  for a, b in zip(ours, grad(g)(q, k, v)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)
  # bf16 inputs: gradients come back in bf16, within bf16 rounding of the fp32 ones.
  bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  for a, b in zip(grad(f)(*bf), ours):
    assert a.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(a.astype(jnp.float32) - b))) <= 0.05 * float(jnp.max(jnp.abs(b)))


def _divided_shapes(fn, *args) -> set[tuple[int, ...]]:
  """The shapes of the arrays `fn` divides: (..., T, H) where the softmax's division is applied to the output,
  (..., T, S) where it makes the probabilities."""
  text = str(jax.make_jaxpr(fn)(*args))
  return {tuple(int(d) for d in m.split(",")) for m in re.findall(r"\w+:f32\[([\d,]+)\] = div ", text)}


@pytest.mark.parametrize("s, text_length", [(64, False), (77, True), (128, True), (129, False)])
def test_text_length_keys_divide_the_output_and_match_jax_nn(s, text_length):
  q, k, v = _qkv(2, 9, s, 2, 8, seed=3)
  f = lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="xla")
  divided = _divided_shapes(f, q, k, v)
  assert ((2, 2, 9, 8) in divided) == text_length and ((2, 2, 9, s) in divided) == (not text_length), divided
  out = jax.jit(f)(q, k, v)
  np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v, implementation="xla"), atol=2e-6)
  bf16 = jax.jit(f)(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf16, np.float32), out, atol=0.05)


def test_text_length_keys_are_blocked_on_the_cpu_from_four_times_as_many_logits(monkeypatch):
  monkeypatch.setattr(attention, "_CPU_BLOCK_LOGITS", 2**12)
  monkeypatch.setattr(attention, "_CPU_BLOCKED_FROM", 2**13)
  f = lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="xla")
  g = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
  loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))
  grad = lambda fn: jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))  # one compile, not one per eager op
  for t, s, blocked in [(32, 77, False), (128, 77, True), (32, 200, True)]:  # 9856, 39424 and 25600 logits
    q, k, v = _qkv(2, t, s, 2, 8, seed=4)
    assert ("while" in jax.jit(f).lower(q, k, v).as_text()) == blocked, (t, s)
    np.testing.assert_allclose(jax.jit(f)(q, k, v), jax.jit(g)(q, k, v), atol=2e-6)
    for a, b in zip(grad(f)(q, k, v), grad(g)(q, k, v)):
      np.testing.assert_allclose(a, b, atol=1e-5)


# The Pallas TPU flash-attention path, run on the CPU in Pallas' TPU interpret mode (which also
# checks the kernel's buffer accesses: out-of-bounds reads raise, scratch memory starts as NaN).


@pytest.fixture
def interpret():
  from jax.experimental.pallas import tpu as pltpu
  try:
    with pltpu.force_tpu_interpret_mode():
      yield
  finally:
    pltpu.reset_tpu_interpret_mode_state()  # the interpreter's shared state, left set if a kernel raised


def _max_diff(a, b):
  return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


# fp32 differences from the XLA path: measured at most 8.3e-7 on these (outputs of order 1; 2.0e-6
# for head_dim 512, the VAE's); the bound leaves room for other CPUs' summation orders.
@pytest.mark.parametrize(
    "shape,causal",
    [
        ((2, 256, 256, 2, 40), False),  # SD 1.5 self-attention head size, padded to 128
        ((2, 256, 77, 2, 40), False),  # cross-attention on 77 context tokens: keys padded and masked
        ((1, 128, 128, 2, 64), True),  # SD 2 head size, causal
        ((1, 77, 77, 2, 64), True),  # CLIP's causal self-attention, queries and keys padded
        ((1, 128, 128, 1, 160), False),  # head_dim above 128 and not a multiple of it (kernel rejects it unpadded)
    ])
def test_pallas_matches_xla(interpret, shape, causal):
  q, k, v = _qkv(*shape, seed=2)
  ours = attention.dot_product_attention(q, k, v, is_causal=causal, implementation="pallas")
  ref = attention.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
  assert ours.shape == ref.shape and ours.dtype == ref.dtype
  assert _max_diff(ours, ref) <= 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_pallas_several_blocks_and_gradients(interpret, monkeypatch, causal):
  # 128-blocks make the small arrays take the kernel's multi-block path (online softmax over key
  # blocks, the last one partly padding: 200 keys -> 256) in the forward and in both backward kernels.
  monkeypatch.setattr(attention, "_PALLAS_BLOCKS", (128,))
  q, k, v = _qkv(1, 256, 200, 2, 40, seed=3)  # causal: query i sees keys 0..i, as in the XLA path
  f = lambda q, k, v: attention.dot_product_attention(q, k, v, is_causal=causal, implementation="pallas")
  g = lambda q, k, v: attention.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
  assert _max_diff(jax.jit(f)(q, k, v), g(q, k, v)) <= 1e-5
  loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))
  grads = jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))(q, k, v)
  # Measured at most 4.8e-6, on gradients up to 7.1 (the causal dv).
  for ours, ref in zip(grads, jax.jit(jax.grad(loss(g), argnums=(0, 1, 2)))(q, k, v)):
    assert _max_diff(ours, ref) <= 2e-5


def test_pallas_bf16_close_to_fp32(interpret):
  q, k, v = _qkv(2, 256, 77, 2, 40, seed=4)
  exact = attention.dot_product_attention(q, k, v, implementation="xla")
  q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
  ours = attention.dot_product_attention(q16, k16, v16, implementation="pallas")
  assert ours.dtype == jnp.bfloat16
  # bf16 keeps 8 bits: inputs, probabilities and outputs (up to 1.24 here) round to 2**-9
  # relative. Measured 9.4e-3 from fp32, the same as the XLA path in bf16.
  assert _max_diff(ours, exact) <= 2e-2


def test_auto_picks_pallas_only_on_tpu_without_a_mask(monkeypatch):
  q, k, v = _qkv(1, 8, 8, 2, 8)
  mask = jnp.ones((1, 1, 8, 8), bool)
  cpu_auto = attention.dot_product_attention(q, k, v, implementation="auto")
  np.testing.assert_array_equal(cpu_auto, attention.dot_product_attention(q, k, v, implementation="xla"))
  calls = []
  monkeypatch.setattr(attention, "_pallas_attention", lambda q, k, v, is_causal: calls.append(is_causal) or q)
  attention.dot_product_attention(q, k, v, implementation="auto")
  assert calls == []  # on the CPU
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  attention.dot_product_attention(q, k, v, is_causal=True, implementation="auto")
  assert calls == [True]
  # A general mask goes to XLA, also when Pallas is asked for.
  monkeypatch.setattr(attention, "_xla_attention", lambda q, k, v, is_causal, mask: q)
  attention.dot_product_attention(q, k, v, mask=mask, implementation="auto")
  attention.dot_product_attention(q, k, v, mask=mask, implementation="pallas")
  assert calls == [True]


def test_unet_with_pallas_attention(interpret):
  # A tiny SD 1.x U-Net: self-attention on 256 and 64 tokens, cross-attention on 7, head_dim 8 / 16.
  from jaxsd.models.unet import UNet2DConditionConfig, UNet2DConditionModel
  cfg = UNet2DConditionConfig.from_dict(
      dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))
  rng = np.random.RandomState(0)
  sample = rng.randn(1, 16, 16, cfg.in_channels).astype(np.float32)
  context = rng.randn(1, 7, cfg.cross_attention_dim).astype(np.float32)
  t = np.array([500])
  # Random parameters of the init's shapes (compiling the init would take longer than the test).
  leaves, tree = jax.tree.flatten(jax.eval_shape(UNet2DConditionModel(cfg).init, jax.random.key(0), sample, t, context))
  params = tree.unflatten(
      [rng.randn(*x.shape).astype(np.float32) / np.sqrt(np.prod(x.shape[:-1]) if x.ndim > 1 else 10) for x in leaves])
  jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})  # as test_unet.py
  out = {
      impl: jit(UNet2DConditionModel(cfg, attention_implementation=impl).apply)(params, sample, t, context)
      for impl in ("xla", "pallas")
  }
  assert float(jnp.std(out["xla"])) > 0.1
  # Measured 3.9e-7.
  assert _max_diff(out["pallas"], out["xla"]) <= 1e-5


def test_cudnn_only_where_its_backward_works(monkeypatch):
  # cuDNN's fused attention backward refused SD's 77-token cross-attention on an H200
  # ("Unsupported sequence length Q 1024, KV 77"): such keys are padded to 128 (below), or, with
  # padding off, take the XLA path; queries and causal attention are never padded.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  bf16 = lambda *shape: jnp.zeros(shape, jnp.bfloat16)
  assert attention._cudnn_ok(bf16(2, 1024, 8, 40), bf16(2, 1024, 8, 40))
  assert attention._cudnn_ok(bf16(2, 1024, 8, 40), bf16(2, 77, 8, 40))  # cross-attention, padded keys
  with attention.cudnn_key_padding(False):
    assert not attention._cudnn_ok(bf16(2, 1024, 8, 40), bf16(2, 77, 8, 40))
  assert attention._cudnn_ok(bf16(2, 1024, 8, 40), bf16(2, 77, 8, 40))  # restored on exit
  assert not attention._cudnn_ok(bf16(2, 77, 12, 64), bf16(2, 77, 12, 64), is_causal=True)  # CLIP text
  assert not attention._cudnn_ok(bf16(2, 1000, 8, 40), bf16(2, 1024, 8, 40))  # queries not padded
  assert not attention._cudnn_ok(bf16(2, 256, 8, 160), bf16(2, 256, 8, 160))  # head_dim > 128
  assert not attention._cudnn_ok(jnp.zeros((2, 1024, 8, 40)), jnp.zeros((2, 1024, 8, 40)))  # fp32


@pytest.mark.parametrize("s", [77, 64, 130])
def test_padded_keys_are_exact(s):
  """The padding the cuDNN path adds (keys and values zero-padded to a multiple of 64, masked by
  `key_value_seq_lengths`), run through jax.nn's XLA implementation, which takes the same
  arguments: output and gradients equal the unpadded attention's. (cuDNN itself runs only on a
  GPU: `benchmarks/gpu_check.py` compares it there.) Fails if the lengths are dropped: the zero
  keys then take softmax weight (checked: 2e-1 off)."""
  q, k, v = _qkv(2, 64, s, 4, 8, seed=3)
  g = jax.random.normal(jax.random.key(4), q.shape)

  def padded(q, k, v):
    kp, vp, lengths = attention._padded_keys(q, k, v)
    assert kp.shape[1] % 64 == 0 and (lengths is None) == (s % 64 == 0)
    return jax.nn.dot_product_attention(q, kp, vp, key_value_seq_lengths=lengths, implementation="xla")

  def plain(q, k, v):
    return attention.dot_product_attention(q, k, v, implementation="xla")

  outs = {}
  for name, fn in (("padded", padded), ("plain", plain)):
    out, vjp = jax.vjp(fn, q, k, v)
    outs[name] = (out, *vjp(g))
  for a, b in zip(outs["padded"], outs["plain"]):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)
