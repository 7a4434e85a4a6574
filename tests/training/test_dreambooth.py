"""DreamBooth (train/configs/lora.py:dreambooth and finetune.py:dreambooth) on a tiny diffusers folder: the
prior-preservation loss is diffusers' formula, class images are drawn once and cached, a LoRA DreamBooth run
trains only the adapters and its file loads in diffusers, a resumed run is exact, bad input is refused.

The LoRA runs train text-encoder adapters too (lora.train_text_encoder, diffusers' --train_text_encoder): one
compiled step covers both, and the file's text_encoder.* keys are checked to load into diffusers' text encoder."""

from __future__ import annotations

import io
import json
import os

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import torch.nn.functional as F
from PIL import Image

import jaxsd
from jaxsd import lora
from jaxsd import tokenizer as tok
from jaxsd.training import dreambooth, losses, run
from tests import reference
from tests.training import ONE_DEVICE
from train import __main__ as train_main
from train.configs import finetune
from train.configs import lora as lora_config

HW, STEPS, CLASS_IMAGES = 16, 4, 2
INSTANCE, CLASS = "a photo of sks dog", "a photo of dog"
WITH_TEXT = {"lora.train_text_encoder": True}
PRIOR_WEIGHT = 0.5


@pytest.fixture(scope="module")
def init(tmp_path_factory):
  return reference.make_tiny_sd_folder(str(tmp_path_factory.mktemp("sd")))


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
  """Three teal images of other sizes than the training resolution (resized and cropped on reading)."""
  folder = tmp_path_factory.mktemp("instance")
  rng = np.random.default_rng(0)
  for i, (w, h) in enumerate([(24, 20), (20, 28), (16, 16)]):
    pixels = np.clip(np.array([0, 128, 128]) + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(folder / f"dog_{i}.png")
  return str(folder)


def _cfg(init_dir, instance, config=lora_config, **updates):
  cfg = config.get_config("dreambooth")
  cfg.init = init_dir
  cfg.dtype = "float32"
  cfg.data.image_size = HW
  cfg.log_every, cfg.checkpoint_every, cfg.progress = 1, 2, False
  cfg.unet.update(steps=STEPS, batch_size=8, sample_steps=2, gradient_checkpointing=False)
  cfg.unet.optimizer.update(lr=1e-2, total_steps=STEPS)  # large, so that a few steps move the tiny model
  cfg.dreambooth.update(instance_data_dir=instance, instance_prompt=INSTANCE, with_prior_preservation=True,
                        class_prompt=CLASS, num_class_images=CLASS_IMAGES, prior_loss_weight=PRIOR_WEIGHT,
                        sample_batch_size=2)  # one batch: one compile
  cfg.update_from_flattened_dict({**ONE_DEVICE, **updates})
  return cfg


@pytest.fixture(scope="module")
def trained(init, instance_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("dreambooth"))
  return workdir, run.train_and_evaluate(_cfg(init, instance_dir, **WITH_TEXT), workdir)


def test_prior_preservation_loss_is_diffusers_formula():
  """diffusers' train_dreambooth_lora.py: chunk the batch in halves, F.mse_loss(instance) + w * F.mse_loss(class);
  ours, from per-example losses and a mask, agrees whatever the order of the rows (several hosts interleave
  them)."""
  rng = np.random.default_rng(0)
  pred, target = rng.normal(size=(2, 6, 4, 3, 3)).astype(np.float32)
  w = 0.7
  tp, tt = torch.from_numpy(pred), torch.from_numpy(target)
  expected = (F.mse_loss(tp[:3], tt[:3], reduction="mean") + w * F.mse_loss(tp[3:], tt[3:], reduction="mean")).item()
  per_example = jnp.square(jnp.asarray(pred) - jnp.asarray(target)).mean(axis=(1, 2, 3))
  for order in (np.arange(6), np.array([0, 3, 1, 4, 2, 5])):
    mask = jnp.asarray(order >= 3, jnp.float32)
    got, parts = jax.jit(losses.prior_preservation_loss, static_argnums=2)(per_example[order], mask, w)
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)
    np.testing.assert_allclose(float(parts["prior_loss"]), F.mse_loss(tp[3:], tt[3:]).item(), rtol=1e-6)


