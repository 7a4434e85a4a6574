"""ControlNet training (train/configs/controlnet.py) on a tiny diffusers folder: initialised as diffusers'
ControlNetModel.from_unet, the shapes condition finds the shape, a few steps move the ControlNet, and the
exported folder loads in diffusers."""

from __future__ import annotations

import os
import random

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxsd import pretrained, weights
from jaxsd.data import shapes
from jaxsd.training import controlnet_training, run
from tests import reference
from tests.training import ONE_DEVICE
from train.configs import controlnet as controlnet_config

STEPS = 4


@pytest.fixture(scope="module")
def init(tmp_path_factory):
  return reference.make_tiny_sd_folder(str(tmp_path_factory.mktemp("sd")))


def _cfg(init_dir, data_dir, **updates):
  cfg = controlnet_config.get_config("shapes")
  cfg.init = init_dir
  cfg.dtype = "float32"
  cfg.data.update(name="shapes/32x32_n512_128_s0", data_dir=data_dir, image_size=32)
  cfg.log_every, cfg.checkpoint_every, cfg.progress = 1, 2, False
  cfg.unet.update(steps=STEPS, batch_size=8)
  cfg.unet.optimizer.update(lr=1e-3, total_steps=STEPS, warmup_steps=0)
  cfg.update_from_flattened_dict({**ONE_DEVICE, **updates})
  return cfg


def test_initialised_as_diffusers_from_unet(init):
  """The U-Net's encoder copied, zero convolutions at 0, the same parameter names and shapes as diffusers'."""
  unet, unet_params = pretrained.load_unet(os.path.join(init, "unet"))
  model, params = controlnet_training.controlnet_from_unet(unet, unet_params, (8, 16), jax.random.key(0))
  ref = diffusers.ControlNetModel.from_unet(diffusers.UNet2DConditionModel.from_pretrained(init, subfolder="unet"),
                                            conditioning_embedding_out_channels=(8, 16))
  ours = weights.params_to_state_dict(params)
  theirs = {k: v.numpy() for k, v in ref.state_dict().items()}
  assert set(ours) == set(theirs)
  for k, v in theirs.items():
    assert ours[k].shape == v.shape, k
    if not k.startswith("controlnet_cond_embedding.") or k.startswith("controlnet_cond_embedding.conv_out"):
      np.testing.assert_allclose(ours[k], v, atol=1e-7, err_msg=k)  # copied from the U-Net, or zero


def test_shape_mask_is_the_shape():
  """A saturated square on a grey gradient: exactly the square. Rendered shapes examples: a mask of a
  shape's size, on the side the caption says."""
  s = 32
  image = np.broadcast_to(np.linspace(60, 200, s, dtype=np.float32)[None, :, None], (s, s, 3)).copy()
  image[..., 0] += 15  # a tinted grey
  image[8:20, 4:14] = shapes.RGB["purple"]
  mask = np.asarray(controlnet_training.shape_mask(jnp.asarray(image[None] / 127.5 - 1)))[0]
  want = np.zeros((s, s), bool)
  want[8:20, 4:14] = True
  assert mask.shape == (s, s, 3) and set(np.unique(mask)) == {0.0, 1.0}
  np.testing.assert_array_equal(mask[..., 0] > 0, want)
  rng = random.Random(0)
  for _ in range(20):
    image, attrs = shapes.render(rng, 64)
    mask = np.asarray(controlnet_training.shape_mask(jnp.asarray(image[None] / 127.5 - 1)))[0, ..., 0]
    # Area over the shape's own (r * 0.9..1.05 as rendered; a triangle's circumradius is 1.2 r): within 25 %.
    r = {"small": 0.13, "large": 0.22}[attrs["size"]] * 0.975
    expected = {"circle": np.pi, "square": (2 * 0.886)**2, "triangle": 3 * np.sqrt(3) / 4 * 1.2**2}[attrs["shape"]]
    assert 0.75 < mask.mean() / (expected * r * r) < 1.25, attrs
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() / 64, ys.mean() / 64
    want_x, want_y = shapes.CENTERS[attrs["position"]]
    assert abs(cx - want_x) < 0.08 and abs(cy - want_y) < 0.12, (attrs, cx, cy)


