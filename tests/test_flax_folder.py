"""Folders written by diffusers <= 0.39's FlaxStableDiffusionPipeline.save_pretrained load into jaxsd.

No diffusers with Flax code is installed here (0.40 removed it; transformers 5 has no Flax models), so
the Flax folder is written from a tiny PyTorch folder by `_to_diffusers_flax` / `_to_transformers_flax`
below: our own re-implementation of the PyTorch -> Flax rules of
  diffusers 0.39.0 src/diffusers/models/modeling_flax_pytorch_utils.py
    (`rename_key`, `rename_key_and_reshape_tensor`, `convert_pytorch_state_dict_to_flax`), and
  transformers 4.57 src/transformers/modeling_flax_pytorch_utils.py (`rename_key_and_reshape_tensor`),
which need the Flax model's own parameter names (`random_flax_state_dict`); `_flax_has` stands in for
them as diffusers 0.39's vae_flax.py / attention_flax.py / unet_2d_blocks_flax.py and transformers'
modeling_flax_clip.py name them (every norm a GroupNorm/LayerNorm with `scale`; the VAE attention's
Dense layers `query`/`key`/`value`/`proj_attn`; the U-Net attention's `to_q`/.../`to_out_0`; CLIP's
`token_embedding`/`position_embedding` nn.Embed; CLIP's layer list `layers/0`). The file is the
msgpack of the nested dict (`flax.serialization.msgpack_serialize`, what `to_bytes` writes for a dict),
beside `Flax*` class names in model_index.json and a FlaxPNDMScheduler config.

Checked once against the real thing (2026-12-02, not part of the suite): in a side venv with diffusers
0.39.0 and transformers 4.57.6, the tiny folder of `reference.make_tiny_sd_folder` was converted with their
own `convert_pytorch_state_dict_to_flax` (the text encoder's keys given transformers 4's `text_model.`
prefix) and written with `FlaxUNet2DConditionModel` / `FlaxAutoencoderKL` / `FlaxCLIPTextModel`
`.save_pretrained(..., params=)` and `FlaxPNDMScheduler.save_pretrained`. Its msgpack trees had the same
keys, dtypes and bit-equal arrays as `make_flax_folder`'s below, and `StableDiffusion.from_pretrained` of it
(with its Flax-written config.json files) gave parameters bit-equal to the PyTorch folder's (max |diff| 0)
and an equal scheduler config.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
from flax import serialization, traverse_util

import jaxsd
from jaxsd import model_folder
from tests import reference

HW = 16


def _flax_has(key: tuple[str, ...], vae: bool) -> bool:
  """Whether diffusers' / transformers' Flax model has this renamed parameter (see the module docstring)."""
  module, leaf = key[-2], key[-1]
  if leaf == "scale":
    return "norm" in module
  if leaf == "embedding":
    return module in ("token_embedding", "position_embedding")
  if module in ("query", "key", "value", "proj_attn"):
    return vae
  return False


def _to_diffusers_flax(state_dict: dict, vae: bool) -> dict:
  """diffusers 0.39 `convert_pytorch_state_dict_to_flax` for the U-Net and VAE (the branches SD reaches)."""
  out = {}
  for pt_key, tensor in state_dict.items():
    # rename_key: `name.<digits>` -> `name_<digits>`
    for pat in re.findall(r"\w+[.]\d+", pt_key):
      pt_key = pt_key.replace(pat, "_".join(pat.split(".")))
    key = tuple(pt_key.split("."))
    renamed = None
    for old, new in (("to_out_0", "proj_attn"), ("to_k", "key"), ("to_v", "value"), ("to_q", "query")):
      if len(key) > 1 and key[-2] == old:
        cand = key[:-2] + (new, "kernel" if key[-1] == "weight" else key[-1])
        if _flax_has(cand, vae):
          renamed = cand, tensor.T
    if renamed is None and key[-1] in ("weight", "gamma") and _flax_has(key[:-1] + ("scale",), vae):
      renamed = key[:-1] + ("scale",), tensor
    if renamed is None and key[-1] == "weight":
      renamed = key[:-1] + ("kernel",), tensor.transpose(2, 3, 1, 0) if tensor.ndim == 4 else tensor.T
    out[renamed[0] if renamed else key] = renamed[1] if renamed else tensor
  return traverse_util.unflatten_dict(out)


def _to_transformers_flax(state_dict: dict) -> dict:
  """transformers 4.57 `convert_pytorch_state_dict_to_flax` for FlaxCLIPTextModel (no digit joining)."""
  out = {}
  for pt_key, tensor in state_dict.items():
    # transformers 5 saves CLIPTextModel without the `text_model.` prefix; FlaxCLIPTextModel's params have it.
    key = tuple(pt_key.split(".")) if pt_key.startswith("text_model.") else ("text_model",) + tuple(pt_key.split("."))
    if key[-1] == "weight" and _flax_has(key[:-1] + ("scale",), False):
      out[key[:-1] + ("scale",)] = tensor
    elif key[-1] == "weight" and _flax_has(key[:-1] + ("embedding",), False):
      out[key[:-1] + ("embedding",)] = tensor
    elif key[-1] == "weight":
      out[key[:-1] + ("kernel",)] = tensor.transpose(2, 3, 1, 0) if tensor.ndim == 4 else tensor.T
    else:
      out[key] = tensor
  return traverse_util.unflatten_dict(out)


def _write_msgpack(tree: dict, file: str) -> None:
  with open(file, "wb") as f:
    f.write(serialization.msgpack_serialize(tree))


def _read_pt(folder: str) -> dict:
  return {k: np.asarray(v) for k, v in model_folder.read_state_dict(folder).items()}


def make_flax_folder(pt_folder: str, out: str, edit=None) -> str:
  """A diffusers <= 0.39 Flax pipeline folder with the weights of `pt_folder`; `edit(name, flat)` may change
  a network's flattened Flax parameters before they are written."""
  shutil.copytree(os.path.join(pt_folder, "tokenizer"), os.path.join(out, "tokenizer"))
  for name, file in (("unet", "diffusion_flax_model.msgpack"), ("vae", "diffusion_flax_model.msgpack"),
                     ("text_encoder", "flax_model.msgpack")):
    os.makedirs(os.path.join(out, name))
    shutil.copy(os.path.join(pt_folder, name, "config.json"), os.path.join(out, name, "config.json"))
    sd = _read_pt(os.path.join(pt_folder, name))
    tree = _to_transformers_flax(sd) if name == "text_encoder" else _to_diffusers_flax(sd, vae=name == "vae")
    if edit:
      flat = traverse_util.flatten_dict(tree)
      edit(name, flat)
      tree = traverse_util.unflatten_dict(flat)
    _write_msgpack(tree, os.path.join(out, name, file))
  sched = model_folder.read_json(model_folder.scheduler_config_file(pt_folder))
  sched["_class_name"] = "FlaxPNDMScheduler"
  os.makedirs(os.path.join(out, "scheduler"))
  with open(model_folder.scheduler_config_file(out), "w") as f:
    json.dump(sched, f)
  index = model_folder.read_json(os.path.join(pt_folder, "model_index.json"))
  index.update({
      "_class_name": "FlaxStableDiffusionPipeline",
      "_diffusers_version": "0.39.0",
      "scheduler": ["diffusers", "FlaxPNDMScheduler"],
      "text_encoder": ["transformers", "FlaxCLIPTextModel"],
      "unet": ["diffusers", "FlaxUNet2DConditionModel"],
      "vae": ["diffusers", "FlaxAutoencoderKL"]
  })
  with open(os.path.join(out, "model_index.json"), "w") as f:
    json.dump(index, f)
  return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  pt = reference.make_tiny_sd_folder(str(tmp_path_factory.mktemp("pt")))
  flax = make_flax_folder(pt, str(tmp_path_factory.mktemp("flax") / "sd"))
  return pt, flax, jaxsd.StableDiffusion.from_pretrained(pt)


