"""SDXL (Podell et al., 2023): Stable Diffusion's pipeline with two text encoders and size conditioning.

`StableDiffusionXL` is a `StableDiffusion` (same compiled programs, samplers, VAE, img2img) whose prompt
goes through both CLIP text encoders, the penultimate hidden states of each concatenated (768 + 1280 =
2048 wide for the base model; the refiner has the second encoder only), and whose U-Net also sees the
second encoder's pooled projection and the "time ids": original size, crop top-left and target size, or
for the refiner the aesthetic score instead of the target size. It follows diffusers'
`StableDiffusionXLPipeline` (text to image) and `StableDiffusionXLImg2ImgPipeline` (img2img and the base ->
refiner hand-off with `denoising_end` / `denoising_start`), quirks included where they change numbers.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd import hub, ip_adapter, model_folder, pag, pipeline, pipeline_folders, pretrained, prompt_syntax, single_file
from jaxsd import tokenizer as tok
from jaxsd.diffusion import schedules
from jaxsd.config import write_json_object
from jaxsd.model_folder import DIFFUSERS_VERSION


def _as_list(value, n: int, name: str) -> list[str] | None:
  if value is None or isinstance(value, str):
    return None if value is None else [value] * n
  value = list(value)
  if len(value) != n:
    raise ValueError(f"{len(value)} {name} for {n} prompts: give one per prompt (or one string for all).")
  return value


@dataclasses.dataclass
class StableDiffusionXL(pipeline.StableDiffusion):
  """An SDXL model (base or refiner). `text_encoder` / `tokenizer` are None for a refiner.

  `model_index` is the folder's model_index.json: its `force_zeros_for_empty_prompt` (no negative prompt
  -> zero unconditional embeddings, the base model's setting) and `requires_aesthetics_score` (the
  refiner's) are read from it, as diffusers' pipelines read them from their config.
  """

  text_encoder_2: Any = None
  text_encoder_2_params: Any = None
  tokenizer_2: Any = None
  model_index: dict = dataclasses.field(default_factory=dict)
  PIX2PIX_IP_ADAPTER: ClassVar[bool] = False  # (diffusers' StableDiffusionXLInstructPix2PixPipeline takes none)

  @classmethod
  def from_pretrained(cls, path: str, dtype=jnp.float32, param_dtype=None, *, variant: str | None = None,
                      allow_pickle: bool = False, **unet_kwargs) -> "StableDiffusionXL":
    """Loads a diffusers SDXL folder (model_index.json, unet/, vae/, text_encoder/, text_encoder_2/,
    tokenizer/, tokenizer_2/, scheduler/; a refiner has no text_encoder/ and tokenizer/).

    Weights may be single files or shards with an index, `variant` ("fp16") and `allow_pickle` as for
    `StableDiffusion`; each
    tensor is read and converted one at a time (the SDXL U-Net, 2.6B parameters, loads within about two
    copies of itself in host memory). The scheduler config is read as the file says (SDXL's pipelines do
    not force SD's steps_offset / clip_sample). `path` may be a Hub id ("owner/name", `jaxsd.hub`). A ControlNet
    pipeline's folder (StableDiffusionXLControlNetPipeline's) loads as its base model, with a warning;
    `StableDiffusionXLControlNet.from_pretrained` and `load` attach its ControlNets.
    """
    path = hub.resolve(path, variant=variant, allow_pickle=allow_pickle)
    index, networks, tokenizers = _folder_parts(path)
    first = "text_encoder" in networks
    model_folder.check_model_folder(path, networks + tokenizers + ("scheduler",),
                                    tuple(f"{n}/config.json" for n in networks) + ("scheduler/scheduler_config.json",))
    dirs = {name: os.path.join(path, name) for name in networks}
    variants = model_folder.resolve_variants(path, dirs, variant)
    unet, unet_params = pretrained.load_unet(dirs["unet"], dtype, param_dtype, variant=variants["unet"],
                                             allow_pickle=allow_pickle, **unet_kwargs)
    if unet.config.addition_embed_type != "text_time":
      raise ValueError(f"{path}: the U-Net has addition_embed_type={unet.config.addition_embed_type!r}, not SDXL's "
                       "'text_time'; load the folder with jaxsd.StableDiffusion.from_pretrained.")
    vae, vae_params = pipeline_folders.load_vae(dirs["vae"], dtype, variants["vae"], allow_pickle)
    te = te_params = tokenizer = None
    if first:
      te, te_params = pretrained.load_text_encoder(dirs["text_encoder"], dtype, param_dtype,
                                                   variant=variants["text_encoder"], projection=False,
                                                   allow_pickle=allow_pickle)
      tokenizer = tok.load_tokenizer(os.path.join(path, "tokenizer"))
    te2, te2_params = pretrained.load_text_encoder(dirs["text_encoder_2"], dtype, param_dtype,
                                                   variant=variants["text_encoder_2"], projection=True,
                                                   allow_pickle=allow_pickle)
    scheduler = schedules.SchedulerConfig.from_dict(model_folder.read_json(model_folder.scheduler_config_file(path)))
    pipeline_folders.warn_unattached_controlnets(cls, path)
    return cls(unet, unet_params, vae, vae_params, te, te_params, tokenizer, scheduler, text_encoder_2=te2,
               text_encoder_2_params=te2_params, tokenizer_2=tok.load_tokenizer(os.path.join(path, "tokenizer_2")),
               model_index=index, source_folder=path)

  @classmethod
  def from_single_file(cls, path: str, config: str = "auto", dtype=jnp.float32, param_dtype=None, *,
                       allow_pickle: bool = False, vae: str | None = None, **unet_kwargs) -> "StableDiffusionXL":
    """Loads an SDXL single `.safetensors` checkpoint in the original (Stability / A1111 / ComfyUI) layout, as
    diffusers' `StableDiffusionXLPipeline.from_single_file` reads it (a pickled `.ckpt` with `allow_pickle`).

    The file holds weights only. `config` says what they are: "xl" (stable-diffusion-xl-base-1.0's configs,
    Euler scheduler, zero unconditional embeddings without a negative prompt), "xl-refiner" (the refiner's:
    aesthetic-score time ids, no first text encoder), "xl-inpainting" (SDXL inpainting 0.1's 9-channel U-Net),
    each with the CLIP vocabulary shipped with jaxsd, the second tokenizer padding with "!"; "auto"
    (`single_file.guess_config`, from the file's keys as diffusers infers the type); or a diffusers SDXL folder
    whose configs, tokenizers, scheduler and model_index.json describe the checkpoint (its own weights are not read).
    `vae` replaces the file's VAE, or gives one to a file that ships without (`StableDiffusion.from_single_file`).
    """
    config = os.fspath(config)
    state_dict = single_file.read(path, allow_pickle)
    if config == "auto":
      config = single_file.guess_config(state_dict)
      if config not in single_file.XL_PRESETS:
        raise ValueError(f"{path} is a Stable Diffusion 1.x / 2.x single file ({config}), not SDXL's: load it with "
                         "jaxsd.StableDiffusion.from_single_file.")
    if os.path.isdir(config):
      index, networks, names = _folder_parts(config)
      model_folder.check_model_folder(
          config, networks + names + ("scheduler",),
          tuple(f"{n}/config.json" for n in networks) + ("scheduler/scheduler_config.json",))
      configs = {name: model_folder.read_json(os.path.join(config, name, "config.json")) for name in networks}
      configs["scheduler"] = model_folder.read_json(model_folder.scheduler_config_file(config))
      tokenizers = {name: tok.load_tokenizer(os.path.join(config, name)) for name in names}
    else:
      configs = single_file.preset_xl(config)
      index = configs.pop("model_index")
      names = ("tokenizer", "tokenizer_2") if "text_encoder" in configs else ("tokenizer_2",)
      tokenizers = {name: tok.load_tokenizer() for name in names}
      tokenizers["tokenizer_2"].pad_token = single_file.XL_PAD_TOKEN_2
    parts = single_file.split_xl(state_dict, configs, need_vae=vae is None)
    where = os.fspath(path)
    unet, unet_params = pretrained.from_state_dict("unet", configs["unet"], parts["unet"], f"{where} (U-Net)", dtype,
                                                   param_dtype, **unet_kwargs)
    if unet.config.addition_embed_type != "text_time":
      raise ValueError(f"config={config!r}: its U-Net has addition_embed_type={unet.config.addition_embed_type!r}, "
                       "not SDXL's 'text_time'; pass an SDXL preset or folder.")
    vae, vae_params = pipeline_folders.single_file_vae(where, parts, configs["vae"], dtype, vae, allow_pickle)
    te = te_params = None
    if "text_encoder" in parts:
      te, te_params = pretrained.from_state_dict("text_encoder", configs["text_encoder"], parts["text_encoder"],
                                                 f"{where} (text encoder)", dtype, param_dtype)
    te2, te2_params = pretrained.from_state_dict("text_encoder_2", configs["text_encoder_2"], parts["text_encoder_2"],
                                                 f"{where} (text encoder 2)", dtype, param_dtype)
    return cls(unet, unet_params, vae, vae_params, te, te_params, tokenizers.get("tokenizer"),
               schedules.SchedulerConfig.from_dict(configs["scheduler"]), text_encoder_2=te2,
               text_encoder_2_params=te2_params, tokenizer_2=tokenizers["tokenizer_2"], model_index=index)

  def save_pretrained(self, path: str, dtype=None) -> None:
    """Writes the diffusers folder `StableDiffusionXLPipeline.from_pretrained` (or the Img2Img pipeline,
    for a refiner) loads unchanged; `dtype` (e.g. np.float16) casts the weights."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    for name, module, params in (("unet", self.unet, self.unet_params), ("vae", self.vae, self.vae_params),
                                 ("text_encoder", self.text_encoder, self.text_encoder_params),
                                 ("text_encoder_2", self.text_encoder_2, self.text_encoder_2_params)):
      if module is not None:
        pretrained.save_pretrained(module, jax.device_get(params), os.path.join(path, name), dtype)
    for name, tokenizer in (("tokenizer", self.tokenizer), ("tokenizer_2", self.tokenizer_2)):
      if tokenizer is not None:
        tok.save_tokenizer(tokenizer, os.path.join(path, name))
    model_folder.write_scheduler(self.scheduler_config, os.path.join(path, "scheduler"), self.scheduler_class)
    write_json_object(os.path.join(path, "model_index.json"), self._model_index(), indent=2, sort_keys=True)

  def _model_index(self) -> dict:
    first = self.text_encoder is not None
    index = {
        "_class_name": model_folder.sdxl_pipeline_class(self.model_index.get("_class_name"), first),
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt,
        "scheduler": ["diffusers", self.scheduler_class.removeprefix("Flax")],
        "text_encoder": ["transformers", "CLIPTextModel"] if first else [None, None],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"] if first else [None, None],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if not first or "requires_aesthetics_score" in self.model_index:
      index["requires_aesthetics_score"] = self.requires_aesthetics_score
    return index

  # --- what the folder's config says ---------------------------------------------------------------

  @property
  def force_zeros_for_empty_prompt(self) -> bool:
    return bool(self.model_index.get("force_zeros_for_empty_prompt", True))

  @property
  def requires_aesthetics_score(self) -> bool:
    return bool(self.model_index.get("requires_aesthetics_score", False))

  @property
  def scheduler_class(self) -> str:
    return (self.model_index.get("scheduler") or [None, "EulerDiscreteScheduler"])[1] or "EulerDiscreteScheduler"

  @property
  def default_sampler(self) -> str:
    """The sampler of the folder's scheduler class (`pipeline.folder_sampler`; Euler for a class with none here)."""
    return pipeline.folder_sampler(self.scheduler_class, self.scheduler_config, "euler")

  @property
  def params(self) -> dict:
    """What the compiled program takes: the U-Net and text encoders with the active LoRA adapters merged in."""
    return {"text_encoder_2": self.text_encoder_2_params, **super().params}

  # --- latents ---------------------------------------------------------------------------------------
  # A VAE config with `latents_mean` and `latents_std` (Playground v2.5's, an SDXL-architecture model)
  # normalises each latent channel, as diffusers' SDXL pipelines do: the U-Net's latents are
  # (z - mean) * scaling_factor / std. Without both, plain scaling (shift_factor is not SDXL's).

  def _latent_stats(self):
    cfg = self.vae.config
    if cfg.latents_mean is None or cfg.latents_std is None:
      return None
    shape = (1, 1, 1, -1)  # per channel, NHWC
    return (jnp.asarray(cfg.latents_mean, jnp.float32).reshape(shape), jnp.asarray(cfg.latents_std,
                                                                                   jnp.float32).reshape(shape))

  def scale_latents(self, z: jax.Array) -> jax.Array:
    stats = self._latent_stats()
    if stats is None:
      return z * self.vae.config.scaling_factor
    return (z - stats[0]) * self.vae.config.scaling_factor / stats[1]

  def pix2pix_image_latents(self, modes: jax.Array) -> jax.Array:
    """The image's latents an InstructPix2Pix U-Net sees: the posterior's mode, times scaling_factor for a CosXL Edit
    folder (model_index.json's `is_cosxl_edit`), as diffusers' StableDiffusionXLInstructPix2PixPipeline."""
    return modes * self.vae.config.scaling_factor if self.model_index.get("is_cosxl_edit") else modes

  def unscale_latents(self, latents: jax.Array) -> jax.Array:
    stats = self._latent_stats()
    if stats is None:
      return latents / self.vae.config.scaling_factor
    return latents * stats[1] / self.vae.config.scaling_factor + stats[0]

  # --- text ------------------------------------------------------------------------------------------

  @property
  def _encoders(self) -> tuple:
    first = ((self.text_encoder, self.tokenizer, "text_encoder"),) if self.text_encoder is not None else ()
    return first + ((self.text_encoder_2, self.tokenizer_2, "text_encoder_2"),)

  def tokenize(self, prompts: Sequence[str], prompts_2: Sequence[str] | None = None) -> np.ndarray:
    """Token ids (B, encoders, 77): `prompts` for the first encoder, `prompts_2` (default: the same) for
    the second, each with its own tokenizer (SDXL's second pads with "!")."""
    texts = [list(prompts)] * (len(self._encoders) - 1) + [list(prompts_2 or prompts)]
    return np.stack([
        tok.tokenize(tokenizer, self.maybe_convert_prompt(t, tokenizer),
                     max_length=encoder.config.max_position_embeddings)
        for t, (encoder, tokenizer, _) in zip(texts, self._encoders)
    ], axis=1)

  @property
  def text_length(self) -> int:
    """Tokens per prompt (window): the text encoders' positions (77), as `tokenize` pads to."""
    return self.text_encoder_2.config.max_position_embeddings

  def _syntax_ids(self, texts: list[list[str]], negatives: list[list[str]], long_prompts: bool,
                  weighting: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ids, weights, uncond ids, uncond weights), each (B, encoders, 77 k): `texts[e]` / `negatives[e]` for
    encoder e by its own tokenizer (`jaxsd.prompt_syntax.tokenize_each`), every encoder the same k windows."""
    tokenizers = [tokenizer for _, tokenizer, _ in self._encoders]
    each = prompt_syntax.tokenize_each(
        tokenizers, [[self.maybe_convert_prompt(t, tokenizer),
                      self.maybe_convert_prompt(n, tokenizer)]
                     for t, n, tokenizer in zip(texts, negatives, tokenizers)], length=self.text_length,
        long_prompts=long_prompts, weighting=weighting)
    return tuple(np.stack([groups[g][i] for groups in each], axis=1) for g in (0, 1) for i in (0, 1))

  def encode_prompt(self, params, ids: jax.Array, clip_skip: int | None = None, uncond_rows: int = 0,
                    weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(context, pooled): each encoder's hidden_states[-(clip_skip + 2)] (the penultimate layer without the
    final layer norm when clip_skip is None, as diffusers' SDXL counts it) concatenated, and the last
    encoder's projected pooled output (`text_embeds`). The first `uncond_rows` rows (negative prompts) take
    the penultimate layer whatever clip_skip says, as diffusers' encode_prompt does.

    `ids` (B, encoders, L): L longer than 77 is k windows of 77 (`jaxsd.prompt_syntax`), which each encoder
    encodes one by one, the states concatenated along the sequence and `pooled` the first window's, as
    A1111's SDXL. `weights` (B, encoders, L) scale each encoder's states by A1111's emphasis, per window (the
    pooled output is not weighted, as A1111's)."""
    n = self.text_length
    b, _, length = ids.shape
    if length > n and length % n:
      raise ValueError(f"ids of {length} tokens: more than {n} must be whole windows of {n} "
                       "(see jaxsd.prompt_syntax.tokenize).")
    windows = max(length // n, 1)
    states = []
    for k, (encoder, _, name) in enumerate(self._encoders):
      layers = encoder.config.num_hidden_layers
      if not 0 <= (clip_skip or 0) <= layers - 1:
        raise ValueError(f"clip_skip={clip_skip}: SDXL counts from the penultimate layer; this {name} has "
                         f"{layers} layers, so clip_skip must be in [0, {layers - 1}].")
      out = encoder.apply({"params": params[name]}, ids[:, k].reshape(b * windows, -1))
      hidden = out.hidden_states[-((clip_skip or 0) + 2)]
      if uncond_rows and clip_skip:
        rows = uncond_rows * windows
        hidden = jnp.concatenate([out.hidden_states[-2][:rows], hidden[rows:]])
      if weights is not None:
        hidden = prompt_syntax.emphasize(hidden, weights[:, k].reshape(hidden.shape[:2]))
      states.append(hidden.reshape(b, length, hidden.shape[-1]))
    pooled = out.text_embeds if windows == 1 else out.text_embeds.reshape(b, windows, -1)[:, 0]
    return jnp.concatenate(states, axis=-1), pooled

  def add_time_ids(self, original_size, crops_coords_top_left, target_size, aesthetic_score) -> tuple[float, ...]:
    """diffusers' `_get_add_time_ids`: original size + crop top-left + target size, or + the aesthetic
    score in place of the target size where the folder says requires_aesthetics_score (the refiner)."""
    last = (aesthetic_score,) if self.requires_aesthetics_score else tuple(target_size)
    ids = tuple(original_size) + tuple(crops_coords_top_left) + last
    cfg = self.unet.config
    got = cfg.addition_time_embed_dim * len(ids) + self.text_encoder_2.config.projection_dim
    if got != cfg.projection_class_embeddings_input_dim:
      raise ValueError(f"the U-Net expects an added embedding of {cfg.projection_class_embeddings_input_dim} features "
                       f"but {len(ids)} time ids and text_encoder_2's projection_dim give {got}: check "
                       "requires_aesthetics_score in model_index.json (true for a refiner).")
    return tuple(float(v) for v in ids)

  def text_inputs(self, prompts, negative_prompts, height, width, *, prompts_2=None, negative_prompts_2=None,
                  original_size=None, crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                  negative_crops_coords_top_left=(0, 0), negative_target_size=None, aesthetic_score=6.0,
                  negative_aesthetic_score=2.5, image_to_image=False, long_prompts=False, prompt_weighting=False):
    """(ids, unconditional ids, {time_ids, uncond_time_ids, zero_uncond}) for the program; ids (B, encoders, 77).

    Sizes default to (height, width). No negative prompts with force_zeros_for_empty_prompt: zero
    unconditional embeddings (`zero_uncond`). Negative time ids as diffusers: text-to-image uses the
    prompt's unless both negative_original_size and negative_target_size are given; img2img defaults the
    negative sizes to the prompt's and, without an aesthetic score, takes the prompt's crop and target size.

    `long_prompts` and `prompt_weighting` as `StableDiffusion.text_inputs` (A1111's SDXL: both encoders take
    the same windows, (B, encoders, 77 k) ids; `weights` / `uncond_weights` of that shape where a weight is not
    1), for the second prompts too. With zero unconditional embeddings, zeros of the prompts' length.
    """
    n = len(prompts)
    size = (height, width)
    original_size, target_size = tuple(original_size or size), tuple(target_size or size)
    pos = self.add_time_ids(original_size, crops_coords_top_left, target_size, aesthetic_score)
    if image_to_image:
      neg_original = tuple(negative_original_size or original_size)
      if self.requires_aesthetics_score:
        neg = self.add_time_ids(neg_original, negative_crops_coords_top_left, None, negative_aesthetic_score)
      else:
        neg = self.add_time_ids(neg_original, crops_coords_top_left, target_size, None)
    elif negative_original_size is not None and negative_target_size is not None:
      neg = self.add_time_ids(negative_original_size, negative_crops_coords_top_left, negative_target_size,
                              negative_aesthetic_score)
    else:
      neg = pos
    zero = negative_prompts is None and self.force_zeros_for_empty_prompt
    negatives = negative_prompts or [""] * n
    prompts_2 = _as_list(prompts_2, n, "prompts_2")
    negatives_2 = _as_list(negative_prompts_2, n, "negative_prompts_2") or negatives
    text = {
        "time_ids": np.tile(np.asarray(pos, np.float32), (n, 1)),
        "uncond_time_ids": np.tile(np.asarray(neg, np.float32), (n, 1)),
        "zero_uncond": np.full((n,), zero),
    }
    if not (long_prompts or prompt_weighting):
      return self.tokenize(prompts, prompts_2), self.tokenize(negatives, negatives_2), text
    first = len(self._encoders) - 1  # the first encoder's prompts (none for a refiner), then the second's
    texts = [list(prompts)] * first + [list(prompts_2 or prompts)]
    ids, weights, uncond_ids, uncond_weights = self._syntax_ids(texts, [list(negatives)] * first + [list(negatives_2)],
                                                                long_prompts, prompt_weighting)
    if (weights != 1).any() or (uncond_weights != 1).any():  # all 1: the unweighted program, exactly
      text.update(weights=weights, uncond_weights=uncond_weights)
    return ids, uncond_ids, text

  def encode_prompts(self, params, ids, uncond_ids, guided, time_ids, uncond_time_ids, zero_uncond, weights=None,
                     uncond_weights=None):
    if not guided:
      context, pooled = self.encode_prompt(params, ids, self.clip_skip, weights=weights)
      return {"context": context, "text_embeds": pooled, "time_ids": time_ids}
    b = ids.shape[0]  # both halves through each encoder at once, the unconditional first
    both = None if weights is None else jnp.concatenate([uncond_weights, weights])
    context, pooled = self.encode_prompt(params, jnp.concatenate([uncond_ids, ids]), self.clip_skip, uncond_rows=b,
                                         weights=both)
    zero = jnp.concatenate([zero_uncond, jnp.zeros_like(zero_uncond)])
    context = jnp.where(zero[:, None, None], jnp.zeros_like(context), context)
    pooled = jnp.where(zero[:, None], jnp.zeros_like(pooled), pooled)
    return {"context": context, "text_embeds": pooled, "time_ids": jnp.concatenate([uncond_time_ids, time_ids])}

  def apply_unet(self, unet_params, x, t, cond, i=None, x_extra=None, **unet_kwargs):
    return self.unet.apply({"params": unet_params}, pipeline.with_extra(x, x_extra), t, cond["context"],
                           text_embeds=cond["text_embeds"], time_ids=cond["time_ids"], **unet_kwargs)

  # --- user entry points -----------------------------------------------------------------------------

  def __call__(self, prompts, negative_prompts=None, height: int | None = None, width: int | None = None,
               steps: int = 50, guidance_scale: float = 5.0, sampler: str | None = None, seed: int = 0, latents=None,
               output: str = "np", *, prompts_2=None, negative_prompts_2=None, original_size=None,
               crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
               negative_crops_coords_top_left=(0, 0), negative_target_size=None, guidance_rescale: float = 0.0,
               denoising_end: float | None = None, long_prompts: bool = False, prompt_weighting: bool = False,
               eta: float = 0.0, ip_adapter_image=None, ip_adapter_image_embeds=None, ip_adapter_masks=None,
               pag_scale: float | None = None, pag_adaptive_scale: float = 0.0):
    """Text to image, as diffusers' StableDiffusionXLPipeline; `StableDiffusion.__call__`'s arguments (`eta`, the
    IP-Adapter's `ip_adapter_image` / `ip_adapter_image_embeds` and PAG's `pag_scale` / `pag_adaptive_scale` too;
    img2img and inpaint take them as well) plus:

    Args:
      prompts_2, negative_prompts_2: the second text encoder's prompts (default: `prompts` / the negatives).
      original_size, crops_coords_top_left, target_size: SDXL's size conditioning, (height, width) and
        (top, left); sizes default to the output size.
      negative_original_size, negative_crops_coords_top_left, negative_target_size: the unconditional
        half's (used when both sizes are given).
      guidance_rescale: in [0, 1], Lin et al. (2023)'s rescale of the guided output.
      denoising_end: in (0, 1): stop there and return the noisy latents (`output="latent"`) for a refiner's
        `img2img(..., denoising_start=denoising_end)`.
      long_prompts, prompt_weighting: A1111's 75-token windows and `(word:1.3)` weights as for SD
        (`jaxsd.prompt_syntax`), both text encoders on the same windows; the pooled embedding is the first
        window's, unweighted (as A1111's SDXL). Also for img2img and inpaint.

    Without negative prompts the unconditional embeddings are zeros where the folder says
    force_zeros_for_empty_prompt (SDXL base), as diffusers. The default sampler is the folder's
    scheduler's (Euler for SDXL); few-step settings (SDXL-Turbo / Lightning: timestep_spacing="trailing",
    1-8 steps, guidance_scale <= 1) go through `scheduler_config.replace(...)` and the arguments.
    """
    options = text_options(prompts_2, negative_prompts_2, original_size, crops_coords_top_left, target_size,
                           negative_original_size, negative_crops_coords_top_left, negative_target_size,
                           **prompt_syntax.options(long_prompts, prompt_weighting))
    return self._text_to_image(prompts, negative_prompts, height, width, steps, guidance_scale, sampler or
                               self.default_sampler, seed, latents, output, text_options=options,
                               guidance_rescale=guidance_rescale, denoising_end=denoising_end, eta=eta,
                               **ip_adapter.call_options(ip_adapter_image, ip_adapter_image_embeds, ip_adapter_masks),
                               **pag.call_options(pag_scale, pag_adaptive_scale))

  def img2img(self, prompts, init_images, strength: float = 0.3, negative_prompts=None, steps: int = 50,
              guidance_scale: float = 5.0, sampler: str | None = None, seed: int = 0, output: str = "np", noise=None,
              image_latents=None, *, prompts_2=None, negative_prompts_2=None, original_size=None,
              crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
              negative_crops_coords_top_left=(0, 0), negative_target_size=None, aesthetic_score: float = 6.0,
              negative_aesthetic_score: float = 2.5, guidance_rescale: float = 0.0,
              denoising_start: float | None = None, denoising_end: float | None = None, long_prompts: bool = False,
              prompt_weighting: bool = False, eta: float = 0.0, ip_adapter_image=None, ip_adapter_image_embeds=None,
              ip_adapter_masks=None, pag_scale: float | None = None, pag_adaptive_scale: float = 0.0):
    """Image to image, as diffusers' StableDiffusionXLImg2ImgPipeline: `StableDiffusion.img2img` plus the
    arguments of `__call__`, the refiner's aesthetic scores and `denoising_start`.

    With `denoising_start` (the base -> refiner hand-off) `strength` is ignored: the calls below that
    fraction of denoising run, starting from `image_latents` as given (the base's `output="latent"`,
    already noised: no noise is added).
    """
    options = text_options(prompts_2, negative_prompts_2, original_size, crops_coords_top_left, target_size,
                           negative_original_size, negative_crops_coords_top_left, negative_target_size,
                           aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score,
                           image_to_image=True, **prompt_syntax.options(long_prompts, prompt_weighting))
    return self._image_to_image(prompts, init_images, strength, negative_prompts, steps, guidance_scale, sampler or
                                self.default_sampler, seed, output, noise, image_latents, text_options=options,
                                guidance_rescale=guidance_rescale, denoising_start=denoising_start,
                                denoising_end=denoising_end, eta=eta,
                                **ip_adapter.call_options(ip_adapter_image, ip_adapter_image_embeds, ip_adapter_masks),
                                **pag.call_options(pag_scale, pag_adaptive_scale))

  def instruct_pix2pix(self, prompts, images, negative_prompts=None, steps: int = 100, guidance_scale: float = 5.0,
                       image_guidance_scale: float = 1.5, sampler: str | None = None, seed: int = 0, output: str = "np",
                       latents=None, image_latents=None, *, prompts_2=None, negative_prompts_2=None, original_size=None,
                       crops_coords_top_left=(0, 0), target_size=None, guidance_rescale: float = 0.0,
                       denoising_end: float | None = None, long_prompts: bool = False, prompt_weighting: bool = False,
                       eta: float = 0.0):
    """Edits each image as its prompt instructs, as diffusers' StableDiffusionXLInstructPix2PixPipeline
    (diffusers/sdxl-instructpix2pix-768; a CosXL Edit folder's image latents scaled, `pix2pix_image_latents`):
    `StableDiffusion.instruct_pix2pix` with SDXL's arguments of `__call__` (its size conditioning, the same for the
    three U-Net copies; `guidance_rescale` on the guided output against the text copy's). The output is the images'
    size: diffusers resizes the image to height x width (default the model's size) first; resize it so here."""
    options = text_options(prompts_2, negative_prompts_2, original_size, crops_coords_top_left, target_size, None,
                           (0, 0), None, **prompt_syntax.options(long_prompts, prompt_weighting))
    return self._instruct_pix2pix(prompts, images, negative_prompts, steps, guidance_scale, image_guidance_scale,
                                  sampler, seed, output, latents, image_latents, text_options=options,
                                  guidance_rescale=guidance_rescale, denoising_end=denoising_end, eta=eta)

  def with_controlnet(self, controlnets, dtype=None, param_dtype=None, allow_pickle: bool = False):
    """This SDXL base model steered by SDXL ControlNets (`jaxsd.pipeline_controlnet.StableDiffusionXLControlNet`,
    diffusers' StableDiffusionXLControlNetPipeline); arguments as `StableDiffusion.with_controlnet`."""
    if self.text_encoder is None:
      raise ValueError("with_controlnet: this is an SDXL refiner (no first text encoder); ControlNets steer the "
                       "base model, as diffusers' StableDiffusionXLControlNetPipeline.")
    from jaxsd import pipeline_controlnet  # it extends this class

    return pipeline_controlnet.StableDiffusionXLControlNet.from_pipeline(self, controlnets, dtype, param_dtype,
                                                                         allow_pickle)

  def inpaint(self, prompts, images, mask_images, strength: float = 0.9999, negative_prompts=None, steps: int = 50,
              guidance_scale: float = 7.5, sampler: str | None = None, seed: int = 0, output: str = "np", latents=None,
              masked_image_latents=None, image_latents=None, padding_mask_crop: int | None = None,
              height: int | None = None, width: int | None = None, *, prompts_2=None, negative_prompts_2=None,
              original_size=None, crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
              negative_crops_coords_top_left=(0, 0), negative_target_size=None, aesthetic_score: float = 6.0,
              negative_aesthetic_score: float = 2.5, long_prompts: bool = False, prompt_weighting: bool = False,
              eta: float = 0.0, ip_adapter_image=None, ip_adapter_image_embeds=None, ip_adapter_masks=None,
              pag_scale: float | None = None, pag_adaptive_scale: float = 0.0):
    """Inpainting, as diffusers' StableDiffusionXLInpaintPipeline: `StableDiffusion.inpaint` (a 9-channel
    inpainting U-Net, e.g. SDXL-inpainting-0.1, or latent blending for the base model and the refiner) with
    SDXL's arguments as `img2img`'s (size conditioning of the output size, the refiner's aesthetic scores) and
    diffusers' default strength 0.9999 (the schedule's first step skipped, from the noised image)."""
    options = text_options(prompts_2, negative_prompts_2, original_size, crops_coords_top_left, target_size,
                           negative_original_size, negative_crops_coords_top_left, negative_target_size,
                           aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score,
                           image_to_image=True, **prompt_syntax.options(long_prompts, prompt_weighting))
    return self._inpaint(prompts, images, mask_images, strength, negative_prompts, steps, guidance_scale, sampler or
                         self.default_sampler, seed, output, latents, masked_image_latents, image_latents, options,
                         padding_mask_crop, height, width, eta=eta,
                         **ip_adapter.call_options(ip_adapter_image, ip_adapter_image_embeds, ip_adapter_masks),
                         **pag.call_options(pag_scale, pag_adaptive_scale))


def _folder_parts(path: str) -> tuple[dict, tuple[str, ...], tuple[str, ...]]:
  """(model_index.json or {}, the network folders, the tokenizer folders) of an SDXL folder: a refiner has no
  text_encoder / tokenizer (model_index.json says so, else the folder's absence)."""
  index_file = os.path.join(path, "model_index.json")
  index = model_folder.read_json(index_file) if os.path.exists(index_file) else {}
  first = (index.get("text_encoder") or [None])[0] is not None if index else os.path.isdir(
      os.path.join(path, "text_encoder"))
  networks = ("unet", "vae") + (("text_encoder",) if first else ()) + ("text_encoder_2",)
  return index, networks, (("tokenizer",) if first else ()) + ("tokenizer_2",)


def text_options(prompts_2, negative_prompts_2, original_size, crops_coords_top_left, target_size,
                 negative_original_size, negative_crops_coords_top_left, negative_target_size, **img2img) -> dict:
  """The SDXL arguments of a call that `StableDiffusionXL.text_inputs` takes (`img2img`: the aesthetic scores and
  image_to_image=True of img2img)."""
  return dict(prompts_2=prompts_2, negative_prompts_2=negative_prompts_2, original_size=original_size,
              crops_coords_top_left=crops_coords_top_left, target_size=target_size,
              negative_original_size=negative_original_size,
              negative_crops_coords_top_left=negative_crops_coords_top_left, negative_target_size=negative_target_size,
              **img2img)


def load(path: str, dtype=jnp.float32, single_file_config: str = "auto", *, controlnets=None,
         **kwargs) -> pipeline.StableDiffusion:
  """`pipeline.load`, and SDXL folders (model_index.json's pipeline class, or an SDXL U-Net) as
  `StableDiffusionXL`: what `python -m sample --model` loads. A `.safetensors` file (a pickled `.ckpt` with
  allow_pickle=True) is a single file read with `single_file_config`: an SD 1.x / 2.x preset ("v1", "v2", ...) or
  folder (`StableDiffusion.from_single_file`), an SDXL one ("xl", "xl-refiner", "xl-inpainting";
  `StableDiffusionXL.from_single_file`), or "auto": SDXL's when the file's text encoders are under
  `conditioner.embedders.`, each then picking its preset by the keys (`single_file.guess_config`; v2, SD 2.1 at
  768 px with v-prediction, when the text encoder is OpenCLIP's, else v1). A Hub id ("owner/name") is its folder
  in the Hugging Face cache (`jaxsd.hub`; downloaded there if need be). `vae` (a VAE folder, Hub id or file)
  replaces the model's VAE (a single file's as it is read: one that ships without a VAE needs it).

  A ControlNet pipeline's folder (diffusers' StableDiffusion(XL)ControlNet*Pipeline: model_index.json names a
  controlnet) loads with its ControlNets, as `StableDiffusion(XL)ControlNet` (`StableDiffusionControlNet.
  from_pretrained`), as diffusers' DiffusionPipeline.from_pretrained does. `controlnets` (a ControlNet folder or Hub
  id, a (module, params) pair, or a list of them: what `with_controlnet` takes) steer any model instead, replacing
  such a folder's own (not read then)."""
  vae = kwargs.pop("vae", None)
  allow_pickle = kwargs.get("allow_pickle", False)
  path = hub.resolve(path, variant=kwargs.get("variant"), allow_pickle=allow_pickle)
  if os.path.isfile(path):
    if kwargs.get("variant"):
      raise ValueError(f"variant={kwargs['variant']!r} names files of a diffusers folder; {path} is a single file.")
    config = os.fspath(single_file_config)
    xl = (config in single_file.XL_PRESETS or (os.path.isdir(config) and model_folder.is_sdxl_folder(config)) or
          (config == "auto" and single_file.is_sdxl_file(path, allow_pickle)))
    cls = StableDiffusionXL if xl else pipeline.StableDiffusion
    pipe = cls.from_single_file(path, config=config, dtype=dtype, allow_pickle=allow_pickle, vae=vae)
    return pipe if controlnets is None else pipe.with_controlnet(controlnets, allow_pickle=allow_pickle)
  if not model_folder.is_workdir(path) and model_folder.controlnet_class(path):
    from jaxsd import pipeline_controlnet  # it extends this module's class

    xl = model_folder.is_sdxl_folder(path)
    cls = pipeline_controlnet.StableDiffusionXLControlNet if xl else pipeline_controlnet.StableDiffusionControlNet
    pipe, controlnets = cls.from_pretrained(path, dtype, controlnets=controlnets, **kwargs), None
  elif model_folder.is_workdir(path) and model_folder.is_sdxl_folder(model_folder.model_dir(path)):
    pipe = pipeline.load_workdir(path, dtype, pipeline_class=StableDiffusionXL, **kwargs)  # an SDXL fine-tune's
  elif not model_folder.is_workdir(path) and model_folder.is_sdxl_folder(path):
    pipe = StableDiffusionXL.from_pretrained(path, dtype, **kwargs)
  else:
    pipe = pipeline.load(path, dtype=dtype, **kwargs)
  if controlnets is not None:
    pipe = pipe.with_controlnet(controlnets, allow_pickle=allow_pickle)
  return pipe if vae is None else pipe.swap_vae(vae, allow_pickle=allow_pickle)
