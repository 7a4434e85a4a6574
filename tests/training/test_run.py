"""End to end: the smoke config through clip -> vae -> unet, fine-tuning a diffusers folder, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

import jaxsd
from jaxsd.training import run
from tests import reference
from train.configs import smoke

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _cfg(data_dir, **updates):
  cfg = smoke.get_config()
  cfg.data.data_dir = data_dir
  cfg.update_from_flattened_dict(updates)
  return cfg


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("workdir"))
  return workdir, run.train_and_evaluate(_cfg(data_dir), workdir)


def test_default_stages_run_end_to_end(trained):
  workdir, results = trained
  assert results["clip"]["steps"] == 6 and results["vae"]["steps"] == 6 and results["unet"]["steps"] == 6
  assert 0 <= results["clip"]["clip_i2t_accuracy"] <= 1 and results["clip"]["clip_eval_examples"] == 100
  assert np.isfinite(results["vae"]["vae_test_mse"]) and results["vae"]["scaling_factor"] > 0
  pm = results["prompt_match"]
  assert len(pm["rows"]) == 18 and 0 <= pm["both_accuracy"] <= 1
  assert pm["rows"][-1]["prompt"] == "an orange triangle"
  for stage in ("clip", "vae", "unet"):
    lines = [json.loads(line) for line in open(os.path.join(workdir, stage, "metrics.jsonl"))]
    losses = [m["loss"] for m in lines if "loss" in m]
    assert losses and all(np.isfinite(losses))
  assert os.path.exists(os.path.join(workdir, "report.md"))
  assert os.path.exists(os.path.join(workdir, "samples", "prompt_match_grid.png"))


def test_exported_model_loads_in_diffusers_and_jaxsd(trained):
  import diffusers

  workdir, _ = trained
  model = os.path.join(workdir, "model")
  tpipe = diffusers.StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
  pipe = jaxsd.StableDiffusion.from_pretrained(model)
  latents = np.asarray(pipe.noise(0, 1, 32, 32))
  ours = pipe(["a red circle"], height=32, width=32, steps=3, sampler="ddim", latents=latents, output="latent")
  tpipe.scheduler = diffusers.DDIMScheduler.from_config(tpipe.scheduler.config, clip_sample=False)
  with torch.no_grad():
    ref = tpipe(["a red circle"], height=32, width=32, num_inference_steps=3, guidance_scale=7.5,
                latents=reference.nhwc_to_nchw(latents), output_type="latent").images
  np.testing.assert_allclose(ours, reference.nchw_to_nhwc(ref), atol=1e-4 * max(1, np.abs(ours).max()))
  # `python -m sample --model <workdir>` reads the same model (the U-Net from the newest checkpoint's EMA).
  from_workdir = jaxsd.pipeline.load(workdir)
  for a, b in zip(jax.tree.leaves(from_workdir.unet_params), jax.tree.leaves(pipe.unet_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rerun_skips_finished_stages(trained, data_dir):
  workdir, first = trained
  again = run.train_and_evaluate(_cfg(data_dir, stages="clip,vae"), workdir)
  assert again["clip"] == first["clip"] and again["vae"] == first["vae"]


def test_finetune_from_a_diffusers_folder(data_dir, tmp_path):
  import diffusers

  init = reference.make_tiny_sd_folder(str(tmp_path / "init"))
  workdir = str(tmp_path / "ft")
  cfg = _cfg(data_dir, init=init)
  cfg.unet.steps = cfg.unet.optimizer.total_steps = 3
  results = run.train_and_evaluate(cfg, workdir)
  assert set(results) >= {"unet"} and "clip" not in results and results["unet"]["steps"] == 3
  before = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(init, "unet"))
  after = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(workdir, "model", "unet"))
  changed = [k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
  assert len(changed) > 0.9 * len(before.state_dict())  # trained, and every key loaded back
  diffusers.StableDiffusionPipeline.from_pretrained(os.path.join(workdir, "model"), safety_checker=None)


def test_benchmark_mode_reports_throughput(data_dir, tmp_path):
  cfg = _cfg(data_dir, benchmark_steps=2, stages="unet")
  cfg.init = reference.make_tiny_sd_folder(str(tmp_path / "init"))
  figures = run.train_and_evaluate(cfg, str(tmp_path / "bench"))
  assert figures["images_per_sec"] > 0 and figures["compile_seconds"] > 0 and figures["devices"] == 8
  assert figures["tflops_per_device"] > 0


@pytest.mark.parametrize("updates,message", [
    ({"stages": "clip,gan"}, "subset of clip,vae,unet"),
    ({"clip.batch_size": 12}, "not divisible by the 8 devices"),
    ({"data.image_size": 20}, "multiple of 8"),
    ({"init": "/nonexistent/sd"}, "does not exist"),
    ({"data.name": "not_prepared_dataset"}, "is not prepared"),
    ({"mesh.fsdp": 3}, "must divide the 8 devices"),
    ({"dtype": "float8"}, "choose one of"),
])
def test_bad_config_is_refused_before_any_work(data_dir, tmp_path, updates, message):
  with pytest.raises(run.ConfigError if "dtype" not in updates else ValueError, match=message):
    cfg = _cfg(data_dir, **updates)
    if "data.image_size" in updates:
      cfg.clip.vision.image_size = updates["data.image_size"]
    run.train_and_evaluate(cfg, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "clip")


def test_init_folder_that_is_not_a_model(data_dir, tmp_path):
  (tmp_path / "half" / "unet").mkdir(parents=True)
  with pytest.raises(run.ConfigError, match="not a diffusers Stable Diffusion folder"):
    run.train_and_evaluate(_cfg(data_dir, init=str(tmp_path / "half")), str(tmp_path / "w"))


def test_missing_caption_key(data_dir, tmp_path):
  with pytest.raises(run.ConfigError, match="caption_key='text' is not a feature.*caption"):
    run.train_and_evaluate(_cfg(data_dir, **{"data.caption_key": "text"}), str(tmp_path / "w"))


def test_cli_unknown_config_key(tmp_path):
  r = subprocess.run([sys.executable, "-m", "train", "--workdir", str(tmp_path), "--config.unet.stepz=3"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and "stepz" in r.stderr and "Traceback" not in r.stderr