def test_flax_folder_loads_the_same_parameters_and_images(folders):
  pt, flax, ref = folders
  assert sorted(os.listdir(os.path.join(flax, "unet"))) == ["config.json", "diffusion_flax_model.msgpack"]
  pipe = jaxsd.StableDiffusion.from_pretrained(flax)
  got = traverse_util.flatten_dict(pipe.params)
  want = traverse_util.flatten_dict(ref.params)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg="/".join(k))
  assert pipe.scheduler_config == ref.scheduler_config
  kw = dict(height=HW, width=HW, steps=2, sampler="pndm", seed=3)
  np.testing.assert_array_equal(pipe(["a red square"], **kw), ref(["a red square"], **kw))


def test_sample_command_reads_a_flax_folder(folders, tmp_path):
  from sample import __main__ as sample_main

  _, flax, _ = folders
  out = tmp_path / "o"
  assert sample_main.main([
      "--model", flax, "--prompt", "a cat", "--no-progress", "--out",
      str(out), "--steps", "2", "--height",
      str(HW), "--width",
      str(HW)
  ]) == 0
  assert any(f.endswith(".png") for f in os.listdir(out))


def _drop(name, flat):
  if name == "vae":
    del flat[("encoder", "mid_block", "attentions_0", "query", "kernel")]


def _extra(name, flat):
  if name == "text_encoder":
    flat[("text_model", "encoder", "layers", "9", "fc1", "bias")] = np.zeros(3, np.float32)


def _reshape(name, flat):
  if name == "unet":
    key = ("down_blocks_0", "resnets_0", "conv1", "kernel")
    flat[key] = flat[key][:, :, :, :-1]


@pytest.mark.parametrize("edit, message", [(_drop, "encoder.mid_block.attentions.0.to_q.weight"),
                                           (_extra, "text_model.encoder.layers.9.fc1.bias"),
                                           (_reshape, "down_blocks.0.resnets.0.conv1.weight")])
def test_missing_extra_and_misshaped_keys_are_named(folders, tmp_path, edit, message):
  pt, _, _ = folders
  bad = make_flax_folder(pt, str(tmp_path / "sd"), edit)
  with pytest.raises(ValueError, match=re.escape(message)):
    jaxsd.StableDiffusion.from_pretrained(bad)
