"""Cached U-Net inputs: the frozen VAE's posterior moments and the frozen text encoder(s)' outputs.

With `config.unet.cache_latents` the U-Net stage encodes its training split once, before its first step,
and then trains on the cache, so that a step runs the U-Net alone (MLPerf's and MaxDiffusion's recipe, and
diffusers' train_text_to_image_sdxl.py, which precomputes both): precomputed latents and text embeddings.
What is cached and what stays random:

- the posterior *moments* (mean and log-variance, as `AutoencoderKL.encode` returns them), not a sample:
  every step still draws a fresh latent from N(mean, std^2), as the uncached stage does;
- the text encoder's `last_hidden_state` of each image's caption (its first caption when it has several) as
  "context"; for SDXL both encoders' penultimate hidden states concatenated, the second's pooled projection
  ("text_embeds") and the image's time ids ("time_ids": original size, crop, target size);
  caption dropout swaps in the empty caption's encodings, as the uncached stage swaps in its tokens;
- images are centre-cropped and never flipped: one encoding per image, so `data.random_flip` /
  `data.random_crop` cannot be combined with the cache (run.py refuses the combination), nor can a text
  encoder that trains.

Layout of `<workdir>/unet/latent_cache/process_<i>/` (each host caches its own shard of the split):
  spec.json                 what the cache was made from (dataset, split, sizes, a fingerprint of the
                            VAE and text-encoder weights); a different spec empties the folder first
  <field>-<k>.npy           float32, `shard_size` examples per file, one file per field: moments (n, h, w,
                            2 * latent_channels), context (n, tokens, hidden_size), for SDXL text_embeds (n, d)
                            and time_ids (n, 6), with a mask (`unet.foreground_loss_weight`) loss_mask (n, h, w, 1)
                            on the latents' grid
  done.json                 written last: the number of examples and the fields; present = complete
Shards are written to a temporary name and renamed (moments last), so a run killed while caching keeps the
finished shards and the rerun encodes only the rest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Callable, Iterable

import grain
import jax
import numpy as np

from jaxsd.config import write_json_object
from jaxsd.files import written_whole

log = logging.getLogger(__name__)
_SPEC, _DONE = "spec.json", "done.json"


def fingerprint(*trees) -> str:
  """A short hash of parameter pytrees (their paths, shapes, dtypes and bytes)."""
  h = hashlib.sha256()
  for tree in trees:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      a = np.asarray(leaf)
      h.update(f"{jax.tree_util.keystr(path)}:{a.shape}:{a.dtype}".encode())
      h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:16]


@dataclasses.dataclass
class LatentCache:
  """A finished cache: memory-mapped shards of each field ("moments", "context", ...), one row per example."""

  directory: str
  fields: dict[str, list[np.ndarray]]  # field -> one memory-mapped array per shard
  shard_size: int

  def __len__(self) -> int:
    return sum(len(m) for m in self.fields["moments"])

  def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Every field of the examples at `indices`, in that order."""
    indices = np.asarray(indices)
    shard, row = np.divmod(indices, self.shard_size)
    out = {name: np.empty((len(indices), *shards[0].shape[1:]), np.float32) for name, shards in self.fields.items()}
    for k in np.unique(shard):
      sel = shard == k
      rows = row[sel]
      for name, shards in self.fields.items():
        out[name][sel] = shards[k][rows]
    return out


_INPUTS = ("image", "input_ids", "input_ids_2", "original_size", "crop_top_left", "loss_mask")  # what `encode` is given
_FIRST = "moments"  # the field whose shard file is written last: its presence marks a finished shard


def _shard_path(directory: str, field: str, k: int) -> str:
  return os.path.join(directory, f"{field}-{k:05d}.npy")


def _save(path: str, array: np.ndarray) -> None:
  with written_whole(path) as tmp, open(tmp, "wb") as f:
    np.save(f, array)


def _prepare(directory: str, spec: dict) -> None:
  """Keeps the folder's finished shards when it was made from the same spec, else empties it."""
  path = os.path.join(directory, _SPEC)
  if os.path.exists(path):
    with open(path) as f:
      if json.load(f) == spec:
        return
    log.info("latent cache in %s was made from other weights or data: rebuilding it.", directory)
    shutil.rmtree(directory)
  os.makedirs(directory, exist_ok=True)
  with written_whole(path) as tmp, open(tmp, "w") as f:
    json.dump(spec, f, indent=2)