def test_batches_pair_instance_and_class_examples(instance_dir, tmp_path):
  """As diffusers' DreamBoothDataset + collate_fn: instance rows under the instance prompt, then as many class
  rows under the class prompt; an epoch of max(n_instance, n_class) = 5 examples visits every class image once."""
  classes = []
  for i in range(5):
    classes.append(str(tmp_path / f"c{i}.png"))
    Image.fromarray(np.full((HW, HW, 3), 40 * i, np.uint8)).save(classes[-1])
  tokenizer = tok.load_tokenizer()
  ds = dreambooth.make_dataset(dreambooth.list_images(instance_dir), INSTANCE, class_images=classes, class_prompt=CLASS,
                               tokenizer=tokenizer, image_size=HW, global_batch_size=5)
  batch = next(iter(ds))
  assert batch["image"].shape == (10, HW, HW, 3) and batch["input_ids"].shape == (10, 77)
  np.testing.assert_array_equal(batch["prior"], [0] * 5 + [1] * 5)
  ids = tok.tokenize(tokenizer, [INSTANCE, CLASS], max_length=77)
  assert (batch["input_ids"][:5] == ids[0]).all() and (batch["input_ids"][5:] == ids[1]).all()
  assert sorted(np.round((batch["image"][5:, 0, 0, 0] + 1) * 127.5).astype(int)) == [0, 40, 80, 120, 160]
  assert -1 <= batch["image"].min() and batch["image"].max() <= 1
  one = dreambooth.make_dataset(dreambooth.list_images(instance_dir), INSTANCE, tokenizer=tokenizer, image_size=HW,
                                global_batch_size=1)  # diffusers' default batch: grain's length overflowed
  assert next(iter(one))["image"].shape == (1, HW, HW, 3)
  it = iter(ds)  # the position resumes exactly (the loop checkpoints get_state())
  next(it)
  state, expected = it.get_state(), [next(it) for _ in range(3)]
  again = iter(ds)
  again.set_state(state)
  for want in expected:
    got = next(again)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
  """A 16-bit grey PNG or a float TIFF among the subject's images reads as its 8-bit twin, as prepare_image_folder
  reads it (PIL's convert("RGB") clipped them: the 16-bit one came out nearly white, the float one black); a
  folder named like an image is not one of the images."""
  grey = np.random.default_rng(0).integers(0, 256, (HW, HW), dtype=np.uint8)
  Image.fromarray(grey).save(tmp_path / "a_8bit.png")
  Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "b_16bit.png")
  Image.fromarray(grey.astype(np.float32) / 255).save(tmp_path / "c_float.tiff")
  (tmp_path / "d_folder.png").mkdir()
  paths = dreambooth.list_images(str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ["a_8bit.png", "b_16bit.png", "c_float.tiff"]
  ds = dreambooth.make_dataset(paths, INSTANCE, tokenizer=tok.load_tokenizer(), image_size=HW, global_batch_size=3,
                               center_crop=True)
  images = next(iter(ds))["image"]
  assert Image.open(paths[1]).mode.startswith("I;16") and Image.open(paths[2]).mode == "F"
  for image in images:  # the epoch's order is shuffled: each image is the 8-bit one
    np.testing.assert_allclose(image, np.repeat(grey[..., None], 3, -1) / 127.5 - 1, atol=1e-6)


def test_class_images_are_drawn_once_and_cached(tmp_path):
  """Only the missing images are drawn; a rerun draws nothing; a run interrupted after one batch finishes with
  the same images; other settings are refused rather than mixed in."""
  calls = []

  def generate(first, n):
    calls.append((first, n))
    return np.stack([np.full((4, 4, 3), first + i, np.uint8) for i in range(n)])

  mine = [str(tmp_path / "own.png")]
  kw = dict(existing=mine, num_images=6, settings=dict(prompt=CLASS, steps=2), generate=generate, batch_size=2)
  paths = dreambooth.class_images(str(tmp_path / "cache"), **kw)
  assert calls == [(0, 2), (2, 2), (4, 1)] and paths[0] == mine[0] and len(paths) == 6
  assert [int(np.asarray(Image.open(p))[0, 0, 0]) for p in paths[1:]] == [0, 1, 2, 3, 4]
  assert dreambooth.class_images(str(tmp_path / "cache"), **kw) == paths and len(calls) == 3
  os.remove(paths[2])  # as if killed before this one was written: its whole batch is drawn again
  assert dreambooth.class_images(str(tmp_path / "cache"), **kw) == paths and calls[3:] == [(0, 2)]
  assert [int(np.asarray(Image.open(p))[0, 0, 0]) for p in paths[1:]] == [0, 1, 2, 3, 4]
  assert dreambooth.class_images(str(tmp_path / "cache"), **dict(kw, existing=mine * 6)) == mine * 6
  with pytest.raises(ValueError, match="made with other settings .*prompt='a photo of dog', now 'a cat'"):
    dreambooth.class_images(str(tmp_path / "cache"), **dict(kw, settings=dict(prompt="a cat", steps=2)))


def test_a_run_killed_between_two_images_of_a_batch_draws_the_same_images(tmp_path, monkeypatch):
  """A batch's size and rows change the rounding of the pipeline's float sums (tests/test_generate.py): a rerun
  used to draw the images a killed run had not written in batches of its own, so other images than an
  uninterrupted run's, and another adapter. It draws the uninterrupted run's batches again."""

  def generate(first, n):  # each image depends on the batch it is drawn in, as the pipeline's may
    return np.stack([np.full((4, 4, 3), 10 * first + n + i, np.uint8) for i in range(n)])

  kw = dict(existing=[], num_images=5, settings=dict(prompt=CLASS), generate=generate, batch_size=2)
  whole = dreambooth.class_images(str(tmp_path / "whole"), **kw)
  replace = os.replace

  def killed_after_image_2(src, dst):  # the first image of the second batch is written, the second is not
    replace(src, dst)
    if dst.endswith("00002.png"):
      raise KeyboardInterrupt

  monkeypatch.setattr(os, "replace", killed_after_image_2)
  with pytest.raises(KeyboardInterrupt):
    dreambooth.class_images(str(tmp_path / "killed"), **kw)
  monkeypatch.undo()
  assert sorted(
      f for f in os.listdir(tmp_path / "killed") if f.endswith(".png")) == ["00000.png", "00001.png", "00002.png"]
  resumed = dreambooth.class_images(str(tmp_path / "killed"), **kw)
  assert [open(p, "rb").read() for p in resumed] == [open(p, "rb").read() for p in whole]


def test_the_run_draws_class_images_and_trains_only_the_adapters(trained, init):
  workdir, results = trained
  r = results["lora"]
  # U-Net: 4 transformer blocks x 2 attentions x to_q/to_k/to_v/to_out.0; text encoder: 2 layers x q/k/v/out_proj
  assert r["steps"] == STEPS and r["layers"] == 32 and r["text_encoder_layers"] == 8
  class_dir = os.path.join(workdir, dreambooth.CLASS_DIR)
  assert sorted(os.listdir(class_dir)) == ["00000.png", "00001.png", dreambooth.MANIFEST]
  assert np.asarray(Image.open(os.path.join(class_dir, "00000.png"))).shape == (HW, HW, 3)
  sd = safetensors.numpy.load_file(r["file"])
  unet_keys = [k for k in sd if k.startswith("unet.")]
  assert len(unet_keys) == 64 and all(".attn" in k for k in unet_keys)
  assert sorted(set(sd) - set(unet_keys)) == sorted(
      f"text_encoder.text_model.encoder.layers.{i}.self_attn.{m}.lora_{ab}.weight" for i in range(2)
      for m in ("q_proj", "k_proj", "v_proj", "out_proj") for ab in "AB")
  assert sum(v.size for v in sd.values()) == r["adapter_parameters"]
  assert all(np.abs(v).max() > 0 for k, v in sd.items() if "lora_B" in k)  # started at zero: gradients reached all
  assert not os.path.exists(os.path.join(workdir, "model"))  # the base model is neither changed nor copied
  metrics = [json.loads(line) for line in open(os.path.join(workdir, "lora", "metrics.jsonl"))]
  logged = [m for m in metrics if "loss" in m]
  assert len(logged) == STEPS and all(m["prior_loss"] > 0 and m["instance_loss"] > 0 for m in logged)
  for m in logged:  # the configured weight reached the compiled loss
    assert m["loss"] == pytest.approx(m["instance_loss"] + PRIOR_WEIGHT * m["prior_loss"], rel=1e-5)


def test_the_adapter_loads_in_diffusers_as_in_jaxsd(trained, init):
  """diffusers' load_lora_weights of the DreamBooth adapters against jaxsd's load_lora: the same latents within
  the pipeline tolerance, and the adapters move them far beyond it; diffusers put LoRA layers on its text
  encoder's 8 projections, and they change its encoding."""
  from peft.tuners.lora import LoraLayer

  workdir, _ = trained
  tpipe = reference.torch_pipeline(init)
  tpipe.scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(init, subfolder="scheduler")
  pipe = jaxsd.StableDiffusion.from_pretrained(init)
  latents = np.asarray(pipe.noise(0, 2, HW, HW))

  def theirs():
    with torch.no_grad():
      out = tpipe([INSTANCE, CLASS], height=HW, width=HW, num_inference_steps=3, guidance_scale=7.5,
                  latents=reference.nhwc_to_nchw(latents), output_type="latent")
    return reference.nchw_to_nhwc(out.images)

  ids = torch.from_numpy(np.asarray(tok.tokenize(tok.load_tokenizer(), [INSTANCE], max_length=77), np.int64))

  def encoding():
    with torch.no_grad():
      return tpipe.text_encoder(ids)[0].numpy()

  base, base_text = theirs(), encoding()
  tpipe.load_lora_weights(os.path.join(workdir, "lora"))
  ref = theirs()
  assert sum(isinstance(m, LoraLayer) for m in tpipe.text_encoder.modules()) == 8
  assert np.abs(encoding() - base_text).max() > 1e-3
  pipe.load_lora(os.path.join(workdir, "lora"))
  ours = pipe([INSTANCE, CLASS], height=HW, width=HW, steps=3, guidance_scale=7.5, sampler="euler", latents=latents,
              output="latent")
  tol = 1e-4 * max(1.0, np.abs(ref).max())
  diff = np.abs(ours - ref).max()
  print(f"max |jaxsd - diffusers| with the DreamBooth adapter: {diff:.2e} (tol {tol:.1e}); the adapter moves "
        f"diffusers' latents by {np.abs(ref - base).max():.2e}")
  assert diff < tol and np.abs(ref - base).max() > 100 * tol


def test_a_resumed_run_is_exact_and_draws_no_class_images_again(trained, init, instance_dir, tmp_path):
  """Stopped after step 2's checkpoint (its result.json removed, as a kill leaves none), run again to 4 steps:
  the adapter is bit-identical to the uninterrupted run's, and the cached class images are not drawn again."""
  workdir = str(tmp_path / "resumed")
  run.train_and_evaluate(_cfg(init, instance_dir, **WITH_TEXT, **{"unet.steps": 2}), workdir)
  os.remove(os.path.join(workdir, "lora", "result.json"))
  class_dir = os.path.join(workdir, dreambooth.CLASS_DIR)
  stamps = {f: os.stat(os.path.join(class_dir, f)).st_mtime_ns for f in os.listdir(class_dir)}
  results = run.train_and_evaluate(_cfg(init, instance_dir, **WITH_TEXT), workdir)
  assert results["lora"]["steps"] == STEPS
  assert {f: os.stat(os.path.join(class_dir, f)).st_mtime_ns for f in os.listdir(class_dir)} == stamps
  for f in stamps:  # the same class images as the uninterrupted run's (deterministic drawing)
    if f.endswith(".png"):
      np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(class_dir, f))),
                                    np.asarray(Image.open(os.path.join(trained[0], dreambooth.CLASS_DIR, f))))
  (a, meta_a), (b, meta_b) = (lora.read(r["lora"]["file"]) for r in (trained[1], results))
  assert meta_a == meta_b and a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k].view(np.uint32), b[k].view(np.uint32), err_msg=k)


