"""The run's config read before any work: the settings the stages derive from it. (Refusals of bad configs go
through the whole driver, before any work: tests/training/test_run.py.)"""

import importlib
import types

import numpy as np

from jaxsd.training import run, run_config


def test_a_cosine_schedule_follows_the_stages_steps():
  """The default config's `total_steps` 0 is the stage's `steps`: raising --config.unet.steps stretches the decay
  (it used to stop at the config's 1,500 and stay at the floor); an explicit total_steps still wins; a section without the key is the same as 0."""
  cfg = importlib.import_module("train.configs.default").get_config()
  cfg.unet.steps = 4000
  opt = run_config.optimizer_settings(cfg, "unet")
  assert opt["total_steps"] == 4000 and cfg.unet.optimizer.total_steps == 0  # the config itself untouched
  schedule = run._optimizer(cfg, types.SimpleNamespace(name="unet"))[1]
  lr = cfg.unet.optimizer.lr
  assert float(schedule(2000)) > 0.5 * lr  # mid-way through the decay, not at its floor
  np.testing.assert_allclose(float(schedule(4000)), 0.1 * lr, rtol=1e-6)
  assert run_config.optimizer_settings(cfg, "lora")["total_steps"] == 4000  # LoRA and ControlNet: the unet section
  cfg.unet.optimizer.total_steps = 3000
  assert run_config.optimizer_settings(cfg, "unet")["total_steps"] == 3000
  for stage in ("clip", "vae"):
    assert run_config.optimizer_settings(cfg, stage)["total_steps"] == cfg[stage].steps
  del cfg.vae.optimizer["total_steps"]  # a hand-written section without the key: the stage's steps, not 10,000
  assert run_config.optimizer_settings(cfg, "vae")["total_steps"] == cfg.vae.steps


def test_mesh_devices_are_every_device_or_the_first_n_of_one_process(monkeypatch):
  """config.mesh.devices: -1 (the default) every device, N the first N; out of range, not a whole number, or with
  several processes (each process has its own devices) refused in one line naming the setting."""
  import jax
  import pytest

  cfg = importlib.import_module("train.configs.default").get_config()
  assert run_config.mesh_devices(cfg) == jax.devices()
  cfg.mesh.devices = 3
  assert run_config.mesh_devices(cfg) == jax.devices()[:3]
  for bad in (0, -2, len(jax.devices()) + 1):  # (ml_collections refuses a value of another type itself)
    cfg.mesh.devices = bad
    with pytest.raises(run.ConfigError, match=f"config.mesh.devices={bad!r}: use -1 for every device"):
      run_config.mesh_devices(cfg)
  cfg.mesh.devices = 2
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(run.ConfigError, match="config.mesh.devices=2: a run of 2 processes uses every device"):
    run_config.mesh_devices(cfg)
  cfg.mesh.devices = -1
  assert run_config.mesh_devices(cfg) == jax.devices()
