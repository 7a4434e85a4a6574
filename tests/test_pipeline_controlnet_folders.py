"""Folders of diffusers' ControlNet pipelines (StableDiffusion(XL)ControlNetPipeline, one ControlNet in controlnet/,
several as a MultiControlNetModel in controlnet/, controlnet_1/): `pipeline_xl.load` runs them with their
ControlNets as diffusers' DiffusionPipeline.from_pretrained does, `save_pretrained` writes them, and `python -m
sample --model` takes their control images."""

from __future__ import annotations

import json
import logging
import os

import diffusers
import jax
import numpy as np
import pytest
import torch
from PIL import Image

import jaxsd
from jaxsd import model_folder, pipeline_xl
from tests import reference
from tests.test_pipeline_controlnet import HW, NEGATIVE, PROMPTS, _check, _controlnet, _images, run_reference


def _same_params(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _torch_state(net) -> dict:
  return {k: v.numpy() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
  """A tiny SD folder and diffusers' StableDiffusionControlNetPipeline folders of it: one ControlNet, and two."""
  root = tmp_path_factory.mktemp("controlnet_folders")
  path = reference.make_tiny_sd_folder(str(root / "sd"))
  tpipe = reference.torch_pipeline(path)
  nets = [_controlnet(tpipe.unet, seed) for seed in (10, 11)]
  folders = {}
  for name, controlnet in (("one", nets[0]), ("two", nets)):
    folders[name] = str(root / name)
    diffusers.StableDiffusionControlNetPipeline(vae=tpipe.vae, text_encoder=tpipe.text_encoder,
                                                tokenizer=tpipe.tokenizer, unet=tpipe.unet, controlnet=controlnet,
                                                scheduler=tpipe.scheduler, safety_checker=None, feature_extractor=None,
                                                requires_safety_checker=False).save_pretrained(folders[name])
  return root, path, nets, folders


def test_controlnet_pipeline_folders_load_with_their_controlnets_as_diffusers(sd, caplog):
  """One ControlNet and a MultiControlNetModel: the ControlNet pipeline, its parameters those of the folders'
  ControlNets; for the two, the latents of diffusers' StableDiffusionControlNetPipeline.from_pretrained(folder) (the
  folder's PNDM scheduler on both sides; one ControlNet's parity is test_pipeline_controlnet's).
  StableDiffusion.from_pretrained loads the base model and says so."""
  _, _, _, folders = sd
  for name, n in (("one", 1), ("two", 2)):
    folder = folders[name]
    assert model_folder.controlnet_folders(folder) == [os.path.join(folder, "controlnet")
                                                      ] + [os.path.join(folder, "controlnet_1")] * (n == 2)
    pipe = pipeline_xl.load(folder)
    assert type(pipe) is jaxsd.StableDiffusionControlNet and len(pipe.controlnets) == n
    for k, d in enumerate(model_folder.controlnet_folders(folder)):
      _same_params(pipe.controlnet_params[k], jaxsd.load_controlnet(d)[1])

  latents = np.asarray(pipe.noise(1, len(PROMPTS), HW, HW))
  images = [_images(1)[0], _images(2)[0]]  # one image per ControlNet for the batch
  ours = pipe(PROMPTS, images, NEGATIVE, steps=4, latents=latents, output="latent")
  ref = diffusers.StableDiffusionControlNetPipeline.from_pretrained(folders["two"])
  assert type(ref.controlnet).__name__ == "MultiControlNetModel"
  _check(ours, run_reference(ref, latents, images, NEGATIVE, 7.5), "the folder's two ControlNets")

  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="jaxsd.pipeline_folders"):
    base = jaxsd.StableDiffusion.from_pretrained(folders["two"])
  assert type(base) is jaxsd.StableDiffusion
  assert "without its MultiControlNetModel" in caplog.text and "pipeline_xl.load" in caplog.text


def test_save_pretrained_writes_diffusers_controlnet_pipeline_folders(sd, tmp_path):
  """jaxsd's save_pretrained of a ControlNet pipeline: diffusers loads it as StableDiffusionControlNetPipeline
  (MultiControlNetModel for two) with the original ControlNets' weights, model_index.json is the one diffusers
  writes, and jaxsd reloads the same parameters. Saving one ControlNet where two were removes controlnet_1/."""
  root, path, nets, folders = sd
  plain = jaxsd.StableDiffusion.from_pretrained(path)
  for name, n in (("one", 1), ("two", 2)):
    pipe = plain.with_controlnet(model_folder.controlnet_folders(folders[name]))
    out = str(tmp_path / name)
    pipe.save_pretrained(out)
    with open(os.path.join(out, "model_index.json")) as f, open(os.path.join(folders[name], "model_index.json")) as g:
      assert json.load(f) == json.load(g)
    ref = diffusers.DiffusionPipeline.from_pretrained(out)
    assert type(ref) is diffusers.StableDiffusionControlNetPipeline
    loaded = ref.controlnet.nets if n == 2 else [ref.controlnet]
    assert type(ref.controlnet).__name__ == ("MultiControlNetModel" if n == 2 else "ControlNetModel")
    assert len(loaded) == n
    for got, want in zip(loaded, nets):
      a, b = _torch_state(got), _torch_state(want)
      assert a.keys() == b.keys()
      for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    again = pipeline_xl.load(out)
    assert type(again) is jaxsd.StableDiffusionControlNet
    _same_params(again.controlnet_params, pipe.controlnet_params)
    _same_params(again.unet_params, pipe.unet_params)
  pipe.with_controlnet(model_folder.controlnet_dir(folders["one"], 0)).save_pretrained(str(tmp_path / "two"))
  assert not os.path.exists(tmp_path / "two" / "controlnet_1")
  assert torch.equal(
      diffusers.ControlNetModel.from_pretrained(tmp_path / "two" / "controlnet").conv_in.weight, nets[0].conv_in.weight)


def test_sdxl_controlnet_pipeline_folder_loads_and_saves(tmp_path):
  """diffusers' StableDiffusionXLControlNetPipeline folder: `pipeline_xl.load` gives the SDXL ControlNet pipeline
  with the folder's ControlNet (the SDXL ControlNet pipeline's parity is test_pipeline_controlnet_sdxl's); its
  save_pretrained writes the folder diffusers loads as that class again."""
  c = reference.tiny_sdxl_components()
  net = _controlnet(c["unet"], 20)
  folder = str(tmp_path / "xl")
  diffusers.StableDiffusionXLControlNetPipeline(vae=c["vae"], text_encoder=c["text_encoder"],
                                                text_encoder_2=c["text_encoder_2"], tokenizer=c["tokenizer"],
                                                tokenizer_2=c["tokenizer_2"], unet=c["unet"], controlnet=net,
                                                scheduler=c["scheduler"], force_zeros_for_empty_prompt=True,
                                                add_watermarker=False).save_pretrained(folder)
  pipe = pipeline_xl.load(folder)
  assert type(pipe) is jaxsd.StableDiffusionXLControlNet and len(pipe.controlnets) == 1
  _same_params(pipe.controlnet_params[0], jaxsd.load_controlnet(os.path.join(folder, "controlnet"))[1])
  _same_params(pipe.unet_params, jaxsd.StableDiffusionXL.from_pretrained(folder).unet_params)

  out = str(tmp_path / "saved")
  pipe.save_pretrained(out)
  with open(os.path.join(out, "model_index.json")) as f:
    index = json.load(f)
  assert index["_class_name"] == "StableDiffusionXLControlNetPipeline"
  assert index["controlnet"] == ["diffusers", "ControlNetModel"]
  again = diffusers.DiffusionPipeline.from_pretrained(out, add_watermarker=False)
  assert type(again) is diffusers.StableDiffusionXLControlNetPipeline
  a, b = _torch_state(again.controlnet), _torch_state(net)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture
def main():
  from sample.__main__ import main

  return main


def test_sample_runs_a_controlnet_pipeline_folder(sd, main, tmp_path, capsys, monkeypatch):
  """`python -m sample --model <ControlNet pipeline folder>` uses its ControlNet: the images of `--controlnet
  folder/controlnet` on the plain model. Without its control images (one per ControlNet) it exits 2 in one line
  before loading anything."""
  root, path, _, folders = sd
  control = str(tmp_path / "edges.png")
  _images(0)[0].save(control)
  common = [
      "--prompt", "a red circle", "--steps", "2", "--sampler", "ddim", "--no-progress", "--control-image", control
  ]
  assert main(["--model", folders["one"], "--out", str(tmp_path / "folder")] + common) == 0
  assert main([
      "--model", path, "--controlnet",
      os.path.join(folders["one"], "controlnet"), "--out",
      str(tmp_path / "explicit")
  ] + common) == 0
  name = "a_red_circle-seed0-0000.png"
  written, explicit = (np.asarray(Image.open(tmp_path / d / name)) for d in ("folder", "explicit"))
  assert written.shape == (HW, HW, 3)
  np.testing.assert_array_equal(written, explicit)

  monkeypatch.setattr(pipeline_xl, "load", lambda *a, **k: pytest.fail("loaded"))
  capsys.readouterr()
  for folder, n, given in ((folders["one"], "1 ControlNet)", []), (folders["two"], "2 ControlNets)",
                                                                   ["--control-image", control])):
    argv = ["--model", folder, "--prompt", "x", "--no-progress", "--out", str(tmp_path / "o")] + given
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"this folder is a ControlNet pipeline ({n}: give --control-image" in err and err.count("\n") == 1, err
  assert not (tmp_path / "o").exists()


def test_sample_checks_a_hub_controlnet_pipeline_once_loaded(main, tmp_path, capsys, monkeypatch):
  """A Hub id's folder is known once resolved: the same one-line message, after loading and before compiling."""

  class FakePipe:
    controlnets = ("a", "b")

  monkeypatch.setattr(pipeline_xl, "load", lambda *a, **k: FakePipe())
  argv = ["--model", "owner/sd-controlnet", "--prompt", "x", "--no-progress", "--out", str(tmp_path / "o")]
  assert main(argv) == 2
  err = capsys.readouterr().err
  assert "owner/sd-controlnet: this folder is a ControlNet pipeline (2 ControlNets): give --control-image" in err
  assert err.count("\n") == 1
