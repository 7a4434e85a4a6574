"""The U-Net stage's latent cache: same loss as the uncached stage, resumable building, exact data resume."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd import pretrained
from jaxsd import tokenizer as tok
from jaxsd.diffusion import SchedulerConfig
from jaxsd.training import latent_cache, stages
from tests import reference
from train.configs import smoke


def test_a_cached_batch_gives_the_uncached_loss(tmp_path):
  """The stage's loss on {moments, context} from `cache_encoder` equals its loss on {image, input_ids} for
  the same rng: the same posterior draw, the same caption-dropout draws (half the captions dropped here)."""
  folder = reference.make_tiny_sd_folder(str(tmp_path / "sd"))
  vae, vae_params = pretrained.load_vae(os.path.join(folder, "vae"))
  te, te_params = pretrained.load_text_encoder(os.path.join(folder, "text_encoder"))
  unet, unet_params = pretrained.load_unet(os.path.join(folder, "unet"))
  tokenizer = tok.load_tokenizer(folder)
  cfg = smoke.get_config()
  cfg.unet.caption_dropout = 0.5
  cfg.unet.train_text_encoder = False
  stage = stages.unet_stage(cfg, unet=unet, vae=vae, vae_params=vae_params, text_encoder=te, text_params=te_params,
                            scheduler=SchedulerConfig(), tokenizer=tokenizer)
  size = unet.config.sample_size * vae.config.downsampling_factor
  images = jax.random.uniform(jax.random.key(0), (8, size, size, 3), minval=-1, maxval=1)
  ids = jnp.asarray(
      tok.tokenize(tokenizer, [f"a red circle number {i}" for i in range(8)],
                   max_length=te.config.max_position_embeddings))
  cached = jax.jit(stages.cache_encoder(vae, te))(vae_params, te_params, {"image": images, "input_ids": ids})
  assert set(cached) == {"moments", "context"}
  moments, context = cached["moments"], cached["context"]
  assert moments.shape == (8, unet.config.sample_size, unet.config.sample_size, 2 * vae.config.latent_channels)
  loss = jax.jit(stage.loss_fn)
  for seed in range(3):
    rng = jax.random.key(seed)
    raw, _ = loss(unet_params, {"image": images, "input_ids": ids}, rng, stage.frozen)
    cached, _ = loss(unet_params, {"moments": moments, "context": context}, rng, stage.frozen)
    np.testing.assert_allclose(float(cached), float(raw), rtol=1e-5)
  # and the cache is not ignored: other contexts give another loss
  other, _ = loss(unet_params, {"moments": moments, "context": context[::-1]}, jax.random.key(0), stage.frozen)
  assert abs(float(other) - float(raw)) > 1e-6
  # With a mask (unet.foreground_loss_weight): stored on the latents' grid, the same loss.
  cfg.unet.foreground_loss_weight = 4.0
  stage = stages.unet_stage(cfg, unet=unet, vae=vae, vae_params=vae_params, text_encoder=te, text_params=te_params,
                            scheduler=SchedulerConfig(), tokenizer=tokenizer)
  loss = jax.jit(stage.loss_fn)
  mask = (jax.random.uniform(jax.random.key(5), (8, size, size, 1)) > 0.7).astype(jnp.float32)
  with_mask = {"image": images, "input_ids": ids, "loss_mask": mask}
  cached = jax.jit(stages.cache_encoder(vae, te))(vae_params, te_params, with_mask)
  assert cached["loss_mask"].shape == (8, unet.config.sample_size, unet.config.sample_size, 1)
  rng = jax.random.key(7)
  raw, _ = loss(unet_params, with_mask, rng, stage.frozen)
  np.testing.assert_allclose(float(loss(unet_params, cached, rng, stage.frozen)[0]), float(raw), rtol=1e-5)
  unweighted, _ = loss(unet_params, {"image": images, "input_ids": ids}, rng, stage.frozen)
  assert abs(float(raw) - float(unweighted)) > 1e-6


def _batches(n, batch, fail_after=None):
  rng = np.random.default_rng(0)
  images = rng.standard_normal((n, 2, 2, 3)).astype(np.float32)
  ids = np.arange(n)[:, None].repeat(3, 1).astype(np.int32)
  for i, start in enumerate(range(0, n, batch)):
    if fail_after is not None and i == fail_after:
      raise KeyboardInterrupt("killed while caching")
    yield {"image": images[start:start + batch], "input_ids": ids[start:start + batch]}


class _Encoder:
  """A stand-in for the VAE and text encoder that counts the examples it encodes."""

  def __init__(self):
    self.calls, self.sizes = 0, []

  def __call__(self, batch):
    images, ids = batch["image"], batch["input_ids"]
    self.calls += 1
    self.sizes.append(len(images))
    return {
        "moments": np.concatenate([images, -images], -1),
        "context": ids[..., None].astype(np.float32) * np.ones(4, np.float32)
    }


def test_build_resumes_after_a_kill_and_rebuilds_for_other_weights(tmp_path):
  spec = {"dataset": "x", "weights": "a"}
  ref_dir, enc = str(tmp_path / "ref"), _Encoder()
  full = latent_cache.build(ref_dir, spec, _batches(50, 4), enc, batch_size=4, shard_size=8)
  assert len(full) == 50 and enc.calls == 13 and set(enc.sizes) == {4}  # the short last batch was padded
  np.testing.assert_array_equal(full.take(np.arange(50))["context"][:, 0, 0], np.arange(50))

  d, enc = str(tmp_path / "killed"), _Encoder()
  with pytest.raises(KeyboardInterrupt):
    latent_cache.build(d, spec, _batches(50, 4, fail_after=7), enc, batch_size=4, shard_size=8)
  assert sorted(f for f in os.listdir(d) if f.startswith("moments")) == [
      "moments-00000.npy", "moments-00001.npy", "moments-00002.npy"
  ]
  enc = _Encoder()
  resumed = latent_cache.build(d, spec, _batches(50, 4), enc, batch_size=4, shard_size=8)
  assert enc.calls == 13 - 6  # shards 0-2 (6 batches) were kept
  for key in ("moments", "context"):
    np.testing.assert_array_equal(resumed.take(np.arange(50))[key], full.take(np.arange(50))[key])

  enc = _Encoder()
  latent_cache.build(d, spec, _batches(50, 4), enc, batch_size=4, shard_size=8)
  assert enc.calls == 0  # complete: read, not encoded
  latent_cache.build(d, dict(spec, weights="b"), _batches(50, 4), enc, batch_size=4, shard_size=8)
  assert enc.calls == 13  # other weights: encoded again


def test_cached_batches_cover_every_example_and_resume_exactly(tmp_path):
  cache = latent_cache.build(str(tmp_path / "c"), {}, _batches(48, 8), _Encoder(), batch_size=8, shard_size=16)
  it = iter(latent_cache.make_dataset(cache, batch_size=8, seed=3))
  epoch = [next(it) for _ in range(6)]
  seen = np.concatenate([b["context"][:, 0, 0] for b in epoch])
  assert sorted(seen) == list(range(48)) and list(seen) != list(range(48))  # shuffled, each once per epoch
  for b in epoch:  # moments and context of a row belong to the same example
    np.testing.assert_array_equal(b["moments"][..., :3], b["moments"][..., 3:] * -1)
  state = it.get_state()
  after = [next(it) for _ in range(3)]
  again = iter(latent_cache.make_dataset(cache, batch_size=8, seed=3))
  again.set_state(state)
  for a, b in zip(after, [next(again) for _ in range(3)]):
    np.testing.assert_array_equal(a["context"], b["context"])
  second_epoch = np.concatenate([b["context"][:, 0, 0] for b in after])
  assert not np.array_equal(second_epoch, seen[:24])  # reshuffled
