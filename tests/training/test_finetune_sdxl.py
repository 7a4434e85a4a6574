"""`train/configs/finetune.py:sdxl` on a tiny random SDXL folder saved by diffusers: the time ids and prompt
embeddings the U-Net is trained with follow diffusers' train_text_to_image_sdxl.py, a few steps change the
U-Net and leave the rest as it was, the written folder loads in diffusers' StableDiffusionXLPipeline, and a
run stopped after a checkpoint and rerun exports the same U-Net, to the bit."""

from __future__ import annotations

import json
import os

import diffusers
import jax
import numpy as np
import pytest
import torch
from PIL import Image

from jaxsd import pretrained
from jaxsd import tokenizer as tok
from jaxsd.data import input_pipeline
from jaxsd.diffusion import SchedulerConfig
from jaxsd.training import latent_cache, run, stages
from tests import reference
from tests.training import ONE_DEVICE
from train.configs import finetune, smoke

SIZE = 16  # the tiny SDXL's VAE and U-Net each halve once: 16x16 images, 8x8 latents
# (height, width) of the source images: shorter side SIZE (crops check pixel for pixel) or larger (resized).
SHAPES = [(16, 24), (40, 16), (16, 16), (24, 32), (16, 33), (48, 20), (20, 20), (16, 40)] * 2
STEPS = 4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("sdxl")
  base, refiner, components = reference.make_tiny_sdxl_folders(str(root / "models"))
  data, name, sources = reference.captioned_image_folder(str(root), SHAPES)
  return dict(base=base, refiner=refiner, components=components, data=data, name=name, sources=sources)


def _config(folders, **updates):
  cfg = smoke.get_config()
  sdxl = finetune.get_config("sdxl")
  cfg.stages, cfg.init = "unet", folders["base"]
  cfg.data.update(name=folders["name"], data_dir=folders["data"], image_size=SIZE, random_crop=True, random_flip=True)
  cfg.unet.update(train_text_encoder=False, batch_size=8, steps=STEPS, caption_dropout=sdxl.unet.caption_dropout,
                  ema_decay=0.0, min_snr_gamma=0.0)
  cfg.unet.optimizer.update(total_steps=STEPS, warmup_steps=0, lr=1e-3)
  cfg.checkpoint_every = 2
  cfg.eval.judge = False
  cfg.update_from_flattened_dict({**ONE_DEVICE, **updates})
  return cfg


@pytest.fixture(scope="module")
def trained(folders, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("workdir"))
  return workdir, run.train_and_evaluate(_config(folders), workdir)


def test_time_ids_of_random_crops_follow_the_diffusers_recipe(folders):
  """Each image's time ids are diffusers' `original_size + crops_coords_top_left + target_size`: the size of
  the stored image, then where the training crop lies in it once resized (and flipped, as diffusers flips
  before it crops), found here by matching the crop's pixels."""
  tokenizer_2 = tok.load_tokenizer(os.path.join(folders["base"], "tokenizer_2"))
  pipe = input_pipeline.make_dataset(folders["name"], data_dir=folders["data"], global_batch_size=16, image_size=SIZE,
                                     random_crop=True, random_flip=True, size_conditioning=True,
                                     tokenizer_2=tokenizer_2, return_captions=True, num_threads=1)
  it = iter(pipe)
  batches = [next(it) for _ in range(3)]
  it.close()
  crops, flips = set(), 0
  for batch in batches:
    assert batch["input_ids_2"].shape == batch["input_ids"].shape == (16, 77)
    time_ids = np.asarray(stages.sdxl_time_ids(batch["original_size"], batch["crop_top_left"], (SIZE, SIZE)))
    for i, caption in enumerate(batch["caption"]):
      source = folders["sources"][str(caption)]
      h, w = source.shape[:2]
      top, left = (int(v) for v in batch["crop_top_left"][i])
      np.testing.assert_array_equal(time_ids[i], [h, w, top, left, SIZE, SIZE])  # compute_time_ids' order
      scale = SIZE / min(h, w)
      rh, rw = max(SIZE, round(h * scale)), max(SIZE, round(w * scale))
      assert 0 <= top <= rh - SIZE and 0 <= left <= rw - SIZE, (caption, top, left, rh, rw)
      if min(h, w) == SIZE:  # no resizing: the crop is the source's pixels at (top, left), flipped or not
        pixels = np.round((batch["image"][i] + 1) * 127.5)
        as_is = np.array_equal(pixels, source[top:top + SIZE, left:left + SIZE])
        flipped = np.array_equal(pixels, source[:, ::-1][top:top + SIZE, left:left + SIZE])
        assert as_is != flipped, f"{caption}: the crop is not at the recorded place ({top}, {left})"
        flips += flipped
      crops.add((top, left))
  assert len(crops) > 5 and flips > 0  # random places recorded, and flipped crops located in the flipped image


