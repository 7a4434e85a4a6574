"""The training objectives against independent formulas: diffusers' recipes, numpy, torch.distributions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from jaxsd.diffusion import SchedulerConfig, alphas_cumprod, schedules
from jaxsd.models.vae import DiagonalGaussianDistribution
from jaxsd.training import losses


def _scheduler():
  return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_match_diffusers_recipe(prediction_type, gamma):
  """diffusers' examples/text_to_image/train_text_to_image.py: min(snr, gamma) / snr (eps), / (snr + 1) (v)."""
  sched = _scheduler()
  t = torch.tensor([0, 1, 10, 100, 250, 500, 750, 999])
  snr = compute_snr(sched, t)
  w = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
  w = w / snr if prediction_type == "epsilon" else w / (snr + 1)
  ac = jnp.asarray(alphas_cumprod(SchedulerConfig()))
  ours = losses.min_snr_weights(ac, jnp.asarray(t.numpy()), gamma, prediction_type)
  np.testing.assert_allclose(np.asarray(ours), w.numpy(), rtol=2e-5)


def test_v_target_matches_diffusers_get_velocity():
  sched = _scheduler()
  rng = np.random.default_rng(0)
  x0 = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
  noise = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
  t = np.array([0, 300, 600, 999])
  ref = sched.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
  ac = jnp.asarray(alphas_cumprod(SchedulerConfig()))
  ours = schedules.velocity(ac, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
  np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-6)


def test_infonce_matches_numpy():
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((7, 7)).astype(np.float32) * 3

  def xent(l):  # rows are predictions, the diagonal is the label
    l = l - l.max(1, keepdims=True)
    return -(np.diag(l) - np.log(np.exp(l).sum(1))).mean()

  ref = (xent(logits) + xent(logits.T)) / 2
  np.testing.assert_allclose(float(losses.clip_contrastive_loss(jnp.asarray(logits))), ref, rtol=1e-5)
  # A batch whose pairs are matched with a clear margin has a loss near 0; an uninformed one log(n).
  assert float(losses.clip_contrastive_loss(jnp.eye(7) * 50)) < 1e-6
  np.testing.assert_allclose(float(losses.clip_contrastive_loss(jnp.zeros((7, 7)))), np.log(7), rtol=1e-6)


def test_vae_kl_matches_closed_form_and_torch():
  rng = np.random.default_rng(2)
  mean = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
  logvar = rng.uniform(-3, 2, (3, 4, 4, 2)).astype(np.float32)
  post = DiagonalGaussianDistribution.from_moments(jnp.concatenate([mean, logvar], -1))
  closed = 0.5 * (mean**2 + np.exp(logvar) - 1 - logvar).sum(axis=(1, 2, 3))
  q = torch.distributions.Normal(torch.from_numpy(mean), torch.from_numpy(np.exp(0.5 * logvar)))
  p = torch.distributions.Normal(torch.zeros(()), torch.ones(()))
  ref = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3)).numpy()
  np.testing.assert_allclose(closed, ref, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(post.kl()), ref, rtol=1e-5)
  loss, aux = losses.vae_loss(jnp.zeros((3, 2, 2, 3)), jnp.ones((3, 2, 2, 3)), post.kl(), 0.5, 1.0, 2.0)
  np.testing.assert_allclose(float(loss), 1.0 + 2.0 + 0.5 * ref.mean(), rtol=1e-5)
  assert float(aux["l1"]) == 1.0 and float(aux["mse"]) == 1.0


def test_vae_edge_term_against_numpy():
  """The gradient-difference term: the mean |d(rec) - d(img)| over vertical and horizontal neighbour
  differences, written out with numpy loops; a constant offset (no edge error) costs nothing."""
  rng = np.random.default_rng(3)
  img = rng.uniform(-1, 1, (2, 5, 6, 3)).astype(np.float32)
  rec = rng.uniform(-1, 1, (2, 5, 6, 3)).astype(np.float32)
  kl = jnp.zeros((2,))
  vert = [
      abs((rec[b, i + 1, j, c] - rec[b, i, j, c]) - (img[b, i + 1, j, c] - img[b, i, j, c]))
      for b in range(2)
      for i in range(4)
      for j in range(6)
      for c in range(3)
  ]
  horiz = [
      abs((rec[b, i, j + 1, c] - rec[b, i, j, c]) - (img[b, i, j + 1, c] - img[b, i, j, c]))
      for b in range(2)
      for i in range(5)
      for j in range(5)
      for c in range(3)
  ]
  edge = (np.mean(vert) + np.mean(horiz)) / 2
  base, _ = losses.vae_loss(jnp.asarray(rec), jnp.asarray(img), kl, 0.0, 1.0, 1.0)
  loss, aux = losses.vae_loss(jnp.asarray(rec), jnp.asarray(img), kl, 0.0, 1.0, 1.0, edge_weight=0.5)
  np.testing.assert_allclose(float(aux["edge_l1"]), edge, rtol=1e-5)
  np.testing.assert_allclose(float(loss), float(base) + 0.5 * edge, rtol=1e-5)
  _, shifted = losses.vae_loss(jnp.asarray(img + 0.3), jnp.asarray(img), kl, 0.0, 1.0, 0.0, edge_weight=1.0)
  assert float(shifted["edge_l1"]) < 1e-6


