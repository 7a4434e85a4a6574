"""The training stages' batches: the prepared dataset (the built-in `shapes` prepared on demand), each stage's
batches from it, and the U-Net stage's from DreamBooth's image folders or from the latent cache."""

from __future__ import annotations

import logging
import os
import time

import jax
import numpy as np

from jaxsd.data import builtin, image_folder, input_pipeline
from jaxsd.pipeline import StableDiffusion
from jaxsd.training import dreambooth, latent_cache, stages
from jaxsd.training.processes import primary_first
from jaxsd.training.run_config import (STAGES, ConfigError, check_mask, data_dir, is_dreambooth, mask_key, text_length)

log = logging.getLogger(__name__)


def ensure_dataset(cfg) -> None:
  """Prepares a built-in dataset (`shapes`) when asked for; any other dataset must be prepared already."""
  found = builtin.lookup(cfg.data.name)
  if found is not None:
    t0 = time.time()
    with primary_first("jaxsd: dataset prepared"):
      found.prepare(data_dir(cfg), cfg.data.name)
    log.info("%s ready in %.1f s", cfg.data.name, time.time() - t0)
    check_mask(cfg)
    return
  prepared = input_pipeline.list_prepared(data_dir(cfg))
  base = cfg.data.name.split(":")[0]
  if not any(p.split(":")[0] == base or p.split("/")[0] == base for p in prepared):
    raise ConfigError(
        f"dataset {cfg.data.name!r} is not prepared in {data_dir(cfg)} (prepared there: "
        f"{', '.join(prepared) or 'none'}). Prepare it first — for a folder of your own images with captions: "
        "python -c \"import jaxsd.data as d; print(d.prepare_image_folder('FOLDER', 'DATA_DIR'))\" — "
        "and set --config.data.name and --config.data.data_dir; or use the built-in shapes/32x32.")
  settings = image_folder.prepared_settings(base, data_dir(cfg))
  if settings and settings.get("max_size") and settings["max_size"] < cfg.data.image_size:
    log.warning(
        "dataset %r was prepared with max_size=%d, smaller than config.data.image_size=%d: its images are "
        "upscaled for training. Prepare it again with a larger max_size (or none) from %s, or train smaller.",
        cfg.data.name, settings["max_size"], cfg.data.image_size, settings.get("folder", "its folder"))
  check_mask(cfg)


def make_input(cfg, stage: str, tokenizer, *, train: bool = True, labels=(), batch_size=None, captions=False,
               tokenizer_2=None, mask: str | None = None):
  """A stage's batches: in training this host's rows of each global batch; in eval the whole split on every
  host (each computes the same metrics, as one process would). With `tokenizer_2` (SDXL) also the second
  tokenizer's ids and each image's original size and crop (SDXL's size conditioning); with `mask` that feature
  as "loss_mask"."""
  max_length = text_length(cfg)
  d = cfg.data
  try:
    return input_pipeline.make_dataset(cfg.data.name, global_batch_size=batch_size or cfg[stage].batch_size,
                                       image_size=d.image_size, data_dir=data_dir(cfg),
                                       split=d.train_split if train else d.test_split, train=train,
                                       seed=cfg.seed + STAGES.index(stage), tokenizer=tokenizer, image_key=d.image_key,
                                       caption_key=d.caption_key, mask_key=mask, label_keys=tuple(labels),
                                       return_captions=captions, random_flip=d.random_flip and train,
                                       flip_swaps_left_right=flip_swaps_left_right(cfg), random_crop=d.random_crop and
                                       train, tokenizer_2=tokenizer_2, size_conditioning=tokenizer_2 is not None,
                                       num_threads=d.num_threads, drop_remainder=True, max_length=max_length,
                                       **({} if train else dict(process_index=0, process_count=1)))
  except (KeyError, ValueError) as e:  # the dataset's own message names what is wrong
    raise ConfigError(f"config.data: {e.args[0]}") from None


def flip_swaps_left_right(cfg) -> bool:
  """Whether a flipped example's caption has "left" and "right" swapped: config.data.flip_swaps_left_right, by
  default only for the built-in datasets, whose captions are made from the picture (shapes' "on the left");
  a caption of one's own is kept as written, as diffusers' --random_flip keeps it."""
  swap = cfg.data.get("flip_swaps_left_right")
  return builtin.lookup(cfg.data.name) is not None if swap is None else bool(swap)


def global_rows(local: np.ndarray) -> np.ndarray:
  """This host's rows of a global batch -> the whole global batch (in process order), on every process."""
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def unet_batches(cfg, workdir, tokenizer, pipe: StableDiffusion, tokenizer_2=None):
  """The U-Net (or LoRA) stage's batches: DreamBooth's, from the latent cache with `unet.cache_latents`, else
  images (with SDXL's second tokenizer and size conditioning when `tokenizer_2` is given). `pipe` holds the
  networks (the init model: DreamBooth's class images are drawn with it)."""
  if is_dreambooth(cfg):
    return iter(_dreambooth_input(cfg, workdir, tokenizer, pipe, tokenizer_2=tokenizer_2))
  if cfg.unet.get("cache_latents"):
    return iter(_cached_input(cfg, workdir, tokenizer, pipe, tokenizer_2=tokenizer_2))
  return iter(make_input(cfg, "unet", tokenizer, tokenizer_2=tokenizer_2, mask=mask_key(cfg)))