@pytest.mark.slow
def test_full_fine_tune_dreambooth_exports_a_diffusers_folder(init, instance_dir, tmp_path):
  """finetune.py:dreambooth trains the whole U-Net (no prior preservation here) and writes DIR/model, which
  diffusers loads; the U-Net moved, the frozen VAE is the init's."""
  workdir = str(tmp_path / "full")
  cfg = _cfg(init, instance_dir, config=finetune, **{"unet.steps": 2, "dreambooth.with_prior_preservation": False})
  results = run.train_and_evaluate(cfg, workdir)
  assert results["unet"]["steps"] == 2 and not os.path.exists(os.path.join(workdir, dreambooth.CLASS_DIR))
  tpipe = reference.torch_pipeline(os.path.join(workdir, "model"))
  base = reference.torch_pipeline(init)
  moved = max((a - b).abs().max().item() for a, b in zip(tpipe.unet.parameters(), base.unet.parameters()))
  assert moved > 0
  for a, b in zip(tpipe.vae.parameters(), base.vae.parameters()):
    assert torch.equal(a, b)
  assert os.path.exists(os.path.join(workdir, "samples", f"step_{2:06d}.png"))


@pytest.mark.parametrize("updates,message", [
    ({
        "dreambooth.instance_data_dir": "/nonexistent/dog"
    }, "instance_data_dir='/nonexistent/dog' does not exist"),
    ({
        "dreambooth.instance_data_dir": ""
    }, "instance_data_dir is not set"),
    ({
        "dreambooth.instance_prompt": " "
    }, "instance_prompt is empty"),
    ({
        "dreambooth.class_prompt": ""
    }, "with_prior_preservation needs class_prompt"),
    ({
        "dreambooth.num_class_images": 0
    }, "num_class_images=0"),
    ({
        "dreambooth.prior_loss_weight": -1.0
    }, "prior_loss_weight=-1.0 must be a finite number >= 0"),
    ({
        "dreambooth.prior_loss_weight": float("nan")
    }, "prior_loss_weight=nan must be a finite number >= 0"),
    ({
        "dreambooth.class_data_dir": "/nonexistent/dogs"
    }, "class_data_dir='/nonexistent/dogs' does not exist"),
    ({
        "unet.cache_latents": True
    }, "set config.unet.cache_latents=False"),
    ({
        "init": ""
    }, "set --config.init"),
    ({
        "lora.train_text_encoder": True,
        "lora.text_target_modules": "q_proj,qq_proj"
    }, "target_modules qq_proj match no Dense or Conv layer of the text encoder"),
])
def test_bad_dreambooth_config_is_refused(init, instance_dir, tmp_path, updates, message):
  with pytest.raises(run.ConfigError, match=message):
    run.train_and_evaluate(_cfg(init, instance_dir, **updates), str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "lora")


