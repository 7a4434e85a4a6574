"""VAE parity with diffusers' PyTorch AutoencoderKL on tiny random configs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxsd import weights  # noqa: E402
from jaxsd.models.vae import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussianDistribution  # noqa: E402

CONFIGS = {
    # SD-like: mid-block attention, quant convs; two levels (16x16 images -> 8x8 latents).
    "sd":
        dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
    # Three levels, two layers per block, no attention or quant convs, another act_fn (the
    # encoder's and decoder's final activations stay SiLU in diffusers).
    "options":
        dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8, latent_channels=3, out_channels=4,
             act_fn="gelu", mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False,
             down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3),
}
TOL = 1e-4  # max abs difference, fp32
SIZE = 16


# XLA's CPU backend at -O0 compiles these graphs in about half the time; they run in milliseconds anyway.
def _jit(f, static_argnames=("method",)):
  return jax.jit(f, static_argnames=static_argnames, compiler_options={"xla_backend_optimization_level": 0})


def _torch_vae(name, seed=0):
  """A diffusers VAE whose every parameter is perturbed (norm scales off 1, biases off 0)."""
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKL(sample_size=SIZE, **CONFIGS[name]).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def _images(cfg, seed=0):
  return np.random.RandomState(seed).uniform(-1, 1, (2, SIZE, SIZE, cfg.in_channels)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _case(name):
  """(torch model, flax model, converted params), built once per config."""
  torch_model = _torch_vae(name)
  model = AutoencoderKL(AutoencoderKLConfig.from_dict(dict(torch_model.config)))
  abstract = jax.eval_shape(model.init, jax.random.key(0), _images(model.config))["params"]
  params = weights.state_dict_to_params({k: v.numpy() for k, v in torch_model.state_dict().items()}, abstract)
  return torch_model, model, params


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity_with_diffusers(name):
  torch_model, model, params = _case(name)
  images = _images(model.config)
  with torch.no_grad():
    post = torch_model.encode(_nchw(images)).latent_dist
    recon = torch_model(_nchw(images)).sample  # decodes the posterior mode
  out, posterior = _jit(model.apply)({"params": params}, images)
  assert np.std(_nhwc(recon)) > 0.1 and np.std(_nhwc(post.mean)) > 0.1  # not trivially zero
  np.testing.assert_allclose(np.asarray(posterior.mean), _nhwc(post.mean), rtol=0, atol=TOL)
  np.testing.assert_allclose(np.asarray(posterior.logvar), _nhwc(post.logvar), rtol=0, atol=TOL)
  np.testing.assert_allclose(np.asarray(posterior.std), _nhwc(post.std), rtol=0, atol=TOL)
  np.testing.assert_allclose(np.asarray(posterior.kl()), post.kl().numpy(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out), _nhwc(recon), rtol=0, atol=TOL)


def test_encode_and_decode_methods():
  torch_model, model, params = _case("sd")
  images = _images(model.config)
  posterior = _jit(model.apply)({"params": params}, images, method="encode")
  assert isinstance(posterior, DiagonalGaussianDistribution) and posterior.mean.dtype == jnp.float32
  assert posterior.mean.shape == (2, SIZE // 2, SIZE // 2, model.config.latent_channels)
  with torch.no_grad():
    ref = torch_model.encode(_nchw(images)).latent_dist
  np.testing.assert_allclose(np.asarray(posterior.mean), _nhwc(ref.mean), rtol=0, atol=TOL)

  z = np.random.RandomState(1).randn(*posterior.mean.shape).astype(np.float32)
  decoded = _jit(model.apply)({"params": params}, z, method="decode")
  with torch.no_grad():
    ref = torch_model.decode(_nchw(z)).sample
  np.testing.assert_allclose(np.asarray(decoded), _nhwc(ref), rtol=0, atol=TOL)


def test_posterior_sampling():
  _, model, params = _case("sd")
  images = _images(model.config)
  key = jax.random.key(3)
  out, posterior = _jit(model.apply, static_argnames=("sample_posterior",))({
      "params": params
  }, images, sample_posterior=True, key=key)
  z = posterior.sample(key)
  noise = jax.random.normal(key, posterior.mean.shape)
  np.testing.assert_allclose(np.asarray(z), np.asarray(posterior.mean + posterior.std * noise), rtol=1e-6)
  assert posterior.mode() is posterior.mean
  assert float(jnp.max(posterior.logvar)) <= 20.0 and float(jnp.min(posterior.logvar)) >= -30.0
  decoded = _jit(model.apply)({"params": params}, z, method="decode")
  np.testing.assert_allclose(np.asarray(out), np.asarray(decoded), rtol=0, atol=1e-5)
  with pytest.raises(ValueError, match="PRNG key"):
    model.apply({"params": params}, images, sample_posterior=True)


def test_logvar_is_clipped_like_diffusers():
  moments = jnp.concatenate([jnp.zeros((1, 2, 2, 4)), jnp.full((1, 2, 2, 4), 50.0)], axis=-1)
  post = DiagonalGaussianDistribution.from_moments(moments.at[..., 4].set(-50.0))
  assert float(post.logvar[..., 0].max()) == -30.0 and float(post.logvar[..., 1:].min()) == 20.0


def test_parameter_count_matches_torch():
  for name in sorted(CONFIGS):
    torch_model, _, params = _case(name)
    assert sum(x.size for x in jax.tree.leaves(params)) == sum(p.numel() for p in torch_model.parameters()), name


def test_config_from_a_saved_folder(tmp_path):
  torch_model, model, _ = _case("options")
  torch_model.save_pretrained(tmp_path)
  cfg = AutoencoderKLConfig.from_json(tmp_path)
  assert cfg == model.config and cfg.use_quant_conv is False and cfg.scaling_factor == 0.18215


# bf16 compute vs fp32 on "sd", measured: reconstructions max abs 0.053, mean abs 0.0093 (images
# of std 0.61, max 2.2), posterior mean max abs 0.043; diffusers itself in bf16 differs from its
# fp32 by 0.050 / 0.0087 on the same model. The bounds leave about 3x margin.
BF16_MAX_ABS, BF16_MEAN_ABS = 0.15, 0.03


def test_bf16_compute_with_fp32_params_stays_close():
  _, model, params = _case("sd")
  images = _images(model.config)
  ref, ref_post = _jit(model.apply)({"params": params}, images)
  model16 = AutoencoderKL(model.config, dtype=jnp.bfloat16, param_dtype=jnp.float32)
  out, post = _jit(model16.apply)({"params": params}, images)
  assert out.dtype == jnp.bfloat16 and post.mean.dtype == jnp.float32
  err = jnp.abs(out.astype(jnp.float32) - ref)
  assert float(jnp.max(err)) < BF16_MAX_ABS and float(jnp.mean(err)) < BF16_MEAN_ABS, (jnp.max(err), jnp.mean(err))
  assert float(jnp.max(jnp.abs(post.mean - ref_post.mean))) < BF16_MAX_ABS


@pytest.mark.parametrize("change", [
    dict(down_block_types=("AttnDownEncoderBlock2D",)),
    dict(up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D")),
    dict(act_fn="tanh"),
    dict(block_out_channels=(48,)),
])
def test_unsupported_configs_raise(change):
  with pytest.raises(ValueError, match="AutoencoderKLConfig"):
    AutoencoderKLConfig.from_dict({**AutoencoderKLConfig().to_dict(), **change})