def test_vae_pixel_weight_against_numpy():
  """`pixel_weight`: each example's L1 and L2 are weighted means, sum(w * e) / sum(w), then averaged over the
  batch (written out with numpy); weights of one everywhere give the unweighted loss; the logged terms stay
  unweighted."""
  rng = np.random.default_rng(4)
  img = rng.uniform(-1, 1, (2, 4, 5, 3)).astype(np.float32)
  rec = rng.uniform(-1, 1, (2, 4, 5, 3)).astype(np.float32)
  w = 1.0 + 3.0 * rng.uniform(0, 1, (2, 4, 5, 1)).astype(np.float32)
  kl = jnp.asarray([0.2, 0.4])
  err = rec - img
  wb = np.broadcast_to(w, err.shape)
  l1 = np.mean([(wb[b] * np.abs(err[b])).sum() / wb[b].sum() for b in range(2)])
  l2 = np.mean([(wb[b] * err[b]**2).sum() / wb[b].sum() for b in range(2)])
  loss, aux = losses.vae_loss(jnp.asarray(rec), jnp.asarray(img), kl, 0.1, 1.0, 2.0, pixel_weight=jnp.asarray(w))
  np.testing.assert_allclose(float(loss), l1 + 2.0 * l2 + 0.1 * 0.3, rtol=1e-5)
  np.testing.assert_allclose(float(aux["l1"]), np.abs(err).mean(), rtol=1e-5)
  base, _ = losses.vae_loss(jnp.asarray(rec), jnp.asarray(img), kl, 0.1, 1.0, 2.0)
  ones, _ = losses.vae_loss(jnp.asarray(rec), jnp.asarray(img), kl, 0.1, 1.0, 2.0, pixel_weight=jnp.ones((2, 4, 5, 1)))
  np.testing.assert_allclose(float(ones), float(base), rtol=1e-6)
  assert abs(float(loss) - float(base)) > 1e-3


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_caption_dropout_rate(rate):
  """Over 20,000 draws the fraction of empty captions is the rate within 4 standard errors; kept rows
  are unchanged and dropped rows are exactly the empty caption."""
  n = 20_000
  ids = jnp.tile(jnp.arange(1, 9)[None], (n, 1))
  empty = jnp.zeros((1, 8), jnp.int32)
  out = np.asarray(jax.jit(losses.drop_captions, static_argnums=3)(jax.random.key(0), ids, empty, rate))
  dropped = (out == 0).all(1)
  kept = (out == np.arange(1, 9)).all(1)
  assert (dropped | kept).all()
  assert abs(dropped.mean() - rate) < 4 * np.sqrt(rate * (1 - rate) / n)
  assert not np.asarray(losses.drop_captions(jax.random.key(1), ids, empty, 0.0) == 0).any()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_loss_is_zero_for_the_perfect_predictor(prediction_type):
  """The loss uses the right target: a U-Net that returns exactly the target has loss 0, one that
  returns the other target does not."""
  ac = jnp.asarray(alphas_cumprod(SchedulerConfig()))
  latents = jax.random.normal(jax.random.key(3), (4, 4, 4, 2))
  rng = jax.random.key(4)
  # Recreate the draws diffusion_loss makes from `rng`, to hand the "U-Net" the true noise.
  t_rng, n_rng = jax.random.split(rng)
  t = jax.random.randint(t_rng, (4,), 0, ac.shape[0])
  noise = jax.random.normal(n_rng, latents.shape, jnp.float32)
  eps_fn = lambda x, tt, c: noise  # noqa: E731
  v_fn = lambda x, tt, c: schedules.velocity(ac, latents, noise, t)  # noqa: E731
  right, wrong = (eps_fn, v_fn) if prediction_type == "epsilon" else (v_fn, eps_fn)
  loss, _ = losses.diffusion_loss(right, ac, latents, None, rng, prediction_type=prediction_type, min_snr_gamma=5.0)
  assert float(loss) < 1e-10
  loss, _ = losses.diffusion_loss(wrong, ac, latents, None, rng, prediction_type=prediction_type, min_snr_gamma=5.0)
  assert float(loss) > 1e-3