def test_an_empty_or_unreadable_instance_folder_is_refused(init, instance_dir, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(run.ConfigError, match="holds no images"):
    run.check_config(_cfg(init, str(empty)), 8)
  (empty / "broken.png").write_bytes(b"not a png")
  with pytest.raises(run.ConfigError, match="instance image .*broken.png cannot be read"):
    run.check_config(_cfg(init, str(empty)), 8)
  (empty / "broken.png").unlink()  # a JPEG cut short (an interrupted copy): verify() passed it, training failed
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
  (empty / "cut.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
  with pytest.raises(run.ConfigError, match="instance image .*cut.jpg cannot be read"):
    run.check_config(_cfg(init, str(empty)), 8)


def test_the_command_line_exits_2_with_one_line(init, tmp_path, capsys):
  code = train_main.main([
      "train", "--config", "train/configs/lora.py:dreambooth", "--workdir",
      str(tmp_path / "w"), f"--config.init={init}", "--config.unet.batch_size=8",
      "--config.dreambooth.instance_data_dir=/nonexistent/dog"
  ])
  err = capsys.readouterr().err.strip()
  assert code == 2 and "\n" not in err and "instance_data_dir='/nonexistent/dog' does not exist" in err


def test_prior_preservation_counts_its_class_rows_among_the_devices(init, instance_dir):
  """With prior preservation a step takes batch_size instance rows and as many class rows: batch_size=4 on 8
  devices is 8 rows, one per device (diffusers' train_dreambooth.py concatenates them the same way)."""
  cfg = _cfg(init, instance_dir, **{"unet.batch_size": 4})
  assert dreambooth.step_rows(cfg.dreambooth, 4) == 8
  run.check_config(cfg, 8)
  with pytest.raises(
      run.ConfigError, match=r"batch_size=3 \(6 rows with prior preservation's class examples\) "
      "is not divisible by the 8 devices.*multiple of 4"):
    run.check_config(_cfg(init, instance_dir, **{"unet.batch_size": 3}), 8)
  with pytest.raises(run.ConfigError, match=r"batch_size=4 is not divisible by the 8 devices.*multiple of 8"):
    run.check_config(_cfg(init, instance_dir, **{"unet.batch_size": 4, "dreambooth.with_prior_preservation": False}), 8)


def test_caption_files_beside_the_images_are_refused(init, tmp_path):
  """kohya's DreamBooth trains a.txt's caption for a.png, this recipe the instance prompt: refused, not silently
  replaced. Other text files, and macOS's hidden ._a.png / .DS_Store, are no concern."""
  folder = tmp_path / "dog"
  folder.mkdir()
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "a.png")
  (folder / "notes.txt").write_text("where the photos were taken")
  (folder / "._a.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
  (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
  run.check_config(_cfg(init, str(folder)), 8)
  (folder / "a.TXT").write_text("sks dog on a sofa")
  with pytest.raises(
      run.ConfigError, match=r"instance_data_dir=.* holds caption files beside its images \(a\.TXT\)"
      r".*every image trains under instance_prompt"):
    run.check_config(_cfg(init, str(folder)), 8)
  (folder / "a.TXT").unlink()
  classes = tmp_path / "dogs"
  classes.mkdir()
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(classes / "c.png")
  (classes / "c.caption").write_text("a dog")
  with pytest.raises(
      run.ConfigError, match=r"class_data_dir=.* holds caption files beside its images \(c\.caption\)"
      r".*every image trains under class_prompt"):
    run.check_config(_cfg(init, str(folder), **{"dreambooth.class_data_dir": str(classes)}), 8)
