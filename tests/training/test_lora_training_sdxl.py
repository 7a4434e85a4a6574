"""`train/configs/lora.py:sdxl` on a tiny random SDXL folder saved by diffusers: a few steps train adapters on the
U-Net and (lora.train_text_encoder) both text encoders; the written pytorch_lora_weights.safetensors loads unchanged
with diffusers' StableDiffusionXLPipeline.load_lora_weights and gives diffusers the latents jaxsd gives with it,
and the kohya export names the layers as sd-scripts does for SDXL (sgm U-Net names, lora_te1_ / lora_te2_) and
loads in diffusers too."""

from __future__ import annotations

import os
import types

import diffusers
import numpy as np
import pytest
import safetensors.numpy
import torch

import jaxsd
from jaxsd import lora
from jaxsd.training import run
from tests import reference
from train.configs import lora as lora_config

SIZE, STEPS, HW = 16, 3, 16
PROMPTS = ["picture number 3", "a small blue square"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("sdxl_lora")
  base, _, _ = reference.make_tiny_sdxl_folders(str(root / "models"))
  data, name, _ = reference.captioned_image_folder(str(root), [(16, 24), (40, 16), (16, 16), (24, 32)] * 2)
  return types.SimpleNamespace(base=base, data=data, name=name)


def _cfg(folders, **updates):
  cfg = lora_config.get_config("sdxl")
  cfg.init = folders.base
  cfg.dtype = "float32"
  cfg.data.update(name=folders.name, data_dir=folders.data, image_size=SIZE)
  cfg.log_every, cfg.checkpoint_every, cfg.progress = 1, STEPS, False
  cfg.eval.judge = False
  cfg.unet.update(steps=STEPS, batch_size=8, gradient_checkpointing=False)
  cfg.unet.optimizer.update(lr=1e-2, total_steps=STEPS)  # large, so that a few steps move the tiny model
  cfg.lora.train_text_encoder = True
  cfg.update_from_flattened_dict(updates)
  return cfg


@pytest.fixture(scope="module")
def trained(folders, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("lora"))
  return workdir, run.train_and_evaluate(_cfg(folders), workdir)["lora"]


@pytest.fixture(scope="module")
def pipes(folders):
  tpipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folders.base)
  tpipe.set_progress_bar_config(disable=True)
  pipe = jaxsd.StableDiffusionXL.from_pretrained(folders.base)
  latents = np.asarray(pipe.noise(0, len(PROMPTS), HW, HW))
  return tpipe, pipe, latents


def _theirs(pipes, file):
  tpipe, _, latents = pipes
  tpipe.unload_lora_weights()
  if file:
    tpipe.load_lora_weights(file)
  with torch.no_grad():
    out = tpipe(PROMPTS, height=HW, width=HW, num_inference_steps=3, guidance_scale=5.0,
                latents=reference.nhwc_to_nchw(latents), output_type="latent")
  return reference.nchw_to_nhwc(out.images)


@pytest.mark.slow  # a training run: ~90 s of CPU, most of it compiling the tiny SDXL step
def test_the_adapter_loads_in_diffusers_as_in_jaxsd(trained, pipes):
  """diffusers' latents with the trained file loaded by its load_lora_weights against jaxsd's with `pipe.load_lora`
  of the same file: within the SDXL pipeline tolerance (1e-4 of the latents' scale), and the adapter moves the
  latents far beyond it."""
  workdir, r = trained
  # U-Net: 8 transformer blocks (down 2, mid 2, up 2 x 2) x 2 attentions x 4 projections; each text encoder:
  # 3 layers x 4 attention projections.
  assert r["steps"] == STEPS and r["layers"] == 64 and r["file"] == os.path.join(workdir, "lora", lora.WEIGHT_NAME)
  assert r["text_encoder_layers"] == r["text_encoder_2_layers"] == 12
  sd = safetensors.numpy.load_file(r["file"])
  networks = {k.split(".")[0] for k in sd}
  assert len(sd) == 2 * (64 + 12 + 12) and networks == {"unet", "text_encoder", "text_encoder_2"}
  assert sum(v.size for v in sd.values()) == r["adapter_parameters"]
  # Each lora_B started at zero and moved, but in the first encoder's last layer: SDXL reads its penultimate layer.
  still = {k for k, v in sd.items() if "lora_B" in k and not np.abs(v).max()}
  assert still == {
      f"text_encoder.text_model.encoder.layers.2.self_attn.{p}.lora_B.weight" for p in ("q_proj", "k_proj", "v_proj",
                                                                                        "out_proj")
  }
  base, ref = _theirs(pipes, None), _theirs(pipes, r["file"])
  _, pipe, latents = pipes
  pipe.unload_lora()
  pipe.load_lora(os.path.dirname(r["file"]))
  ours = pipe(PROMPTS, height=HW, width=HW, steps=3, guidance_scale=5.0, sampler="euler", latents=latents,
              output="latent")
  tol = 1e-4 * max(1.0, np.abs(ref).max())
  diff = np.abs(ours - ref).max()
  print(f"max |jaxsd - diffusers| with the trained SDXL adapter: {diff:.2e} (tolerance {tol:.1e}); the adapter "
        f"moves diffusers' latents by {np.abs(ref - base).max():.2e}")
  assert diff < tol
  assert np.abs(ref - base).max() > 100 * tol


@pytest.mark.slow  # a training run: ~90 s of CPU, most of it compiling the tiny SDXL step
def test_kohya_export_has_sd_scripts_sdxl_names(trained, folders, pipes, tmp_path):
  """--config.lora.export_format=kohya (resuming the finished run's checkpoint: no training) writes the U-Net's
  layers under the sgm names (input_blocks / middle_block / output_blocks), the encoders' as lora_te1_ / lora_te2_,
  with an alpha each; diffusers loads it and draws what it draws with the PEFT file."""
  workdir = reference.reuse_checkpoints(trained[0], str(tmp_path / "kohya"), "lora")
  r = run.train_and_evaluate(_cfg(folders, **{"lora.export_format": "kohya"}), workdir)["lora"]
  sd = safetensors.numpy.load_file(r["file"])
  assert len(sd) == 3 * (64 + 12 + 12) and "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.alpha" in sd
  assert "lora_te2_text_model_encoder_layers_2_self_attn_out_proj.lora_up.weight" in sd
  assert {k.split("_")[2] for k in sd if k.startswith("lora_unet_")} == {"input", "middle", "output"}
  assert {k.split("_")[1] for k in sd} == {"unet", "te1", "te2"}
  np.testing.assert_allclose(_theirs(pipes, r["file"]), _theirs(pipes, trained[1]["file"]), rtol=0, atol=1e-6)
