"""The model-folder format, read and written: diffusers Stable Diffusion folders and training workdirs.

A Stable Diffusion folder holds model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/;
each network's folder holds config.json and its weights: safetensors, one file or shards listed in an
`.index.json`, optionally a variant, named as diffusers and transformers name them (the variant goes
before the last extension: `diffusion_pytorch_model.fp16.safetensors`, shards
`model.fp16-00001-of-00002.safetensors` listed in `model.safetensors.index.fp16.json`). Pickled `.bin`
checkpoints can run code when loaded, so they are refused unless the caller opts in
(`allow_pickle=True`), and then read with `torch.load(weights_only=True)`. Folders written by
diffusers <= 0.39's Flax pipelines (`diffusion_flax_model.msgpack`, transformers' `flax_model.msgpack`)
read through `jaxsd.flax_msgpack`, which renames their parameters to PyTorch's.

A training workdir holds such a folder in model/ (each network with the `jaxsd_step.json` of the step
it was exported at) and the orbax checkpoints of each stage in <stage>/checkpoints/<step>/state.

Nothing here knows the networks: `jaxsd.pretrained` (one network), the pipeline, `python -m sample`
and the training exporter stand on this module.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np

from jaxsd.config import ConfigBase, read_json_object, write_json_object

DIFFUSERS_VERSION = "0.42.1"  # written into config.json; diffusers only uses it for warnings
COMPONENTS = ("unet", "vae", "text_encoder", "scheduler")  # what a folder must have to sample
CONFIG_FILES = ("unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json")
STEP_FILE = "jaxsd_step.json"  # in an exported network's folder: the training step it holds

log = logging.getLogger(__name__)

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

# --- one network's weight files ------------------------------------------------------------------


class SafetensorsDict(Mapping):
  """A read-only mapping over one or more safetensors files that loads each tensor on access."""

  def __init__(self, files: list[str]):
    from safetensors import safe_open

    self._handles = []
    for f in files:
      if os.path.isfile(f) and not os.access(f, os.R_OK):  # safetensors says "No such file or directory"
        raise ValueError(f"{f}: permission denied; make the file readable (chmod a+r).")
      try:
        self._handles.append(safe_open(f, framework="numpy"))
      except FileNotFoundError:
        raise
      except Exception as e:  # SafetensorError (not an exception class of its own family), OSError
        raise ValueError(f"{f} is not a readable safetensors file ({e}); replace it with a complete copy.") from None
    self._where = {}
    for h in self._handles:
      for k in h.keys():
        self._where[k] = h

  def __getitem__(self, key: str) -> np.ndarray:
    return self._where[key].get_tensor(key)

  def __iter__(self) -> Iterator[str]:
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)


_WEIGHT_NAMES = ("diffusion_pytorch_model", "model")


def add_variant(file_name: str, variant: str | None) -> str:
  """diffusers' / transformers' `_add_variant`: the variant goes before the last extension."""
  if not variant:
    return file_name
  stem, ext = file_name.rsplit(".", 1)
  return f"{stem}.{variant}.{ext}"


class WeightFiles(NamedTuple):
  files: list[str]  # one file, or an index's shards
  fmt: str  # "safetensors", "msgpack" or "pickle"
  index: str | None  # the .index.json listing the shards


def pick_weight_files(exists: Callable[[str], bool], read_index: Callable[[str], Mapping[str, Any]],
                      variant: str | None = None) -> WeightFiles | None:
  """The names of the weight files a diffusers / transformers network folder loads, found by name:
  `exists(name)` says whether the folder has a file, `read_index(name)` reads one of its .index.json files;
  safetensors before Flax msgpack before pickled .bin, one file before an index's shards; None when none. The
  folder may be local (`find_weight_files`) or a Hub repository's listing (`jaxsd.hub`)."""
  for fmt, ext in (("safetensors", "safetensors"), ("msgpack", "msgpack"), ("pickle", "bin")):
    for name in _WEIGHT_NAMES:
      if fmt == "msgpack":  # diffusers <= 0.39's and transformers' Flax weights (transformers' may be sharded)
        name = {"diffusion_pytorch_model": "diffusion_flax_model", "model": "flax_model"}[name]
      single = add_variant(f"{name}.{ext}", variant)
      if exists(single):
        return WeightFiles([single], fmt, None)
      # The index as diffusers and transformers name it (model.safetensors.index.fp16.json), then the
      # variant before the extension as for single files (model.fp16.safetensors.index.json).
      for index in (add_variant(f"{name}.{ext}.index.json",
                                variant), add_variant(f"{name}.{ext}", variant) + ".index.json"):
        if exists(index):
          return WeightFiles(sorted(set(read_index(index)["weight_map"].values())), fmt, index)
  return None


def find_weight_files(folder: str, variant: str | None = None) -> tuple[list[str], str]:
  """Returns (files, format) for the weights in a diffusers/transformers model folder."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder}: not a directory; pass a model folder holding config.json and weights.")

  def read_index(name: str) -> Mapping[str, Any]:
    with open(os.path.join(folder, name)) as f:
      return json.load(f)

  picked = pick_weight_files(lambda name: os.path.exists(os.path.join(folder, name)), read_index, variant)
  if picked:
    missing = [f for f in picked.files if not os.path.exists(os.path.join(folder, f))]
    if missing:
      raise FileNotFoundError(f"{os.path.join(folder, picked.index)}: lists shards that are not in the folder: "
                              f"{', '.join(missing)}.")
    return [os.path.join(folder, f) for f in picked.files], picked.fmt
  listing = ", ".join(sorted(os.listdir(folder))) or "nothing"
  single = add_variant("diffusion_pytorch_model.safetensors", variant)
  index = add_variant("diffusion_pytorch_model.safetensors.index.json", variant)
  others = sorted(variants_in(folder) - {variant})
  hint = (f" It holds the {', '.join(others)} variant: pass variant={others[0]!r} (--variant {others[0]} on the "
          "command line)." if others else "")
  raise FileNotFoundError(f"{folder}: no weights found (looked for {single}, {index}, the same with model for "
                          f"diffusion_pytorch_model, their .bin forms, and Flax's diffusion_flax_model.msgpack / "
                          f"flax_model.msgpack); the folder holds: {listing}.{hint}")


# A variant's weight files: model.fp16.safetensors, its shards model.fp16-00001-of-00002.safetensors, and the
# index diffusers names diffusion_pytorch_model.safetensors.index.fp16.json.
_VARIANT_FILE = re.compile(r"(?:diffusion_pytorch_model|model)\.(?:(\w+?)(?:-\d+-of-\d+)?\.(?:safetensors|bin)|"
                           r"(?:safetensors|bin)\.index\.(\w+)\.json)$")


def variants_in(folder: str) -> set[str]:
  """The variants ("fp16", ...) whose weight files the folder holds."""
  found = (_VARIANT_FILE.match(f) for f in os.listdir(folder))
  return {m.group(1) or m.group(2) for m in found if m}


def has_weights(folder: str, variant: str | None = None) -> bool:
  """Whether `folder` holds weights of `variant` (None: the default files)."""
  try:
    find_weight_files(folder, variant)
  except FileNotFoundError:
    return False
  return True


def read_state_dict(folder: str, variant: str | None = None, allow_pickle: bool = False) -> Mapping[str, Any]:
  """The state dict in a model folder: safetensors lazily; Flax `.msgpack` in PyTorch names; pickled `.bin`
  only with allow_pickle."""
  files, fmt = find_weight_files(folder, variant)
  if fmt == "safetensors":
    return SafetensorsDict(files)
  if fmt == "msgpack":
    from jaxsd import flax_msgpack

    return flax_msgpack.MsgpackStateDict(files)
  if not allow_pickle:
    raise ValueError(f"{folder} holds only pickled PyTorch weights ({os.path.basename(files[0])}). Unpickling can run "
                     "arbitrary code, so it is off by default. Convert the folder to safetensors (jaxsd.StableDiffusion"
                     ".from_pretrained(folder, allow_pickle=True).save_pretrained(new_folder), or diffusers' "
                     "DiffusionPipeline.from_pretrained(folder).save_pretrained(new_folder)), or, "
                     "if you trust its source, pass allow_pickle=True (to StableDiffusion.from_pretrained, or "
                     "jaxsd.pretrained's load_unet / load_vae / load_text_encoder; --allow-pickle on the command "
                     "line): it is read with torch.load(weights_only=True).")
  return read_pickled(files)


def read_pickled(files: list[str]) -> dict[str, np.ndarray]:
  """The tensors of pickled PyTorch checkpoints (`.bin`, `.ckpt`), read with `torch.load(weights_only=True)`, as
  diffusers reads them; a Lightning checkpoint's `state_dict` is unwrapped and its other entries left out."""
  try:
    import torch
  except ImportError as e:
    raise ImportError("reading pickled (.bin / .ckpt) checkpoints needs PyTorch: pip install torch") from e
  sd = {}
  for f in files:
    try:
      loaded = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, RuntimeError (not a zip / truncated), EOFError
      raise ValueError(f"{f} is not a readable PyTorch checkpoint ({' '.join(str(e).split())[:200]}); replace it "
                       "with a complete copy, or a safetensors file.") from None
    while isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
      loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
      raise ValueError(f"{f} holds a {type(loaded).__name__}, not a state dict of tensors.")
    for k, v in loaded.items():
      if isinstance(v, torch.Tensor):
        sd[k] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
  return sd