def test_prompt_embeddings_equal_diffusers_encode_prompt(folders):
  """`stages.sdxl_encode` (what the loss conditions on) against diffusers' StableDiffusionXLPipeline.encode_prompt,
  which train_text_to_image_sdxl.py's encode_prompt mirrors: penultimate states of both encoders, pooled of the
  second."""
  c = folders["components"]
  prompts = ["picture number 3", "", "a much longer caption about a red circle on a blue square"]
  pipe = diffusers.StableDiffusionXLPipeline(vae=c["vae"], text_encoder=c["text_encoder"],
                                             text_encoder_2=c["text_encoder_2"], tokenizer=c["tokenizer"],
                                             tokenizer_2=c["tokenizer_2"], unet=c["unet"], scheduler=c["scheduler"])
  with torch.no_grad():
    ref, _, ref_pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
  base = folders["base"]
  te, te_params = pretrained.load_text_encoder(os.path.join(base, "text_encoder"), projection=False)
  te2, te2_params = pretrained.load_text_encoder(os.path.join(base, "text_encoder_2"), projection=True)
  ids = tok.tokenize(tok.load_tokenizer(os.path.join(base, "tokenizer")), prompts)
  ids_2 = tok.tokenize(tok.load_tokenizer(os.path.join(base, "tokenizer_2")), prompts)
  context, pooled = stages.sdxl_encode(te, te2, {"text_encoder": te_params, "text_encoder_2": te2_params}, ids, ids_2)
  for name, ours, theirs in (("prompt_embeds", context, ref), ("pooled", pooled, ref_pooled)):
    diff = float(np.abs(np.asarray(ours) - theirs.numpy()).max())
    assert ours.shape == tuple(
        theirs.shape) and diff < 1e-5, f"{name}: max |diff| {diff}"  # measured 9.5e-7 (values up to 3.3)


@pytest.mark.slow
def test_a_few_steps_change_the_unet_and_the_folder_loads_in_diffusers(folders, trained):
  workdir, results = trained
  assert results["unet"]["steps"] == STEPS
  model = os.path.join(workdir, "model")
  for name, weights in (("text_encoder", "model.safetensors"), ("text_encoder_2", "model.safetensors"),
                        ("vae", "diffusion_pytorch_model.safetensors")):
    with open(os.path.join(folders["base"], name, weights), "rb") as a, open(os.path.join(model, name, weights),
                                                                             "rb") as b:
      assert a.read() == b.read(), f"{name} changed: it is frozen"
  before = folders["components"]["unet"].state_dict()
  pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(model)
  after = pipe.unet.state_dict()
  assert after.keys() == before.keys()
  changed = [k for k, v in after.items() if not torch.equal(v, before[k])]
  assert len(changed) > 0.9 * len(before), f"only {len(changed)} of {len(before)} U-Net tensors changed"
  pipe.set_progress_bar_config(disable=True)
  with torch.no_grad():
    out = pipe("picture number 1", height=SIZE, width=SIZE, num_inference_steps=2, output_type="np").images
  assert out.shape == (1, SIZE, SIZE, 3) and np.isfinite(out).all()
  assert json.load(open(os.path.join(model, "model_index.json")))["_class_name"] == "StableDiffusionXLPipeline"


@pytest.mark.slow
def test_stopped_after_a_checkpoint_and_rerun_gives_the_same_unet(folders, trained, tmp_path):
  """A run that ends at its step-2 checkpoint (as a killed one would have left it, less the result), then
  rerun to the end: the exported U-Net equals the uninterrupted run's, byte for byte."""
  workdir = str(tmp_path / "stopped")
  first = run.train_and_evaluate(_config(folders, **{"unet.steps": 2}), workdir)
  assert first["unet"]["steps"] == 2
  os.remove(os.path.join(workdir, "unet", "result.json"))  # what a kill after the checkpoint leaves
  assert run.train_and_evaluate(_config(folders), workdir)["unet"]["steps"] == STEPS
  name = os.path.join("model", "unet", "diffusion_pytorch_model.safetensors")
  with open(os.path.join(trained[0], name), "rb") as a, open(os.path.join(workdir, name), "rb") as b:
    assert a.read() == b.read(), "the resumed run's U-Net differs from the uninterrupted run's"


