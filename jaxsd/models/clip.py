"""CLIP (Radford et al., 2021): text transformer, vision transformer and the contrastive model.

Mirrors transformers' PyTorch `modeling_clip.py` layer for layer. Parameter paths follow the
checkpoint keys (`text_model/encoder/layers_0/self_attn/q_proj/kernel` <->
`text_model.encoder.layers.0.self_attn.q_proj.weight`), so weights convert by rename and
transpose alone. Initialisers reproduce transformers' `CLIPPreTrainedModel._init_weights`, so a
`CLIPModel` trained from scratch starts where the reference would.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsd.models.attention import dot_product_attention
from jaxsd.config import ConfigBase
from jaxsd.models.normalization import LayerNorm

Dtype = Any

# transformers' ACT2FN names; "gelu" is the exact erf form, "gelu_new" the tanh approximation.
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def _validate_transformer(cfg: CLIPTextConfig | CLIPVisionConfig) -> None:
  name = type(cfg).__name__
  cfg.check_sizes("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "projection_dim")
  if cfg.hidden_size % cfg.num_attention_heads:
    raise ValueError(f"{name}: hidden_size ({cfg.hidden_size}) must be a multiple of "
                     f"num_attention_heads ({cfg.num_attention_heads}).")
  if cfg.hidden_act not in _ACTIVATIONS:
    raise ValueError(f"{name}: hidden_act {cfg.hidden_act!r} is not implemented; use one of {sorted(_ACTIVATIONS)}.")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(ConfigBase):
  """transformers `CLIPTextConfig`; defaults are openai/clip-vit-base-patch32's text tower."""

  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  projection_dim: int = 512  # read by CLIPTextModelWithProjection only; CLIPModel uses its own
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_dropout: float = 0.0  # kept for the file; no dropout is implemented
  initializer_range: float = 0.02
  initializer_factor: float = 1.0
  pad_token_id: int | None = 1
  bos_token_id: int | None = 49406
  # 2 marks configs written before transformers PR #24773 (SD 1.x / 2.x text encoders): pooling
  # then takes the highest token id, which is <|endoftext|> in CLIP's vocabulary.
  eos_token_id: int = 49407

  model_type = "clip_text_model"  # class attribute, not a field: written by to_dict

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> CLIPTextConfig:
    # A full CLIPModel config.json holds the text tower's settings under "text_config".
    if d.get("model_type") == "clip" or ("text_config" in d and "vocab_size" not in d):
      d = _merged_sub_config(d, "text_config")
    return super().from_dict(d)

  def validate(self) -> None:
    _validate_transformer(self)
    self.check_sizes("vocab_size", "max_position_embeddings")
    if not isinstance(self.eos_token_id, int):
      raise ValueError(
          f"CLIPTextConfig: eos_token_id must be one integer (pooling reads it), got {self.eos_token_id!r}.")

  def to_dict(self) -> dict[str, Any]:
    return {**super().to_dict(), "model_type": self.model_type}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(ConfigBase):
  """transformers `CLIPVisionConfig`; defaults are openai/clip-vit-base-patch32's vision tower."""

  hidden_size: int = 768
  intermediate_size: int = 3072
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_dropout: float = 0.0
  initializer_range: float = 0.02
  initializer_factor: float = 1.0

  model_type = "clip_vision_model"

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> CLIPVisionConfig:
    if d.get("model_type") == "clip" or ("vision_config" in d and "patch_size" not in d):
      d = _merged_sub_config(d, "vision_config")
    return super().from_dict(d)

  def validate(self) -> None:
    _validate_transformer(self)
    if not (isinstance(self.image_size, int) and isinstance(self.patch_size, int)):
      raise ValueError(
          f"CLIPVisionConfig: image_size and patch_size must be single integers (square images and patches), "
          f"got {self.image_size!r} and {self.patch_size!r}.")
    self.check_sizes("num_channels", "image_size", "patch_size")
    if self.image_size % self.patch_size:
      raise ValueError(
          f"CLIPVisionConfig: image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size}).")

  def to_dict(self) -> dict[str, Any]:
    return {**super().to_dict(), "model_type": self.model_type}


