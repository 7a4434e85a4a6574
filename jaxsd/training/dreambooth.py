"""DreamBooth (Ruiz et al. 2023): a subject learned from a handful of images under an instance prompt with a rare
token ("a photo of sks dog"), optionally with prior preservation: class images ("a photo of a dog") that the
model itself draws before training are trained on beside the instance images, so that the class keeps its
look (the paper's language drift). The recipe of diffusers' examples/dreambooth/train_dreambooth_lora.py and
train_dreambooth.py: each step takes `batch_size` instance examples and, with prior preservation, as many
class examples; the loss is the instance mean + prior_loss_weight * the class mean
(`jaxsd.training.losses.prior_preservation_loss`).

The class images are made once and cached in <workdir>/class_images (with the settings that made them in
class_images.json), so a rerun or a resume reuses them; image i starts from the noise of `noise(seed, ...,
offset=i)`, so the set does not depend on how generation was batched or interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable

import grain
import numpy as np
from PIL import Image, ImageOps

from jaxsd import tokenizer as tok
from jaxsd.conditioning import to_rgb
from jaxsd.data.folder_scan import CAPTION_EXTENSIONS, IMAGE_EXTENSIONS
from jaxsd.config import write_json_object
from jaxsd.files import written_whole

log = logging.getLogger(__name__)
CLASS_DIR = "class_images"
MANIFEST = "class_images.json"


def list_images(folder: str) -> list[str]:
  """The image files directly in `folder` (as diffusers' DreamBoothDataset reads it), sorted."""
  names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
  # Sub-folders named like images are left out; a broken link stays, so that the check names it as unreadable.
  return [os.path.join(folder, f) for f in names if not os.path.isdir(os.path.join(folder, f))]


def _readable(paths: list[str], what: str) -> None:
  for p in paths:
    try:  # decoded whole: verify() reads no JPEG data, so a truncated JPEG passed and failed in training
      with Image.open(p) as image:
        image.load()
    except Exception as e:  # noqa: BLE001  (any decoder failure is the same error for the user)
      raise ValueError(f"{what} image {p} cannot be read ({type(e).__name__}: {e}); remove or replace it.") from None


def _no_captions(images: list[str], what: str, prompt: str) -> None:
  """Refuses caption files beside the images (b.png + b.txt or b.caption): kohya's DreamBooth trains them, this
  recipe (diffusers') one prompt for all."""
  if not images:
    return
  folder = os.path.dirname(images[0])
  stems = {os.path.splitext(os.path.basename(p))[0] for p in images}
  found = sorted(
      f for f in os.listdir(folder)
      if f.lower().endswith(CAPTION_EXTENSIONS) and os.path.splitext(f)[0] in stems and not f.startswith("."))
  if found:
    shown = ", ".join(found[:5]) + (f" ... and {len(found) - 5} more" if len(found) > 5 else "")
    raise ValueError(f"{what}={folder!r} holds caption files beside its images ({shown}), which DreamBooth does not "
                     f"read: every image trains under {prompt} (as in diffusers' train_dreambooth.py; kohya's "
                     "trainers would use the captions). To train on the captions, prepare the folder with "
                     "jaxsd.data.prepare_image_folder and fine-tune on it; else move them out of the folder.")


def check_settings(c) -> None:
  """ValueError for values of the config section `dreambooth` that cannot work (checked before any model is
  loaded): the instance folder and prompt, and what prior preservation needs."""
  folder = os.path.expanduser(c.instance_data_dir or "")
  if not folder:
    raise ValueError("instance_data_dir is not set: give the folder of your subject's images.")
  if not os.path.isdir(folder):
    what = "is a file" if os.path.isfile(folder) else "does not exist"
    raise ValueError(f"instance_data_dir={c.instance_data_dir!r} {what}: give the folder of your subject's images.")
  images = list_images(folder)
  if not images:
    raise ValueError(f"instance_data_dir={c.instance_data_dir!r} holds no images (looked directly in it for the "
                     f"{len(IMAGE_EXTENSIONS)} extensions PIL reads: .png, .jpg, .jpeg, .webp, ...).")
  _readable(images, "instance")
  _no_captions(images, "instance_data_dir", "instance_prompt")
  if not str(c.instance_prompt).strip():
    raise ValueError("instance_prompt is empty: give the prompt with the subject's identifier, e.g. "
                     "'a photo of sks dog'.")
  if int(c.sample_batch_size) < 1:
    raise ValueError(f"sample_batch_size={c.sample_batch_size}: class images are drawn in batches of >= 1.")
  if not c.with_prior_preservation:
    return
  if not str(c.class_prompt).strip():
    raise ValueError("with_prior_preservation needs class_prompt, the prompt of the subject's class without the "
                     "identifier (e.g. 'a photo of dog').")
  if int(c.num_class_images) < 1:
    raise ValueError(f"num_class_images={c.num_class_images}: prior preservation needs at least 1 class image.")
  if not 0 <= float(c.prior_loss_weight) < float("inf"):
    raise ValueError(f"prior_loss_weight={c.prior_loss_weight} must be a finite number >= 0.")
  if c.class_data_dir:
    class_dir = os.path.expanduser(c.class_data_dir)
    if not os.path.isdir(class_dir):
      raise ValueError(f"class_data_dir={c.class_data_dir!r} does not exist: give a folder of class images, or "
                       "leave it empty to have the model draw them all.")
    used = list_images(class_dir)[:int(c.num_class_images)]
    _readable(used, "class")
    _no_captions(used, "class_data_dir", "class_prompt")


def step_rows(c, batch_size: int) -> int:
  """The rows of one step's batch: `batch_size` instance examples and, with prior preservation, as many class
  examples (what must divide among the devices)."""
  return 2 * batch_size if c.with_prior_preservation else batch_size


# --- class images ------------------------------------------------------------------------------


def class_images(directory: str, *, existing: list[str], num_images: int, settings: dict,
                 generate: Callable[[int, int], np.ndarray], batch_size: int) -> list[str]:
  """`num_images` class images: the first of `existing`, then those drawn by `generate(first, n) -> uint8
  (n, H, W, 3)` (image `first + i` of the generated set) and cached in `directory` as 00000.png, ...

  Only the batches with missing files are drawn, the batches of a run that draws them all: a rerun finds them
  all and draws nothing, and a killed run's rerun writes the images an uninterrupted run would have. `settings`
  (prompt, model, sampler, ...) are stored beside them; a cache made with other settings is refused rather than
  mixed in.
  """
  existing = list(existing)[:num_images]
  need = num_images - len(existing)
  if need <= 0:
    return existing
  os.makedirs(directory, exist_ok=True)
  manifest = os.path.join(directory, MANIFEST)
  settings = json.loads(json.dumps(settings))  # as it reads back (tuples become lists)
  if os.path.exists(manifest):
    with open(manifest) as f:
      before = json.load(f)
    changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
    if changed:
      what = "; ".join(f"{k}={old!r}, now {new!r}" for k, (old, new) in changed.items())
      raise ValueError(f"the class images cached in {directory} were made with other settings ({what}): delete "
                       "that folder to draw them again, or set the old values.")
  else:
    write_json_object(manifest, settings, indent=2)
  paths = [os.path.join(directory, f"{i:05d}.png") for i in range(need)]
  missing = [i for i, p in enumerate(paths) if not os.path.exists(p)]
  if missing:
    log.info("Drawing %d class image(s) of %d into %s.", len(missing), need, directory)
  # Always the batches of a run that draws them all (a batch's size and rows change the float sums' rounding): a
  # run killed between two images of a batch draws that whole batch again and keeps the images already written.
  for first in sorted({i - i % batch_size for i in missing}):
    n = min(batch_size, need - first)
    for i, image in zip(range(first, first + n), np.asarray(generate(first, n))):
      if i in missing:
        with written_whole(paths[i]) as tmp:  # a killed run leaves no half-written image
          Image.fromarray(image).save(tmp, format="PNG")
  return existing + paths


def pipeline_generator(pipe, prompt: str, size: int, *, sampler: str, steps: int, guidance_scale: float,
                       seed: int) -> Callable[[int, int], np.ndarray]:
  """`generate(first, n)` for `class_images`: n images of `prompt` by the pipeline `pipe`, image `first + i`
  from the initial noise `pipe.noise(seed, ..., offset=first + i)` (so independent of the batching for the
  deterministic samplers)."""

  def generate(first: int, n: int) -> np.ndarray:
    latents = pipe.noise(seed, n, size, size, offset=first)
    return pipe([prompt] * n, height=size, width=size, steps=steps, sampler=sampler, guidance_scale=guidance_scale,
                seed=seed + first, latents=latents)

  return generate


# --- batches -----------------------------------------------------------------------------------


def make_dataset(instance_images: list[str], instance_prompt: str, *, class_images: list[str] = (),
                 class_prompt: str = "", tokenizer: Any, image_size: int, global_batch_size: int, seed: int = 0,
                 center_crop: bool = False, random_flip: bool = False, max_length: int = tok.MAX_LENGTH,
                 process_index: int = 0, process_count: int = 1, num_threads: int = 2,
                 tokenizer_2: Any = None) -> grain.IterDataset:
  """DreamBooth batches, forever, with get_state()/set_state() on their iterator (exact resume).

  As diffusers' DreamBoothDataset: example k of an epoch pairs instance image k % n_instance with class image
  k % n_class, an epoch is max(n_instance, n_class) examples in a shuffled order (reshuffled each epoch), and
  images are resized (shorter side, bilinear) and cropped, at random unless `center_crop`. This host's rows
  of each global batch of `global_batch_size` examples come as {"image": (2b, H, W, 3) in [-1, 1],
  "input_ids": (2b, L), "prior": (2b,) 1.0 for a class example}: its b instance examples then their b class
  examples (b = global_batch_size / process_count); without class images (b, ...) and no "prior".
  With `tokenizer_2` (SDXL, diffusers' train_dreambooth_lora_sdxl.py) also "input_ids_2" and each example's
  "original_size" (height, width before resizing) and "crop_top_left" (top, left of the crop, in the flipped
  image when flipped), the U-Net's time ids.
  """
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} is not a multiple of the {process_count} processes.")
  rows = global_batch_size // process_count
  n = max(len(instance_images), len(class_images))
  prompts = [instance_prompt, class_prompt or ""]
  ids = tok.tokenize(tokenizer, prompts, max_length=max_length, warn=False)
  ids_2 = None if tokenizer_2 is None else np.asarray(
      tok.tokenize(tokenizer_2, prompts, max_length=max_length, warn=False), np.int32)
  reader = _Reader(tuple(instance_images), tuple(class_images), np.asarray(ids, np.int32), image_size, center_crop,
                   random_flip, seed, global_batch_size, process_index * rows, rows, ids_2)
  chunks = grain.MapDataset.range(n).shuffle(seed=seed).repeat().batch(global_batch_size,
                                                                       drop_remainder=True).map_with_index(reader)
  return chunks.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2))


