"""Training results as a diffusers Stable Diffusion folder (`<workdir>/model`).

The folder is what `StableDiffusionPipeline.from_pretrained` and `jaxsd.StableDiffusion.from_pretrained`
read: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/ (plus clip/, the whole
contrastive model, used as the judge of the samples). `python -m sample --model <workdir>` loads it
(`jaxsd.pipeline.load`), with the U-Net replaced by the newest checkpoint's EMA weights when training
went further. The format itself is `jaxsd.model_folder`'s.
"""

from __future__ import annotations

import os

import jax

from jaxsd import pretrained
from jaxsd import tokenizer as tok
from jaxsd.model_folder import model_dir, write_model_index, write_scheduler  # noqa: F401  (the exporter's API)
from jaxsd import model_folder
from jaxsd.config import write_json_object


def export_component(workdir: str, name: str, module, params, step: int | None = None) -> str:
  """Saves one network under <workdir>/model/<name> (diffusers/transformers layout)."""
  path = os.path.join(model_dir(workdir), name)
  pretrained.save_pretrained(module, jax.device_get(params), path)
  if step is not None:
    model_folder.write_step(path, step)
  return path


def export_tokenizer(workdir: str, tokenizer) -> None:
  tok.save_tokenizer(tokenizer, os.path.join(model_dir(workdir), "tokenizer"))


def copy_from_init(init: str, workdir: str) -> None:
  """Fine-tuning: the frozen parts (VAE, text encoder(s), tokenizer(s), scheduler) are those of `init`; an SDXL
  folder keeps its own model_index.json (its pipeline class and settings such as force_zeros_for_empty_prompt)."""
  sdxl = model_folder.is_sdxl_folder(init)
  names = ("vae", "text_encoder", "tokenizer", "scheduler") + (("text_encoder_2", "tokenizer_2") if sdxl else ())
  model_folder.copy_components(init, model_dir(workdir), names)
  if sdxl and os.path.isfile(os.path.join(init, "model_index.json")):
    index = model_folder.sdxl_index(model_folder.read_json(os.path.join(init, "model_index.json")))
    write_json_object(os.path.join(model_dir(workdir), "model_index.json"), index, indent=2, sort_keys=True)
