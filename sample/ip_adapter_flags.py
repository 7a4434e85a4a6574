"""python -m sample's IP-Adapter flags: --ip-adapter, --ip-adapter-image / --ip-adapter-embeds (the k-th of either,
in the order given, for the k-th adapter), --ip-adapter-mask, --ip-adapter-scale, --image-encoder; their checks
(one-line errors before anything loads, `check`) and generate's arguments from them (`call`)."""

from __future__ import annotations

import argparse
import itertools
import json
import os

from jaxsd.config import finite32


class _Prompt(argparse.Action):
  """--ip-adapter-image / --ip-adapter-embeds: appended to their own list and, in the order given, to
  `ip_adapter_prompts` as ("ip_adapter_image" or "ip_adapter_embeds", path), the k-th for the k-th --ip-adapter."""

  def __call__(self, parser, namespace, values, option_string=None):
    setattr(namespace, self.dest, [*getattr(namespace, self.dest), values])
    namespace.ip_adapter_prompts = [*getattr(namespace, "ip_adapter_prompts", []), (self.dest, values)]


def add_flags(p: argparse.ArgumentParser) -> None:
  """Declares the IP-Adapter flags on `p` (python -m sample's parser)."""
  p.add_argument(
      "--ip-adapter", action="append", default=[], metavar="FILE",
      help="an IP-Adapter, plain, Plus or FaceID (h94/IP-Adapter's ip-adapter_sd15.safetensors, ip-adapter-plus_sd15, "
      "ip-adapter_sdxl*.safetensors, ip-adapter-faceid_sd15.bin, ...; a pickled .bin with --allow-pickle): its "
      "--ip-adapter-image is then an image prompt, or its --ip-adapter-embeds the image's embeddings; its image "
      "encoder is the file's folder's image_encoder/ (as diffusers), the --model folder's own, or --image-encoder "
      "(repeatable: several adapters at once, the k-th --ip-adapter-image or --ip-adapter-embeds, in the order given, "
      "for the k-th adapter)")
  p.add_argument(
      "--ip-adapter-image", action=_Prompt, default=[], metavar="IMG",
      help="with --ip-adapter: its image prompt, for every image generated (one per --ip-adapter, or its "
      "--ip-adapter-embeds)")
  p.add_argument(
      "--ip-adapter-embeds", action=_Prompt, default=[], metavar="FILE.npy",
      help="with --ip-adapter, in place of its --ip-adapter-image (FaceID: the only way): a NumPy .npy file of its "
      "image embeddings in diffusers' ip_adapter_image_embeds layout for that adapter, for every image generated: "
      "(2, n, D) under guidance, the unconditional row first; (1, n, D) with --guidance <= 1; or (n, D), the n "
      "images' embeddings alone, their unconditional row zeros (as diffusers' FaceID example makes it); FaceID: "
      "insightface's normed_embedding, D = 512; Plus and Full Face: the image encoder's hidden states, (2, n, L, D) "
      "or (1, n, L, D)")
  p.add_argument(
      "--ip-adapter-mask", action="append", default=[], metavar="IMG",
      help="with --ip-adapter: a region mask (white: where the image prompt acts; resized to the output, as "
      "diffusers' IPAdapterMaskProcessor), one per image prompt in the order of the adapters (an --ip-adapter-embeds "
      "of n images takes n): none, or one for every image prompt, `none` for each of an adapter's that acts "
      "everywhere (diffusers' None in ip_adapter_masks)")
  per_block = '{"up": {"block_0": [0, 1, 0]}}'  # InstantStyle's style-only weights (SDXL)
  p.add_argument(
      "--ip-adapter-scale", action="append", default=[], metavar="S",
      help="with --ip-adapter: its weight (default 1: as trained; 0: off, 0.5 for text and image alike), "
      f"or per-block weights as JSON ({per_block}); one for all adapters, or one per --ip-adapter")
  p.add_argument("--image-encoder", default=None, metavar="FOLDER",
                 help="with --ip-adapter: its image encoder, a transformers CLIPVisionModelWithProjection folder")
  p.set_defaults(ip_adapter_prompts=[])


def scale_flag(text: str) -> float | dict:
  """--ip-adapter-scale: a number, or a JSON object of per-block weights (checked against the U-Net on loading)."""
  if text.lstrip().startswith("{"):
    try:
      value = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"--ip-adapter-scale {text}: not valid JSON ({e}); give a number or per-block weights such as "
                       "'{\"up\": {\"block_0\": [0, 1, 0]}}'.") from None
    if isinstance(value, dict):
      return value
  try:
    value = float(text)
  except ValueError:
    value = None
  if value is None or not finite32(value):
    raise ValueError(f"--ip-adapter-scale {text}: must be a finite number (1: as trained, 0: off) or a JSON object of "
                     "per-block weights.")
  return value


