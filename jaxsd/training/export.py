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
  """Fine-tuning: the frozen parts (VAE, text encoder, tokenizer, scheduler) are those of `init`."""
  model_folder.copy_components(init, model_dir(workdir), ("vae", "text_encoder", "tokenizer", "scheduler"))
