"""The three stages on a tiny config: shapes of what they build, finite losses (CLIP's with gradients), and the
pieces that hand one stage's result to the next (text tower, scaling factor, joint U-Net params)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd import tokenizer as tok
from jaxsd.diffusion import SchedulerConfig
from jaxsd.models.unet import UNet2DConditionModel
from jaxsd.training import stages
from train.configs import smoke

B = 2


@pytest.fixture(scope="module")
def cfg():
  c = smoke.get_config()  # smaller still: the stages' own logic, not learning, is under test here
  c.vae.update(block_out_channels=(8, 16), norm_num_groups=4)
  c.unet.update(block_out_channels=(8, 8, 16), norm_num_groups=4)
  return c


def _batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  s = cfg.data.image_size
  ids = tok.tokenize(tok.load_tokenizer(), ["a red circle", "a blue square"],
                     max_length=cfg.clip.text.max_position_embeddings)
  return {"image": jnp.asarray(rng.uniform(-1, 1, (B, s, s, 3)), jnp.float32), "input_ids": jnp.asarray(ids)}


def _params(stage, seed=0):
  """Random parameters of the tree `stage.init_params` builds (compiling the real init takes far longer)."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(stage.init_params, jax.random.key(0))
  return jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype), abstract)


def _loss(stage, batch, frozen=None):
  params = _params(stage)
  loss, aux = jax.jit(stage.loss_fn)(params, batch, jax.random.key(1), frozen)
  return params, float(loss), aux


def test_dtype_of(cfg):
  assert stages.dtype_of(cfg) == jnp.float32
  with pytest.raises(ValueError, match="choose one of float32, bfloat16, float16"):
    stages.dtype_of(_with(cfg, dtype="int8"))


def _with(cfg, **kw):
  c = cfg.copy_and_resolve_references()
  with c.unlocked():
    c.update(kw)
  return c


def test_clip_stage_and_its_text_tower(cfg):
  stage = stages.clip_stage(cfg)
  batch = _batch(cfg)
  params, loss, aux = _loss(stage, batch)
  assert np.isfinite(loss) and loss > 0
  grads = jax.jit(jax.grad(lambda p: stage.loss_fn(p, batch, jax.random.key(1), None)[0]))(params)
  assert float(jnp.abs(grads["logit_scale"])) > 0 and float(jnp.abs(grads["text_projection"]["kernel"]).max()) > 0
  assert set(aux) == {"batch_i2t_accuracy", "temperature_inv"}
  clip = stage.modules["clip"]
  te, te_params = stages.text_encoder_from_clip(clip, params)
  pooled = te.apply({"params": te_params}, batch["input_ids"]).pooler_output
  features = clip.apply({"params": params}, batch["input_ids"], method=clip.get_text_features)
  np.testing.assert_allclose(pooled @ params["text_projection"]["kernel"], features, rtol=1e-5, atol=1e-5)


def test_vae_stage_and_scaling_factor(cfg):
  stage = stages.vae_stage(cfg)
  params, loss, _ = _loss(stage, _batch(cfg))
  assert np.isfinite(loss) and loss > 0
  vae = stage.modules["vae"]
  assert vae.config.scaling_factor == 1.0  # measured after training
  images = np.asarray(_batch(cfg)["image"])
  key = jax.random.key(2)
  factor = stages.measure_scaling_factor(vae, params, images, key)
  z = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))(params, jnp.asarray(images)).sample(key)
  np.testing.assert_allclose(factor, 1.0 / float(jnp.std(z)), rtol=1e-5)