NO_MASK = "none"  # --ip-adapter-mask none: the adapter acts everywhere (diffusers' None in ip_adapter_masks)


def check(args) -> None:
  """The IP-Adapter flags: each needs the others they go with (an image or embeddings per adapter, one scale for all
  or one per adapter, a mask per image prompt or none), and the files they name; the --ip-adapter-embeds arrays are
  read (and checked as far as they can be without the adapters) into `args.ip_adapter_arrays`."""
  n = len(args.ip_adapter)
  args.ip_adapter_arrays = {}
  if not n:
    for flag, value in (("--ip-adapter-image", args.ip_adapter_image), ("--ip-adapter-embeds", args.ip_adapter_embeds),
                        ("--ip-adapter-mask", args.ip_adapter_mask), ("--ip-adapter-scale", args.ip_adapter_scale),
                        ("--image-encoder", args.image_encoder)):
      if value not in (None, []):
        raise ValueError(f"{flag} needs --ip-adapter FILE (the IP-Adapter's weights).")
    return
  if not args.ip_adapter_prompts:
    raise ValueError("--ip-adapter needs --ip-adapter-image IMG (the image prompt) or --ip-adapter-embeds FILE.npy "
                     "(its embeddings; FaceID: the face's).")
  if len(args.ip_adapter_prompts) != n:
    given = (f"{len(args.ip_adapter_image)} --ip-adapter-image" if not args.ip_adapter_embeds else
             f"{len(args.ip_adapter_image)} --ip-adapter-image and {len(args.ip_adapter_embeds)} --ip-adapter-embeds")
    raise ValueError(f"{given} for {n} --ip-adapter: give one image (or embeddings file) per adapter, in the same "
                     "order.")
  if len(args.ip_adapter_scale) not in (0, 1, n):
    raise ValueError(f"{len(args.ip_adapter_scale)} --ip-adapter-scale for {n} --ip-adapter: give one for all, or one "
                     "per adapter.")
  for file in args.ip_adapter:
    if not os.path.isfile(file):
      raise FileNotFoundError(f"--ip-adapter {file}: no such file; give the adapter's .safetensors file.")
    if not file.endswith((".safetensors", ".bin")):
      raise ValueError(f"--ip-adapter {file}: an IP-Adapter is a .safetensors file (or a pickled .bin with "
                       "--allow-pickle).")
    if file.endswith(".bin") and not args.allow_pickle:
      raise ValueError(f"--ip-adapter {file} is pickled (unpickling can run code): use the .safetensors file, or pass "
                       "--allow-pickle if you trust its source.")
  args.ip_adapter_scale = [scale_flag(s) for s in args.ip_adapter_scale]
  args.ip_adapter_arrays = {path: read_embeds(path) for path in args.ip_adapter_embeds}
  images = image_counts(args)
  if args.ip_adapter_mask and len(args.ip_adapter_mask) != sum(images):
    each = ", ".join(map(str, images))
    raise ValueError(f"{len(args.ip_adapter_mask)} --ip-adapter-mask for {sum(images)} image prompt"
                     f"{'s' * (sum(images) > 1)} (per --ip-adapter: {each}): give one mask per image, adapter by "
                     "adapter, or none.")
  for file, chunk in zip(args.ip_adapter, by_adapter([m == NO_MASK for m in args.ip_adapter_mask], images)):
    if any(chunk) and not all(chunk):
      raise ValueError(f"--ip-adapter-mask {NO_MASK} for {sum(chunk)} of --ip-adapter {file}'s {len(chunk)} image "
                       "prompts: "
                       f"an adapter's images are masked together; give {NO_MASK} for each of them, or a mask for each "
                       "(a white one acts everywhere).")
  if not args.ip_adapter_image:  # embeddings only: no image encoder is needed
    if args.image_encoder is not None:
      raise ValueError("--image-encoder with --ip-adapter-embeds alone: the embeddings need no image encoder; drop "
                       "--image-encoder.")
    return
  if args.image_encoder is not None:
    if not os.path.isfile(os.path.join(args.image_encoder, "config.json")):
      raise FileNotFoundError(f"--image-encoder {args.image_encoder}: not a model folder (no config.json); give a "
                              "transformers CLIPVisionModelWithProjection folder.")
  elif not any(
      os.path.isdir(os.path.join(folder, "image_encoder"))
      for folder in (os.path.dirname(os.path.abspath(args.ip_adapter[0])), args.model)):
    raise FileNotFoundError(f"--ip-adapter {args.ip_adapter[0]}: no image_encoder/ beside it (nor in the --model "
                            "folder): give --image-encoder FOLDER (a CLIPVisionModelWithProjection folder).")