def test_the_latent_cache_holds_what_the_uncached_stage_computes(folders, tmp_path):
  """`unet.cache_latents` for SDXL, through the run: the cache holds each image's posterior moments, both
  encoders' context, the pooled `text_embeds` and the time ids (centre crops: the recorded crop and the
  original size), and the stage's loss on cached rows equals its loss on the same images and captions
  uncached, for the same rng (caption dropout at 0.5: the empty caption's encodings swapped in on the
  same rows)."""
  workdir = str(tmp_path / "cached")
  cfg = _config(folders, **{
      "unet.cache_latents": True,
      "unet.steps": 2,
      "data.random_flip": False,
      "data.random_crop": False
  })
  assert run.train_and_evaluate(cfg, workdir)["unet"]["steps"] == 2
  directory = os.path.join(workdir, "unet", "latent_cache", "process_0")
  done = json.load(open(os.path.join(directory, "done.json")))
  assert done["examples"] == len(SHAPES) and done["fields"] == ["context", "moments", "text_embeds", "time_ids"]
  cache = latent_cache.load(directory)
  rows = cache.take(np.arange(8))

  base = folders["base"]
  vae, vae_params = pretrained.load_vae(os.path.join(base, "vae"))
  te, te_params = pretrained.load_text_encoder(os.path.join(base, "text_encoder"), projection=False)
  te2, te2_params = pretrained.load_text_encoder(os.path.join(base, "text_encoder_2"), projection=True)
  unet, unet_params = pretrained.load_unet(os.path.join(base, "unet"))
  tokenizer, tokenizer_2 = (tok.load_tokenizer(os.path.join(base, name)) for name in ("tokenizer", "tokenizer_2"))
  raw = next(
      iter(
          input_pipeline.make_dataset(folders["name"], global_batch_size=8, image_size=SIZE, data_dir=folders["data"],
                                      train=False, tokenizer=tokenizer, tokenizer_2=tokenizer_2, size_conditioning=True,
                                      max_length=te.config.max_position_embeddings)))
  np.testing.assert_array_equal(rows["time_ids"][:, :2], raw["original_size"])  # the images in the cache's order
  np.testing.assert_array_equal(rows["time_ids"][:, 4:], SIZE)
  np.testing.assert_array_equal(rows["time_ids"][:, 2:4], raw["crop_top_left"])
  assert set(map(tuple, raw["original_size"].tolist())) <= set(SHAPES) and raw["crop_top_left"].any()
  cfg.unet.caption_dropout = 0.5
  stage = stages.unet_stage(cfg, unet=unet, vae=vae, vae_params=vae_params, text_encoder=te, text_params=te_params,
                            scheduler=SchedulerConfig.from_json(os.path.join(base, "scheduler")), tokenizer=tokenizer,
                            text_encoder_2=te2, text_params_2=te2_params, tokenizer_2=tokenizer_2)
  loss = jax.jit(stage.loss_fn)
  raw = {k: raw[k] for k in ("image", "input_ids", "input_ids_2", "original_size", "crop_top_left")}
  for seed in range(2):
    want, _ = loss(unet_params, raw, jax.random.key(seed), stage.frozen)
    got, _ = loss(unet_params, rows, jax.random.key(seed), stage.frozen)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  other, _ = loss(unet_params, dict(rows, text_embeds=rows["text_embeds"][::-1]), jax.random.key(0), stage.frozen)
  assert abs(float(other) - float(want)) > 1e-7, "the cached pooled embeddings are not used"


@pytest.mark.parametrize("updates, message", [
    ({
        "unet.train_text_encoder": True
    }, "train_text_encoder"),
])
def test_unsupported_sdxl_settings_are_refused(folders, updates, message):
  with pytest.raises(run.ConfigError, match=f"SDXL.*{message}"):
    run.check_config(_config(folders, **updates), 8)


def test_a_refiner_folder_is_refused(folders):
  with pytest.raises(run.ConfigError, match="refiner"):
    run.check_config(_config(folders, init=folders["refiner"]), 8)


def test_cli_loads_the_sdxl_config_and_refuses_a_refiner_with_exit_2(folders, tmp_path, capsys):
  from train.__main__ import main

  config = os.path.join(os.path.dirname(finetune.__file__), "finetune.py")
  rc = main(["train", "--config", f"{config}:sdxl", "--workdir", str(tmp_path), f"--config.init={folders['refiner']}"])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and "refiner is not supported" in err and len(err.splitlines()) == 1, err


def test_the_workdir_samples_on_the_command_line(trained, tmp_path, monkeypatch):
  """`python -m sample --model WORKDIR` on an SDXL fine-tune's workdir (in-process): loaded as SDXL, its exported
  folder with the newest U-Net, it writes the images."""
  import jaxsd
  from jaxsd import pipeline_xl
  from sample.__main__ import main

  workdir, _ = trained
  pipe = pipeline_xl.load(workdir)
  assert isinstance(pipe, jaxsd.StableDiffusionXL)
  exported = jaxsd.StableDiffusionXL.from_pretrained(os.path.join(workdir, "model"))
  for a, b in zip(jax.tree.leaves(pipe.unet_params), jax.tree.leaves(exported.unet_params)):
    np.testing.assert_array_equal(a, b)
  out = tmp_path / "out"
  argv = [
      "--model", workdir, "--prompt", "picture number 1", "--steps", "2", "--height",
      str(SIZE), "--width",
      str(SIZE), "--out",
      str(out), "--no-progress"
  ]
  assert main(argv) == 0
  written = sorted(p for p in os.listdir(out) if p.endswith(".png"))
  assert written and np.asarray(Image.open(out / written[0])).shape == (SIZE, SIZE, 3)