@pytest.mark.parametrize("joint", [False, True])
def test_unet_stage(cfg, joint):
  cfg = _with(cfg, unet=dict(cfg.unet.to_dict(), train_text_encoder=joint))
  clip = stages.clip_stage(cfg)
  te, te_params = stages.text_encoder_from_clip(clip.modules["clip"], _params(clip))
  vae_stage = stages.vae_stage(cfg)
  vae, vae_params = vae_stage.modules["vae"], _params(vae_stage, seed=1)
  ucfg = stages.unet_config(cfg, vae.config, te.config)
  assert ucfg.sample_size * vae.config.downsampling_factor == cfg.data.image_size
  assert ucfg.in_channels == ucfg.out_channels == vae.config.latent_channels
  assert ucfg.cross_attention_dim == te.config.hidden_size
  stage = stages.unet_stage(cfg, unet=UNet2DConditionModel(ucfg), vae=vae, vae_params=vae_params, text_encoder=te,
                            text_params=te_params, scheduler=SchedulerConfig(), tokenizer=tok.load_tokenizer())
  params, loss, _ = _loss(stage, _batch(cfg), stage.frozen)
  assert np.isfinite(loss) and loss > 0
  unet_params, text = stages.split_unet_params(params)
  assert (text is not None) == joint
  assert ("text" in stage.frozen) != joint and "vae" in stage.frozen
  if joint:
    assert jax.tree.structure(text) == jax.tree.structure(te_params)
  assert "conv_in" in unet_params


def test_beta_schedule_is_trained_and_exported_as_diffusers_reads_it(cfg, tmp_path):
  """unet.beta_schedule: the training schedule's alpha_bar is diffusers' for that schedule name, and the
  exported scheduler folder gives diffusers the same alpha_bar (the cosine schedule ends near pure noise)."""
  import diffusers

  from jaxsd import model_folder
  from jaxsd.diffusion import alphas_cumprod

  c = cfg.copy_and_resolve_references()
  c.unet.prediction_type = "v_prediction"
  c.unet.beta_schedule = "squaredcos_cap_v2"
  sched = stages.scheduler_config(c)
  ours = np.asarray(alphas_cumprod(sched))
  model_folder.write_scheduler(sched, str(tmp_path / "scheduler"))
  ref = diffusers.DDIMScheduler.from_pretrained(str(tmp_path / "scheduler"))
  assert ref.config.beta_schedule == "squaredcos_cap_v2"
  np.testing.assert_allclose(ours, ref.alphas_cumprod.numpy(), rtol=1e-6, atol=1e-9)
  assert ours[-1] < 1e-6  # near pure noise, unlike SD's 0.0047
  c.unet.beta_schedule = "scaled_linear"
  assert abs(float(alphas_cumprod(stages.scheduler_config(c))[-1]) - 0.0047) < 1e-4


def test_zero_terminal_snr_schedule_is_exported_as_diffusers_reads_it(cfg, tmp_path):
  """unet.rescale_betas_zero_snr: the training schedule ends on pure noise, and the exported scheduler
  config makes diffusers sample it the same way (DDIMScheduler, which honours the key, trailing spacing)."""
  import diffusers

  from jaxsd import model_folder
  from jaxsd.diffusion import alphas_cumprod

  c = cfg.copy_and_resolve_references()
  c.unet.prediction_type = "v_prediction"
  assert float(alphas_cumprod(stages.scheduler_config(c))[-1]) > 0  # off: SD's schedule
  c.unet.rescale_betas_zero_snr = True
  sched = stages.scheduler_config(c)
  assert float(alphas_cumprod(sched)[-1]) == 0.0
  model_folder.write_scheduler(sched, str(tmp_path / "scheduler"))
  with open(tmp_path / "scheduler" / "scheduler_config.json") as f:
    assert json.load(f)["_class_name"] == "DDIMScheduler"  # diffusers' PNDMScheduler ignores the key
  ref = diffusers.DDIMScheduler.from_pretrained(str(tmp_path / "scheduler"))
  assert ref.config.rescale_betas_zero_snr and ref.config.timestep_spacing == "trailing"
  assert ref.config.prediction_type == "v_prediction" and float(ref.alphas_cumprod[-1]) == 0.0
  ref.set_timesteps(10)
  assert int(ref.timesteps[0]) == 999


