"""A training run's config read and checked: every check that needs no compilation (`check_config`, one
paragraph that says what to change, raised as `ConfigError` before anything is compiled), and the settings the
stages derive from the config (which stages run, the dataset folder, a stage's mask and optimizer section)."""

from __future__ import annotations

import json
import math
import os

import jax

from jaxsd import hub
from jaxsd.data import builtin, input_pipeline
from jaxsd.diffusion import samplers, schedules
from jaxsd.model_folder import (check_model_folder, find_weight_files, is_sdxl_folder, is_workdir, model_dir,
                                SafetensorsDict, scheduler_config_file, variants_in)
from jaxsd.training import controlnet_training, dreambooth, losses, lora_training, sharding, stages
from jaxsd.training.optimizer import make_optimizer

STAGES = ("clip", "vae", "unet")


class ConfigError(ValueError):
  """A configuration that cannot work; raised before anything is compiled."""


def stage_names(cfg) -> list[str]:
  names = [s.strip() for s in cfg.stages.split(",") if s.strip()]
  bad = [s for s in names if s not in STAGES]
  if bad or not names:
    raise ConfigError(f"config.stages={cfg.stages!r}: stages are a comma-separated subset of "
                      f"{','.join(STAGES)} (in that order).")
  if cfg.init:  # fine-tuning: VAE, text encoder and tokenizer come from the init folder
    return ["lora"] if is_lora(cfg) else ["controlnet"] if is_controlnet(cfg) else ["unet"]
  return [s for s in STAGES if s in names]


def _check_section(cfg, name: str, check) -> None:
  """`check(cfg.<name>)`'s ValueError as a ConfigError naming the section."""
  try:
    check(cfg[name])
  except ValueError as e:
    raise ConfigError(f"config.{name}: {e}") from None


def is_lora(cfg) -> bool:
  return "lora" in cfg


def is_sdxl(cfg) -> bool:
  """Fine-tuning an SDXL folder (its U-Net, with both text encoders and the size conditioning)."""
  return bool(cfg.init) and os.path.isdir(cfg.init) and is_sdxl_folder(cfg.init)


def is_dreambooth(cfg) -> bool:
  return "dreambooth" in cfg


def is_controlnet(cfg) -> bool:
  return "controlnet" in cfg


def section(name: str) -> str:
  """The config section of a stage's training settings: LoRA and ControlNet training are the U-Net stage's,
  on adapters or on a ControlNet."""
  return "unet" if name in ("lora", "controlnet") else name