def read_embeds(path: str):
  """An --ip-adapter-embeds file: a float32 array of 2 to 4 axes, finite, (n, D) or with 1 or 2 rows first; whether
  it fits its adapter (kind, width) and the guidance is `image_embeds`' to check, once they are known."""
  import numpy as np

  flag = "--ip-adapter-embeds"
  if not os.path.exists(path):
    raise FileNotFoundError(f"{flag} {path}: no such file.")
  if not path.endswith(".npy") or os.path.isdir(path):
    raise ValueError(f"{flag} {path}: give a NumPy .npy file (np.save) of the adapter's image embeddings.")
  try:
    x = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:  # not .npy data, truncated, or a pickled object array
    raise ValueError(f"{flag} {path}: not a NumPy array file np.load can read without pickle ({e}).") from None
  if not isinstance(x, np.ndarray) or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
    raise ValueError(f"{flag} {path}: holds {getattr(x, 'dtype', type(x).__name__)} data; give the embeddings as "
                     "floats.")
  if x.ndim not in (2, 3, 4) or 0 in x.shape or (x.ndim > 2 and x.shape[0] not in (1, 2)):
    raise ValueError(f"{flag} {path} has shape {x.shape}: give (2, n, D) (the unconditional row first, for "
                     "guidance), (1, n, D) (--guidance <= 1) or (n, D) (the unconditional row zeros); Plus and Full "
                     "Face: (2, n, L, D) or (1, n, L, D).")
  if not finite32(x):
    raise ValueError(f"{flag} {path}: not all finite (in float32).")
  return x.astype(np.float32)


def embeds_images(x) -> int:
  """How many images an --ip-adapter-embeds array holds (its n)."""
  return x.shape[0] if x.ndim == 2 else x.shape[1]


def image_counts(args) -> list[int]:
  """How many images each --ip-adapter's prompt holds: 1 for an --ip-adapter-image, n for an --ip-adapter-embeds
  array (read by `check`)."""
  return [
      1 if flag == "ip_adapter_image" else embeds_images(args.ip_adapter_arrays[path])
      for flag, path in args.ip_adapter_prompts
  ]


def by_adapter(items: list, counts: list[int]) -> list[list]:
  """A list with one item per image prompt (the masks), adapter by adapter, cut into one list per adapter."""
  starts = itertools.accumulate(counts[:-1], initial=0)
  return [items[start:start + count] for start, count in zip(starts, counts)]


def image_embeds(args, adapters, guided: bool) -> list:
  """diffusers' `ip_adapter_image_embeds` for the loaded `adapters` (`pipe.ip_adapters`) from the --ip-adapter-embeds
  arrays, None for those given --ip-adapter-image: an (n, D) array gets zero unconditional rows; the rest is
  `ip_adapter.check_embeds`' (kind, width, rows against the guidance), its ValueError naming the file."""
  import numpy as np

  from jaxsd.ip_adapter import check_embeds
  from jaxsd.ip_adapter_weights import HIDDEN_STATE_KINDS

  out = []
  for (flag, path), file, state in zip(args.ip_adapter_prompts, args.ip_adapter, adapters):
    if flag != "ip_adapter_embeds":
      out.append(None)
      continue
    x = args.ip_adapter_arrays[path]
    if x.ndim == 2 and state.kind not in HIDDEN_STATE_KINDS:  # the images' embeddings alone: zero unconditional rows
      x = np.stack([np.zeros_like(x), x]) if guided else x[None]
    out.append(
        check_embeds(x, state.kind, state.embed_dim, guided,
                     name=f"--ip-adapter-embeds {path} (for --ip-adapter {file})"))
  return out


def call(args, pipe, images: list, masks: list) -> dict:
  """generate's IP-Adapter arguments for the adapters loaded in `pipe`: each adapter's image (`images`, None where
  it has embeddings) or embeddings, and the masks, adapter by adapter."""
  guided = not pipe.guidance_embedded if args.guidance is None else pipe.guided(args.guidance)  # (defaults are > 1)
  embeds = image_embeds(args, pipe.ip_adapters, guided)
  single = len(images) == 1
  out = {}
  if any(im is not None for im in images):
    out["ip_adapter_image"] = images[0] if single else images
  if any(x is not None for x in embeds):
    out["ip_adapter_image_embeds"] = embeds
  if any(m is not None for m in masks):  # each adapter's masks, one per image it has; None: no mask (`none`)
    out["ip_adapter_masks"] = [None if chunk[0] is None else chunk for chunk in by_adapter(masks, image_counts(args))]
  return out
