"""What may be a workdir; one run at a time in a workdir, and one config per workdir.

A workdir holds the checkpoints, exports and results of one training run, however often it is interrupted and
started again. Two processes writing one workdir at once overwrite each other's checkpoints, and a rerun whose
config differs in what the training computes (batch size, seed, data, networks, optimizer, ...) would resume
the old run's checkpoints under new settings: a mixed run that its config.json would then misdescribe. So a
run holds a lock on `<workdir>/.jaxsd.lock` while it works (released by the OS when the process dies, kill -9
included), and a rerun is compared with the `config.json` the workdir was started with: only settings that do
not change what is computed (`FREE`) may differ. It is a folder of its own (`check_workdir`): not a file, not a
model folder (the run's config.json would replace a network's) and not inside the init folder it starts from.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
from typing import Any, Iterator

from jaxsd.files import written_whole

log = logging.getLogger(__name__)

LOCK_FILE = ".jaxsd.lock"
CONFIG_FILE = "config.json"
# Keys (dotted; a trailing "." is a prefix) that may differ between the runs of one workdir: logging,
# checkpoint cadence, progress, the stage list, the device mesh, threads, where the prepared data lies, the
# evaluation and sampling of results, and a stage's length (a finished stage stays finished at its own step).
FREE = ("log_every", "checkpoint_every", "max_to_keep", "progress", "stages", "benchmark_steps", "mesh.", "eval.",
        "data.num_threads", "data.data_dir", "distributed")
_FREE_IN_STAGE = ("steps", "optimizer.total_steps", "sample_every", "sample_prompts", "sample_steps", "sampler",
                  "guidance_scale", "sample_batch_size", "eval_examples")
_STAGES = ("clip", "vae", "unet", "lora", "controlnet", "dreambooth")


class WorkdirError(ValueError):
  """The workdir cannot take this run (in use, or started with another config)."""


def check_workdir(workdir: str, init: str | None = None) -> None:
  """A WorkdirError when `workdir` cannot be a run's folder (creates nothing): a file, or under one; a model folder
  (a run writes its config.json, model/ and checkpoints there); the init folder or a folder inside it."""
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"workdir {workdir} is a file, not a folder: give a folder for the run.")
  if init and os.path.commonpath([path, os.path.abspath(init)]) == os.path.abspath(init):
    raise WorkdirError(f"workdir {workdir} is inside config.init={init!r}: the run would write into the model it "
                       "starts from; give a folder of its own.")
  if os.path.isdir(path):
    held = [f for f in ("model_index.json", "config.json") if os.path.isfile(os.path.join(path, f))]
    if "model_index.json" in held or ("config.json" in held and _is_model_config(os.path.join(path, "config.json"))):
      raise WorkdirError(f"workdir {workdir} is a model folder (it holds {held[0]}): a run writes its own config.json, "
                         "model/ and checkpoints there; give a new folder, or a training run's.")
  while not os.path.exists(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise WorkdirError(f"workdir {workdir}: {path} is a file, so the folder cannot be made there.")


def _is_model_config(path: str) -> bool:
  """Whether a config.json is a diffusers / transformers network's (a run's own holds the training config)."""
  try:
    with open(path) as f:
      d = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(d, dict) and any(k in d for k in ("_class_name", "_diffusers_version", "architectures"))


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(d, dict):
    return {prefix[:-1]: d}
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}."))
  return out


def _free(key: str) -> bool:
  if any(key == f or (f.endswith(".") and key.startswith(f)) for f in FREE):
    return True
  stage, _, rest = key.partition(".")
  return stage in _STAGES and rest in _FREE_IN_STAGE


def changed_settings(old: dict, new: dict) -> list[str]:
  """"key: old -> new" for the settings both configs have that differ and are not FREE (keys only one has, e.g.
  of another jaxsd version, are not compared)."""
  a, b = _flat(old), _flat(new)
  if isinstance(a.get("init"), str) and a["init"] and not os.path.isabs(a["init"]):
    # Runs before 2026-12-06 recorded the init as given; it is absolute now. Taken from the rerun's directory.
    a["init"] = os.path.abspath(os.path.expanduser(a["init"]))
  return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in sorted(a.keys() & b.keys()) if a[k] != b[k] and not _free(k)]


def check_same_config(config_json: str, workdir: str) -> None:
  """A WorkdirError when `workdir` was started with a config that computes otherwise than `config_json`."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    return
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, ValueError):
    log.warning("%s cannot be read: not compared with this run's config.", path)
    return
  changed = changed_settings(old, json.loads(config_json)) if isinstance(old, dict) else []
  if changed:
    shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
    raise WorkdirError(f"workdir {workdir} was started with another config ({shown}): its checkpoints would resume "
                       "under new settings. Rerun with the settings it was started with, or give a new workdir.")


def write_config(config_json: str, workdir: str) -> None:
  """Records the run's config in the workdir, whole or not at all (a temporary file, then `os.replace`): a kill
  while writing it used to leave a cut-short config.json, which the next run cannot compare with its own."""
  with written_whole(os.path.join(workdir, CONFIG_FILE)) as tmp, open(tmp, "w") as f:
    f.write(config_json)


@contextlib.contextmanager
def lock(workdir: str, enabled: bool = True) -> Iterator[None]:
  """Holds `<workdir>/.jaxsd.lock` while the run works; a WorkdirError when another process holds it."""
  if not enabled:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
      raise WorkdirError(f"workdir {workdir} is in use by another run ({holder}): two runs in one workdir overwrite "
                         "each other's checkpoints; wait for it to end, or stop it first.") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock
