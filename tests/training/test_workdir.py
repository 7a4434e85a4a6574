"""One run at a time in a workdir, one config per workdir (jaxsd/training/workdir.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jaxsd.training import workdir
from train.configs import smoke


def test_a_second_run_is_refused_while_the_first_holds_the_workdir(tmp_path):
  """Two runs at once in one workdir killed each other's checkpoints (both exited 1 with tracebacks)."""
  holder = subprocess.Popen([
      sys.executable, "-c", "import sys, time; from jaxsd.training import workdir; "
      f"cm = workdir.lock({str(tmp_path)!r}); cm.__enter__(); print('held', flush=True); time.sleep(60)"
  ], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(workdir.WorkdirError, match=rf"is in use by another run \(pid {holder.pid} on "):
      with workdir.lock(str(tmp_path)):
        pass
  finally:
    holder.kill()  # kill -9: the OS releases the lock
    holder.wait()
  with workdir.lock(str(tmp_path)):  # free again
    pass
  with workdir.lock(str(tmp_path)):  # and again in the same process (the first released it)
    pass


def test_a_rerun_with_settings_that_change_the_training_is_refused(tmp_path):
  """A rerun resumed the old run's checkpoints under another seed, dataset or batch size (exit 0, a mixed run,
  or a traceback inside the compiled step); settings that do not change what is computed may differ."""
  cfg = smoke.get_config()
  (tmp_path / "config.json").write_text(cfg.to_json_best_effort(indent=2))
  for key, value in (("log_every", 7), ("checkpoint_every", 3), ("stages", "clip"), ("unet.steps", 99),
                     ("eval.fid_images", 10), ("data.num_threads", 1), ("mesh.fsdp", 2), ("unet.sampler", "ddim")):
    other = smoke.get_config()
    other.update_from_flattened_dict({key: value})
    workdir.check_same_config(other.to_json_best_effort(), str(tmp_path))
  for key, value in (("seed", 1), ("vae.batch_size", 8), ("data.name", "shapes/64x64"), ("unet.optimizer.lr", 2e-3),
                     ("dtype", "bfloat16")):
    other = smoke.get_config()
    other.update_from_flattened_dict({key: value})
    with pytest.raises(workdir.WorkdirError, match=rf"was started with another config \({key}: .* -> "):
      workdir.check_same_config(other.to_json_best_effort(), str(tmp_path))
  d = json.loads((tmp_path / "config.json").read_text())  # a key one version has and the other not: not compared
  d["unet"]["a_key_of_another_version"] = 1
  (tmp_path / "config.json").write_text(json.dumps(d))
  workdir.check_same_config(smoke.get_config().to_json_best_effort(), str(tmp_path))
  assert not os.path.exists(tmp_path / "other")


def test_a_workdir_that_recorded_a_relative_init_resumes(tmp_path, monkeypatch):
  """Workdirs started before config.init was made absolute recorded it as given (relative): a rerun from the same
  directory, whose init is now absolute, is the same run; another folder is not."""
  monkeypatch.chdir(tmp_path)
  old = smoke.get_config()
  old.init = "models/sd"
  (tmp_path / "config.json").write_text(old.to_json_best_effort(indent=2))
  rerun = smoke.get_config()
  rerun.init = str(tmp_path / "models" / "sd")
  workdir.check_same_config(rerun.to_json_best_effort(), str(tmp_path))
  rerun.init = str(tmp_path / "models" / "other")
  with pytest.raises(workdir.WorkdirError, match="init: "):
    workdir.check_same_config(rerun.to_json_best_effort(), str(tmp_path))


def test_a_run_killed_while_recording_its_config_still_refuses_another(tmp_path, monkeypatch):
  """config.json was written in place: a kill while a rerun rewrote it left it cut short, and the next run, unable
  to read it, only warned and resumed the checkpoints under whatever config it was given. It is replaced whole."""
  import builtins

  from jaxsd.training import run
  from jaxsd.training.run_config import ConfigError

  monkeypatch.setattr(run, "ensure_dataset", lambda cfg: None)
  monkeypatch.setattr(run, "_check_test_split", lambda cfg, names: None)
  monkeypatch.setattr(run, "_run_stages", lambda cfg, wd, names: {})  # the stages are not what is tested
  wd = str(tmp_path / "run")
  run.train_and_evaluate(smoke.get_config(), wd)
  real_open = builtins.open

  class Killed:  # half of what is written reaches the file, then the process is gone

    def __init__(self, f):
      self.f = f

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.f.close()

    def write(self, text):
      self.f.write(text[:len(text) // 2])
      raise KeyboardInterrupt

  def open_(file, mode="r", *a, **k):
    f = real_open(file, mode, *a, **k)
    return Killed(f) if "w" in mode and os.path.basename(str(file)).startswith("config.json") else f

  rerun = smoke.get_config()
  rerun.log_every = 7  # free to change: the rerun records its config again
  monkeypatch.setattr(builtins, "open", open_)
  with pytest.raises(KeyboardInterrupt):
    run.train_and_evaluate(rerun, wd)
  monkeypatch.setattr(builtins, "open", real_open)
  other = smoke.get_config()
  other.seed = 1
  with pytest.raises(ConfigError, match=r"was started with another config \(seed: 0 -> 1\)"):
    run.train_and_evaluate(other, wd)
