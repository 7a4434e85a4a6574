"""Hugging Face Hub model ids ("stabilityai/stable-diffusion-2-1", "owner/name@revision") as local folders: what
diffusers' `from_pretrained` takes besides a path.

A path that exists is used as it is. A name of the form owner/name that is no path here is looked up as
huggingface_hub's `snapshot_download` does it: in the local Hugging Face cache (HF_HOME / HF_HUB_CACHE, where
diffusers and transformers keep their downloads) when the Hub cannot be reached or HF_HUB_OFFLINE=1 is set, and
on the Hub otherwise, downloading into that cache what is missing. Only the files jaxsd reads are fetched:
model_index.json and the JSON / text files of each network, tokenizer and scheduler folder jaxsd loads (a
ControlNet pipeline's controlnet/, controlnet_1/, ... too), and the weight files `model_folder.pick_weight_files`
picks in each network folder (the variant's where the network has them, else the default ones); not a
repository's single-file checkpoints, safety checker, image encoder, ONNX or other variants' copies. A repository
without model_index.json is one network (a ControlNet): its top folder is read the same way.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from collections.abc import Callable

from jaxsd import model_folder

log = logging.getLogger(__name__)

# Folders of a pipeline repository that jaxsd reads (SD 1.x / 2.x and SDXL pipelines).
FOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
_FILE_ENDINGS = (".safetensors", ".ckpt", ".bin", ".pt", ".pth", ".json")  # paths of files, not repository names
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")


def is_repo_id(name: str) -> bool:
  """Whether `name` has the form of a Hub model id (owner/name, optionally @revision)."""
  return bool(_REPO_ID.fullmatch(name)) and ".." not in name and not name.endswith(_FILE_ENDINGS)


def resolve(name: str | os.PathLike, *, variant: str | None = None, allow_pickle: bool = False,
            select: Callable[[set[str]], list[str]] | None = None) -> str:
  """`name` itself when it exists here or is no Hub id; else the local folder of the Hub model `name` (see the
  module docstring). A FileNotFoundError in one line when it is neither here, nor cached, nor downloadable.
  `select(files)` picks the files to fetch from the repository's listing instead (a LoRA repository's adapter)."""
  path = os.fspath(name)
  if os.path.exists(os.path.expanduser(path)) or not is_repo_id(path):
    return path
  repo_id, _, revision = path.partition("@")
  import huggingface_hub
  from huggingface_hub import constants

  revision = revision or None
  reason = "HF_HUB_OFFLINE is set, so the Hub was not asked"
  if not constants.HF_HUB_OFFLINE:
    try:
      info = huggingface_hub.model_info(repo_id, revision=revision)  # one request, no retries (list_repo_files has)
      files = {f.rfilename for f in info.siblings or ()}
      if select:
        return huggingface_hub.snapshot_download(repo_id, revision=info.sha or revision,
                                                 allow_patterns=_exactly(select(files)))
      return _download(repo_id, info.sha or revision, files, variant, allow_pickle)
    except Refused:
      raise
    except Exception as e:  # no network, no such repository or revision, a gated one without a token, ...
      reason = f"the Hub could not give it ({_first_line(e)})"
  try:
    return huggingface_hub.snapshot_download(repo_id, revision=revision, local_files_only=True)
  except Exception:
    raise FileNotFoundError(
        f"{path!r} does not exist here and is not a model in the Hugging Face cache ({constants.HF_HUB_CACHE}); "
        f"{reason}. Pass a local folder, or a Hub model id that can be downloaded.") from None


class Refused(ValueError):
  """The repository holds nothing jaxsd may fetch (only pickled weights, several candidate files, ...)."""


def _first_line(e: Exception) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= 300 else text[:297] + "..."


def _download(repo_id: str, revision: str | None, files: set[str], variant: str | None, allow_pickle: bool) -> str:
  import huggingface_hub

  pipeline = "model_index.json" in files
  folders = [f for f in FOLDERS if any(n.startswith(f + "/") for n in files)] if pipeline else [""]
  if pipeline:  # a ControlNet pipeline's ControlNets (MultiControlNetModel: controlnet/, controlnet_1/, ...)
    folders += sorted({n.split("/")[0] for n in files if re.fullmatch(r"controlnet(_[1-9][0-9]*)?/[^/]+", n)})
  in_folder = lambda folder, n: os.path.dirname(n) == folder  # noqa: E731
  small = [n for n in files if n.endswith((".json", ".txt")) and any(in_folder(f, n) for f in folders + [""])]
  snapshot = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=_exactly(small))
  weights = []
  for folder in folders:
    join = lambda n: os.path.join(folder, n) if folder else n  # noqa: E731

    def read_index(n: str) -> dict:
      with open(os.path.join(snapshot, join(n))) as f:
        return json.load(f)

    exists = lambda n: join(n) in files  # noqa: E731
    picked = variant and model_folder.pick_weight_files(exists, read_index, variant)
    picked = picked or model_folder.pick_weight_files(exists, read_index)
    if picked is None:
      continue  # a tokenizer or scheduler folder (a network without weights is named by the loader)
    if picked.fmt == "pickle" and not allow_pickle:
      raise Refused(f"{repo_id}: {folder or 'the repository'} has only pickled .bin weights, which can run code "
                    "when read: pass allow_pickle=True (--allow-pickle on the command line) to download and read "
                    "them, if you trust the repository.")
    weights += [join(n) for n in picked.files]
  log.info("%s: fetching %d weight files (%s) into the Hugging Face cache if missing.", repo_id, len(weights),
           ", ".join(weights))
  return huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=_exactly(small + weights))


def _exactly(names: list[str]) -> list[str]:
  """fnmatch patterns that match exactly these file names."""
  return [glob.escape(n) for n in names] or ["model_index.json", "config.json"]