def _merged_sub_config(d: dict[str, Any], key: str) -> dict[str, Any]:
  """`d[key]`, updated by the legacy `d[key + '_dict']` the way transformers' CLIPConfig merges them."""
  return {**(d.get(key) or {}), **(d.get(key + "_dict") or {})}


@dataclasses.dataclass(frozen=True)
class CLIPConfig(ConfigBase):
  """transformers `CLIPConfig`: both towers' configs nested, plus the joint embedding."""

  text_config: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
  vision_config: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592  # log(1 / 0.07), the CLIP paper's initial temperature
  initializer_factor: float = 1.0

  model_type = "clip"

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> CLIPConfig:
    d = dict(d)
    d["text_config"] = CLIPTextConfig.from_dict(_merged_sub_config(d, "text_config"))
    d["vision_config"] = CLIPVisionConfig.from_dict(_merged_sub_config(d, "vision_config"))
    return super().from_dict(d)

  def validate(self) -> None:
    if not isinstance(self.text_config, CLIPTextConfig) or not isinstance(self.vision_config, CLIPVisionConfig):
      raise ValueError("CLIPConfig: text_config and vision_config must be CLIPTextConfig and CLIPVisionConfig; "
                       "build from a dict with CLIPConfig.from_dict.")
    self.text_config.validate()
    self.vision_config.validate()
    self.check_sizes("projection_dim")

  def to_dict(self) -> dict[str, Any]:
    return {**super().to_dict(), "model_type": self.model_type}


@flax.struct.dataclass
class CLIPTextOutput:
  last_hidden_state: jax.Array  # (B, T, D), after final_layer_norm
  pooler_output: jax.Array  # (B, D), last_hidden_state at each sequence's end-of-text token
  hidden_states: tuple[jax.Array, ...]  # num_hidden_layers + 1 arrays: the embeddings, then each layer's output


@flax.struct.dataclass
class CLIPTextModelOutput:
  """transformers' CLIPTextModelOutput (CLIPTextModelWithProjection), with the tower's pooled output too."""

  text_embeds: jax.Array  # (B, projection_dim): text_projection(pooler_output), not normalised
  last_hidden_state: jax.Array
  pooler_output: jax.Array
  hidden_states: tuple[jax.Array, ...]


@flax.struct.dataclass
class CLIPVisionOutput:
  last_hidden_state: jax.Array  # (B, 1 + patches, D), the last layer's output (no post_layernorm)
  pooler_output: jax.Array  # (B, D), post_layernorm of the class token
  hidden_states: tuple[jax.Array, ...]  # the pre_layrnorm'd embeddings, then each layer's output


@flax.struct.dataclass
class CLIPVisionModelOutput:
  """transformers' CLIPVisionModelOutput (CLIPVisionModelWithProjection), with the tower's pooled output too."""

  image_embeds: jax.Array  # (B, projection_dim): visual_projection(pooler_output), not normalised
  last_hidden_state: jax.Array
  pooler_output: jax.Array
  hidden_states: tuple[jax.Array, ...]


@flax.struct.dataclass
class CLIPOutput:
  logits_per_image: jax.Array  # (images, texts), cosine similarity times exp(logit_scale), fp32
  logits_per_text: jax.Array  # (texts, images)
  text_embeds: jax.Array  # projected and L2-normalised, fp32
  image_embeds: jax.Array
  text_model_output: CLIPTextOutput  # the towers' own outputs (pooler_output not projected)
  vision_model_output: CLIPVisionOutput


def _normal(std: float) -> nn.initializers.Initializer:
  return nn.initializers.normal(stddev=std)


