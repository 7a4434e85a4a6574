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
from tests.training import ONE_DEVICE
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
  cfg.update_from_flattened_dict({**ONE_DEVICE, **updates})
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
  reference.assert_matches_and_moves(pipe, PROMPTS, HW, 5.0, latents, ref, base, "the trained SDXL adapter")


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


def test_dreambooth_sdxl_batches_carry_both_tokenizers_and_the_size_conditioning(tmp_path):
  """SDXL DreamBooth batches (diffusers' train_dreambooth_lora_sdxl.py): instance and class rows with the second
  tokenizer's ids of their prompt, each image's size before resizing and the crop's top-left, the crop's left
  counted in the flipped image when flipped (diffusers flips, then crops)."""
  from PIL import Image

  from jaxsd import tokenizer as tok
  from jaxsd.training import dreambooth

  sizes = {"a.png": (16, 24), "b.png": (40, 16), "c.png": (20, 20)}  # (height, width)
  for name, (h, w) in sizes.items():
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / name)
  paths = sorted(str(tmp_path / n) for n in sizes)
  tokenizer = tok.load_tokenizer()
  for center, flip in ((True, False), (False, True)):
    it = iter(
        dreambooth.make_dataset(paths, "a photo of sks dog", class_images=paths[:2], class_prompt="a photo of dog",
                                tokenizer=tokenizer, tokenizer_2=tokenizer, image_size=16, global_batch_size=3,
                                center_crop=center, random_flip=flip, max_length=77))
    for _ in range(2):
      b = next(it)
      want = tok.tokenize(tokenizer, ["a photo of sks dog"] * 3 + ["a photo of dog"] * 3, max_length=77)
      np.testing.assert_array_equal(b["input_ids_2"], want)
      for size, (top, left) in zip(b["original_size"], b["crop_top_left"]):
        h, w = size
        assert (int(h), int(w)) in sizes.values()
        rh, rw = max(16, round(h * 16 / min(h, w))), max(16, round(w * 16 / min(h, w)))  # resized, shorter side 16
        assert 0 <= top <= rh - 16 and 0 <= left <= rw - 16
        if center:
          assert (top, left) == ((rh - 16) // 2, (rw - 16) // 2)


@pytest.mark.slow  # a training run with class images drawn first: ~60 s of CPU
def test_dreambooth_sdxl_draws_class_images_and_trains_an_adapter_diffusers_loads(folders, pipes, tmp_path):
  """`lora.py:dreambooth_sdxl` on the tiny SDXL base: the class images are drawn by jaxsd's SDXL pipeline, a few
  steps on instance + class batches train the U-Net adapter, and diffusers' StableDiffusionXLPipeline loads the
  file (its latents move from the base model's)."""
  from PIL import Image

  instance = tmp_path / "instance"
  instance.mkdir()
  for i, (h, w) in enumerate([(16, 24), (40, 16), (16, 16)]):
    Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(instance / f"{i}.png")
  cfg = lora_config.get_config("dreambooth_sdxl")
  cfg.init, cfg.dtype = folders.base, "float32"
  cfg.update_from_flattened_dict(ONE_DEVICE)
  cfg.data.image_size = SIZE
  cfg.log_every, cfg.checkpoint_every, cfg.progress = 1, 2, False
  cfg.eval.judge = False
  cfg.unet.update(steps=2, batch_size=8, gradient_checkpointing=False, sample_steps=2)
  cfg.unet.optimizer.update(lr=1e-2, total_steps=2)
  cfg.dreambooth.update(instance_data_dir=str(instance), instance_prompt="a photo of sks square",
                        with_prior_preservation=True, class_prompt="a photo of a square", num_class_images=2,
                        sample_batch_size=2)
  workdir = str(tmp_path / "db")
  r = run.train_and_evaluate(cfg, workdir)["lora"]
  assert r["steps"] == 2
  assert sorted(
      f for f in os.listdir(os.path.join(workdir, "class_images")) if f.endswith(".png")) == ["00000.png", "00001.png"]
  base, ref = _theirs(pipes, None), _theirs(pipes, r["file"])
  assert np.abs(ref - base).max() > 1e-3