def _dreambooth_input(cfg, workdir, tokenizer, pipe: StableDiffusion, tokenizer_2=None):
  """DreamBooth's batches (jaxsd.training.dreambooth): instance examples, and with prior preservation as many
  class examples, the missing class images drawn first by `pipe` into DIR/class_images (once: a rerun finds
  them). SDXL (`tokenizer_2`): with the second tokenizer's ids and each image's size conditioning."""
  c, size = cfg.dreambooth, cfg.data.image_size
  classes = []
  if c.with_prior_preservation:
    existing = dreambooth.list_images(os.path.expanduser(c.class_data_dir)) if c.class_data_dir else []
    settings = dict(prompt=c.class_prompt, init=os.path.abspath(cfg.init), image_size=size, sampler=cfg.unet.sampler,
                    steps=cfg.unet.sample_steps, guidance_scale=cfg.unet.guidance_scale, seed=cfg.seed, dtype=cfg.dtype)
    generate = dreambooth.pipeline_generator(pipe, c.class_prompt, size, sampler=cfg.unet.sampler,
                                             steps=cfg.unet.sample_steps, guidance_scale=cfg.unet.guidance_scale,
                                             seed=cfg.seed)
    with primary_first("jaxsd: class images drawn"):
      try:
        classes = dreambooth.class_images(os.path.join(workdir, dreambooth.CLASS_DIR), existing=existing,
                                          num_images=int(c.num_class_images), settings=settings, generate=generate,
                                          batch_size=int(c.sample_batch_size))
      except ValueError as e:
        raise ConfigError(f"config.dreambooth: {e}") from None
  return dreambooth.make_dataset(dreambooth.list_images(os.path.expanduser(c.instance_data_dir)), c.instance_prompt,
                                 class_images=classes, class_prompt=c.class_prompt, tokenizer=tokenizer,
                                 image_size=size, global_batch_size=cfg.unet.batch_size,
                                 seed=cfg.seed + STAGES.index("unet"), center_crop=c.center_crop,
                                 random_flip=cfg.data.random_flip, max_length=text_length(cfg),
                                 process_index=jax.process_index(), process_count=jax.process_count(),
                                 num_threads=cfg.data.num_threads, tokenizer_2=tokenizer_2)


def _cached_input(cfg, workdir, tokenizer, pipe: StableDiffusion, tokenizer_2=None):
  """The U-Net stage's batches from the latent cache (latent_cache.py) of `pipe`'s frozen VAE and text encoder(s),
  built first when missing; SDXL's (`tokenizer_2` given) with both encoders' outputs and the time ids."""
  d, batch = cfg.data, cfg.unet.batch_size // jax.process_count()
  xl = tokenizer_2 is not None
  text_params = pipe.text_encoder_params
  if xl:
    text_params = {"text_encoder": text_params, "text_encoder_2": pipe.text_encoder_2_params}
  mask = mask_key(cfg)
  in_order = input_pipeline.make_dataset(d.name, global_batch_size=batch * jax.process_count(), image_size=d.image_size,
                                         data_dir=data_dir(cfg), split=d.train_split, train=False, tokenizer=tokenizer,
                                         image_key=d.image_key, caption_key=d.caption_key, mask_key=mask,
                                         num_threads=d.num_threads, drop_remainder=False, max_length=text_length(cfg),
                                         tokenizer_2=tokenizer_2, size_conditioning=xl)
  if in_order.num_examples < batch:
    raise ConfigError(f"config.unet.batch_size={cfg.unet.batch_size}: dataset {d.name!r} split {d.train_split!r} "
                      f"has {in_order.num_examples} examples per process, fewer than a batch of {batch}; lower the "
                      "batch size.")
  # The prepared data's files are in the spec: a dataset prepared again (other images or captions) rebuilds it.
  spec = dict(dataset=d.name, split=d.train_split, image_key=d.image_key, caption_key=d.caption_key,
              image_size=d.image_size, tokens=text_length(cfg), process=jax.process_index(),
              processes=jax.process_count(), weights=latent_cache.fingerprint(pipe.vae_params, text_params),
              data=input_pipeline.prepared_fingerprint(in_order.info))
  if xl:
    spec["sdxl"] = True  # context, text_embeds and time_ids as the SDXL stage takes them
  if mask:
    spec["mask_key"] = mask  # and the mask on the latents' grid
  directory = os.path.join(workdir, "unet", "latent_cache", f"process_{jax.process_index()}")
  encode = jax.jit(
      stages.cache_encoder(pipe.vae, pipe.text_encoder, pipe.text_encoder_2 if xl else None,
                           target_size=(d.image_size, d.image_size)))
  it = iter(in_order)
  cache = latent_cache.build(directory, spec, it, lambda b: encode(pipe.vae_params, text_params, b), batch_size=batch,
                             shard_size=batch * max(1, 4096 // batch))
  it.close()
  return latent_cache.make_dataset(cache, batch_size=batch, seed=cfg.seed + STAGES.index("unet"))
