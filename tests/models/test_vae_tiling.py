"""Tiled and sliced VAE encode / decode (jaxsd.models.vae_tiling) against diffusers' AutoencoderKL with
`enable_tiling()` / `enable_slicing()`, on a tiny random VAE whose tiles are small (sample_size 32, three levels:
32-pixel / 8-latent tiles) and images whose sides leave partial tiles at the bottom and right."""

import contextlib
import functools

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxsd import weights  # noqa: E402
from jaxsd.models import vae_tiling  # noqa: E402
from jaxsd.models.vae import AutoencoderKL, AutoencoderKLConfig  # noqa: E402
from tests.reference import check_close, nchw_to_nhwc, nhwc_to_nchw  # noqa: E402

CONFIG = dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, sample_size=32)
# (height, width) of the images: 80x48 cuts 4 x 2 tiles, the last row and column partial; 28x100 one row of 5, on
# latents of odd sides (7 x 25), the last column one latent pixel wide (its encoder tile 4 pixels wide).
SHAPES = [(80, 48), (28, 100)]
F = 4  # the VAE's downsampling factor


@functools.lru_cache(maxsize=None)
def _case():
  """(torch model, flax model, converted params)."""
  torch.manual_seed(0)
  torch_model = diffusers.AutoencoderKL(**CONFIG).eval()
  with torch.no_grad():
    for p in torch_model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model = AutoencoderKL(AutoencoderKLConfig.from_dict(dict(torch_model.config)))
  abstract = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))["params"]
  params = weights.state_dict_to_params({k: v.numpy() for k, v in torch_model.state_dict().items()}, abstract)
  return torch_model, model, params


@contextlib.contextmanager
def _tiling(torch_model, tiling=True, slicing=False):
  if tiling:
    torch_model.enable_tiling()
  if slicing:
    torch_model.enable_slicing()
  try:
    with torch.no_grad():
      yield
  finally:
    torch_model.disable_tiling()
    torch_model.disable_slicing()


def _images(h, w, batch=2, seed=0):
  return np.random.RandomState(seed).uniform(-1, 1, (batch, h, w, 3)).astype(np.float32)


def _latents(h, w, batch=2, seed=1):
  return np.random.RandomState(seed).normal(size=(batch, h // F, w // F, 4)).astype(np.float32)


def _decode(model, params, z, **options):
  return np.asarray(jax.jit(lambda p, z: vae_tiling.decode(model, p, z, **options))(params, z))


def _encode(model, params, x, **options):
  post = jax.jit(lambda p, x: vae_tiling.encode(model, p, x, **options))(params, x)
  return np.asarray(post.mean), np.asarray(post.std)


def test_tile_sizes_are_diffusers():
  torch_model, model, _ = _case()
  sizes = vae_tiling.TileSizes.of(model.config)
  want = (torch_model.tile_sample_min_size, torch_model.tile_latent_min_size, torch_model.tile_overlap_factor)
  assert (sizes.sample, sizes.latent, sizes.overlap_factor) == want
  assert sizes.encode_grid() == (32, 24, 2, 6) and sizes.decode_grid() == (8, 6, 8, 24)
  # [height, width]: the first side, as diffusers' tile_latent_min_size (SD's VAE: 512 -> 64-latent tiles).
  sd = AutoencoderKLConfig(block_out_channels=(128, 256, 512, 512), sample_size=(512, 768))
  assert vae_tiling.TileSizes.of(sd) == vae_tiling.TileSizes(512, 64)


@pytest.mark.parametrize("shape", SHAPES, ids=["80x48", "28x100"])
def test_tiled_decode_matches_diffusers(shape):
  torch_model, model, params = _case()
  z = _latents(*shape)
  with _tiling(torch_model):
    ref = nchw_to_nhwc(torch_model.decode(nhwc_to_nchw(z)).sample)
  with _tiling(torch_model, tiling=False):
    untiled = nchw_to_nhwc(torch_model.decode(nhwc_to_nchw(z)).sample)
  check_close(_decode(model, params, z, tiling=True), ref, f"tiled decode {shape}")
  print(f"tiling moves diffusers' images by {np.abs(untiled - ref).max():.2e}")
  assert np.abs(untiled - ref).max() > 0.05  # each tile sees only itself: not the untiled decode


@pytest.mark.parametrize("shape", SHAPES, ids=["80x48", "28x100"])
def test_tiled_encode_matches_diffusers(shape):
  torch_model, model, params = _case()
  x = _images(*shape)
  with _tiling(torch_model):
    post = torch_model.encode(nhwc_to_nchw(x)).latent_dist
  with _tiling(torch_model, tiling=False):
    untiled = torch_model.encode(nhwc_to_nchw(x)).latent_dist
  mean, std = _encode(model, params, x, tiling=True)
  check_close(mean, nchw_to_nhwc(post.mean), f"tiled encode {shape}: mean")
  check_close(std, nchw_to_nhwc(post.std), f"tiled encode {shape}: std")
  assert np.abs(untiled.mean - post.mean).max() > 0.01


def test_within_one_tile_tiling_is_the_plain_pass_bit_for_bit():
  """As diffusers, tiling starts past one tile (32 pixels, 8 latent pixels): up to that, the untiled program."""
  _, model, params = _case()
  x, z = _images(32, 24), _latents(32, 24)
  np.testing.assert_array_equal(_decode(model, params, z, tiling=True), _decode(model, params, z))
  for a, b in zip(_encode(model, params, x, tiling=True), _encode(model, params, x)):
    np.testing.assert_array_equal(a, b)


def test_slicing_gives_the_batchs_images():
  """One image at a time: the batch's results up to float rounding. (With tiling, each image is tiled alone, as in
  diffusers; every operation of the VAE is per image, so that is the batch's tiling.)"""
  _, model, params = _case()
  z, x = _latents(16, 16, batch=3), _images(16, 16, batch=3)
  np.testing.assert_allclose(_decode(model, params, z, slicing=True), _decode(model, params, z), rtol=0, atol=1e-5)
  for a, b in zip(_encode(model, params, x, slicing=True), _encode(model, params, x)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_sliced_program_maps_over_the_batch():
  """The sliced decode is a loop over the images (a while loop in the program), each tile shape's decoder once."""
  _, model, params = _case()
  z = _latents(*SHAPES[0], batch=2)
  plain = jax.jit(lambda p, z: vae_tiling.decode(model, p, z)).lower(params, z).as_text()
  sliced = jax.jit(lambda p, z: vae_tiling.decode(model, p, z, slicing=True)).lower(params, z).as_text()
  assert "stablehlo.while" not in plain and "stablehlo.while" in sliced