def _noise_seen_by_the_unet(**kw):
  """(the noise in the U-Net's input, the loss of a U-Net that returns it) for epsilon prediction; the
  noise is recovered from x_t and the timestep the U-Net is handed, as diffusers' add_noise defines x_t."""
  ac = jnp.asarray(alphas_cumprod(SchedulerConfig()))
  latents = jax.random.normal(jax.random.key(5), (64, 16, 16, 4))
  seen = []

  def unet_fn(x, t, c):
    a = ac[t][:, None, None, None]
    seen.append((x - jnp.sqrt(a) * latents) / jnp.sqrt(1 - a))
    return seen[-1]

  loss, _ = losses.diffusion_loss(unet_fn, ac, latents, None, jax.random.key(6), **kw)
  return np.asarray(seen[-1]), float(loss)


def test_noise_offset_and_input_perturbation_as_diffusers_defines_them():
  """diffusers' train_text_to_image.py: `noise_offset` adds offset * N(0, 1) per example and channel to the
  noise, and the target is that noise (a U-Net returning its input's noise has loss 0); `input_perturbation`
  noises the input with noise + gamma * N(0, 1) while the target stays `noise` (the same U-Net's loss is
  gamma^2). Both off: the draws are the ones without them (the default's runs reproduce)."""
  plain, plain_loss = _noise_seen_by_the_unet()
  off, _ = _noise_seen_by_the_unet(noise_offset=0.0, input_perturbation=0.0)
  np.testing.assert_array_equal(off, plain)
  assert plain_loss < 1e-8
  # Channel means over 16 x 16 positions: std 1/16 without an offset, sqrt(0.3^2 + 1/256) with one.
  offset, offset_loss = _noise_seen_by_the_unet(noise_offset=0.3)
  assert offset_loss < 1e-8
  assert abs(plain.mean(axis=(1, 2)).std() - 1 / 16) < 0.02
  assert abs(offset.mean(axis=(1, 2)).std() - np.sqrt(0.09 + 1 / 256)) < 0.05
  perturbed, perturbed_loss = _noise_seen_by_the_unet(input_perturbation=0.1)
  assert abs(perturbed_loss - 0.01) < 0.001
  assert abs(perturbed.std() - np.sqrt(1.01)) < 0.01