def build(directory: str, spec: dict, batches: Iterable[dict], encode: Callable[[dict], dict], *, batch_size: int,
          shard_size: int) -> LatentCache:
  """Encodes `batches` (in order; the last one possibly short) into `directory`, or reads the cache there
  when it is complete for `spec`.

  `encode(batch) -> {field: array}` ("moments" among them) is called on batches of exactly `batch_size` (a
  short last batch is padded, so one compiled program serves all); `shard_size` must be a multiple of it.
  """
  if shard_size % batch_size:
    raise ValueError(f"shard_size={shard_size} must be a multiple of batch_size={batch_size}.")
  _prepare(directory, spec)
  if not os.path.exists(os.path.join(directory, _DONE)):
    t0, encoded = time.time(), 0
    per_shard = shard_size // batch_size
    pending: list[dict[str, np.ndarray]] = []
    k = 0
    for i, batch in enumerate(batches):
      k = i // per_shard
      if os.path.exists(_shard_path(directory, _FIRST, k)):
        continue  # finished by an earlier run
      n = len(batch["image"])
      pad = lambda x: np.concatenate([x, np.repeat(x[-1:], batch_size - n, axis=0)]) if n < batch_size else x
      out = jax.device_get(encode({key: pad(np.asarray(v)) for key, v in batch.items() if key in _INPUTS}))
      pending.append({name: np.asarray(v[:n], np.float32) for name, v in out.items()})
      encoded += n
      if len(pending) == per_shard or n < batch_size:
        _write_shard(directory, k, pending)
        pending = []
    if pending:
      _write_shard(directory, k, pending)
    shards = _num_shards(directory)
    fields = sorted(name[:-len("-00000.npy")] for name in os.listdir(directory) if name.endswith("-00000.npy"))
    count = sum(len(np.load(_shard_path(directory, _FIRST, j), mmap_mode="r")) for j in range(shards))
    write_json_object(os.path.join(directory, _DONE), {
        "examples": count,
        "shards": shards,
        "shard_size": shard_size,
        "fields": fields
    })
    log.info("latent cache: encoded %d examples in %.1f s into %s (%d in all).", encoded,
             time.time() - t0, directory, count)
  return load(directory)


def _write_shard(directory: str, k: int, parts: list[dict[str, np.ndarray]]) -> None:
  for name in sorted(parts[0], key=lambda name: name == _FIRST):
    _save(_shard_path(directory, name, k), np.concatenate([p[name] for p in parts]))


def _num_shards(directory: str) -> int:
  return sum(1 for name in os.listdir(directory) if name.startswith(_FIRST + "-") and name.endswith(".npy"))


def load(directory: str) -> LatentCache:
  """The complete cache in `directory`, memory-mapped (nothing is read until a batch asks for it)."""
  with open(os.path.join(directory, _DONE)) as f:
    done = json.load(f)
  names = done.get("fields", ["context", "moments"])  # caches written before SDXL's fields had these two
  fields = {
      name: [np.load(_shard_path(directory, name, k), mmap_mode="r") for k in range(done["shards"])] for name in names
  }
  sizes = [len(m) for m in fields[_FIRST]]
  if (sum(sizes) != done["examples"] or any([len(a) for a in shards] != sizes for shards in fields.values()) or
      any(n != done["shard_size"] for n in sizes[:-1])):
    found = {name: [len(a) for a in shards] for name, shards in fields.items()}
    raise ValueError(f"latent cache {directory} is inconsistent (shard sizes {found}; {done['examples']} examples "
                     "recorded): delete it and rerun.")
  return LatentCache(directory, fields, done["shard_size"])


def make_dataset(cache: LatentCache, *, batch_size: int, seed: int, prefetch_batches: int = 2) -> grain.IterDataset:
  """Training batches (every field of the cache) from it: shuffled with `seed`, reshuffled every
  epoch, repeated forever; `iter()` gives a grain iterator whose get_state/set_state resume exactly."""
  if len(cache) < batch_size:
    raise ValueError(f"the latent cache holds {len(cache)} examples: fewer than a batch of {batch_size}.")
  positions = grain.MapDataset.range(len(cache)).shuffle(seed=seed).repeat()
  batches = positions.batch(batch_size, drop_remainder=True).map(cache.take)
  it = batches.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
  if prefetch_batches:
    it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch_batches)
  return it