def resolve_variants(path: str, dirs: dict[str, str], variant: str | None) -> dict[str, str | None]:
  """The variant to read in each network folder of a pipeline folder, as diffusers: `variant` where the
  folder has it, the default files elsewhere (with a warning); an error when no network has it."""
  variants = {name: variant for name in dirs}
  if variant:
    have = {name: has_weights(d, variant) for name, d in dirs.items()}
    if not any(have.values()):
      raise FileNotFoundError(f"{path}: no network has weights of variant={variant!r} (files named like "
                              f"{add_variant('diffusion_pytorch_model.safetensors', variant)}); "
                              "leave the variant out to load the default files.")
    for name in dirs:
      if not have[name]:
        log.warning("%s has no %s weights; loading its default files.", dirs[name], variant)
        variants[name] = None
  return variants


def read_json(file: str) -> dict:
  return read_json_object(file)


def write_safetensors(state_dict: dict[str, np.ndarray], path: str, metadata: Mapping[str, str] | None = None) -> None:
  """Writes `state_dict` to `path` with the header metadata {"format": "pt", **metadata}, the same bytes for
  the same tensors and metadata in every process."""
  from safetensors.numpy import save_file

  # transformers refuses safetensors files without a "format" entry in the metadata.
  save_file(state_dict, path, metadata={"format": "pt", **(metadata or {})})
  if metadata:
    _sort_header_metadata(path)