def data_dir(cfg) -> str:
  return os.path.expanduser(cfg.data.data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def mask_key(cfg, stage: str = "unet") -> str | None:
  """The dataset feature a stage's loss is weighted by (`<stage>.foreground_loss_weight`, the VAE's or the
  U-Net's), or None: `data.mask_key`, else the built-in dataset's own mask (shapes' "mask"), else none."""
  if not cfg[stage].get("foreground_loss_weight"):
    return None
  if cfg.data.get("mask_key"):
    return cfg.data.mask_key
  found = builtin.lookup(cfg.data.name)
  return found.mask_key if found is not None else None


def _check_foreground_weight(cfg) -> None:
  for stage in ("vae", "unet"):
    weight = cfg[stage].get("foreground_loss_weight", 0.0)
    if not (_real(weight) and weight >= 0):
      raise ConfigError(f"config.{stage}.foreground_loss_weight={weight} must be >= 0 (0: every pixel weighs 1).")
  dilation = cfg.vae.get("foreground_dilation", 0)
  if not isinstance(dilation, int) or dilation < 0:
    raise ConfigError(f"config.vae.foreground_dilation={dilation!r} must be a whole number of pixels >= 0.")
  if cfg.unet.get("foreground_loss_weight") and (is_lora(cfg) or is_dreambooth(cfg) or is_controlnet(cfg)):
    raise ConfigError("config.unet.foreground_loss_weight weights the U-Net stage's loss by the dataset's mask; "
                      "LoRA, DreamBooth and ControlNet training do not read masks: set it to 0.")


def _whole(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _real(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_STEPS = (lambda v: _whole(v) and v >= 1, "a whole number >= 1")
_COUNT = (lambda v: _whole(v) and v >= 0, "a whole number >= 0")
_WEIGHT = (lambda v: _real(v) and v >= 0, "a number >= 0 (0 turns the term off)")
_SHARE = (lambda v: _real(v) and 0 <= v <= 1, "a number in [0, 1]")
# (section, key, (test, what the value must be)); a key the config does not have is not checked. The stage
# sections are checked for the stages that run, `eval` when the samples are judged.
_NUMBERS = (
    ("", "seed", (lambda v: _whole(v) and 0 <= v < 2**31, "a whole number in [0, 2**31)")),  # grain: < 2**32
    ("", "log_every", _STEPS),
    ("", "checkpoint_every", _STEPS),
    ("", "max_to_keep", (_STEPS[0], "a whole number of checkpoints >= 1")),
    ("", "benchmark_steps", (_COUNT[0], "0 (train) or the number of U-Net steps to time")),
    ("data", "image_size", (_STEPS[0], "a whole number of pixels >= 1")),
    ("data", "num_threads", (_STEPS[0], "a whole number of reading threads >= 1")),
    ("*", "steps", _STEPS),
    ("*", "batch_size", _STEPS),
    ("*", "eval_examples", _STEPS),
    ("vae", "kl_weight", _WEIGHT),
    ("vae", "l1_weight", _WEIGHT),
    ("vae", "l2_weight", _WEIGHT),
    ("vae", "edge_weight", _WEIGHT),
    ("unet", "ema_decay", (lambda v: _real(v) and 0 <= v < 1, "a number in [0, 1) (0 turns the EMA off)")),
    ("unet", "sample_every", (_COUNT[0], "0 (samples at the end only) or a whole number of steps")),
    ("unet", "sample_steps", _STEPS),
    ("unet", "caption_dropout", _SHARE),
    ("unet", "min_snr_gamma", (_WEIGHT[0], "a number >= 0 (0 turns Min-SNR weighting off; the paper's is 5)")),
    ("unet", "timestep_logit_std", (lambda v: _real(v) and v > 0, "a number > 0")),
    ("unet", "timestep_logit_mean", (_real, "a finite number")),
    ("unet", "text_encoder_lr", (_WEIGHT[0], "a number >= 0 (0: the U-Net's learning rate)")),
    ("unet", "guidance_scale", (_real, "a finite number (the training samples' guidance; <= 1 turns it off)")),
    ("eval", "judge_steps", _STEPS),
    ("eval", "judge_train_examples", _STEPS),
    ("eval", "images_per_prompt", _STEPS),
    ("eval", "fid_images", (lambda v: _whole(v) and v >= 2, "a whole number >= 2 (an FID needs two samples)")),
    ("eval", "periodic_fid_images", (lambda v: _whole(v) and
                                     (v == 0 or v >= 2), "0 (all of eval.fid_images) or a whole number >= 2")),
)


def _check_numbers(cfg, names) -> None:
  """Every counted or weighted setting in its range, so that a zero or a typo fails here rather than in the
  middle of a run (a sampler or an FID at the end of the U-Net stage)."""
  sections = sorted({section(n) for n in names})
  judged = "unet" in names and bool(cfg.get("eval", {}).get("judge", False))
  checked = {"", "data", *sections} | ({"eval"} if judged else set())
  for sec, key, (ok, what) in _NUMBERS:
    for name in sections if sec == "*" else [sec]:
      if name not in checked:
        continue
      part = cfg if not name else cfg.get(name)
      if part is None or key not in part:
        continue
      if not ok(part[key]):
        where = f"config.{name + '.' if name else ''}{key}"
        raise ConfigError(f"{where}={part[key]!r}: use {what}.")
  if "unet" in sections and "sampler" in cfg.unet:
    try:
      samplers.get(cfg.unet.sampler)
    except ValueError as e:
      raise ConfigError(f"config.unet.sampler: {e}") from None


def check_mask(cfg) -> None:
  """After the dataset is found: a foreground-weighted VAE or U-Net stage has a mask to read."""
  weighted = [s for s in ("vae", "unet") if cfg[s].get("foreground_loss_weight") and s in stage_names(cfg)]
  for stage in weighted:
    if mask_key(cfg, stage) is None:
      raise ConfigError(f"config.{stage}.foreground_loss_weight={cfg[stage].foreground_loss_weight} weights the "
                        f"loss by the dataset's mask, and {cfg.data.name!r} has no built-in one: name its mask "
                        f"feature with --config.data.mask_key, or set --config.{stage}.foreground_loss_weight=0.")
  if weighted and cfg.data.get("mask_key"):
    names = input_pipeline.feature_names(cfg.data.name, data_dir(cfg))
    if cfg.data.mask_key not in names:
      raise ConfigError(f"config.data.mask_key={cfg.data.mask_key!r} is not a feature of {cfg.data.name!r}; its "
                        f"features are {names}.")


def mesh_devices(cfg) -> list:
  """The devices the run's mesh spans: every device (`config.mesh.devices=-1`, the default) or the first N of a single
  process's; a ConfigError for another count."""
  n = cfg.mesh.get("devices", -1)
  every = jax.devices()
  if n == -1:
    return every
  if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(every):
    raise ConfigError(f"config.mesh.devices={n!r}: use -1 for every device or a whole number from 1 to {len(every)}.")
  if jax.process_count() > 1:
    raise ConfigError(f"config.mesh.devices={n}: a run of {jax.process_count()} processes uses every device; leave "
                      "it at -1 (choose each process's devices with CUDA_VISIBLE_DEVICES or the like).")
  return every[:n]


def check_config(cfg, n_devices: int) -> None:
  """Every check that needs no compilation: a one-paragraph error that says what to change."""
  names = stage_names(cfg)
  _check_numbers(cfg, names)
  try:
    stages.dtype_of(cfg)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  try:
    sharding.mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, n_devices)
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from None
  for name in names:
    b = cfg[section(name)].batch_size
    rows = dreambooth.step_rows(cfg.dreambooth, b) if is_dreambooth(cfg) and section(name) == "unet" else b
    if rows % n_devices or b % jax.process_count():
      also = f" ({rows} rows with prior preservation's class examples)" if rows != b else ""
      need = math.lcm(n_devices // math.gcd(n_devices, rows // b), jax.process_count())
      raise ConfigError(f"config.{section(name)}.batch_size={b}{also} is not divisible by the {n_devices} devices "
                        f"({jax.process_count()} hosts): use a multiple of {need}.")
    try:  # builds the optax chain only: a bad value is refused before any stage runs
      make_optimizer(optimizer_settings(cfg, name))
    except ValueError as e:
      raise ConfigError(f"config.{section(name)}.optimizer: {e}") from None
  if cfg.init:
    _check_init(cfg)
    vae_blocks, unet_blocks = (
        len(read_json(cfg.init, name, "config.json").get("block_out_channels", [0])) for name in ("vae", "unet"))
  else:
    vae_blocks, unet_blocks = len(cfg.vae.block_out_channels), len(cfg.unet.block_out_channels)
  multiple = 2**(vae_blocks - 1) * 2**(unet_blocks - 1)
  if cfg.data.image_size % multiple:
    raise ConfigError(f"config.data.image_size={cfg.data.image_size} cannot go through this VAE and U-Net: "
                      f"it must be a multiple of {multiple} (the VAE and U-Net downsample by that much).")
  if not cfg.init:
    _check_networks(cfg)
  if is_lora(cfg):
    if not cfg.init:
      raise ConfigError("config.lora trains adapters on a pretrained U-Net: set --config.init=<diffusers folder>.")
    if cfg.unet.train_text_encoder:
      raise ConfigError("config.lora trains adapters, not whole networks: set config.unet.train_text_encoder=False "
                        "(and config.lora.train_text_encoder=True for text-encoder adapters).")
    if (cfg.lora.get("train_text_encoder") or cfg.lora.get("token_embeddings")) and cfg.unet.get("cache_latents"):
      raise ConfigError("config.unet.cache_latents stores the frozen text encoder's outputs: it cannot be combined "
                        "with config.lora.train_text_encoder=True or config.lora.token_embeddings.")
    _check_section(cfg, "lora", lora_training.check_settings)
    if cfg.unet.get("sample_every"):
      raise ConfigError(f"config.unet.sample_every={cfg.unet.sample_every}: a LoRA run draws no samples while it "
                        "trains; set it to 0 and sample with the adapter (python -m sample --model INIT --lora "
                        "DIR/lora/pytorch_lora_weights.safetensors).")
  if is_dreambooth(cfg):
    if not cfg.init:
      raise ConfigError("config.dreambooth teaches a pretrained model a subject: set --config.init=<diffusers "
                        "folder>.")
    if cfg.unet.get("cache_latents"):
      raise ConfigError("config.unet.cache_latents reads a prepared dataset; DreamBooth reads its image folders: "
                        "set config.unet.cache_latents=False.")
    _check_section(cfg, "dreambooth", dreambooth.check_settings)
  if is_controlnet(cfg):
    if is_sdxl(cfg):
      raise ConfigError("config.controlnet trains SD 1.x/2.x ControlNets; SDXL ControlNet training is not "
                        "implemented: give an SD 1.x/2.x folder as --config.init.")
    if not cfg.init or is_lora(cfg):
      raise ConfigError("config.controlnet trains a ControlNet for a pretrained model: set --config.init=<diffusers "
                        "folder> (and no config.lora).")
    if cfg.unet.train_text_encoder or cfg.unet.get("cache_latents"):
      raise ConfigError("config.controlnet trains the ControlNet alone on images (its condition is derived from "
                        "each image): set config.unet.train_text_encoder=False and config.unet.cache_latents=False.")
    if cfg.benchmark_steps:
      raise ConfigError("config.benchmark_steps times the U-Net or LoRA step; it is not implemented for "
                        "config.controlnet: set it to 0.")
    _check_section(cfg, "controlnet", controlnet_training.check_settings)
    if cfg.unet.get("sample_every"):
      raise ConfigError(f"config.unet.sample_every={cfg.unet.sample_every}: a ControlNet run draws no samples while "
                        "it trains; set it to 0 and sample with the result (python -m sample --model INIT "
                        "--controlnet DIR/controlnet --control-image IMAGE).")
    try:  # the condition is image-sized, the latents the VAE's: the embedding must downsample as the VAE does
      controlnet_training.embedding_widths(2**(vae_blocks - 1), cfg.controlnet.conditioning_embedding_out_channels)
    except ValueError as e:
      raise ConfigError(f"config.controlnet: {e}") from None
    if cfg.controlnet.conditioning == "shape_mask" and builtin.lookup(cfg.data.name) is None:
      raise ConfigError(f"config.controlnet.conditioning='shape_mask' is made from the shapes dataset's pictures (a "
                        f"saturation threshold that outlines its shapes); on {cfg.data.name!r} it would teach a "
                        "meaningless condition: train on shapes/32x32 or shapes/64x64.")
  if ("unet" in names or "lora" in names) and cfg.unet.get("cache_latents"):
    if cfg.data.random_flip or cfg.data.random_crop:
      raise ConfigError("config.unet.cache_latents stores one encoding per image, so images cannot be flipped or "
                        "randomly cropped: set config.data.random_flip=False and config.data.random_crop=False, or "
                        "turn the cache off.")
    if cfg.unet.train_text_encoder:
      raise ConfigError("config.unet.cache_latents stores the frozen text encoder's outputs: it cannot be "
                        "combined with config.unet.train_text_encoder=True.")
  if ("unet" in names and not cfg.init and cfg.unet.get("rescale_betas_zero_snr") and
      cfg.unet.prediction_type != "v_prediction"):
    raise ConfigError("config.unet.rescale_betas_zero_snr=True trains the last timestep on pure noise, where "
                      "predicting the noise says nothing about the image: set config.unet.prediction_type="
                      "v_prediction.")
  _check_foreground_weight(cfg)
  beta_schedule = cfg.unet.get("beta_schedule", "scaled_linear")
  if "unet" in names and not cfg.init and beta_schedule not in schedules.BETA_SCHEDULES:
    raise ConfigError(f"config.unet.beta_schedule={beta_schedule!r}: use one of {schedules.BETA_SCHEDULES}.")
  sampling = cfg.unet.get("timestep_sampling", "uniform")
  if ("unet" in names or "lora" in names) and sampling not in losses.TIMESTEP_SAMPLINGS:
    raise ConfigError(f"config.unet.timestep_sampling={sampling!r}: use one of {losses.TIMESTEP_SAMPLINGS}.")
  if "unet" in names and cfg.unet.get("text_encoder_lr") and not cfg.unet.train_text_encoder:
    raise ConfigError(f"config.unet.text_encoder_lr={cfg.unet.text_encoder_lr} is the learning rate of a text encoder "
                      "trained with the U-Net: set config.unet.train_text_encoder=True, or text_encoder_lr=0.")
  diffusers_hint = "diffusers' examples use 0.05-0.1; 0 turns it off"
  for key, hint in (("noise_offset", diffusers_hint), ("input_perturbation", diffusers_hint),
                    ("timestep_uniform_fraction", "the share of timesteps drawn uniformly instead of by "
                     "timestep_sampling; 0 turns it off")):
    if not 0.0 <= float(cfg.unet.get(key, 0.0)) <= 1.0:
      raise ConfigError(f"config.unet.{key}={cfg.unet.get(key)}: use a value in [0, 1] ({hint}).")
  folder = data_dir(cfg)
  if os.path.exists(folder) and not os.path.isdir(folder):
    raise ConfigError(f"config.data.data_dir: {folder} is a file; give the folder of the prepared datasets.")
  if "clip" in names and (cfg.clip.vision.image_size != cfg.data.image_size):
    raise ConfigError(f"config.clip.vision.image_size={cfg.clip.vision.image_size} differs from "
                      f"config.data.image_size={cfg.data.image_size}: set them equal.")


def _check_networks(cfg) -> None:
  """The networks a run from nothing builds from its config sections, checked as their config dataclasses check
  a config.json (sizes >= 1, heads dividing widths, groups dividing channels, ...): a bad U-Net setting is
  refused here, not after the CLIP and VAE stages have trained."""
  built = {}
  for name, build in (("clip", lambda: stages.clip_config(cfg)), ("vae", lambda: stages.vae_config(cfg)),
                      ("unet", lambda: stages.unet_config(cfg, built["vae"], built["clip"].text_config))):
    try:
      built[name] = build()
    except (ValueError, TypeError, ZeroDivisionError) as e:
      raise ConfigError(f"config.{name}: {e}") from None


def resolve_init(cfg) -> None:
  """config.init as the local folder it names, absolute (so that config.json says which folder) with ~ expanded (as
  data_dir and the DreamBooth folders): a Hub id ("owner/name") is looked up in the Hugging Face cache or downloaded
  into it (`jaxsd.hub`; a ConfigError when it cannot be)."""
  if not cfg.init:
    return
  try:
    init = hub.resolve(cfg.init)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f"config.init: {e}") from None
  cfg.init = os.path.abspath(os.path.expanduser(init))


def _check_init(cfg) -> None:
  """The init folder: a diffusers SD folder whose weights can be read, of a text-to-image U-Net with a
  prediction type training knows."""
  init = cfg.init
  if os.path.isfile(init):
    raise ConfigError(f"config.init={init!r} is a file: give a diffusers Stable Diffusion folder (a single-file "
                      "checkpoint converts with jaxsd.StableDiffusion.from_single_file(file, config='auto')"
                      ".save_pretrained(folder), or diffusers' from_single_file + save_pretrained).")
  if not os.path.isdir(init):
    raise ConfigError(f"config.init={init!r} does not exist: give a diffusers Stable Diffusion folder.")
  if is_workdir(init):
    raise ConfigError(f"config.init={init!r} is a jaxsd training workdir: give the model it exported, "
                      f"{model_dir(init)}.")
  kind = cfg.get("init_kind")
  if kind and kind != ("sdxl" if is_sdxl(cfg) else "sd"):
    have = "an SD 1.x / 2.x" if kind == "sdxl" else "an SDXL"
    use = "sd15 / sd21 (dreambooth / dreambooth_sd21)" if kind == "sdxl" else "sdxl (dreambooth_sdxl)"
    raise ConfigError(f"config.init={init!r} is {have} folder, and this config's recipe is for "
                      f"{'SDXL' if kind == 'sdxl' else 'SD 1.x / 2.x'} (config.init_kind={kind!r}): use "
                      f"train/configs/finetune.py:{use}.")
  if is_sdxl(cfg):
    _check_sdxl(cfg)
  try:
    check_model_folder(init)
  except FileNotFoundError as e:
    raise ConfigError(f"config.init: {e} (it is not a diffusers Stable Diffusion folder).") from None
  networks = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if is_sdxl(cfg) else ())
  for name in networks:  # safetensors: the headers only (a truncated download, a Git LFS pointer)
    files = None
    try:
      files, fmt = find_weight_files(os.path.join(init, name))
      if fmt == "safetensors":
        SafetensorsDict(files)  # opens each file's header
    except (ValueError, FileNotFoundError) as e:
      variants = sorted(variants_in(os.path.join(init, name))) if files is None else []
      if variants:  # the loader's own hint names sampling's --variant, which training does not have
        raise ConfigError(f"config.init: {os.path.join(init, name)} holds only {variants[0]} weights, and training "
                          "reads a folder's own weights (it has no variant setting): convert the folder first, e.g. "
                          "python -c \"import jaxsd; jaxsd.StableDiffusion.from_pretrained('INIT', "
                          f"variant='{variants[0]}').save_pretrained('NEW')\".") from None
      raise ConfigError(f"config.init: {e}") from None
    if fmt == "pickle":
      raise ConfigError(f"config.init: {os.path.join(init, name)} holds only pickled .bin weights, which training "
                        "does not unpickle: convert the folder to safetensors first, e.g. python -c \"import jaxsd; "
                        "jaxsd.StableDiffusion.from_pretrained('INIT', allow_pickle=True).save_pretrained('NEW')\".")
  unet, vae = read_json(init, "unet", "config.json"), read_json(init, "vae", "config.json")
  if unet.get("in_channels", 4) != vae.get("latent_channels", 4):
    raise ConfigError(f"config.init={init!r}: its U-Net takes {unet.get('in_channels', 4)} input channels and its "
                      f"VAE's latents have {vae.get('latent_channels', 4)} (an inpainting model): training here fits "
                      "text-to-image U-Nets, whose input is the latents alone; start from a text-to-image model.")
  if unet.get("time_cond_proj_dim") is not None:
    raise ConfigError(f"config.init={init!r}: its U-Net is guidance-distilled (time_cond_proj_dim, a Latent "
                      "Consistency Model); training here fits noise-prediction U-Nets: start from the model it was "
                      "distilled from.")
  scheduler = read_json(scheduler_config_file(init))
  if scheduler.get("sigma_data") is not None or str(scheduler.get("_class_name", "")).startswith("EDM"):
    raise ConfigError(f"config.init={init!r}: its scheduler is {scheduler.get('_class_name', 'EDM')} (EDM "
                      "preconditioning, e.g. Playground v2.5); training here noises with a DDPM schedule, which "
                      "would unlearn it: start from a model with a DDPM-family scheduler.")
  prediction = scheduler.get("prediction_type", "epsilon")
  if prediction not in losses.PREDICTION_TYPES:
    raise ConfigError(f"config.init={init!r}: its scheduler's prediction_type={prediction!r}; training learns "
                      f"{' or '.join(map(repr, losses.PREDICTION_TYPES))} (as diffusers' training scripts).")


def _check_sdxl(cfg) -> None:
  for need in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
    if not os.path.isdir(os.path.join(cfg.init, need)):
      raise ConfigError(f"config.init={cfg.init!r} is an SDXL folder without {need}/: fine-tuning needs the base "
                        "model's folder (both text encoders and tokenizers; a refiner is not supported).")
  if cfg.unet.train_text_encoder:
    raise ConfigError("fine-tuning SDXL trains its U-Net with both text encoders frozen: turn off "
                      "config.unet.train_text_encoder (not supported for SDXL yet; lora.train_text_encoder trains "
                      "adapters on both).")


def read_json(*path) -> dict:
  path = os.path.join(*path)
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"config.init: cannot read {path} ({e}); is the folder a complete diffusers "
                      "Stable Diffusion folder?") from None


def text_length(cfg) -> int:
  """Tokens per caption: the text encoder's positions (77 for SD; fewer for the small default)."""
  if cfg.init:
    with open(os.path.join(cfg.init, "text_encoder", "config.json")) as f:
      return json.load(f).get("max_position_embeddings", 77)
  return cfg.clip.text.max_position_embeddings


def optimizer_settings(cfg, name: str) -> dict:
  """A stage's optimizer section; `total_steps` 0 or absent means the stage's own `steps`, so that a cosine
  schedule follows `--config.unet.steps=N` (as diffusers' --max_train_steps sets its scheduler's length)."""
  c = cfg[section(name)]
  opt = dict(c.optimizer)
  if not opt.get("total_steps"):
    opt["total_steps"] = c.steps
  return opt
