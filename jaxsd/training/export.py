"""Training results as a diffusers Stable Diffusion folder (`<workdir>/model`), and back.

The folder is what `StableDiffusionPipeline.from_pretrained` and `jaxsd.StableDiffusion.from_pretrained`
read: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/ (plus clip/, the whole
contrastive model, used as the judge of the samples). `python -m sample --model <workdir>` loads it,
with the U-Net replaced by the newest checkpoint's EMA weights when training went further.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxsd import pretrained
from jaxsd import tokenizer as tok
from jaxsd.diffusion import SchedulerConfig
from jaxsd.training import stages

log = logging.getLogger(__name__)
DIFFUSERS_VERSION = pretrained.DIFFUSERS_VERSION

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def model_dir(workdir: str) -> str:
  return os.path.join(workdir, "model")


def write_scheduler(cfg: SchedulerConfig, path: str) -> None:
  """scheduler/scheduler_config.json for SD's PNDM scheduler (None-valued keys left out: diffusers
  then applies the scheduler's own defaults, as for the SD 1.5 file)."""
  os.makedirs(path, exist_ok=True)
  d = {k: v for k, v in cfg.to_dict().items() if v is not None}
  d.update({"_class_name": "PNDMScheduler", "_diffusers_version": DIFFUSERS_VERSION, "skip_prk_steps": True})
  with open(os.path.join(path, "scheduler_config.json"), "w") as f:
    json.dump(d, f, indent=2, sort_keys=True)


def write_model_index(path: str) -> None:
  with open(os.path.join(path, "model_index.json"), "w") as f:
    json.dump(MODEL_INDEX, f, indent=2, sort_keys=True)


def export_component(workdir: str, name: str, module, params, step: int | None = None) -> str:
  """Saves one network under <workdir>/model/<name> (diffusers/transformers layout)."""
  path = os.path.join(model_dir(workdir), name)
  pretrained.save_pretrained(module, jax.device_get(params), path)
  if step is not None:
    with open(os.path.join(path, "jaxsd_step.json"), "w") as f:
      json.dump({"step": int(step)}, f)
  return path


def export_tokenizer(workdir: str, tokenizer) -> None:
  tok.save_tokenizer(tokenizer, os.path.join(model_dir(workdir), "tokenizer"))


def copy_from_init(init: str, workdir: str) -> None:
  """Fine-tuning: the frozen parts (VAE, text encoder, tokenizer, scheduler) are those of `init`."""
  dst = model_dir(workdir)
  os.makedirs(dst, exist_ok=True)
  for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
    if os.path.isdir(os.path.join(init, name)) and not os.path.isdir(os.path.join(dst, name)):
      shutil.copytree(os.path.join(init, name), os.path.join(dst, name))
  write_model_index(dst)


def _latest_unet_checkpoint(workdir: str) -> tuple[int, str] | None:
  ckpt_dir = os.path.join(workdir, "unet", "checkpoints")
  if not os.path.isdir(ckpt_dir):
    return None
  steps = sorted((int(d) for d in os.listdir(ckpt_dir) if d.isdigit()), reverse=True)
  for step in steps:
    state_dir = os.path.join(ckpt_dir, str(step), "state")
    if os.path.isdir(state_dir):
      return step, state_dir
  return None


def load_workdir_pipeline(workdir: str, dtype=jnp.float32, **kwargs):
  """The exported model of a training workdir, with the newest U-Net checkpoint's EMA weights."""
  from jaxsd.pipeline import StableDiffusion, check_model_folder

  path = model_dir(workdir)
  check_model_folder(path)
  pipe = StableDiffusion.from_pretrained(path, dtype, **kwargs)
  exported_step = -1
  step_file = os.path.join(path, "unet", "jaxsd_step.json")
  if os.path.exists(step_file):
    with open(step_file) as f:
      exported_step = json.load(f)["step"]
  latest = _latest_unet_checkpoint(workdir)
  if latest and latest[0] > exported_step:
    step, state_dir = latest
    try:
      state = ocp.StandardCheckpointer().restore(state_dir)  # no target: plain dicts, enough for params
      # (U-Net, text encoder or None: trained with the U-Net when config.unet.train_text_encoder)
      params, text = stages.split_unet_params(state.get("ema_params") or state["params"])
      want = jax.tree.structure(pipe.unet_params)
      if jax.tree.structure(params) != want or (
          text is not None and jax.tree.structure(text) != jax.tree.structure(pipe.text_encoder_params)):
        raise ValueError("the checkpoint's U-Net does not match the exported config")
      pipe.unet_params = jax.tree.map(lambda p, ref: jnp.asarray(p, ref.dtype), params, pipe.unet_params)
      if text is not None:
        pipe.text_encoder_params = jax.tree.map(lambda p, ref: jnp.asarray(p, ref.dtype), text, pipe.text_encoder_params)
      log.info("U-Net from %s (step %d, %s).", state_dir, step, "EMA" if state.get("ema_params") else "raw")
    except Exception as e:  # pylint: disable=broad-except
      log.warning("Could not use the U-Net checkpoint at %s (%s); using the exported U-Net.", state_dir, e)
  return pipe