def _sort_header_metadata(path: str) -> None:
  """Rewrites a safetensors file's `__metadata__` in sorted key order, in place and at the same length.

  safetensors writes the metadata from a Rust HashMap, whose order changes from one call to the next, so two
  writes of the same adapter would differ in their bytes (a resumed run must write the same file as an
  uninterrupted one). The header is re-serialized as serde_json writes it (compact, UTF-8 unescaped); where
  that does not reproduce the original bytes in the original order, the file is left as it is."""
  with open(path, "r+b") as f:
    size = int.from_bytes(f.read(8), "little")
    raw = f.read(size)
    text = raw.rstrip(b" ").decode("utf-8")
    header = json.loads(text)
    dump = lambda h: json.dumps(h, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if dump(header) != text.encode("utf-8"):
      return
    meta = header.get("__metadata__")
    if not meta:
      return
    header["__metadata__"] = dict(sorted(meta.items()))
    f.seek(8)
    f.write(dump(header).ljust(size, b" "))


# --- Stable Diffusion folders --------------------------------------------------------------------


def check_model_folder(path: str, components: tuple[str, ...] = COMPONENTS,
                       config_files: tuple[str, ...] = CONFIG_FILES) -> None:
  """Raises a FileNotFoundError that says what is missing from a diffusers pipeline folder (by default a
  Stable Diffusion one; SDXL's lists its own components)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"model folder {path!r} does not exist; pass a diffusers Stable Diffusion folder "
        "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a training workdir.")
  missing = [d for d in components if not os.path.isdir(os.path.join(path, d))]
  index = os.path.join(path, "model_index.json")
  if "unet" in missing and os.path.isdir(os.path.join(path, "transformer")) and os.path.isfile(index):
    kind = read_json(index).get("_class_name", "a diffusion-transformer pipeline")
    raise FileNotFoundError(f"model folder {path!r} holds {kind} (a transformer/, no unet/: SD 3, FLUX, PixArt, "
                            "...); jaxsd runs U-Net models: Stable Diffusion 1.x / 2.x and SDXL folders.")
  if missing:
    need = ("A Stable Diffusion folder needs unet/, vae/, text_encoder/, tokenizer/ and scheduler/."
            if components == COMPONENTS else f"This folder needs {', '.join(d + '/' for d in components)}.")
    raise FileNotFoundError(f"model folder {path!r} is incomplete: no {', '.join(d + '/' for d in missing)}. {need}")
  missing = [f for f in config_files if not os.path.isfile(os.path.join(path, f))]
  if missing:
    raise FileNotFoundError(f"model folder {path!r} is incomplete: no {', '.join(missing)}. Each network's folder "
                            "needs the config.json it was saved with (scheduler/ its scheduler_config.json).")


SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
# The SDXL pipeline classes whose folders hold only the SDXL components (a ControlNet pipeline's has one more).
SDXL_FOLDER_PIPELINES = SDXL_PIPELINES + ("StableDiffusionXLInpaintPipeline",
                                          "StableDiffusionXLInstructPix2PixPipeline")


def sdxl_pipeline_class(own: str | None, first_text_encoder: bool) -> str:
  """The pipeline class a folder of SDXL networks is saved under: the source's `own` where that is an
  SDXL_FOLDER_PIPELINES one (Flax prefix dropped), else the base's or, without a first text encoder, the refiner's."""
  own = str(own or "").removeprefix("Flax")
  return own if own in SDXL_FOLDER_PIPELINES else SDXL_PIPELINES[0 if first_text_encoder else 1]


def sdxl_index(index: dict) -> dict:
  """An SDXL folder's model_index.json for a copy holding its networks only: the class `sdxl_pipeline_class`
  says, its settings (force_zeros_for_empty_prompt, ...) kept, a ControlNet entry dropped."""
  out = {k: v for k, v in index.items() if k != "controlnet"}
  first = (index.get("text_encoder") or [None, None])[1] is not None
  out["_class_name"] = sdxl_pipeline_class(index.get("_class_name"), first)
  return out


def is_sdxl_folder(path: str) -> bool:
  """Whether a pipeline folder holds SDXL (base or refiner): model_index.json's `_class_name` names an SDXL
  pipeline (StableDiffusionXL..., its inpainting, ControlNet, ... ones included), or its U-Net has SDXL's addition
  embedding ("text_time")."""
  index = os.path.join(path, "model_index.json")
  if os.path.isfile(index) and str(read_json(index).get("_class_name",
                                                        "")).removeprefix("Flax").startswith("StableDiffusionXL"):
    return True
  unet = os.path.join(path, "unet", "config.json")
  return os.path.isfile(unet) and read_json(unet).get("addition_embed_type") == "text_time"


def scheduler_config_file(path: str) -> str:
  return os.path.join(path, "scheduler", "scheduler_config.json")


def write_scheduler(cfg: ConfigBase, path: str, class_name: str | None = None) -> None:
  """scheduler/scheduler_config.json, by default for SD's PNDM scheduler (DDIM's for zero terminal SNR, which
  diffusers' PNDMScheduler ignores). None-valued keys and the keys the config was read without (`defaulted`)
  are left out: each scheduler class then applies its own default, so the file means what the one it came
  from meant."""
  os.makedirs(path, exist_ok=True)
  defaulted = set(getattr(cfg, "defaulted", ()))
  d = {k: v for k, v in cfg.to_dict().items() if v is not None and k not in defaulted}
  d.update(getattr(cfg, "unimplemented", ()))  # the file's keys no sampler here reads beyond their default
  if class_name is None:
    class_name = "DDIMScheduler" if d.get("rescale_betas_zero_snr") else "PNDMScheduler"
  d.update({"_class_name": class_name.removeprefix("Flax"), "_diffusers_version": DIFFUSERS_VERSION})
  write_json_object(os.path.join(path, "scheduler_config.json"), d, indent=2, sort_keys=True)


def index_classes(path: str) -> tuple[str | None, str | None]:
  """(pipeline class, scheduler class) a folder's model_index.json names (what diffusers builds), else the
  scheduler class of its scheduler_config.json; None for what neither names."""
  index_file, pipeline_class, scheduler_class = os.path.join(path, "model_index.json"), None, None
  if os.path.isfile(index_file):
    index = read_json(index_file)
    entry = index.get("scheduler")
    pipeline_class = index.get("_class_name")
    if isinstance(entry, (list, tuple)) and len(entry) == 2:
      scheduler_class = entry[1]
  if not isinstance(scheduler_class, str) and os.path.isfile(scheduler_config_file(path)):
    scheduler_class = read_json(scheduler_config_file(path)).get("_class_name")
  return (pipeline_class if isinstance(pipeline_class, str) else None,
          scheduler_class if isinstance(scheduler_class, str) else None)


# The pipeline classes whose folders hold exactly MODEL_INDEX's components (a ControlNet pipeline's has one more).
SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
                "StableDiffusionInstructPix2PixPipeline", "LatentConsistencyModelPipeline",
                "LatentConsistencyModelImg2ImgPipeline")


def write_model_index(path: str, pipeline_class: str | None = None, scheduler_class: str | None = None) -> None:
  """An SD 1.x / 2.x folder's model_index.json, naming the pipeline and scheduler classes of the folder it came
  from (`index_classes`; diffusers builds the scheduler of model_index's class, whatever scheduler_config.json
  says), without a Flax prefix (the weights written are PyTorch's); by default, and for a pipeline class with other
  components than these (not in SD_PIPELINES), StableDiffusionPipeline, and the class `write_scheduler` wrote."""
  index = dict(MODEL_INDEX)
  if pipeline_class and pipeline_class.removeprefix("Flax") in SD_PIPELINES:
    index["_class_name"] = pipeline_class.removeprefix("Flax")
  if scheduler_class is None and os.path.isfile(scheduler_config_file(path)):
    scheduler_class = read_json(scheduler_config_file(path)).get("_class_name")
  if isinstance(scheduler_class, str) and scheduler_class:
    index["scheduler"] = ["diffusers", scheduler_class.removeprefix("Flax")]
  write_json_object(os.path.join(path, "model_index.json"), index, indent=2, sort_keys=True)


# diffusers' ControlNet pipelines, by the plain pipeline whose components (and a "controlnet") their folders hold.
CONTROLNET_PIPELINES = {
    "StableDiffusionPipeline": "StableDiffusionControlNetPipeline",
    "StableDiffusionImg2ImgPipeline": "StableDiffusionControlNetImg2ImgPipeline",
    "StableDiffusionInpaintPipeline": "StableDiffusionControlNetInpaintPipeline",
    "StableDiffusionXLPipeline": "StableDiffusionXLControlNetPipeline",
    "StableDiffusionXLImg2ImgPipeline": "StableDiffusionXLControlNetImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline": "StableDiffusionXLControlNetInpaintPipeline",
}
# model_index.json's "controlnet" class for one ControlNet (in controlnet/) and for several (MultiControlNetModel:
# controlnet/, controlnet_1/, controlnet_2/, ..., as its save_pretrained writes and its from_pretrained reads them).
CONTROLNET_CLASSES = ("ControlNetModel", "MultiControlNetModel")


def controlnet_class(path: str) -> str | None:
  """The class a pipeline folder's model_index.json names for its "controlnet" component (Flax prefix dropped), or
  None: no such entry (a plain pipeline's folder), a null one, or no model_index.json."""
  index = os.path.join(path, "model_index.json")
  entry = read_json(index).get("controlnet") if os.path.isfile(index) else None
  if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[1], str):
    return None
  return entry[1].removeprefix("Flax")


def controlnet_folders(path: str) -> list[str]:
  """The ControlNet folders of a diffusers ControlNet pipeline folder (StableDiffusionControlNetPipeline's,
  StableDiffusionXLControlNetPipeline's, ...), in order, as diffusers loads them: controlnet/ for a ControlNetModel,
  controlnet/, controlnet_1/, controlnet_2/, ... while they exist for a MultiControlNetModel; [] for a folder whose
  model_index.json names none. A ValueError for ControlNet kinds jaxsd does not run (ControlNet-XS, Union, SD3's),
  a FileNotFoundError when controlnet/ is missing."""
  kind = controlnet_class(path)
  if kind is None:
    return []
  if kind not in CONTROLNET_CLASSES:
    raise ValueError(f"{path}: model_index.json's controlnet is a {kind}; jaxsd runs diffusers ControlNetModel "
                     "ControlNets (one, or several as a MultiControlNetModel).")
  first = os.path.join(path, "controlnet")
  if not os.path.isdir(first):
    raise FileNotFoundError(f"model folder {path!r} is incomplete: model_index.json names a {kind}, but there is no "
                            "controlnet/.")
  folders = [first]
  while kind == "MultiControlNetModel" and os.path.isdir(controlnet_dir(path, len(folders))):
    folders.append(controlnet_dir(path, len(folders)))
  return folders


def controlnet_dir(path: str, k: int) -> str:
  """ControlNet k's folder in a pipeline folder: controlnet/, then controlnet_1/, ... (MultiControlNetModel's)."""
  return os.path.join(path, "controlnet" if k == 0 else f"controlnet_{k}")


def write_controlnet_index(path: str, own_class: str | None, n: int) -> None:
  """Makes the plain pipeline's model_index.json just written in `path` that of a ControlNet pipeline with n
  ControlNets saved in `controlnet_dir(path, k)`, as diffusers' save_pretrained writes it: "controlnet":
  ["diffusers", "ControlNetModel"] (n = 1) or "MultiControlNetModel"; the pipeline class `own_class` where that is
  one of CONTROLNET_PIPELINES' (a folder loaded as StableDiffusionControlNetInpaintPipeline stays one), else the
  ControlNet pipeline of the class written. Folders controlnet_n/, ... left by an earlier save with more ControlNets
  are removed: MultiControlNetModel.from_pretrained would load them too."""
  file = os.path.join(path, "model_index.json")
  index = read_json(file)
  written, own = index["_class_name"], str(own_class or "").removeprefix("Flax")
  xl = written.startswith("StableDiffusionXL")
  if own in CONTROLNET_PIPELINES.values() and own.startswith("StableDiffusionXL") == xl:
    index["_class_name"] = own
  else:
    index["_class_name"] = CONTROLNET_PIPELINES.get(
        written, CONTROLNET_PIPELINES["StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"])
  index["controlnet"] = ["diffusers", CONTROLNET_CLASSES[n > 1]]
  write_json_object(file, index, indent=2, sort_keys=True)
  k = max(n, 1)
  while os.path.isdir(controlnet_dir(path, k)):
    log.warning("%s: removing %s, left by an earlier save with more ControlNets.", path, controlnet_dir(path, k))
    shutil.rmtree(controlnet_dir(path, k))
    k += 1


def _listing(folder: str) -> list[tuple[str, int, int]]:
  """(relative path, size, mtime in ns) of every file under `folder`: what a copy with copy2 keeps."""
  out = []
  for root, _, files in os.walk(folder):
    for f in files:
      st = os.stat(os.path.join(root, f))
      out.append((os.path.relpath(os.path.join(root, f), folder), st.st_size, st.st_mtime_ns))
  return sorted(out)


def copy_components(src: str, dst: str, names: tuple[str, ...]) -> None:
  """Copies the named component folders of `src` into `dst` where dst has no copy of the same files (names, sizes,
  modification times: a copy cut short, or one of an init folder repaired or replaced since, is made again), each
  whole or not at all (into a temporary folder, then renamed); a network training exported there (its
  STEP_FILE) is left as it is. Writes dst's model_index.json."""
  os.makedirs(dst, exist_ok=True)
  for name in names:
    source, target = os.path.join(src, name), os.path.join(dst, name)
    if not os.path.isdir(source) or os.path.exists(os.path.join(target, STEP_FILE)):
      continue  # (a network the run trained and exported, e.g. the text encoder with train_text_encoder)
    if os.path.isdir(target) and _listing(source) == _listing(target):
      continue
    if os.path.exists(target):
      log.warning("%s differs from %s: copying it again.", target, source)
    tmp = target + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    old = target + ".old"
    if os.path.exists(target):
      shutil.rmtree(old, ignore_errors=True)
      os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
  write_model_index(dst, *index_classes(src))


# --- training workdirs ---------------------------------------------------------------------------


def model_dir(workdir: str) -> str:
  return os.path.join(workdir, "model")


def is_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(model_dir(path), "unet"))  # a workdir's own unet/ holds checkpoints


def write_step(component_dir: str, step: int) -> None:
  write_json_object(os.path.join(component_dir, STEP_FILE), {"step": int(step)})


def exported_step(component_dir: str) -> int:
  """The training step an exported network holds; -1 when the folder does not say."""
  path = os.path.join(component_dir, STEP_FILE)
  if not os.path.exists(path):
    return -1
  with open(path) as f:
    return json.load(f)["step"]


def latest_unet_checkpoint(workdir: str) -> tuple[int, str] | None:
  """(step, state folder) of the newest U-Net checkpoint of a workdir, or None."""
  ckpt_dir = os.path.join(workdir, "unet", "checkpoints")
  if not os.path.isdir(ckpt_dir):
    return None
  steps = sorted((int(d) for d in os.listdir(ckpt_dir) if d.isdigit()), reverse=True)
  for step in steps:
    state_dir = os.path.join(ckpt_dir, str(step), "state")
    if os.path.isdir(state_dir):
      return step, state_dir
  return None


def split_unet_params(params) -> tuple[Any, Any]:
  """(U-Net params, trained text-encoder params or None) from the U-Net stage's params."""
  if isinstance(params, dict) and set(params) == {"unet", "text_encoder"}:
    return params["unet"], params["text_encoder"]
  return params, None


def read_unet_checkpoint(state_dir: str) -> tuple[Any, Any, bool]:
  """(U-Net params, text-encoder params or None, whether they are the EMA) of a U-Net checkpoint.

  The text encoder is there when it was trained with the U-Net (config.unet.train_text_encoder).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # only workdirs need it
  from etils import epath  # orbax's path type

  ckptr = ocp.StandardCheckpointer()
  # Onto this process's first device: without a target orbax restores onto the shardings it was saved with, and
  # a checkpoint written on 8 devices is refused on 1 ("Topology mismatch"), so the exported U-Net was used
  # instead and 1 device gave other images than 8. Plain dicts (no TrainState) are enough for the params.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  saved = ocp.StandardCheckpointHandler().metadata(
      epath.Path(state_dir)).tree  # quietly (StandardCheckpointer.metadata warns here)
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)
                        if hasattr(m, "shape") else m, saved)
  state = ckptr.restore(state_dir, target)
  unet, text = split_unet_params(state.get("ema_params") or state["params"])
  return unet, text, bool(state.get("ema_params"))
