"""A pipeline's model folders and files: `StableDiffusion.from_pretrained`, `from_single_file` and
`save_pretrained` (diffusers' layout), and one network replaced by another's (`swap_vae`, `swap_unet`), as a mixin
of the pipeline class; with the rules they share: the VAE's dtype and the folder's scheduler as diffusers builds it.
"""

from __future__ import annotations

import logging
import os
from typing import Self

import jax
import jax.numpy as jnp

from jaxsd import hub, model_folder, pretrained, single_file
from jaxsd import tokenizer as tok
from jaxsd.diffusion import schedules
from jaxsd.models.vae import AutoencoderKLConfig

log = logging.getLogger(__name__)


class FoldersMixin:
  """Loading and saving for `jaxsd.pipeline.StableDiffusion` (its networks, parameters, tokenizer and schedule)."""

  @classmethod
  def from_pretrained(cls, path: str, dtype=jnp.float32, param_dtype=None, *, variant: str | None = None,
                      allow_pickle: bool = False, **unet_kwargs) -> Self:
    """Loads a diffusers Stable Diffusion folder (model_index.json, unet/, vae/, text_encoder/, ...).

    `variant` (e.g. "fp16") reads each network's `*.fp16.safetensors` (or its shards) where the folder
    has them and the default files elsewhere, as diffusers; weights are cast to `param_dtype` (default
    `dtype`) either way. `allow_pickle` reads networks that have only pickled `.bin` weights (with
    `torch.load(weights_only=True)`; off by default, see `jaxsd.model_folder.read_state_dict`). `path` may be a
    Hub id ("owner/name"): its folder in the Hugging Face cache (`jaxsd.hub`; downloaded there if need be).
    A ControlNet pipeline's folder (StableDiffusionControlNetPipeline's) loads as its base model, with a warning
    (as diffusers' StableDiffusionPipeline); `StableDiffusionControlNet.from_pretrained` and
    `jaxsd.pipeline_xl.load` attach its ControlNets.
    """
    path = hub.resolve(path, variant=variant, allow_pickle=allow_pickle)
    if model_folder.is_sdxl_folder(path):
      raise ValueError(f"{path} is an SDXL folder: load it with jaxsd.StableDiffusionXL.from_pretrained (or "
                       "jaxsd.pipeline_xl.load, which tells the kinds apart).")
    model_folder.check_model_folder(path)
    dirs = {name: os.path.join(path, name) for name in ("unet", "vae", "text_encoder")}
    variants = model_folder.resolve_variants(path, dirs, variant)
    unet, unet_params = pretrained.load_unet(dirs["unet"], dtype, param_dtype, variant=variants["unet"],
                                             allow_pickle=allow_pickle, **unet_kwargs)
    vae, vae_params = load_vae(dirs["vae"], dtype, variants["vae"], allow_pickle)
    te, te_params = pretrained.load_text_encoder(dirs["text_encoder"], dtype, param_dtype,
                                                 variant=variants["text_encoder"], allow_pickle=allow_pickle)
    scheduler_file = model_folder.read_json(model_folder.scheduler_config_file(path))
    pipeline_class, class_name = model_folder.index_classes(path)
    pipe = cls(unet, unet_params, vae, vae_params, te, te_params, tok.load_tokenizer(path),
               _scheduler_config(scheduler_file, class_name), scheduler_class_name=class_name,
               pipeline_class_name=pipeline_class, source_folder=path)
    pipe.check_parts(path)
    warn_unattached_controlnets(cls, path)
    return pipe

  @classmethod
  def from_single_file(cls, path: str, config: str = "v1", dtype=jnp.float32, param_dtype=None, *,
                       allow_pickle: bool = False, vae: str | None = None, **unet_kwargs) -> Self:
    """Loads a single `.safetensors` checkpoint in the original CompVis / A1111 layout (a pickled `.ckpt` with
    `allow_pickle`, read with `torch.load(weights_only=True)`).

    The file holds weights only. `config` says what they are: "v1" (SD 1.5's network configs and PNDM scheduler),
    "v2" (SD 2.1 at 768 px: v-prediction DDIM, OpenCLIP text encoder, padding with "!"), both with the CLIP
    vocabulary shipped with jaxsd; "v1-inpainting" / "v2-inpainting" (their 9-channel inpainting U-Nets; SD 2's at
    512 px, epsilon); "instruct-pix2pix" (timbrooks/instruct-pix2pix: SD 1.5 with an 8-channel U-Net, Euler
    ancestral); "auto" (`single_file.guess_config`: v2 when the text encoder is OpenCLIP's, else v1, -inpainting
    for a 9-channel U-Net, instruct-pix2pix for an 8-channel SD 1.x one, as diffusers infers the type); or a
    diffusers Stable Diffusion folder whose configs, tokenizer and scheduler describe the checkpoint (its own weights
    are not read). `vae` (a VAE folder, Hub id or file, as `swap_vae` reads them) replaces the file's VAE, as
    diffusers' `from_single_file(..., vae=)`; a file that ships without one needs it.
    """
    config = os.fspath(config)
    state_dict = single_file.read(path, allow_pickle)
    if config == "auto":
      config = single_file.guess_config(state_dict)
    if os.path.isdir(config):
      model_folder.check_model_folder(config)
      configs = {
          name: model_folder.read_json(os.path.join(config, name, "config.json"))
          for name in ("unet", "vae", "text_encoder")
      }
      configs["scheduler"] = model_folder.read_json(model_folder.scheduler_config_file(config))
      tokenizer = tok.load_tokenizer(config)
    else:
      configs = single_file.preset(config)
      tokenizer = tok.load_tokenizer()
      if single_file.PAD_TOKEN[config]:
        tokenizer.pad_token = single_file.PAD_TOKEN[config]
    parts = single_file.split(state_dict, configs, need_vae=vae is None)
    where = os.fspath(path)
    unet, unet_params = pretrained.from_state_dict("unet", configs["unet"], parts["unet"], f"{where} (U-Net)", dtype,
                                                   param_dtype, **unet_kwargs)
    vae, vae_params = single_file_vae(where, parts, configs["vae"], dtype, vae, allow_pickle)
    te, te_params = pretrained.from_state_dict("text_encoder", configs["text_encoder"], parts["text_encoder"],
                                               f"{where} (text encoder)", dtype, param_dtype)
    pipe = cls(unet, unet_params, vae, vae_params, te, te_params, tokenizer, _scheduler_config(configs["scheduler"]),
               scheduler_class_name=configs["scheduler"].get("_class_name"),
               pipeline_class_name=single_file.PIPELINE_CLASS.get(config))
    pipe.check_parts(where)
    return pipe

  def swap_vae(self, path: str, *, variant: str | None = None, allow_pickle: bool = False) -> Self:
    """Replaces this pipeline's VAE (in place; returns the pipeline), as diffusers' `pipe.vae =
    AutoencoderKL.from_pretrained(path)` and A1111's VAE setting: a diffusers AutoencoderKL folder or Hub id
    (stabilityai/sd-vae-ft-mse, madebyollin/sdxl-vae-fp16-fix), or a single VAE file (`.safetensors`; a pickled
    `.ckpt` / `.pt` with `allow_pickle`) in the original layout or diffusers' names, read with this pipeline's VAE
    config. Computes in the pipeline's dtype (fp32 where an fp16 VAE would overflow, as `from_pretrained`). Programs
    compiled before are dropped (they hold the old VAE's config)."""
    where = os.fspath(path)
    vae, vae_params = read_network("vae", where, self.vae.config, self.unet.dtype, variant=variant,
                                   allow_pickle=allow_pickle)
    old, new = self.vae.config, vae.config
    if (new.latent_channels, new.downsampling_factor) != (old.latent_channels, old.downsampling_factor):
      raise ValueError(f"{where}: this VAE has {new.latent_channels} latent channels at 1/{new.downsampling_factor} "
                       f"of the image size; the model's U-Net works on {old.latent_channels} at "
                       f"1/{old.downsampling_factor}: it is a VAE of another kind of model.")
    self.vae, self.vae_params = vae, vae_params
    self.__dict__.pop("_compiled", None)
    return self

  def swap_unet(self, path: str, *, variant: str | None = None, allow_pickle: bool = False) -> Self:
    """Replaces this pipeline's U-Net (in place; returns the pipeline), as diffusers'
    `from_pretrained(model, unet=UNet2DConditionModel.from_pretrained(path))`: a diffusers U-Net folder or Hub id
    (latent-consistency/lcm-sdxl), or a single U-Net file read with this pipeline's U-Net config, in diffusers'
    names (SDXL-Lightning's sdxl_lightning_4step_unet.safetensors) or the original layout. It must fit the text
    encoders and VAE (and be SDXL's kind in an SDXL pipeline); programs compiled before are dropped. Refused while
    LoRA adapters are fused (unfuse_lora would bring the old U-Net's parameters back) and while an IP-Adapter is
    loaded (its layers are the old U-Net's)."""
    self._loras.check_unfused("swap_unet")
    if self.ip_adapter is not None:  # its layers are the old U-Net's
      raise ValueError("swap_unet: an IP-Adapter is loaded; unload_ip_adapter() first, then load it again for the "
                       "new U-Net.")
    where = os.fspath(path)
    unet, unet_params = read_network("unet", where, self.unet.config, self.unet.dtype, self.unet.param_dtype,
                                     variant=variant, allow_pickle=allow_pickle,
                                     attention_implementation=self.unet.attention_implementation,
                                     gradient_checkpointing=self.unet.gradient_checkpointing)
    old, new = self.unet.config, unet.config
    if (old.addition_embed_type,
        old.projection_class_embeddings_input_dim) != (new.addition_embed_type,
                                                       new.projection_class_embeddings_input_dim):
      raise ValueError(f"{where}: this U-Net's added conditioning (addition_embed_type="
                       f"{new.addition_embed_type!r}, {new.projection_class_embeddings_input_dim} features) is not the "
                       f"model's ({old.addition_embed_type!r}, {old.projection_class_embeddings_input_dim}): it is a "
                       "U-Net of another kind of model (SD 1.x / 2.x, SDXL base or refiner).")
    previous = self.unet, self.unet_params
    self.unet, self.unet_params = unet, unet_params
    try:
      self.check_parts(where)
    except ValueError:
      self.unet, self.unet_params = previous
      raise
    self.__dict__.pop("_compiled", None)
    return self

  def save_pretrained(self, path: str, dtype=None) -> None:
    """Writes the diffusers folder `StableDiffusionPipeline.from_pretrained` (and `from_pretrained` here) loads:
    safetensors weights (cast to `dtype`, e.g. np.float16, if given), tokenizer, scheduler and model_index.json.
    E.g. a single file or a folder of pickled `.bin` weights converted to a safetensors folder:
    `StableDiffusion.from_single_file(file, config="auto").save_pretrained(folder)`."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    for name, module, params in (("unet", self.unet, self.unet_params), ("vae", self.vae, self.vae_params),
                                 ("text_encoder", self.text_encoder, self.text_encoder_params)):
      pretrained.save_pretrained(module, jax.device_get(params), os.path.join(path, name), dtype)
    tok.save_tokenizer(self.tokenizer, os.path.join(path, "tokenizer"))
    model_folder.write_scheduler(self.scheduler_config, os.path.join(path, "scheduler"), self.scheduler_class_name)
    model_folder.write_model_index(path, self.pipeline_class_name, self.scheduler_class_name)


def warn_unattached_controlnets(cls, path: str) -> None:
  """Warns, as diffusers' StableDiffusionPipeline.from_pretrained does for a component its class does not take,
  when `cls` (not a ControlNet pipeline class) loaded a ControlNet pipeline's folder without its ControlNets."""
  kind = model_folder.controlnet_class(path)
  if kind is not None and getattr(cls, "controlnets", None) is None:
    log.warning(
        "%s is a %s folder: %s.from_pretrained loads its base model without its %s (controlnet/); "
        "jaxsd.pipeline_xl.load(path) or %sControlNet.from_pretrained(path) attach it, pipe.with_controlnet(...) "
        "others.", path,
        model_folder.read_json(os.path.join(path, "model_index.json")).get("_class_name"), cls.__name__, kind,
        cls.__name__)