def test_stratified_timesteps_cover_every_stratum_and_are_uniform():
  """Stratified draws: each batch has exactly one timestep in every stratum [i T/B, (i+1) T/B), in a random
  order; over many batches every timestep is as frequent as under independent uniform draws (a chi-square
  bound), and a batch's mean is far less spread (the point of it)."""
  T, B, n = 1000, 8, 4000
  keys = jax.random.split(jax.random.key(0), n)
  strat = np.asarray(jax.vmap(lambda k: losses.sample_timesteps(k, B, T, "stratified"))(keys))
  unif = np.asarray(jax.vmap(lambda k: losses.sample_timesteps(k, B, T, "uniform"))(keys))
  assert strat.min() >= 0 and strat.max() < T
  np.testing.assert_array_equal(np.sort(strat // (T // B), axis=1), np.tile(np.arange(B), (n, 1)))
  assert (strat[:, 0] // (T // B)).std() > 1.5  # the strata are not always in the same order
  counts = np.bincount(strat.ravel() // 50, minlength=T // 50)  # 20 bins of 1,600 expected draws
  expected = n * B / len(counts)
  assert ((counts - expected)**2 / expected).sum() < 50  # chi-square, 19 degrees of freedom: p < 1e-4
  assert strat.mean(axis=1).std() < 0.25 * unif.mean(axis=1).std()
  with pytest.raises(ValueError, match="timestep_sampling 'sobol'"):
    losses.sample_timesteps(keys[0], B, T, "sobol")


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (0.5, 0.8)])
def test_logit_normal_timesteps_follow_sd3s_density(mean, std):
  """"logit_normal": the timesteps' distribution is diffusers' compute_density_for_timestep_sampling
  ("logit_normal" with the same logit_mean / logit_std; its u scaled to T timesteps as diffusers' SD3 script
  indexes them): equal deciles within sampling error (8,000 draws each); with mean 0, std 1 more draws at middle
  noise than uniform's and fewer near t = 0."""
  import torch
  from diffusers.training_utils import compute_density_for_timestep_sampling

  T, n = 1000, 8000
  ours = np.asarray(losses.sample_timesteps(jax.random.key(1), n, T, "logit_normal", mean, std))
  u = compute_density_for_timestep_sampling("logit_normal", n, logit_mean=mean, logit_std=std,
                                            generator=torch.Generator().manual_seed(0))
  ref = (u * T).long().clamp(max=T - 1).numpy()
  assert ours.min() >= 0 and ours.max() < T
  qs = np.linspace(0.1, 0.9, 9)
  np.testing.assert_allclose(np.quantile(ours, qs), np.quantile(ref, qs), atol=20)  # ~3 standard errors
  if mean == 0.0:
    middle = lambda t: ((t >= 250) & (t < 750)).mean()
    assert middle(ours) > 0.6 and (ours < 50).mean() < 0.02  # uniform: 0.5 and 0.05


def test_uniform_fraction_mixes_in_uniform_draws():
  """`uniform_fraction` f: each timestep uniform with probability f, else logit-normal: the share below t = 100
  (logit-normal (0.8, 1) alone: 0.14%) is f * 0.1 + (1 - f) * that, within sampling error (20,000 draws); f = 0
  gives the plain draws bit for bit."""
  T, n, key = 1000, 20000, jax.random.key(5)
  plain = np.asarray(losses.sample_timesteps(key, n, T, "logit_normal", 0.8, 1.0))
  np.testing.assert_array_equal(np.asarray(losses.sample_timesteps(key, n, T, "logit_normal", 0.8, 1.0, 0.0)), plain)
  low = (plain < 100).mean()
  assert low < 0.004  # 0.0014 expected
  for f in (0.2, 0.5):
    mixed = np.asarray(losses.sample_timesteps(key, n, T, "logit_normal", 0.8, 1.0, f))
    assert mixed.min() >= 0 and mixed.max() < T
    expected = f * 0.1 + (1 - f) * low
    assert abs((mixed < 100).mean() - expected) < 4 * np.sqrt(expected * (1 - expected) / n)
    assert abs((mixed != plain).mean() - f * (1 - 1 / T)) < 0.02  # the others keep their logit-normal draw


def test_pixel_weight_is_a_normalised_weighted_mean_against_numpy():
  """`pixel_weight`: each example's loss is sum(w e^2) / sum(w) over its latent pixels and channels (numpy), then
  the batch mean; a constant weight is the unweighted loss; the weighted pixels' errors count (1 + w) times."""
  ac = jnp.asarray(alphas_cumprod(SchedulerConfig()))
  latents = jax.random.normal(jax.random.key(7), (3, 4, 4, 2))
  pred = jax.random.normal(jax.random.key(8), latents.shape)
  unet_fn = lambda x, t, c: pred  # noqa: E731
  rng = jax.random.key(9)
  _, n_rng = jax.random.split(rng)
  noise = np.asarray(jax.random.normal(n_rng, latents.shape, jnp.float32))
  mask = np.zeros((3, 4, 4, 1), np.float32)
  mask[:, 1:3, 1:3] = 1.0
  mask[2] = 0.25
  weight = 1.0 + 4.0 * mask
  err = np.square(np.asarray(pred) - noise)
  want = np.mean([
      (np.broadcast_to(weight[i], err[i].shape) * err[i]).sum() / np.broadcast_to(weight[i], err[i].shape).sum()
      for i in range(3)
  ])
  got, _ = losses.diffusion_loss(unet_fn, ac, latents, None, rng, pixel_weight=jnp.asarray(weight))
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  plain, _ = losses.diffusion_loss(unet_fn, ac, latents, None, rng)
  np.testing.assert_allclose(float(plain), err.mean(), rtol=1e-6)
  constant, _ = losses.diffusion_loss(unet_fn, ac, latents, None, rng, pixel_weight=jnp.full((3, 4, 4, 1), 3.0))
  np.testing.assert_allclose(float(constant), float(plain), rtol=1e-6)
  assert abs(float(got) - float(plain)) > 1e-3  # the weight changes the loss here
