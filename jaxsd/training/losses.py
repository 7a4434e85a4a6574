"""The three stages' objectives: contrastive CLIP, the KL autoencoder, and latent diffusion."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxsd.diffusion import schedules


def clip_contrastive_loss(logits_per_text: jax.Array) -> jax.Array:
  """Symmetric InfoNCE over a batch of matching (text, image) pairs (Radford et al. 2021, CLIP)."""
  labels = jnp.arange(logits_per_text.shape[0])
  logits = logits_per_text.astype(jnp.float32)
  t2i = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  i2t = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
  return (t2i + i2t) / 2


def example_means(values: jax.Array, weight: jax.Array | None = None) -> jax.Array:
  """Each example's mean of `values` (B, ...), or with `weight` (broadcastable to it, > 0) its weighted mean
  sum(w * v) / sum(w), which keeps the unweighted mean's scale (the per-pixel weights of the foreground losses)."""
  axes = tuple(range(1, values.ndim))
  if weight is None:
    return values.mean(axis=axes)
  w = jnp.broadcast_to(weight.astype(jnp.float32), values.shape)
  return (w * values).sum(axis=axes) / w.sum(axis=axes)


def vae_loss(reconstruction: jax.Array, images: jax.Array, kl: jax.Array, kl_weight: float, l1_weight: float = 1.0,
             l2_weight: float = 0.0, edge_weight: float = 0.0,
             pixel_weight: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Reconstruction (L1 and/or L2, per pixel) + kl_weight * KL per latent (Kingma & Welling 2014;
  Rombach et al. 2022 use a small KL weight so the latent stays close to the data).

  `edge_weight`: an L1 between the horizontal and vertical differences of neighbouring pixels of the
  reconstruction and of the image (a gradient-difference loss, Mathieu et al. 2016), per difference: it
  penalises blurred edges and rounded corners more than the per-pixel error does.

  `pixel_weight` (broadcastable to the images, e.g. (B, H, W, 1), > 0): the L1 and L2 terms are each example's
  weighted means, sum(w * e) / sum(w), so their scale stays that of the unweighted means (the logged "l1" and
  "mse" stay unweighted).
  """
  rec, img = reconstruction.astype(jnp.float32), images.astype(jnp.float32)
  err = rec - img
  l1 = jnp.abs(err).mean()
  l2 = jnp.square(err).mean()
  kl = kl.mean()
  if pixel_weight is None:
    loss = l1_weight * l1 + l2_weight * l2 + kl_weight * kl
  else:
    wl1 = example_means(jnp.abs(err), pixel_weight).mean()
    wl2 = example_means(jnp.square(err), pixel_weight).mean()
    loss = l1_weight * wl1 + l2_weight * wl2 + kl_weight * kl
  aux = {"l1": l1, "mse": l2, "kl": kl}
  if edge_weight:
    dy = jnp.abs(jnp.diff(rec, axis=1) - jnp.diff(img, axis=1)).mean()
    dx = jnp.abs(jnp.diff(rec, axis=2) - jnp.diff(img, axis=2)).mean()
    aux["edge_l1"] = (dx + dy) / 2
    loss = loss + edge_weight * aux["edge_l1"]
  return loss, aux


def drop_captions(rng: jax.Array, captions: jax.Array, empty: jax.Array, rate: float) -> jax.Array:
  """Replaces each caption by the empty one with probability `rate`, so that the U-Net also learns the
  unconditional prediction classifier-free guidance needs (Ho & Salimans 2022).

  `captions`: token ids (B, L), or encoded captions (B, L, D) as the latent cache holds them; `empty`:
  the empty caption in the same form, without or with a leading axis of 1. Same draws for both forms.
  """
  drop = jax.random.uniform(rng, (captions.shape[0], 1)) < rate
  return jnp.where(drop.reshape(drop.shape + (1,) * (captions.ndim - 2)), empty, captions)


PREDICTION_TYPES = ("epsilon", "v_prediction")  # what the U-Net learns to predict (diffusers' training scripts)


def min_snr_weights(alphas_cumprod: jax.Array, t: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
  """Min-SNR-gamma loss weights (Hang et al. 2023), for the epsilon or v objective."""
  snr = schedules.snr(alphas_cumprod, t)
  clipped = jnp.minimum(snr, gamma)
  if prediction_type == "v_prediction":
    return clipped / (snr + 1)
  return clipped / snr


def prior_preservation_loss(per_example: jax.Array, is_prior: jax.Array,
                            prior_loss_weight: float) -> tuple[jax.Array, dict]:
  """DreamBooth's loss (Ruiz et al. 2023, Eq. 2): the mean over the instance examples + prior_loss_weight * the
  mean over the class examples (`is_prior` 1). diffusers' train_dreambooth_lora.py computes it on the two halves
  of its batch, each an F.mse_loss mean; a mask gives the same wherever the class rows sit in the global batch."""
  is_prior = is_prior.astype(jnp.float32)
  instance_weight = 1.0 - is_prior
  instance = (per_example * instance_weight).sum() / jnp.maximum(instance_weight.sum(), 1.0)
  prior = (per_example * is_prior).sum() / jnp.maximum(is_prior.sum(), 1.0)
  return instance + prior_loss_weight * prior, {"instance_loss": instance, "prior_loss": prior}


TIMESTEP_SAMPLINGS = ("uniform", "stratified", "logit_normal")  # what `sample_timesteps` draws


def sample_timesteps(rng: jax.Array, batch: int, num_timesteps: int, how: str = "uniform", logit_mean: float = 0.0,
                     logit_std: float = 1.0, uniform_fraction: float = 0.0) -> jax.Array:
  """`batch` training timesteps in [0, num_timesteps), each uniform. "uniform": independent (diffusers'
  train_text_to_image.py). "stratified": one per stratum [i T / B, (i + 1) T / B) in a random order, a
  low-discrepancy draw (Kingma et al. 2021, "Variational diffusion models", appendix; k-diffusion's
  `stratified_uniform`): the same expected loss, less variance from the timesteps in a small batch.
  "logit_normal": t / T = sigmoid(n), n ~ N(logit_mean, logit_std^2) (Esser et al. 2024, SD3, eq. 19; diffusers'
  `compute_density_for_timestep_sampling` and its scripts' --logit_mean / --logit_std): more of the batch at
  middle noise, fewer at the ends (a positive mean keeps more at the noisy end).

  `uniform_fraction` > 0: each timestep is instead drawn uniformly with that probability (a mixture: the
  density never falls below `uniform_fraction` times uniform's, so no noise level goes untrained); 0 leaves
  the draws above unchanged, bit for bit."""
  t = _sample_timesteps(rng, batch, num_timesteps, how, logit_mean, logit_std)
  if not uniform_fraction:
    return t
  k_pick, k_uniform = jax.random.split(jax.random.fold_in(rng, 3))
  pick = jax.random.bernoulli(k_pick, uniform_fraction, (batch,))
  return jnp.where(pick, jax.random.randint(k_uniform, (batch,), 0, num_timesteps), t)


def _sample_timesteps(rng, batch, num_timesteps, how, logit_mean, logit_std):
  if how == "uniform":
    return jax.random.randint(rng, (batch,), 0, num_timesteps)
  if how == "logit_normal":
    u = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (batch,)))
    return jnp.minimum(jnp.floor(u * num_timesteps).astype(jnp.int32), num_timesteps - 1)
  if how not in TIMESTEP_SAMPLINGS:
    raise ValueError(f"timestep_sampling {how!r}: use one of {TIMESTEP_SAMPLINGS}.")
  k_u, k_perm = jax.random.split(rng)
  u = (jnp.arange(batch) + jax.random.uniform(k_u, (batch,))) / batch
  t = jnp.minimum(jnp.floor(u * num_timesteps).astype(jnp.int32), num_timesteps - 1)
  return jax.random.permutation(k_perm, t)


def diffusion_loss(unet_fn, alphas_cumprod: jax.Array, latents: jax.Array, context: jax.Array, rng: jax.Array, *,
                   prediction_type: str = "epsilon", min_snr_gamma: float | None = None,
                   prior_mask: jax.Array | None = None, prior_loss_weight: float = 1.0,
                   timestep_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
                   noise_offset: float = 0.0, input_perturbation: float = 0.0, timestep_uniform_fraction: float = 0.0,
                   pixel_weight: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Noise the latents at a random timestep drawn as `timestep_sampling` says (`sample_timesteps`, with the
  logit-normal's `logit_mean` / `logit_std`); the U-Net predicts the noise or v (Ho et al. 2020;
  Salimans & Ho 2022 for v). `unet_fn(x_t, t, context) -> prediction`; `context` is passed through as given (an
  array, or a dict of the U-Net's conditioning). With `prior_mask` (B,), 1 for DreamBooth's class examples, the
  loss is `prior_preservation_loss` of the per-example losses (min-SNR weights, when asked for, weigh every
  example).

  As diffusers' `train_text_to_image.py`: `noise_offset` adds `noise_offset * N(0, 1)` per example and
  channel to the noise (Guttenberg 2023: lets the model change an image's mean brightness; the target is the
  offset noise); `input_perturbation` noises the input with `noise + input_perturbation * N(0, 1)` while the
  target keeps `noise` (Ning et al. 2023, against exposure bias). Both 0: the draws are those without them.

  `pixel_weight` (broadcastable to the latents, e.g. (B, h, w, 1), > 0): each example's loss is the weighted
  mean of its squared errors, sum(w * e^2) / sum(w), so its scale stays that of the unweighted mean."""
  b = latents.shape[0]
  t_rng, n_rng = jax.random.split(rng)
  t = sample_timesteps(t_rng, b, alphas_cumprod.shape[0], timestep_sampling, logit_mean, logit_std,
                       timestep_uniform_fraction)
  noise = jax.random.normal(n_rng, latents.shape, jnp.float32)
  if noise_offset:
    offset = jax.random.normal(jax.random.fold_in(n_rng, 1), (b, 1, 1, latents.shape[-1]), jnp.float32)
    noise = noise + noise_offset * offset
  input_noise = noise
  if input_perturbation:
    input_noise = noise + input_perturbation * jax.random.normal(jax.random.fold_in(n_rng, 2), latents.shape,
                                                                 jnp.float32)
  x_t = schedules.add_noise(alphas_cumprod, latents, input_noise, t)
  if prediction_type == "epsilon":
    target = noise
  elif prediction_type == "v_prediction":
    target = schedules.velocity(alphas_cumprod, latents, noise, t)
  else:
    raise ValueError(f"prediction_type {prediction_type!r}: use 'epsilon' or 'v_prediction'.")
  pred = unet_fn(x_t, t, context).astype(jnp.float32)
  per_example = example_means(jnp.square(pred - target), pixel_weight)
  if min_snr_gamma:
    per_example = per_example * min_snr_weights(alphas_cumprod, t, min_snr_gamma, prediction_type)
  aux = {"mse": jnp.square(pred - target).mean()}
  if prior_mask is not None:
    loss, parts = prior_preservation_loss(per_example, prior_mask, prior_loss_weight)
    return loss, dict(aux, **parts)
  return per_example.mean(), aux