class CLIPAttention(nn.Module):
  config: CLIPTextConfig | CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, *, is_causal: bool, mask: jax.Array | None) -> jax.Array:
    cfg = self.config
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    in_std = d**-0.5 * (2 * cfg.num_hidden_layers)**-0.5 * cfg.initializer_factor
    out_std = d**-0.5 * cfg.initializer_factor

    def dense(name, std):
      return nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_normal(std), name=name)

    b, t, _ = x.shape
    q, k, v = (dense(n, in_std)(x).reshape(b, t, heads, d // heads) for n in ("q_proj", "k_proj", "v_proj"))
    o = dot_product_attention(q, k, v, is_causal=is_causal, mask=mask, implementation=self.attention_implementation)
    return dense("out_proj", out_std)(o.reshape(b, t, d))


class CLIPMLP(nn.Module):
  config: CLIPTextConfig | CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    fc1_std = (2 * cfg.hidden_size)**-0.5 * cfg.initializer_factor
    fc2_std = cfg.hidden_size**-0.5 * (2 * cfg.num_hidden_layers)**-0.5 * cfg.initializer_factor
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Dense(cfg.intermediate_size, kernel_init=_normal(fc1_std), name="fc1", **kw)(x)
    x = _ACTIVATIONS[cfg.hidden_act](x)
    return nn.Dense(cfg.hidden_size, kernel_init=_normal(fc2_std), name="fc2", **kw)(x)


def _layer_norm(cfg, dtype, param_dtype, name: str | None = None) -> LayerNorm:
  # The U-Net's LayerNorm: fp32 statistics with a two-pass variance (as torch computes it), which
  # matters here because CLIP's residual stream has large outlier channels.
  return LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, name=name)


class CLIPEncoderLayer(nn.Module):
  """Pre-norm transformer block."""

  config: CLIPTextConfig | CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, *, is_causal: bool, mask: jax.Array | None) -> jax.Array:
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = _layer_norm(cfg, name="layer_norm1", **kw)(x)
    x = x + CLIPAttention(cfg, attention_implementation=self.attention_implementation, name="self_attn", **kw)(
        h, is_causal=is_causal, mask=mask)
    h = _layer_norm(cfg, name="layer_norm2", **kw)(x)
    return x + CLIPMLP(cfg, name="mlp", **kw)(h)


class CLIPEncoder(nn.Module):
  config: CLIPTextConfig | CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, *, is_causal: bool = False, mask: jax.Array | None = None):
    """Returns (last layer's output, (input, each layer's output))."""
    hidden_states = [x]
    for i in range(self.config.num_hidden_layers):
      x = CLIPEncoderLayer(
          self.config,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          attention_implementation=self.attention_implementation,
          name=f"layers_{i}",
      )(x, is_causal=is_causal, mask=mask)
      hidden_states.append(x)
    return x, tuple(hidden_states)


class _TextEmbeddings(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(features=cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype)
    init = _normal(0.02 * cfg.initializer_factor)  # transformers hard-codes 0.02 here
    tok = nn.Embed(cfg.vocab_size, embedding_init=init, name="token_embedding", **kw)(input_ids)
    pos = nn.Embed(cfg.max_position_embeddings, embedding_init=init, name="position_embedding",
                   **kw)(jnp.arange(input_ids.shape[1]))
    return tok + pos[None]


class CLIPTextTransformer(nn.Module):
  """The text tower: parameters at `text_model/...` in both CLIPTextModel and CLIPModel."""

  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: str = "auto"

  def setup(self):
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embeddings = _TextEmbeddings(cfg, **kw)
    self.encoder = CLIPEncoder(cfg, attention_implementation=self.attention_implementation, **kw)
    self.final_layer_norm = _layer_norm(cfg, **kw)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
    cfg = self.config
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be (batch, length) token ids, got shape {input_ids.shape}.")
    if input_ids.shape[1] > cfg.max_position_embeddings:
      raise ValueError(
          f"input_ids has {input_ids.shape[1]} tokens but the model has {cfg.max_position_embeddings} positions; "
          "tokenize with truncation to max_position_embeddings.")
    mask = None
    if attention_mask is not None:
      if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} must equal input_ids shape {input_ids.shape}.")
      mask = attention_mask.astype(bool)[:, None, None, :]  # padded keys are masked for every query
    x = self.embeddings(input_ids)
    x, hidden_states = self.encoder(x, is_causal=True, mask=mask)
    x = self.final_layer_norm(x)
    if cfg.eos_token_id == 2:
      # Legacy configs (before transformers PR #24773): <|endoftext|> is the highest id in the row.
      eos_pos = jnp.argmax(input_ids, axis=-1)
    else:
      eos_pos = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)  # first end-of-text token
    pooled = jnp.take_along_axis(x, eos_pos[:, None, None], axis=1)[:, 0]
    return CLIPTextOutput(last_hidden_state=x, pooler_output=pooled, hidden_states=hidden_states)

  def encode_prompt(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, clip_skip: int = 0):
    """`final_layer_norm(hidden_states[-(clip_skip + 1)])`: diffusers' `encode_prompt` recipe.

    clip_skip=0 is `last_hidden_state`; clip_skip=1 is the penultimate layer. Layers past the one
    read are dead code under jit.
    """
    if not 0 <= clip_skip <= self.config.num_hidden_layers:
      raise ValueError(f"clip_skip must be in [0, {self.config.num_hidden_layers}] for this model, got {clip_skip}.")
    out = self(input_ids, attention_mask)
    if clip_skip == 0:
      return out.last_hidden_state
    return self.final_layer_norm(out.hidden_states[-(clip_skip + 1)])