def vae_dtype(config: AutoencoderKLConfig, dtype):
  """As diffusers: an fp16 VAE overflows, so configs with force_upcast (SD's, SDXL's) decode in fp32; an
  fp16-safe VAE (force_upcast false, e.g. SDXL's "fp16-fix") keeps fp16."""
  return jnp.float32 if dtype == jnp.float16 and config.force_upcast else dtype


def load_vae(path: str, dtype, variant: str | None = None, allow_pickle: bool = False):
  """(module, params) of a pipeline's VAE folder, in fp32 where it would overflow in fp16 (`vae_dtype`)."""
  return pretrained.load_vae(path, vae_dtype(AutoencoderKLConfig.from_json(path), dtype), variant=variant,
                             allow_pickle=allow_pickle)


def single_file_vae(where: str, parts: dict, config: dict, dtype, vae: str | None, allow_pickle: bool):
  """A single file's VAE (module, params): `vae` (a folder, Hub id or file) where given, else the file's own."""
  cfg = AutoencoderKLConfig.from_dict(config)
  if vae is not None:
    return read_network("vae", vae, cfg, dtype, allow_pickle=allow_pickle)
  return pretrained.from_state_dict("vae", config, parts["vae"], f"{where} (VAE)", vae_dtype(cfg, dtype))


