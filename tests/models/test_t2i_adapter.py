"""T2I-Adapter parity with diffusers' PyTorch T2IAdapter (full, XL and light layouts), and the U-Net fed its
features (`down_intrablock_additional_residuals`) as diffusers' UNet2DConditionModel, SD and SDXL layouts."""

import functools

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxsd import pretrained, weights  # noqa: E402
from jaxsd.models.t2i_adapter import T2IAdapter, T2IAdapterConfig  # noqa: E402
from jaxsd.models.unet import UNet2DConditionConfig, UNet2DConditionModel  # noqa: E402
from tests.models.test_controlnet import _nchw, _nhwc, _perturb, _state_dict  # noqa: E402

TOL = 1e-4  # max abs difference, fp32
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

ADAPTERS = {
    # SD 1.x layout: four levels, each after the first halving; image 24x40 -> odd sizes 3x5 -> 2x3 (ceil pooling).
    "full":
        dict(in_channels=3, channels=(8, 16, 16, 24), num_res_blocks=2, downscale_factor=8,
             adapter_type="full_adapter"),
    # SDXL layout: one halving, after the second block; a grey image (the sketch adapters').
    "full_xl":
        dict(in_channels=1, channels=(8, 16, 24, 24), num_res_blocks=1, downscale_factor=4,
             adapter_type="full_adapter_xl"),
    # Light: bottlenecked blocks (a quarter of each width), one block more than channels.
    "light":
        dict(in_channels=3, channels=(8, 16, 32), num_res_blocks=2, downscale_factor=4, adapter_type="light_adapter"),
}


@functools.lru_cache(maxsize=None)
def _adapter(name):
  torch.manual_seed(0)
  tmodel = _perturb(diffusers.T2IAdapter(**ADAPTERS[name]))
  model = T2IAdapter(T2IAdapterConfig.from_dict(dict(tmodel.config)))
  params = weights.state_dict_to_params(_state_dict(tmodel), pretrained.abstract_params(model))
  return tmodel, model, params


@pytest.mark.parametrize("name, hw", [("full", (24, 40)), ("full_xl", (16, 24)), ("light", (24, 20))])
def test_adapter_parity_with_diffusers(name, hw):
  tmodel, model, params = _adapter(name)
  image = np.random.RandomState(0).rand(2, *hw, model.config.in_channels).astype(np.float32)
  ours = _jit(model.apply)({"params": params}, image)
  with torch.no_grad():
    ref = tmodel(_nchw(image))
  assert len(ours) == len(ref) == len(model.config.channels) + (name == "light")
  assert tmodel.total_downscale_factor == model.config.total_downscale_factor
  worst = 0.0
  for a, b in zip(ours, ref):
    assert a.shape == _nhwc(b).shape
    worst = max(worst, float(np.abs(np.asarray(a) - _nhwc(b)).max()))
  assert [a.shape[1:] for a in ours] == model.config.feature_shapes(*hw)
  print(f"{name} adapter {hw}: max |diff| {worst:.1e}")
  assert worst < TOL


def test_loads_a_diffusers_folder_strictly_and_saves_one_diffusers_loads(tmp_path):
  tmodel, model, params = _adapter("light")
  tmodel.save_pretrained(tmp_path / "adapter")
  loaded, loaded_params = pretrained.load_t2i_adapter(str(tmp_path / "adapter"))
  assert loaded.config == model.config
  jax.tree.map(np.testing.assert_array_equal, loaded_params, params)
  pretrained.save_pretrained(loaded, loaded_params, str(tmp_path / "ours"))
  back = diffusers.T2IAdapter.from_pretrained(tmp_path / "ours")
  for k, v in tmodel.state_dict().items():
    np.testing.assert_array_equal(back.state_dict()[k].numpy(), v.numpy(), err_msg=k)


@pytest.mark.parametrize("change, match", [
    (dict(adapter_type="tiny_adapter"), "adapter_type='tiny_adapter' unknown"),
    (dict(channels=(8, 0)), "channels"),
    (dict(adapter_type="full_adapter_xl", channels=(8, 16, 24, 32)), "must be equal"),
])
def test_unsupported_configs_raise(change, match):
  with pytest.raises(ValueError, match=match):
    T2IAdapterConfig.from_dict({**ADAPTERS["full"], **change})


UNETS = {
    # SD 1.x order: a cross-attention block (residual after its last pair, before the downsampler), a plain
    # DownBlock2D last (residual after it, in its last skip too); two maps for two blocks, none for the mid block.
    "sd":
        dict(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4, cross_attention_dim=24,
             norm_num_groups=8, layers_per_block=2),
    # SDXL order: a DownBlock2D first (residual after its downsampler), then cross-attention blocks, and the fourth
    # map (the shape of the mid block's output) added to the mid block's output.
    "sdxl":
        dict(block_out_channels=(16, 32, 32),
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4, 4),
             cross_attention_dim=24, norm_num_groups=8, layers_per_block=1, use_linear_projection=True,
             transformer_layers_per_block=(1, 1, 2)),
}
SIZE = 10  # latents 10x10: levels of 10, 5 and 3 pixels (ceil, as the adapters' pooling)


def _residual_shapes(name, batch):
  c = UNETS[name]["block_out_channels"]
  if name == "sd":
    return [(batch, 10, 10, c[0]), (batch, 5, 5, c[1])]
  return [(batch, 5, 5, c[0]), (batch, 5, 5, c[1]), (batch, 3, 3, c[2]), (batch, 3, 3, c[2])]


@pytest.mark.parametrize("name, count", [("sd", 2), ("sdxl", 4), ("sd", 1)])
def test_unet_takes_intrablock_residuals_as_diffusers(name, count):
  """Random feature maps as large as an adapter's (the first `count` of them) in diffusers' places, where they move
  diffusers' output."""
  torch.manual_seed(1)
  tunet = _perturb(diffusers.UNet2DConditionModel(sample_size=SIZE, **UNETS[name]), seed=1)
  unet = UNet2DConditionModel(UNet2DConditionConfig.from_dict(dict(tunet.config)))
  params = weights.state_dict_to_params(_state_dict(tunet), pretrained.abstract_params(unet))
  rng = np.random.RandomState(2)
  sample = rng.randn(2, SIZE, SIZE, 4).astype(np.float32)
  context = rng.randn(2, 7, 24).astype(np.float32)
  t = np.array([3, 781])
  residuals = tuple(rng.randn(*s).astype(np.float32) for s in _residual_shapes(name, 2)[:count])
  apply = _jit(unet.apply)
  ours = apply({"params": params}, sample, t, context, down_intrablock_additional_residuals=residuals)
  with torch.no_grad():
    ref = tunet(_nchw(sample), torch.as_tensor(t), torch.from_numpy(context),
                down_intrablock_additional_residuals=[_nchw(r) for r in residuals]).sample
    tplain = tunet(_nchw(sample), torch.as_tensor(t), torch.from_numpy(context)).sample
  diff = np.abs(np.asarray(ours) - _nhwc(ref)).max()
  print(f"{name} U-Net with {count} intrablock residuals: max |diff| {diff:.1e}")
  assert diff < TOL
  assert np.abs(_nhwc(ref) - _nhwc(tplain)).max() > 0.1