def test_latent_mask_pools_each_latent_pixels_patch():
  mask = np.zeros((2, 8, 8, 1), np.float32)
  mask[0, :2, :2] = 1.0  # one whole 2x2 patch
  mask[1, 0, 0] = 1.0  # a quarter of one
  got = np.asarray(stages.latent_mask(jnp.asarray(mask), (4, 4)))
  want = mask.reshape(2, 4, 2, 4, 2, 1).mean(axis=(2, 4))
  np.testing.assert_array_equal(got, want)
  assert got[0, 0, 0, 0] == 1.0 and got[1, 0, 0, 0] == 0.25 and got.sum() == 1.25
  np.testing.assert_array_equal(np.asarray(stages.latent_mask(jnp.asarray(want), (4, 4))), want)  # already there
  with pytest.raises(ValueError, match="does not pool"):
    stages.latent_mask(jnp.asarray(mask), (3, 3))


def test_dilate_grows_a_mask_by_whole_pixels():
  """`dilate`: the maximum over a (2d+1)^2 window, so a pixel grows to a (2d+1)^2 square (clipped at the image's
  edge) keeping its value; d = 0 returns the mask as is."""
  mask = np.zeros((2, 7, 7, 1), np.float32)
  mask[0, 3, 3] = 0.6
  mask[1, 0, 6] = 1.0
  np.testing.assert_array_equal(np.asarray(stages.dilate(jnp.asarray(mask), 0)), mask)
  want = np.zeros_like(mask)
  want[0, 2:5, 2:5] = 0.6
  want[1, 0:2, 5:7] = 1.0
  np.testing.assert_array_equal(np.asarray(stages.dilate(jnp.asarray(mask), 1)), want)
  want[0, 1:6, 1:6] = 0.6
  want[1, 0:3, 4:7] = 1.0
  np.testing.assert_array_equal(np.asarray(stages.dilate(jnp.asarray(mask), 2)), want)


def _check_mask_weighting(cfg, loss):
  """`loss(weight, mask=None)`: an empty mask gives the unweighted loss, a weight of 0 ignores the mask, a mask over
  a quarter of the image changes the loss."""
  s = cfg.data.image_size
  part = np.zeros((B, s, s, 1), np.float32)
  part[:, :s // 2, :s // 2] = 1.0
  plain = loss(0.0)
  np.testing.assert_allclose(loss(4.0, np.zeros_like(part)), plain, rtol=1e-6)
  np.testing.assert_allclose(loss(0.0, part), plain, rtol=1e-6)
  assert abs(loss(4.0, part) - plain) > 1e-4 * plain
  return part


def test_vae_stage_weights_the_loss_by_the_batchs_mask(cfg):
  """`vae.foreground_loss_weight` with a batch "loss_mask" (per pixel); `vae.foreground_dilation` changes the loss
  of a mask with an edge."""

  def loss(weight, mask=None, dilation=0):
    c = _with(cfg, vae=dict(cfg.vae.to_dict(), foreground_loss_weight=weight, foreground_dilation=dilation))
    batch = _batch(cfg)
    if mask is not None:
      batch["loss_mask"] = jnp.asarray(mask)
    return _loss(stages.vae_stage(c), batch)[1]

  part = _check_mask_weighting(cfg, loss)
  assert abs(loss(4.0, part, dilation=1) - loss(4.0, part)) > 1e-5 * loss(4.0, part)


def test_unet_stage_weights_the_loss_by_the_batchs_mask(cfg):
  """`unet.foreground_loss_weight` with a batch "loss_mask" (pooled onto the latents' grid)."""
  clip = stages.clip_stage(cfg)
  te, te_params = stages.text_encoder_from_clip(clip.modules["clip"], _params(clip))
  vae_stage = stages.vae_stage(cfg)
  vae, vae_params = vae_stage.modules["vae"], _params(vae_stage, seed=1)
  unet = UNet2DConditionModel(stages.unet_config(cfg, vae.config, te.config))

  def loss(weight, mask=None):
    c = _with(cfg, unet=dict(cfg.unet.to_dict(), foreground_loss_weight=weight))
    stage = stages.unet_stage(c, unet=unet, vae=vae, vae_params=vae_params, text_encoder=te, text_params=te_params,
                              scheduler=SchedulerConfig(), tokenizer=tok.load_tokenizer())
    batch = _batch(cfg)
    if mask is not None:
      batch["loss_mask"] = jnp.asarray(mask)
    return _loss(stage, batch, stage.frozen)[1]

  _check_mask_weighting(cfg, loss)
