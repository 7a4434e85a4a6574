"""U-Net parity with diffusers' PyTorch UNet2DConditionModel on tiny random configs."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from flax import traverse_util  # noqa: E402

from jaxsd import model_folder, pretrained, weights  # noqa: E402
from jaxsd.models.unet import UNet2DConditionConfig, UNet2DConditionModel  # noqa: E402

BATCH, SEQ = 2, 7

# Tiny configs covering the SD families and the config options the flax model reads.
CONFIGS = {
    # SD 1.x: heads as an int, 1x1-conv proj_in/proj_out, default 32 groups.
    "sd1":
        dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32, attention_head_dim=4,
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # SD 2.x: heads per block, linear projections, upcast_attention, wider text embeddings.
    "sd2":
        dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=48, attention_head_dim=(2, 4),
             use_linear_projection=True, upcast_attention=True, norm_num_groups=16,
             down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    # Inpainting input, the other sinusoid layout, three levels, a non-default downsample pad.
    "inpaint":
        dict(in_channels=9, block_out_channels=(16, 32, 32), layers_per_block=1, cross_attention_dim=24,
             attention_head_dim=2, norm_num_groups=8, flip_sin_to_cos=False, freq_shift=1,
             down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    # Rarer options: per-block layers and only_cross_attention, 2 transformer layers, mid-block
    # scale, time-embedding activations, centring, 1x1 conv_in / conv_out.
    "options":
        dict(block_out_channels=(32, 64), layers_per_block=(1, 2), cross_attention_dim=16, attention_head_dim=(4, 8),
             norm_num_groups=8, only_cross_attention=(True, False), transformer_layers_per_block=2,
             mid_block_scale_factor=1.414, time_embedding_act_fn="silu", timestep_post_act="gelu",
             center_input_sample=True, conv_in_kernel=1, conv_out_kernel=1, norm_eps=1e-6, act_fn="mish",
             down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D",
                                                                                                "CrossAttnUpBlock2D")),
    # The attention-free mid block, and no mid block.
    "resnet_mid":
        dict(block_out_channels=(32, 32), layers_per_block=1, cross_attention_dim=16, attention_head_dim=2,
             norm_num_groups=8, mid_block_type="UNetMidBlock2D",
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
    # addition_embed_type="text": the attention-pooled prompt added to the time embedding.
    "text_embed":
        dict(block_out_channels=(32, 32), layers_per_block=1, cross_attention_dim=16, attention_head_dim=2,
             norm_num_groups=8, addition_embed_type="text", addition_embed_type_num_heads=4,
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # ADM's AdaGN (diffusers' resnet_time_scale_shift="scale_shift"): norm2(h) * (1 + scale) + shift in every
    # ResNet block, here with the attention-free mid block.
    "scale_shift":
        dict(block_out_channels=(32, 32), layers_per_block=1, cross_attention_dim=16, attention_head_dim=2,
             norm_num_groups=8, addition_embed_type="text", addition_embed_type_num_heads=4,
             resnet_time_scale_shift="scale_shift", mid_block_type="UNetMidBlock2D",
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
    "no_mid":
        dict(block_out_channels=(32, 32), layers_per_block=1, cross_attention_dim=16, attention_head_dim=2,
             norm_num_groups=8, mid_block_type=None, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # SDXL base: addition_embed_type="text_time" (pooled text 16 + 6 time ids x 8 Fourier features), no
    # attention at the top level, transformer depth per block (1, 2, 3; the mid block takes 3).
    "sdxl":
        dict(block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=40, attention_head_dim=(2, 4, 8),
             use_linear_projection=True, norm_num_groups=8, transformer_layers_per_block=(1, 2, 3),
             addition_embed_type="text_time", addition_time_embed_dim=8,
             projection_class_embeddings_input_dim=16 + 6 * 8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                                 "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
    # SDXL refiner: 5 time ids (sizes, crop and aesthetic score), a narrower text context (its second
    # text encoder only), attention-free top and bottom levels.
    "sdxl_refiner":
        dict(block_out_channels=(32, 64, 64, 32), layers_per_block=1, cross_attention_dim=24, attention_head_dim=4,
             use_linear_projection=True, norm_num_groups=8, transformer_layers_per_block=2,
             addition_embed_type="text_time", addition_time_embed_dim=8, flip_sin_to_cos=False, freq_shift=1,
             projection_class_embeddings_input_dim=24 + 5 * 8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                                 "CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
    # Transformer depth per layer (nested lists) with the up blocks' own depths, as diffusers allows.
    "nested_depths":
        dict(block_out_channels=(32, 32), layers_per_block=2, cross_attention_dim=16, attention_head_dim=2,
             norm_num_groups=8, transformer_layers_per_block=((1, 2), (2, 1)),
             reverse_transformer_layers_per_block=((1, 3, 1), (2, 1, 1)),
             down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
}
TOL = 1e-4  # max abs difference, fp32

# XLA's CPU backend at -O0 compiles these graphs in about half the time; they run in milliseconds anyway.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _torch_unet(name, seed=0):
  """A diffusers U-Net whose every parameter is perturbed (norm scales off 1, biases off 0)."""
  torch.manual_seed(seed)
  model = diffusers.UNet2DConditionModel(sample_size=16, **CONFIGS[name]).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def _inputs(cfg, size=(16, 16), seed=0):
  rng = np.random.RandomState(seed)
  sample = rng.randn(BATCH, *size, cfg.in_channels).astype(np.float32)
  context = rng.randn(BATCH, SEQ, cfg.cross_attention_dim).astype(np.float32)
  return sample, np.array([3, 781]), context


def _added(cfg, seed=1) -> dict:
  """SDXL's added inputs (diffusers' added_cond_kwargs) for "text_time" U-Nets: a pooled text embedding and
  time ids on SDXL's scales (sizes in pixels, crops, a refiner's aesthetic score); none otherwise."""
  if cfg.addition_embed_type != "text_time":
    return {}
  rng = np.random.RandomState(seed)
  # A refiner's pooled embedding is as wide as its context (its one text encoder), with 5 time ids.
  refiner = cfg.projection_class_embeddings_input_dim == cfg.cross_attention_dim + 5 * cfg.addition_time_embed_dim
  n_ids = 5 if refiner else 6
  dim = cfg.projection_class_embeddings_input_dim - n_ids * cfg.addition_time_embed_dim
  time_ids = np.array([[1024, 768, 0, 32, 1024, 1024][:n_ids], [512, 512, 64, 0, 512, 512][:n_ids]], np.float32)
  if n_ids == 5:
    time_ids[:, 4] = (6.0, 2.5)
  return dict(text_embeds=rng.randn(BATCH, dim).astype(np.float32), time_ids=time_ids)


def _flax(torch_model, **kw):
  cfg = UNet2DConditionConfig.from_dict(dict(torch_model.config))
  model = UNet2DConditionModel(cfg, **kw)
  sample, t, context = _inputs(cfg)
  abstract = jax.eval_shape(functools.partial(model.init, **_added(cfg)), jax.random.key(0), sample, t,
                            context)["params"]
  sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  return model, weights.state_dict_to_params(sd, abstract)


@functools.lru_cache(maxsize=None)
def _case(name):
  """(torch model, flax model, converted params, jitted apply), built once per config."""
  torch_model = _torch_unet(name)
  model, params = _flax(torch_model)
  return torch_model, model, params, _jit(model.apply)


def _torch_apply(torch_model, sample, t, context, **added):
  with torch.no_grad():
    out = torch_model(torch.from_numpy(sample.transpose(0, 3, 1, 2)), torch.as_tensor(t), torch.from_numpy(context),
                      added_cond_kwargs={
                          k: torch.from_numpy(v) for k, v in added.items()
                      } or None).sample
  return out.numpy().transpose(0, 2, 3, 1)


# "no_mid" is checked against torch in the gradient-checkpointing test, which runs it anyway.
@pytest.mark.parametrize("name", sorted(set(CONFIGS) - {"no_mid"}))
def test_parity_with_diffusers(name):
  torch_model, model, params, apply = _case(name)
  sample, t, context = _inputs(model.config)
  added = _added(model.config)
  ref = _torch_apply(torch_model, sample, t, context, **added)
  out = apply({"params": params}, sample, t, context, **added)
  assert out.shape == ref.shape and out.dtype == jnp.float32
  assert np.std(ref) > 0.1  # not trivially zero
  np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=TOL)


def test_parameter_count_matches_torch():
  for name in sorted(CONFIGS):
    torch_model, _, params, _ = _case(name)
    n_torch = sum(p.numel() for p in torch_model.parameters())
    assert sum(x.size for x in jax.tree.leaves(params)) == n_torch, name


def test_scalar_timestep_and_input_not_a_multiple_of_the_downsampling():
  # A scalar timestep broadcasts over the batch. An input size that 2**(levels-1) does not divide
  # makes diffusers upsample to each skip connection's size (15 -> 8 -> 4 -> 8 -> 15).
  torch_model, model, params, _ = _case("inpaint")
  sample, _, context = _inputs(model.config, size=(15, 13))
  ref = _torch_apply(torch_model, sample, 250, context)
  out = _jit(model.apply)({"params": params}, sample, jnp.float32(250.0), context)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=TOL)


def test_config_and_weights_from_a_saved_folder(tmp_path):
  torch_model, model, _, apply = _case("sd2")
  torch_model.save_pretrained(tmp_path)
  cfg = UNet2DConditionConfig.from_json(tmp_path)
  assert cfg == model.config
  assert cfg.attention_head_dim == (2, 4) and cfg.use_linear_projection and cfg.upcast_attention
  sample, t, context = _inputs(cfg)
  abstract = jax.eval_shape(model.init, jax.random.key(0), sample, t, context)["params"]
  params = weights.state_dict_to_params(model_folder.read_state_dict(str(tmp_path)), abstract)
  out = apply({"params": params}, sample, t, context)
  np.testing.assert_allclose(np.asarray(out), _torch_apply(torch_model, sample, t, context), rtol=0, atol=TOL)


# bf16 compute vs fp32, measured on "sd1": max abs 0.038, mean abs 0.0083 (outputs of std 0.59,
# max 2.5); diffusers itself in bf16 differs from its fp32 by 0.043 / 0.0078 on the same model.
# The bounds leave 2.5x margin.
BF16_MAX_ABS, BF16_MEAN_ABS = 0.1, 0.02


def test_bf16_compute_with_fp32_params_stays_close():
  _, model, params, apply = _case("sd1")
  sample, t, context = _inputs(model.config)
  ref = apply({"params": params}, sample, t, context)
  model16 = UNet2DConditionModel(model.config, dtype=jnp.bfloat16, param_dtype=jnp.float32)
  out = _jit(model16.apply)({"params": params}, sample, t, context)
  assert out.dtype == jnp.bfloat16
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  err = jnp.abs(out.astype(jnp.float32) - ref)
  assert float(jnp.max(err)) < BF16_MAX_ABS and float(jnp.mean(err)) < BF16_MEAN_ABS, (jnp.max(err), jnp.mean(err))


def test_gradient_checkpointing_same_output_and_gradients():
  torch_model, model, params, _ = _case("no_mid")
  remat = UNet2DConditionModel(model.config, gradient_checkpointing=True)
  sample, t, context = _inputs(model.config)

  def loss(m, p):
    out = m.apply({"params": p}, sample, t, context)
    return jnp.mean(jnp.square(out)), out

  # One rematerialised region per down and up block ("no_mid" has no mid block).
  jaxpr = str(jax.make_jaxpr(remat.apply)({"params": params}, sample, t, context))
  assert len(re.findall(r"\b(?:remat2?|checkpoint)\[", jaxpr)) == 4

  results = [_jit(jax.value_and_grad(functools.partial(loss, m), has_aux=True))(params) for m in (model, remat)]
  ((l0, out0), g0), ((l1, out1), g1) = results
  np.testing.assert_allclose(np.asarray(out0), _torch_apply(torch_model, sample, t, context), rtol=0, atol=TOL)
  # Rematerialisation changes XLA's fusions, hence rounding: measured 1.4e-6 on outputs and
  # 1.5e-6 of each gradient leaf's largest entry.
  np.testing.assert_allclose(np.asarray(out1), np.asarray(out0), rtol=0, atol=1e-5)
  assert jax.tree.structure(g0) == jax.tree.structure(g1)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
    scale = float(jnp.max(jnp.abs(a)))
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * scale + 1e-12, jax.tree_util.keystr(path)


def test_lcm_guidance_embedding_matches_diffusers():
  """An LCM-distilled U-Net (time_cond_proj_dim: the guidance scale embedded and projected into the time
  embedding) against diffusers, with the embedding of diffusers' pipeline for two guidance scales; the
  condition changes the output, and is refused by a U-Net without time_cond_proj_dim."""
  from diffusers import StableDiffusionPipeline  # noqa: PLC0415

  from jaxsd.models.embeddings import guidance_scale_embedding  # noqa: PLC0415
  torch.manual_seed(0)
  conf = dict(CONFIGS["sd1"], time_cond_proj_dim=24)
  torch_model = diffusers.UNet2DConditionModel(sample_size=16, **conf).eval()
  with torch.no_grad():
    for p in torch_model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model, params = _flax(torch_model)
  sample, t, context = _inputs(model.config)
  w = np.array([7.0, 0.5], np.float32)  # guidance_scale - 1
  ref_emb = StableDiffusionPipeline.get_guidance_scale_embedding(None, torch.from_numpy(w), embedding_dim=24).numpy()
  emb = np.asarray(guidance_scale_embedding(w, 24))
  # sin(1000 w f) of up to 7,000 radians: one float32 ulp of the argument (XLA's exp and torch's differ by
  # one ulp at some f) moves it by up to 5e-4; measured 1.1e-5.
  np.testing.assert_allclose(emb, ref_emb, rtol=0, atol=1e-4)
  assert np.abs(emb - guidance_scale_embedding(w + 0.01, 24)).max() > 0.1
  with torch.no_grad():
    ref = torch_model(torch.from_numpy(sample.transpose(0, 3, 1, 2)), torch.as_tensor(t), torch.from_numpy(context),
                      timestep_cond=torch.from_numpy(ref_emb)).sample.numpy().transpose(0, 2, 3, 1)
  apply = _jit(model.apply)
  out = apply({"params": params}, sample, t, context, timestep_cond=ref_emb)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=TOL)
  other = apply({"params": params}, sample, t, context, timestep_cond=emb[::-1])
  assert float(jnp.max(jnp.abs(other - out))) > 1e-3
  with pytest.raises(ValueError, match="time_cond_proj_dim is 24"):
    model.apply({"params": params}, sample, t, context, timestep_cond=emb[:, :8])
  _, sd, sd_params, _ = _case("sd1")
  with pytest.raises(ValueError, match="no time_cond_proj_dim"):
    sd.apply({"params": sd_params}, sample, t, context, timestep_cond=emb)


@pytest.mark.parametrize(
    "change",
    [
        dict(class_embed_type="timestep"),
        dict(num_class_embeds=10),
        dict(addition_embed_type="text_time", addition_time_embed_dim=256),
        dict(addition_embed_type="text", addition_embed_type_num_heads=7),
        dict(resnet_time_scale_shift="spatial"),
        dict(time_embedding_type="fourier"),
        dict(down_block_types=("SimpleCrossAttnDownBlock2D",) + ("DownBlock2D",) * 3),
        dict(up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
        dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"),
        dict(block_out_channels=(320, 640, 1280)),
        dict(attention_head_dim=(8, 8)),
        dict(transformer_layers_per_block=((1, 2), 1, 1, 1)),  # per-layer depths without the up blocks'
        dict(transformer_layers_per_block=((1,), 1, 1, 1), reverse_transformer_layers_per_block=((1,), 1, 1, 1)),
        dict(transformer_layers_per_block=(1, 1, 1)),
        dict(addition_embed_type="text_time", projection_class_embeddings_input_dim=2816),  # no addition_time_embed_dim
        dict(act_fn="tanh"),
        dict(dropout=0.1),
    ])
def test_unsupported_configs_raise(change):
  with pytest.raises(ValueError, match="UNet2DConditionConfig"):
    UNet2DConditionConfig.from_dict({**UNet2DConditionConfig().to_dict(), **change})


def test_sdxl_added_inputs_matter_and_are_checked():
  """The pooled text and every time id change the output (the parity above would miss inputs that are
  silently dropped); missing or misshapen added inputs, or added inputs to an SD U-Net, are refused."""
  _, model, params, apply = _case("sdxl")
  sample, t, context = _inputs(model.config)
  added = _added(model.config)
  out = apply({"params": params}, sample, t, context, **added)
  for i in range(6):
    ids = added["time_ids"].copy()
    ids[:, i] += 16
    assert float(jnp.max(jnp.abs(apply({"params": params}, sample, t, context, **{
        **added, "time_ids": ids
    }) - out))) > 1e-4
  other = dict(added, text_embeds=added["text_embeds"][::-1].copy())
  assert float(jnp.max(jnp.abs(apply({"params": params}, sample, t, context, **other) - out))) > 1e-4
  with pytest.raises(ValueError, match="pass text_embeds= .* and time_ids="):
    model.apply({"params": params}, sample, t, context)
  with pytest.raises(ValueError, match="projection_class_embeddings_input_dim is 64"):
    model.apply({"params": params}, sample, t, context, text_embeds=added["text_embeds"],
                time_ids=added["time_ids"][:, :5])
  _, sd, sd_params, _ = _case("sd1")
  with pytest.raises(ValueError, match="drop them"):
    sd.apply({"params": sd_params}, *_inputs(sd.config), **added)


def test_sdxl_config_from_a_saved_folder(tmp_path):
  """SDXL's config.json as diffusers writes it (lists, nested per-layer depths) reads back to a hashable config
  equal to the model's, and loads strictly (add_embedding included)."""
  for name in ("sdxl", "nested_depths"):
    torch_model, model, _, apply = _case(name)
    torch_model.save_pretrained(tmp_path / name)
    cfg = UNet2DConditionConfig.from_json(tmp_path / name)
    assert cfg == model.config and hash(cfg) == hash(model.config)
    sample, t, context = _inputs(cfg)
    added = _added(cfg)
    abstract = jax.eval_shape(functools.partial(model.init, **added), jax.random.key(0), sample, t, context)["params"]
    params = weights.state_dict_to_params(model_folder.read_state_dict(str(tmp_path / name)), abstract)
    out = apply({"params": params}, sample, t, context, **added)
    np.testing.assert_allclose(np.asarray(out), _torch_apply(torch_model, sample, t, context, **added), rtol=0,
                               atol=TOL)
  assert UNet2DConditionConfig.from_json(tmp_path / "nested_depths").transformer_layers() == (((1, 2), (2, 1)),
                                                                                              ((1, 3, 1), (2, 1, 1)))


