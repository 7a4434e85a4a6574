"""ControlNet parity with diffusers' PyTorch ControlNetModel, and the U-Net fed its residuals."""

import functools
import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxsd import pretrained, weights  # noqa: E402
from jaxsd.models.controlnet import ControlNetConfig, ControlNetModel  # noqa: E402
from jaxsd.models.unet import UNet2DConditionConfig, UNet2DConditionModel  # noqa: E402

BATCH, SEQ, SIZE = 2, 7, 8  # latents 8x8
TOL = 1e-4  # max abs difference, fp32

POOLED = 12  # the tiny SDXL case's pooled text embedding width
CONFIGS = {
    # SD 1.x layout: heads as an int, 1x1-conv projections, a conditioning embedding downsampling by 4.
    "sd1":
        dict(block_out_channels=(16, 32), layers_per_block=2, cross_attention_dim=24, attention_head_dim=4,
             norm_num_groups=8, conditioning_embedding_out_channels=(8, 8, 16),
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D")),
    # SD 2.x layout: heads per block, linear projections, upcast attention, three levels, a BGR conditioning
    # image with one channel more, the attention-free mid block.
    "sd2":
        dict(block_out_channels=(16, 32, 32), layers_per_block=1, cross_attention_dim=32, attention_head_dim=(2, 4, 4),
             use_linear_projection=True, upcast_attention=True, norm_num_groups=8, flip_sin_to_cos=False, freq_shift=1,
             conditioning_channels=4, controlnet_conditioning_channel_order="bgr",
             conditioning_embedding_out_channels=(8, 16), mid_block_type="UNetMidBlock2D",
             down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")),
    # A "shuffle" ControlNet: residuals averaged over the image.
    "global_pool":
        dict(block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=24, attention_head_dim=2,
             norm_num_groups=8, conditioning_embedding_out_channels=(8, 16), global_pool_conditions=True,
             transformer_layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D")),
    # SDXL layout: the pooled text embedding and six Fourier-embedded time ids added to the time embedding,
    # transformer depth per block, linear projections, no attention at the top level.
    "sdxl":
        dict(block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=24, attention_head_dim=(2, 4),
             transformer_layers_per_block=(1, 2), use_linear_projection=True, norm_num_groups=8,
             addition_embed_type="text_time", addition_time_embed_dim=8,
             projection_class_embeddings_input_dim=POOLED + 6 * 8, conditioning_embedding_out_channels=(8, 16),
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D")),
}

_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0}, static_argnames="guess_mode")


def _perturb(model, seed=0):
  """Every parameter off its init (zero convolutions included, or they would hide everything)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))
  return model.eval()


def _state_dict(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=None)
def _case(name):
  torch.manual_seed(0)
  tmodel = _perturb(diffusers.ControlNetModel(**CONFIGS[name]))
  cfg = ControlNetConfig.from_dict(dict(tmodel.config))
  model = ControlNetModel(cfg)
  params = weights.state_dict_to_params(_state_dict(tmodel), pretrained.abstract_params(model))
  return tmodel, model, params, _jit(model.apply)


def _inputs(cfg, seed=0):
  rng = np.random.RandomState(seed)
  sample = rng.randn(BATCH, SIZE, SIZE, cfg.in_channels).astype(np.float32)
  context = rng.randn(BATCH, SEQ, cfg.cross_attention_dim).astype(np.float32)
  f = cfg.conditioning_factor
  cond = rng.rand(BATCH, SIZE * f, SIZE * f, cfg.conditioning_channels).astype(np.float32)
  return sample, np.array([3, 781]), context, cond


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(x):
  return np.transpose(x.detach().numpy(), (0, 2, 3, 1))


@pytest.mark.parametrize("name, guess_mode", [("sd1", False), ("sd1", True), ("sd2", False), ("global_pool", True),
                                              ("sdxl", False), ("sdxl", True)])
def test_parity_with_diffusers(name, guess_mode):
  tmodel, model, params, apply = _case(name)
  sample, t, context, cond = _inputs(model.config)
  extra, added = {}, None
  if model.config.addition_embed_type == "text_time":  # SDXL: diffusers' added_cond_kwargs
    rng = np.random.RandomState(1)
    extra = dict(text_embeds=rng.randn(BATCH, POOLED).astype(np.float32),
                 time_ids=np.array([[1024, 768, 0, 16, 1024, 1024], [512, 512, 8, 0, 512, 512]], np.float32))
    added = {k: torch.from_numpy(v) for k, v in extra.items()}
  down, mid = apply({"params": params}, sample, t, context, cond, 0.7, guess_mode=guess_mode, **extra)
  with torch.no_grad():
    tdown, tmid = tmodel(_nchw(sample), torch.as_tensor(t), torch.from_numpy(context), _nchw(cond),
                         conditioning_scale=0.7, guess_mode=guess_mode, added_cond_kwargs=added, return_dict=False)
  assert len(down) == len(tdown) == model.config.num_residuals
  worst = 0.0
  for ours, ref in zip(down + (mid,), list(tdown) + [tmid]):
    ref = _nhwc(ref)
    assert ours.shape == ref.shape
    worst = max(worst, float(np.abs(np.asarray(ours) - ref).max()))
  print(f"{name} guess_mode={guess_mode}: max |diff| {worst:.1e}")
  assert worst < TOL


def test_unet_takes_the_residuals_as_diffusers():
  """The U-Net fed a ControlNet's residuals (here random, as large as real ones) matches diffusers' fed the
  same; without them it is the plain U-Net."""
  torch.manual_seed(1)
  unet_kw = dict(block_out_channels=(16, 32), layers_per_block=2, cross_attention_dim=24, attention_head_dim=4,
                 norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
  tunet = _perturb(diffusers.UNet2DConditionModel(sample_size=SIZE, **unet_kw), seed=1)
  cfg = UNet2DConditionConfig.from_dict(dict(tunet.config))
  unet = UNet2DConditionModel(cfg)
  params = weights.state_dict_to_params(_state_dict(tunet), pretrained.abstract_params(unet))
  _, controlnet, _, _ = _case("sd1")
  sample, t, context, _ = _inputs(controlnet.config)
  # Residual shapes from the ControlNet of the same layout.
  shapes = jax.eval_shape(lambda: controlnet.init_with_output(jax.random.key(0), *_inputs(controlnet.config))[0])
  rng = np.random.RandomState(2)
  down = tuple(rng.randn(*s.shape).astype(np.float32) for s in shapes[0])
  mid = rng.randn(*shapes[1].shape).astype(np.float32)
  apply = _jit(unet.apply)
  ours = apply({"params": params}, sample, t, context, down_block_additional_residuals=down,
               mid_block_additional_residual=mid)
  plain = apply({"params": params}, sample, t, context)
  with torch.no_grad():
    ref = tunet(_nchw(sample), torch.as_tensor(t), torch.from_numpy(context),
                down_block_additional_residuals=tuple(_nchw(d) for d in down),
                mid_block_additional_residual=_nchw(mid)).sample
  diff = np.abs(np.asarray(ours) - _nhwc(ref)).max()
  print(f"U-Net with residuals: max |diff| {diff:.1e}")
  assert diff < TOL
  assert np.abs(np.asarray(ours) - np.asarray(plain)).max() > 0.1
  with pytest.raises(ValueError, match="both"):
    unet.apply({"params": params}, sample, t, context, down_block_additional_residuals=down)
  with pytest.raises(ValueError, match="does not match this U-Net"):
    unet.apply({"params": params}, sample, t, context, down_block_additional_residuals=down[:-1],
               mid_block_additional_residual=mid)


def test_loads_a_diffusers_folder_strictly_and_saves_one_diffusers_loads(tmp_path):
  tmodel, model, params, apply = _case("sd1")
  tmodel.save_pretrained(tmp_path / "cn")
  loaded, loaded_params = pretrained.load_controlnet(str(tmp_path / "cn"))
  assert loaded.config == model.config
  jax.tree.map(np.testing.assert_array_equal, loaded_params, params)
  pretrained.save_pretrained(loaded, loaded_params, str(tmp_path / "ours"))
  back = diffusers.ControlNetModel.from_pretrained(tmp_path / "ours")
  for k, v in tmodel.state_dict().items():
    np.testing.assert_array_equal(back.state_dict()[k].numpy(), v.numpy(), err_msg=k)
  # A ControlNet of another layout is refused, naming the keys.
  other = diffusers.ControlNetModel(**{**CONFIGS["sd1"], "conditioning_embedding_out_channels": (8, 16)})
  other.save_pretrained(tmp_path / "other")
  cfg = dict(tmodel.config)
  with open(tmp_path / "other" / "config.json", "w") as f:
    json.dump({k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}, f)
  with pytest.raises(weights.WeightLoadError, match="controlnet_cond_embedding"):
    pretrained.load_controlnet(str(tmp_path / "other"))


def test_config_from_unet_matches_diffusers():
  tunet = diffusers.UNet2DConditionModel(sample_size=SIZE, block_out_channels=(16, 32), layers_per_block=1,
                                         cross_attention_dim=24, attention_head_dim=(2, 4), norm_num_groups=8,
                                         use_linear_projection=True,
                                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
  ref = diffusers.ControlNetModel.from_unet(tunet, conditioning_embedding_out_channels=(8, 16))
  ours = ControlNetConfig.from_unet(UNet2DConditionConfig.from_dict(dict(tunet.config)),
                                    conditioning_embedding_out_channels=(8, 16))
  assert ours == ControlNetConfig.from_dict(dict(ref.config))
  abstract = pretrained.abstract_params(ControlNetModel(ours))
  assert set(weights.params_to_state_dict(jax.tree.map(np.zeros_like, abstract))) == set(ref.state_dict())


@pytest.mark.parametrize("change, match", [
    (dict(mid_block_type=None), "mid_block_type=None"),
    (dict(layers_per_block=(1, 2)), "one integer"),
    (dict(controlnet_conditioning_channel_order="rbg"), "channel_order"),
    (dict(class_embed_type="timestep"), "ControlNetConfig: class_embed_type"),
    (dict(transformer_layers_per_block=((1, 2), (1, 1))), "nested"),
])
def test_unsupported_configs_raise(change, match):
  base = {**CONFIGS["sd1"], **change}
  with pytest.raises(ValueError, match=match):
    ControlNetConfig.from_dict(base)


def test_conditioning_image_of_the_wrong_size_is_refused():
  _, model, params, _ = _case("sd1")
  sample, t, context, cond = _inputs(model.config)
  with pytest.raises(ValueError, match="controlnet_cond has shape"):
    model.apply({"params": params}, sample, t, context, cond[:, :SIZE, :SIZE])