@dataclasses.dataclass(frozen=True)
class _Reader:
  """Reads this host's rows of a global batch of positions; an example's randomness (crop, flip) depends only
  on the seed and its place in the global stream."""
  instance: tuple[str, ...]
  classes: tuple[str, ...]
  ids: np.ndarray  # (2, L): the instance prompt's tokens, the class prompt's
  size: int
  center_crop: bool
  random_flip: bool
  seed: int
  chunk_size: int
  first: int
  rows: int
  ids_2: np.ndarray | None = None  # SDXL's second tokenizer's (2, L); then the size conditioning too

  def __call__(self, chunk_index: int, positions: np.ndarray) -> dict[str, np.ndarray]:
    mine = [int(p) for p in positions[self.first:self.first + self.rows]]
    place = [chunk_index * self.chunk_size + self.first + j for j in range(len(mine))]
    loaded = [self._load(self.instance[p % len(self.instance)], (self.seed, q, 0)) for p, q in zip(mine, place)]
    kinds = [0] * len(mine)
    if self.classes:
      loaded += [self._load(self.classes[p % len(self.classes)], (self.seed, q, 1)) for p, q in zip(mine, place)]
      kinds += [1] * len(mine)
    out = {"image": np.stack([x[0] for x in loaded]), "input_ids": self.ids[kinds]}
    if self.ids_2 is not None:
      out.update(input_ids_2=self.ids_2[kinds], original_size=np.array([x[1] for x in loaded], np.int32),
                 crop_top_left=np.array([x[2] for x in loaded], np.int32))
    if self.classes:
      out["prior"] = np.repeat(np.array([0.0, 1.0], np.float32), len(mine))
    return out

  def _load(self, path: str, key: tuple[int, int, int]) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """(pixels in [-1, 1], the image's (height, width) before resizing, the crop's (top, left))."""
    rng = np.random.default_rng(key)
    with Image.open(path) as f:  # 16-bit and float images scaled to 8 bits (convert("RGB") clips them)
      image = to_rgb(ImageOps.exif_transpose(f))
    s = self.size
    original = (image.height, image.width)
    w, h = image.size
    scale = s / min(w, h)
    w, h = max(s, round(w * scale)), max(s, round(h * scale))
    if image.size != (w, h):
      image = image.resize((w, h), Image.BILINEAR)
    if self.center_crop:
      left, top = (w - s) // 2, (h - s) // 2
    else:
      left, top = int(rng.integers(w - s + 1)), int(rng.integers(h - s + 1))
    image = image.crop((left, top, left + s, top + s))
    if self.random_flip and rng.random() < 0.5:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
      left = w - s - left  # where the crop lies in the flipped image (diffusers flips, then crops)
    return np.asarray(image, np.float32) / 127.5 - 1.0, original, (top, left)