class _VisionEmbeddings(nn.Module):
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    cfg = self.config
    d, p = cfg.hidden_size, cfg.patch_size
    std = cfg.initializer_range * cfg.initializer_factor
    class_embedding = self.param("class_embedding", _normal(d**-0.5 * cfg.initializer_factor), (d,), self.param_dtype)
    patches = nn.Conv(
        d,
        (p, p),
        strides=(p, p),
        padding="VALID",
        use_bias=False,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=_normal(std),
        name="patch_embedding",
    )(pixel_values.astype(self.dtype))
    b = patches.shape[0]
    patches = patches.reshape(b, -1, d)  # row-major over the patch grid, as torch's flatten(2)
    cls = jnp.broadcast_to(class_embedding.astype(self.dtype), (b, 1, d))
    x = jnp.concatenate([cls, patches], axis=1)
    num_positions = (cfg.image_size // p)**2 + 1
    pos = nn.Embed(
        num_positions,
        d,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        embedding_init=_normal(std),
        name="position_embedding",
    )(jnp.arange(num_positions))
    return x + pos[None]


class CLIPVisionTransformer(nn.Module):
  """The vision tower: parameters at `vision_model/...` in both CLIPVisionModel and CLIPModel."""

  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: str = "auto"

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    want = (cfg.image_size, cfg.image_size, cfg.num_channels)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
      raise ValueError(f"pixel_values must be NHWC (batch, {want[0]}, {want[1]}, {want[2]}) for this model, "
                       f"got shape {pixel_values.shape}; resize to image_size and put channels last.")
    x = _VisionEmbeddings(cfg, name="embeddings", **kw)(pixel_values)
    x = _layer_norm(cfg, name="pre_layrnorm", **kw)(x)  # sic: the checkpoint key is misspelt
    x, hidden_states = CLIPEncoder(cfg, attention_implementation=self.attention_implementation, name="encoder", **kw)(x)
    pooled = _layer_norm(cfg, name="post_layernorm", **kw)(x[:, 0])
    return CLIPVisionOutput(last_hidden_state=x, pooler_output=pooled, hidden_states=hidden_states)


class CLIPTextModel(nn.Module):
  """transformers `CLIPTextModel`: the SD text encoder. Parameters under `text_model`."""

  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: str = "auto"

  def setup(self):
    self.text_model = CLIPTextTransformer(
        self.config,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        attention_implementation=self.attention_implementation,
    )

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
    return self.text_model(input_ids, attention_mask)

  def encode_prompt(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, clip_skip: int = 0):
    """Prompt embeddings for the U-Net; see `CLIPTextTransformer.encode_prompt`."""
    return self.text_model.encode_prompt(input_ids, attention_mask, clip_skip)


class CLIPTextModelWithProjection(CLIPTextModel):
  """transformers `CLIPTextModelWithProjection` (SDXL's second text encoder): the text tower under
  `text_model` and a bias-free `text_projection` of its pooled output."""

  def setup(self):
    super().setup()
    cfg = self.config
    self.text_projection = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                                    kernel_init=_normal(cfg.hidden_size**-0.5 * cfg.initializer_factor))

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextModelOutput:
    out = self.text_model(input_ids, attention_mask)
    return CLIPTextModelOutput(text_embeds=self.text_projection(out.pooler_output),
                               last_hidden_state=out.last_hidden_state, pooler_output=out.pooler_output,
                               hidden_states=out.hidden_states)