def test_heads_follow_diffusers_naming_quirk():
  cfg = UNet2DConditionConfig(attention_head_dim=(5, 10, 20, 20))  # SD 2.x's config.json
  assert cfg.heads == (5, 10, 20, 20)
  assert UNet2DConditionConfig(attention_head_dim=8, num_attention_heads=4).heads == (4,) * 4


# SDXL 1.0 base's unet/config.json (stabilityai/stable-diffusion-xl-base-1.0), the keys that shape the network.
SDXL_BASE = dict(addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
                 block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], layers_per_block=2,
                 projection_class_embeddings_input_dim=2816, sample_size=128, transformer_layers_per_block=[1, 2, 10],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                 "UpBlock2D"], upcast_attention=None, use_linear_projection=True)


def test_real_sdxl_base_config_builds_diffusers_parameter_tree():
  """The full SDXL base U-Net, shapes only (no weights: diffusers' on the meta device, ours abstract): the same
  1680 tensors of the same shapes, 2,567,463,684 parameters."""
  with torch.device("meta"):
    sd = diffusers.UNet2DConditionModel(**SDXL_BASE).state_dict()
  model = UNet2DConditionModel(UNet2DConditionConfig.from_dict(SDXL_BASE))
  flat = traverse_util.flatten_dict(pretrained.abstract_params(model))
  ours = {weights.path_to_torch_key(p): tuple(x.shape) for p, x in flat.items()}
  torch_layout = {k: tuple(v.shape) for k, v in sd.items()}
  for k, shape in torch_layout.items():
    if k.endswith(".weight") and len(shape) == 4:  # (O, I, kh, kw) -> (kh, kw, I, O)
      torch_layout[k] = (shape[2], shape[3], shape[1], shape[0])
    elif k.endswith(".weight") and len(shape) == 2:
      torch_layout[k] = shape[::-1]
  assert ours == torch_layout
  assert sum(int(np.prod(s)) for s in ours.values()) == 2_567_463_684
