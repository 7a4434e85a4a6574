"""The grain input pipeline: a prepared TFDS dataset -> batches of images and token ids.

Any TFDS dataset prepared as array_record works (`shapes`, an image folder, a
catalogue dataset), read through `tfds.data_source` without TensorFlow. Each host
builds `global_batch_size / process_count` examples per batch: in training, its own rows of
each global batch of one shuffled order that every host draws alike (so the global batches
are those of a single host); in eval, from its own contiguous shard of the split:

  {"image": float32 (B, H, W, 3) in [-1, 1], "input_ids": int32 (B, 77),
   "input_ids_2": int32 (B, 77)  [with tokenizer_2: SDXL's second tokenizer],
   "original_size": int32 (B, 2), "crop_top_left": int32 (B, 2)  [with size_conditioning: SDXL's],
   "caption": str (B,)  [with return_captions], <label key>: int32 (B,) ...}

Training pipelines shuffle (reshuffled every epoch) and repeat forever; eval
pipelines make one pass in order. All randomness is a function of the seed and
the example's position, so `iterator.get_state()` / `set_state()` resume exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import re
import threading
from typing import Any

import grain
import jax
import numpy as np
from PIL import Image, ImageOps
import tensorflow_datasets as tfds

from jaxsd import tokenizer as tokenizer_lib
from jaxsd.data import shapes as _shapes  # noqa: F401  (registers the `shapes` builder)

log = logging.getLogger(__name__)
_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)
_RESERVED = ("image", "input_ids", "input_ids_2", "original_size", "crop_top_left", "caption", "loss_mask")
_MAX_LOGGED = 10
_ORIENTATION = 0x0112  # the EXIF orientation tag
# What ImageOps.exif_transpose does for each orientation (applied to a mask stored with its image's pixels).
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclasses.dataclass
class PipelineStats:
  """Counters shared with the worker threads (read ahead included)."""
  skipped_images: int = 0
  _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

  def count_skipped(self) -> int:
    with self._lock:
      self.skipped_images += 1
      return self.skipped_images


@dataclasses.dataclass
class InputPipeline:
  """Batches as a grain `IterDataset`, with what the caller needs to know about them."""
  dataset: grain.IterDataset  # iter() -> grain.DatasetIterator (get_state/set_state)
  info: tfds.core.DatasetInfo
  num_examples: int  # in this host's shard of the split
  batch_size: int  # per host
  stats: PipelineStats  # stats.skipped_images: unreadable images skipped so far

  def __iter__(self) -> grain.DatasetIterator:
    return iter(self.dataset)


def make_dataset(
    dataset: str | tfds.core.DatasetBuilder,
    *,
    global_batch_size: int,
    image_size: int | None = None,
    data_dir: str | os.PathLike | None = None,
    split: str = "train",
    train: bool = True,
    seed: int = 0,
    tokenizer: Any = None,
    tokenizer_2: Any = None,
    max_length: int = tokenizer_lib.MAX_LENGTH,
    image_key: str = "image",
    caption_key: str = "caption",
    mask_key: str | None = None,
    label_keys: tuple[str, ...] = (),
    return_captions: bool = False,
    random_crop: bool = False,
    random_flip: bool = False,
    size_conditioning: bool = False,
    flip_swaps_left_right: bool = True,
    drop_remainder: bool = True,
    num_threads: int = 4,
    prefetch_batches: int = 2,
    process_index: int | None = None,
    process_count: int | None = None,
) -> InputPipeline:
  """Builds the input pipeline for one host.

  Args:
    dataset: a TFDS name ("shapes/32x32", "my_pets", "name/config:1.0.0") found in
      `data_dir`, or a prepared builder.
    global_batch_size: examples per step over all hosts.
    image_size: output side; images are resized (shorter side) and cropped to a
      square. None: the dataset's own size, when all its images share one.
    data_dir: the TFDS data directory (None: TFDS's default).
    split: a TFDS split, slices included ("train", "test", "train[:90%]").
    train: shuffle with `seed`, reshuffle each epoch and repeat forever; else one
      pass in order.
    seed: the shuffle and augmentation seed.
    tokenizer: a CLIP tokenizer (None: the shipped one).
    tokenizer_2: a second tokenizer (SDXL's): its token ids as "input_ids_2".
    max_length: tokens per caption.
    image_key, caption_key: feature names of the image and its caption (a text,
      or a sequence of texts of which training picks one at random and eval the first).
    mask_key: a single-channel image feature (e.g. shapes' "mask"), returned as "loss_mask", float32 in [0, 1]
      (N, S, S, 1), resized, cropped and flipped with its image (what a loss weighted on the subject reads;
      kohya-ss' masked loss reads the alpha channel the same way).
    label_keys: features passed through as int32 arrays (e.g. shapes' "color").
    return_captions: also return the caption strings under "caption".
    random_crop: (training only) crop at a random place instead of the centre.
    random_flip: (training only) flip half of the images horizontally.
    size_conditioning: also return SDXL's size conditioning (Podell et al. 2023, section 2.2): each
      image's "original_size" (height, width) as stored, before any resizing, and "crop_top_left"
      (top, left) of the crop in the resized image (flipped first, when flipped, as diffusers'
      train_text_to_image_sdxl.py flips before cropping).
    flip_swaps_left_right: in a flipped example, swap the words "left" and "right"
      in the caption, and the "left"/"right" classes of label features.
    drop_remainder: drop the last partial batch (eval can set False).
    num_threads, prefetch_batches: read/decode threads and batches read ahead.
    process_index, process_count: this host and the number of hosts (default: jax's).

  Returns:
    An `InputPipeline`; iterate it (or its `.dataset`) for batches.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                     f"the number of processes ({process_count}).")
  batch_size = global_batch_size // process_count
  if image_size is not None and image_size < 1:
    raise ValueError(f"image_size must be a positive number of pixels, got {image_size}.")
  if num_threads < 1 or prefetch_batches < 0:
    raise ValueError(f"Need num_threads >= 1 and prefetch_batches >= 0, got {num_threads}, "
                     f"{prefetch_batches}.")
  builder = _builder(dataset, data_dir)
  info = builder.info
  features = info.features
  if info.file_format is not None and info.file_format.value != "array_record":
    raise ValueError(f"Dataset {info.full_name} is stored as {info.file_format.value}, which only TensorFlow "
                     "reads: install the optional extra (pip install 'jaxsd[tensorflow]') and convert it, "
                     "or prepare it again with file_format='array_record'.")
  split_name = re.match(r"[\w-]*", split).group(0)
  if split_name not in info.splits:
    raise ValueError(f"Dataset {info.full_name} has no split {split_name!r}; it has "
                     f"{sorted(info.splits)}.")
  keys = [("image_key", image_key), ("caption_key", caption_key)] + [("mask_key", mask_key)] * bool(mask_key)
  for what, key in keys + [("label_keys", k) for k in label_keys]:
    if key not in features:
      raise KeyError(f"{what}={key!r} is not a feature of {info.full_name}; its features are "
                     f"{sorted(features.keys())}.")
    if what == "label_keys" and key in _RESERVED:
      raise ValueError(f"label key {key!r} clashes with an output key {_RESERVED}.")
  if image_size is None:
    height, width = features[image_key].shape[:2]
    if height is None or height != width:
      raise ValueError(f"{info.full_name} images have no single square size "
                       f"({features[image_key].shape}); pass image_size.")
    image_size = height
  if tokenizer is None:
    tokenizer = tokenizer_lib.load_tokenizer()

  decoders = {k: tfds.decode.SkipDecoding() for k in (image_key, mask_key) if k}
  source = builder.as_data_source(split=split, decoders=decoders)
  per_host = len(source) // process_count  # equal shards: every host makes the same steps
  if per_host < batch_size and (drop_remainder or per_host == 0):
    raise ValueError(f"{info.full_name} split {split!r} has {len(source)} examples, "
                     f"{per_host} per host: fewer than a batch of {batch_size}.")

  stats = PipelineStats()
  swaps = {k: _left_right_swap(features[k]) for k in label_keys} if flip_swaps_left_right else {}
  if train:
    # Every host draws the same global order of the whole split (its equal-share part, per_host x hosts) and
    # reads its own rows of each global batch: the global batches, and so training, do not depend on how
    # many hosts share them.
    positions = grain.MapDataset.range(per_host * process_count).shuffle(seed=seed).repeat()  # reshuffled each epoch
    # drop_remainder: the same batches of an endless order, but grain's len of repeat().batch(1) overflows.
    chunks, first, offset = positions.batch(global_batch_size, drop_remainder=True), process_index * batch_size, 0
  else:  # one ordered pass over this host's contiguous shard
    positions = grain.MapDataset.range(per_host)
    chunks, first, offset = positions.batch(batch_size, drop_remainder=False), 0, process_index * per_host
  reader = _ChunkReader(source=source, offset=offset, chunk_size=global_batch_size if train else batch_size,
                        first=first, rows=batch_size, seed=seed, image_key=image_key, caption_key=caption_key,
                        mask_key=mask_key or None, label_keys=tuple(label_keys), image_size=image_size, train=train,
                        random_crop=random_crop, random_flip=random_flip, size_conditioning=size_conditioning,
                        caption_choice=not isinstance(features[caption_key], tfds.features.Text),
                        flip_swaps_left_right=flip_swaps_left_right, label_swaps=swaps,
                        label_shapes={k: tuple(features[k].shape) for k in label_keys
                                     }, stats=stats, name=f"{info.full_name}[{split}]")

  # Chunks of positions -> this host's examples of each: one array_record read per chunk costs a fraction
  # of per-record reads.
  chunks = chunks.map_with_index(reader)
  it = chunks.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2, num_threads)))
  # Chunks lose their unreadable images; rebatching refills every batch.
  it = it.filter(lambda chunk: len(chunk["caption"]) > 0)
  it = grain.experimental.RebatchIterDataset(it, batch_size, drop_remainder=drop_remainder)

  def finish(batch):
    captions = batch.pop("caption")
    batch["input_ids"] = tokenizer_lib.tokenize(tokenizer, [str(c) for c in captions], max_length, warn=False)
    if tokenizer_2 is not None:
      batch["input_ids_2"] = tokenizer_lib.tokenize(tokenizer_2, [str(c) for c in captions], max_length, warn=False)
    if return_captions:
      batch["caption"] = captions
    return batch

  it = it.map(finish)
  if prefetch_batches:
    it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch_batches)
  return InputPipeline(dataset=it, info=info, num_examples=per_host, batch_size=batch_size, stats=stats)


@dataclasses.dataclass(frozen=True)
class _ChunkReader:
  """Reads a chunk of positions and decodes, crops, flips and normalises each example.

  A chunk is `chunk_size` positions (a global batch when training); this host reads `rows` of them from
  `first` on. Returns them stacked (images, captions, labels), without unreadable images. An example's
  randomness depends only on the seed and its place in the (global) stream.
  """
  source: Any
  offset: int
  chunk_size: int
  first: int
  rows: int
  seed: int
  image_key: str
  caption_key: str
  mask_key: str | None
  label_keys: tuple[str, ...]
  image_size: int
  train: bool
  random_crop: bool
  random_flip: bool
  size_conditioning: bool
  caption_choice: bool  # the caption feature holds several captions
  flip_swaps_left_right: bool
  label_swaps: dict
  label_shapes: dict  # key -> shape of one label, for empty chunks
  stats: PipelineStats
  name: str

  def __call__(self, chunk_index: int, positions: np.ndarray) -> dict[str, np.ndarray]:
    keys = [self.offset + int(p) for p in positions[self.first:self.first + self.rows]]
    if hasattr(self.source, "__getitems__"):
      examples = self.source.__getitems__(keys)
    else:
      examples = [self.source[k] for k in keys]
    out = []
    for j, (key, example) in enumerate(zip(keys, examples)):
      rng = None
      if self.train and (self.random_crop or self.random_flip or self.caption_choice):
        rng = np.random.default_rng((self.seed, chunk_index * self.chunk_size + self.first + j))
      processed = self._example(key, example, rng)
      if processed is not None:
        out.append(processed)
    s = self.image_size
    sizes = {
        k: np.array([o[k] for o in out], np.int32).reshape(len(out), 2) for k in ("original_size", "crop_top_left")
    } if self.size_conditioning else {}
    return {
        "image":
            np.stack([o["image"] for o in out]) if out else np.zeros((0, s, s, 3), np.float32),
        "caption":
            np.array([o["caption"] for o in out], dtype=str),
        **sizes,
        **({
            "loss_mask": np.stack([o["loss_mask"] for o in out]) if out else np.zeros((0, s, s, 1), np.float32)
        } if self.mask_key else {}),
        **{
            k: np.array([o[k] for o in out], np.int32).reshape((len(out),) + self.label_shapes[k]) for k in self.label_keys
        },
    }

  def _example(self, key: int, example: dict, rng: np.random.Generator | None):
    try:
      image = Image.open(io.BytesIO(example[self.image_key]))
      width, height = image.size  # as stored (draft below decodes smaller)
      orientation = 1  # read only where it is used: the mask and the size conditioning turn with the image
      if (self.mask_key or self.size_conditioning) and "exif" in image.info:
        orientation = image.getexif().get(_ORIENTATION, 1)
      mask = self._mask(example, image.size, orientation)
      if self.size_conditioning and orientation in (5, 6, 7, 8):  # turned by 90 below
        width, height = height, width
      if image.format == "JPEG":  # decode at a reduced scale when >= 2x too large
        image.draft("RGB", (self.image_size, self.image_size))
      if "exif" in image.info:  # camera JPEGs: apply the orientation tag
        image = ImageOps.exif_transpose(image)
      image = image.convert("RGB")  # decodes the whole image
      if mask is not None and mask.size != image.size:  # the image decoded at a reduced scale (draft)
        mask = mask.resize(image.size, Image.BILINEAR)
    except Exception as e:  # noqa: BLE001  (any decoder failure: skip, never crash)
      n = self.stats.count_skipped()
      if n <= _MAX_LOGGED:
        log.warning("Skipping unreadable image %s #%d: %s%s", self.name, key, e,
                    " (further ones are counted, not logged)" if n == _MAX_LOGGED else "")
      return None

    (image, mask), resized_width, top, left = self._resize_and_crop(image, mask, rng)
    flip = self.random_flip and rng is not None and rng.random() < 0.5
    if flip:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
      mask = None if mask is None else mask.transpose(Image.FLIP_LEFT_RIGHT)
      left = resized_width - self.image_size - left  # where this crop lies in the flipped resized image
    pixels = np.asarray(image, np.float32) / 127.5 - 1.0

    caption = example[self.caption_key]
    if not isinstance(caption, (bytes, str)):  # a sequence of captions
      caption = caption[rng.integers(len(caption))] if rng is not None else caption[0]
    caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
    if flip and self.flip_swaps_left_right:
      caption = _LEFT_RIGHT.sub(_swap_word, caption)
    out = {"image": pixels, "caption": caption}
    if mask is not None:
      out["loss_mask"] = np.asarray(mask, np.float32)[..., None] / 255.0
    if self.size_conditioning:
      out.update(original_size=(height, width), crop_top_left=(top, left))
    for key in self.label_keys:
      label = np.asarray(example[key], np.int32)
      swap = self.label_swaps.get(key)
      if flip and swap:
        a, b = swap
        label = np.where(label == a, b, np.where(label == b, a, label)).astype(np.int32)
      out[key] = label
    return out

  def _mask(self, example: dict, size: tuple[int, int], orientation: int) -> Image.Image | None:
    """The example's mask ("L"), turned as the image's EXIF orientation turns the image; None without
    `mask_key`. A mask of another size than the stored image is an error (the example is skipped)."""
    if not self.mask_key:
      return None
    mask = Image.open(io.BytesIO(example[self.mask_key]))
    if mask.size != size:
      raise ValueError(f"its {self.mask_key!r} is {mask.size[0]}x{mask.size[1]}, the image {size[0]}x{size[1]}")
    mask = mask.convert("L")
    turn = _EXIF_TRANSPOSE.get(orientation)
    return mask if turn is None else mask.transpose(turn)

  def _resize_and_crop(self, image: Image.Image, mask: Image.Image | None,
                       rng) -> tuple[tuple[Image.Image, Image.Image | None], int, int, int]:
    """((the square crop, the mask's same crop or None), the resized image's width, the crop's top and left in
    the resized image)."""
    s = self.image_size
    w, h = image.size
    if (w, h) != (s, s):
      scale = s / min(w, h)
      w, h = max(s, round(w * scale)), max(s, round(h * scale))
      image = image.resize((w, h), Image.BICUBIC)
      mask = None if mask is None else mask.resize((w, h), Image.BILINEAR)
    if (w, h) == (s, s):
      return (image, mask), w, 0, 0
    if self.random_crop and rng is not None:
      left, top = int(rng.integers(w - s + 1)), int(rng.integers(h - s + 1))
    else:
      left, top = (w - s) // 2, (h - s) // 2
    box = (left, top, left + s, top + s)
    return (image.crop(box), None if mask is None else mask.crop(box)), w, top, left


def _swap_word(match: re.Match) -> str:
  word = match.group(0)
  other = "right" if word.lower() == "left" else "left"
  return other.capitalize() if word[0].isupper() else other


def _left_right_swap(feature) -> tuple[int, int] | None:
  names = getattr(feature, "names", None)
  if names and "left" in names and "right" in names:
    return names.index("left"), names.index("right")
  return None


def prepared_fingerprint(info: tfds.core.DatasetInfo) -> str:
  """Identifies the prepared files of a dataset (their names, sizes and modification times): preparing it again,
  or another dataset of the same name in another data_dir, gives another fingerprint. What a cache of
  the data's encodings keys on."""
  root = os.fspath(info.data_dir)
  h = hashlib.sha1(os.path.abspath(root).encode())
  for name in sorted(os.listdir(root)):
    st = os.stat(os.path.join(root, name))
    h.update(f"\0{name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
  return h.hexdigest()


def feature_names(dataset: str, data_dir: str | os.PathLike | None = None) -> list[str]:
  """The features of a prepared dataset, sorted (an error says what is prepared when it is not)."""
  return sorted(_builder(dataset, data_dir).info.features.keys())


def split_names(dataset: str, data_dir: str | os.PathLike | None = None) -> list[str]:
  """The splits of a prepared dataset, sorted (an error says what is prepared when it is not)."""
  return sorted(_builder(dataset, data_dir).info.splits)


def _builder(dataset, data_dir) -> tfds.core.DatasetBuilder:
  """The prepared builder, or an error that says what is there and how to prepare."""
  if isinstance(dataset, tfds.core.DatasetBuilder):
    if not dataset.is_prepared():
      raise FileNotFoundError(f"Dataset {dataset.info.full_name} is not prepared in "
                              f"{dataset.data_dir}; call download_and_prepare() first.")
    return dataset
  data_dir = os.path.expanduser(os.fspath(data_dir)) if data_dir is not None else None
  root = data_dir or os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
  base = dataset.split(":")[0]
  found = list_prepared(root)
  names = [f.split(":")[0] for f in found]
  if not any(n == base or n.startswith(base + "/") for n in names):
    if base.split("/")[0] == "shapes":
      how = "jaxsd.data.prepare_shapes(data_dir, config) (configs 32x32, 64x64)"
    else:
      how = ("jaxsd.data.prepare_image_folder(folder, data_dir, name=...) for your own images, "
             "or the dataset's TFDS builder with file_format='array_record'")
    raise FileNotFoundError(f"Dataset {dataset!r} is not prepared in data_dir {root!r}. Prepare it with {how}. "
                            f"Prepared there: {', '.join(found) if found else 'nothing'}.")
  builder = tfds.builder(dataset, data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(f"Dataset {dataset!r} ({builder.info.full_name}) is not prepared in "
                            f"{root!r}; prepared there: {', '.join(found)}.")
  return builder


def list_prepared(data_dir: str) -> list[str]:
  """The datasets prepared in `data_dir`, as "name/config:version" strings."""
  found = []
  if not os.path.isdir(data_dir):
    return found
  for root, dirs, files in os.walk(data_dir):
    dirs[:] = sorted(d for d in dirs if not d.startswith((".", "incomplete", "downloads")))
    if "dataset_info.json" in files:
      rel = os.path.relpath(root, data_dir).replace(os.sep, "/")
      path, _, version = rel.rpartition("/")
      found.append(f"{path}:{version}" if path else rel)
      dirs[:] = []
    elif os.path.relpath(root, data_dir).count(os.sep) >= 3:
      dirs[:] = []
  return sorted(found)