class CLIPVisionModel(nn.Module):
  """transformers `CLIPVisionModel`. Parameters under `vision_model`; pixel_values are NHWC."""

  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: str = "auto"

  def setup(self):
    self.vision_model = CLIPVisionTransformer(
        self.config,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        attention_implementation=self.attention_implementation,
    )

  def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
    return self.vision_model(pixel_values)


class CLIPVisionModelWithProjection(CLIPVisionModel):
  """transformers `CLIPVisionModelWithProjection`: the vision tower under `vision_model` and a bias-free
  `visual_projection` of its pooled output (the image encoder of IP-Adapters, `jaxsd.ip_adapter`)."""

  def setup(self):
    super().setup()
    cfg = self.config
    self.visual_projection = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype,
                                      param_dtype=self.param_dtype,
                                      kernel_init=_normal(cfg.hidden_size**-0.5 * cfg.initializer_factor))

  def __call__(self, pixel_values: jax.Array) -> CLIPVisionModelOutput:
    out = self.vision_model(pixel_values)
    return CLIPVisionModelOutput(image_embeds=self.visual_projection(out.pooler_output),
                                 last_hidden_state=out.last_hidden_state, pooler_output=out.pooler_output,
                                 hidden_states=out.hidden_states)


def _l2_normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))


class CLIPModel(nn.Module):
  """transformers `CLIPModel`: both towers, their projections and the learned temperature."""

  config: CLIPConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: str = "auto"

  def setup(self):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, attention_implementation=self.attention_implementation)
    self.text_model = CLIPTextTransformer(cfg.text_config, **kw)
    self.vision_model = CLIPVisionTransformer(cfg.vision_config, **kw)

    def projection(in_dim):
      return nn.Dense(
          cfg.projection_dim,
          use_bias=False,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          kernel_init=_normal(in_dim**-0.5 * cfg.initializer_factor),
      )

    self.visual_projection = projection(cfg.vision_config.hidden_size)
    self.text_projection = projection(cfg.text_config.hidden_size)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(cfg.logit_scale_init_value), (),
                                  self.param_dtype)

  def get_text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """Projected pooled text features (B, projection_dim), not normalised."""
    return self.text_projection(self.text_model(input_ids, attention_mask).pooler_output)

  def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
    """Projected pooled image features (B, projection_dim), not normalised."""
    return self.visual_projection(self.vision_model(pixel_values).pooler_output)

  def __call__(self, input_ids: jax.Array, pixel_values: jax.Array,
               attention_mask: jax.Array | None = None) -> CLIPOutput:
    text_out = self.text_model(input_ids, attention_mask)
    vision_out = self.vision_model(pixel_values)
    # Normalisation and similarities in fp32: the logits feed a softmax over the whole batch.
    text_embeds = _l2_normalize(self.text_projection(text_out.pooler_output))
    image_embeds = _l2_normalize(self.visual_projection(vision_out.pooler_output))
    logits_per_text = (text_embeds @ image_embeds.T) * jnp.exp(self.logit_scale.astype(jnp.float32))
    return CLIPOutput(
        logits_per_image=logits_per_text.T,
        logits_per_text=logits_per_text,
        text_embeds=text_embeds,
        image_embeds=image_embeds,
        text_model_output=text_out,
        vision_model_output=vision_out,
    )