def test_the_run_trains_a_controlnet_that_diffusers_loads(init, tmp_path):
  workdir = str(tmp_path / "work")
  result = run.train_and_evaluate(_cfg(init, str(tmp_path / "tfds")), workdir)["controlnet"]
  assert result["steps"] == STEPS and result["conditioning"] == "shape_mask"
  assert result["folder"] == os.path.join(workdir, "controlnet")
  net = diffusers.ControlNetModel.from_pretrained(result["folder"])
  assert list(net.config.conditioning_embedding_out_channels) == [16, 32]  # cut to the tiny VAE's factor 2
  sd = net.state_dict()
  moved = [
      k for k, v in sd.items() if k.startswith(("controlnet_down_blocks", "controlnet_mid_block")) and v.abs().max()
  ]
  assert len(moved) == len([k for k in sd if k.startswith(("controlnet_down_blocks", "controlnet_mid_block"))])
  # The residuals of the trained ControlNet, as diffusers computes them, match jaxsd's loaded from the same folder.
  module, params = pretrained.load_controlnet(result["folder"])
  rng = np.random.RandomState(0)
  x, ctx = rng.randn(1, 16, 16, 4).astype(np.float32), rng.randn(1, 5, 32).astype(np.float32)
  cond = (rng.rand(1, 32, 32, 3) > 0.5).astype(np.float32)
  down, mid = module.apply({"params": params}, x, np.array([500]), ctx, cond)
  with torch.no_grad():
    tdown, tmid = net(reference.nhwc_to_nchw(x), 500, torch.from_numpy(ctx), reference.nhwc_to_nchw(cond),
                      return_dict=False)
  np.testing.assert_allclose(np.asarray(mid), reference.nchw_to_nhwc(tmid), atol=1e-4)
  assert np.abs(np.asarray(mid)).max() > 1e-4


@pytest.mark.parametrize("updates, match", [
    (dict(init=""), "config.init"),
    (dict(unet__cache_latents=True), "cache_latents=False"),
    (dict(controlnet__conditioning="canny"), "conditioning='canny'"),
    (dict(benchmark_steps=2), "benchmark_steps"),
    (dict(data__name="my_photos"), "shape_mask.*on 'my_photos' it would teach a meaningless condition"),
    (dict(controlnet__conditioning_embedding_out_channels=(8, 16, 32)), "downsamples the condition by 4, but the VAE "
     "downsamples by 2"),
    (dict(controlnet__conditioning_embedding_out_channels=(0, 16)), "widths must be whole numbers >= 1"),
    (dict(unet__sample_every=2), "sample_every=2: a ControlNet run draws no samples while it trains"),
])
def test_bad_settings_are_refused_first(init, tmp_path, updates, match):
  cfg = _cfg(init, str(tmp_path / "tfds"))
  for k, v in updates.items():
    section, _, key = k.partition("__")
    (cfg[section] if key else cfg)[key or section] = v
  with pytest.raises(run.ConfigError, match=match):
    run.check_config(cfg, jax.device_count())


def test_conditioning_widths_must_downsample_as_the_vae():
  """Widths that downsample the condition by other than the VAE's factor are refused as a setting (they failed as
  a ValueError traceback while the first step compiled, the condition and the latents of other sizes)."""
  assert controlnet_training.embedding_widths(2, (8, 16)) == (8, 16)
  assert controlnet_training.embedding_widths(8) == controlnet_training.EMBEDDING_WIDTHS
  for factor, widths in ((2, (8, 16, 32)), (8, (16, 32)), (8, (16,))):
    message = rf"downsamples the condition by {2**(len(widths) - 1)}, but the VAE downsamples by {factor}: give "
    with pytest.raises(ValueError, match=message + rf"{factor.bit_length()} widths"):
      controlnet_training.embedding_widths(factor, widths)
  with pytest.raises(ValueError, match=r"=\(0, 16\): the widths must be whole numbers >= 1"):
    controlnet_training.embedding_widths(2, (0, 16))  # was a ValueError traceback from the model's config