# One network's file in either naming: how its keys are renamed, and its name in messages.
_ONE_FILE = {"unet": (single_file.unet_state_dict, "U-Net"), "vae": (single_file.vae_state_dict, "VAE")}


def read_network(kind: str, path: str, config, dtype, param_dtype=None, *, variant: str | None = None,
                 allow_pickle: bool = False, **module_kwargs):
  """(module, params) of a "unet" or "vae" given apart from its model: a diffusers folder or Hub id, or one file
  (original layout or diffusers' names) read with `config`, the model's (a VAE in fp32 where fp16 would
  overflow, `vae_dtype`)."""
  where = os.fspath(path)
  if not os.path.isfile(where):
    if kind == "vae":
      return load_vae(hub.resolve(where, variant=variant, allow_pickle=allow_pickle), dtype, variant, allow_pickle)
    return pretrained.load_unet(where, dtype, param_dtype, variant=variant, allow_pickle=allow_pickle, **module_kwargs)
  if variant:
    raise ValueError(f"variant={variant!r} names files of a diffusers folder; {where} is a single file.")
  rename, name = _ONE_FILE[kind]
  if kind == "vae":
    dtype = vae_dtype(config, dtype)
  d = config.to_dict()
  state_dict = rename(single_file.read(where, allow_pickle), d)
  return pretrained.from_state_dict(kind, d, state_dict, f"{where} ({name})", dtype, param_dtype, **module_kwargs)


def _scheduler_config(d: dict, class_name: str | None = None) -> schedules.SchedulerConfig:
  """A folder's noise schedule as StableDiffusionPipeline builds it: of the class model_index.json names
  (`class_name`; else the file's `_class_name`), with what its __init__ forces on that scheduler's config:
  steps_offset=1 and clip_sample=False, where the config has them (DDIM both, PNDM steps_offset, and any class
  whose file lists them: UniPC, KDPM2, LCM, ...)."""
  d = dict(d)
  if class_name:
    d["_class_name"] = class_name
  own = schedules.DIFFUSERS_DEFAULTS.get(str(d.get("_class_name", "")).removeprefix("Flax"), {})
  for key, value in (("steps_offset", 1), ("clip_sample", False)):
    if key in own or key in d:
      d[key] = value
  return schedules.SchedulerConfig.from_dict(d)
