"""StableDiffusion.from_single_file on the original CompVis / A1111 layout, made from a tiny diffusers model.

The test writes the single file by renaming the tiny folder's state dicts back to the LDM names, and
checks that file with diffusers' own single-file converters (they must give the folder's state dicts
back), so the layout is diffusers' understanding of it, not only the inverse of jaxsd's tables.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import torch
from diffusers.loaders import single_file_utils as su

import jaxsd
from jaxsd import model_folder, single_file
from tests import reference


def _to_ldm(sd: dict, pairs: list[tuple[str, str]], prefix: str, unsqueeze_attention: bool = False) -> dict:
  """A diffusers state dict renamed to LDM keys with jaxsd's (LDM, diffusers) prefix pairs, inverted."""
  inverse = sorted(((d, l) for l, d in pairs), key=lambda p: -len(p[0]))
  out = {}
  for key, value in sd.items():
    new = next((l + key[len(d):] for d, l in inverse if key.startswith(d)), key)
    if unsqueeze_attention and ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
      value = value[:, :, None, None]  # LDM's VAE attention is 1x1 convolutions
    out[prefix + new] = value
  return out


@pytest.fixture(scope="module")
def folder_and_file(tmp_path_factory):
  root = tmp_path_factory.mktemp("single")
  folder = reference.make_tiny_sd_folder(str(root / "sd"))
  read = lambda name: dict(model_folder.read_state_dict(os.path.join(folder, name)))
  configs = {name: jaxsd.pipeline._read_json(os.path.join(folder, name, "config.json")) for name in ("unet", "vae")}
  unet, vae, text = read("unet"), read("vae"), read("text_encoder")
  ldm = {
      **_to_ldm(unet, single_file.unet_prefixes(configs["unet"]), "model.diffusion_model."),
      **_to_ldm(vae, single_file.vae_prefixes(configs["vae"]), "first_stage_model.", unsqueeze_attention=True),
      # transformers 5 saves a standalone CLIPTextModel without `text_model.`; LDM files have it.
      **{
          f"cond_stage_model.transformer.text_model.{k}": v for k, v in text.items()
      },
      "model_ema.decay": np.float32(0.9999),  # keys of no network are ignored
  }
  # diffusers' converters read this file back into the folder's state dicts: it is the LDM layout.
  torch_ldm = {k: torch.from_numpy(np.asarray(v)) for k, v in ldm.items()}
  for got, want in ((su.convert_ldm_unet_checkpoint(torch_ldm, configs["unet"]), unet),
                    (su.convert_ldm_vae_checkpoint(torch_ldm, configs["vae"]), vae)):
    assert sorted(got) == sorted(want)
    for k in want:
      np.testing.assert_array_equal(got[k].reshape(want[k].shape).numpy(), want[k], err_msg=k)
  path = str(root / "model.safetensors")
  model_folder.write_safetensors({k: np.asarray(v) for k, v in ldm.items()}, path)
  return folder, path


def test_single_file_loads_the_folders_weights(folder_and_file):
  folder, path = folder_and_file
  want = jaxsd.StableDiffusion.from_pretrained(folder)
  got = jaxsd.StableDiffusion.from_single_file(path, config=folder)
  for name in ("unet_params", "vae_params", "text_encoder_params"):
    jax.tree.map(np.testing.assert_array_equal, getattr(got, name), getattr(want, name))
  assert got.scheduler_config == want.scheduler_config
  assert got.unet.config == want.unet.config and got.vae.config == want.vae.config


def test_v1_preset_and_refusals(folder_and_file, tmp_path):
  folder, path = folder_and_file
  # The tiny file is not SD 1.5's size: the preset's U-Net names every mismatched weight.
  with pytest.raises(jaxsd.weights.WeightLoadError,
                     match=r"(?s)model.safetensors \(U-Net\): checkpoint does not match.*shape mismatches"):
    jaxsd.StableDiffusion.from_single_file(path, config="v1")
  with pytest.raises(ValueError, match="config='v3': choose one of v1"):
    jaxsd.StableDiffusion.from_single_file(path, config="v3")
  sd2 = str(tmp_path / "sd2.safetensors")
  model_folder.write_safetensors({"cond_stage_model.model.ln_final.weight": np.ones(4, np.float32)}, sd2)
  with pytest.raises(ValueError, match="OpenCLIP text encoder.*not implemented"):
    jaxsd.StableDiffusion.from_single_file(sd2, config=folder)
  with pytest.raises(ValueError, match="only .safetensors"):
    (tmp_path / "model.ckpt").write_bytes(b"")
    jaxsd.StableDiffusion.from_single_file(str(tmp_path / "model.ckpt"), config=folder)
