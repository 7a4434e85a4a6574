"""StableDiffusion.from_single_file on the original CompVis / A1111 layout, made from tiny diffusers models.

The test writes the single file by renaming the tiny folder's state dicts back to the LDM names (SD 2:
the OpenCLIP text tower, with its fused q/k/v and one layer more), and checks that file with
diffusers' own single-file converters (they must give the folder's state dicts back), so the layout
is diffusers' understanding of it, not only the inverse of jaxsd's tables.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import torch
import transformers
from diffusers.loaders import single_file_utils as su

import jaxsd
from jaxsd import model_folder, single_file
from tests import reference


@pytest.fixture(scope="module", params=[False, True], ids=["sd1", "sd2"])
def folder_and_file(request, tmp_path_factory):
  sd2 = request.param
  root = tmp_path_factory.mktemp("single_sd2" if sd2 else "single_sd1")
  folder = reference.make_tiny_sd_folder(str(root / "sd"), sd2=sd2)
  read = lambda name: dict(model_folder.read_state_dict(os.path.join(folder, name)))
  configs = {name: model_folder.read_json(os.path.join(folder, name, "config.json")) for name in ("unet", "vae")}
  unet, vae, text = read("unet"), read("vae"), read("text_encoder")
  # transformers 5 saves a standalone CLIPTextModel without `text_model.`; SD 1 files have it.
  text_ldm = reference.to_open_clip(text, extra_layer=True) if sd2 else {
      f"cond_stage_model.transformer.text_model.{k}": v for k, v in text.items()
  }
  ldm = {
      **reference.to_ldm(unet, single_file.unet_prefixes(configs["unet"]), "model.diffusion_model."),
      **reference.to_ldm(vae, single_file.vae_prefixes(configs["vae"]), "first_stage_model.", unsqueeze_attention=True),
      **text_ldm,
      "model_ema.decay": np.float32(0.9999),  # keys of no network are ignored
  }
  # diffusers' converters read this file back into the folder's state dicts: it is the LDM layout.
  torch_ldm = {k: torch.from_numpy(np.asarray(v)) for k, v in ldm.items()}
  for got, want in ((su.convert_ldm_unet_checkpoint(torch_ldm, configs["unet"]), unet),
                    (su.convert_ldm_vae_checkpoint(torch_ldm, configs["vae"]), vae)):
    assert sorted(got) == sorted(want)
    for k in want:
      np.testing.assert_array_equal(got[k].reshape(want[k].shape).numpy(), want[k], err_msg=k)
  if sd2:
    tm = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_pretrained(os.path.join(folder, "text_encoder")))
    got = su.convert_open_clip_checkpoint(tm, torch_ldm)
    for k, v in text.items():  # (diffusers drops only SD 2.1's own 24th layer: the tiny file's extra one stays)
      np.testing.assert_array_equal(got["text_model." + k].numpy(), v, err_msg=k)
  path = str(root / "model.safetensors")
  model_folder.write_safetensors({k: np.asarray(v) for k, v in ldm.items()}, path)
  return folder, path, sd2


def test_single_file_loads_the_folders_weights(folder_and_file):
  folder, path, _ = folder_and_file
  want = jaxsd.StableDiffusion.from_pretrained(folder)
  got = jaxsd.StableDiffusion.from_single_file(path, config=folder)
  for name in ("unet_params", "vae_params", "text_encoder_params"):
    jax.tree.map(np.testing.assert_array_equal, getattr(got, name), getattr(want, name))
  assert got.scheduler_config == want.scheduler_config
  assert got.unet.config == want.unet.config and got.vae.config == want.vae.config


def test_presets_and_refusals(folder_and_file, tmp_path):
  folder, path, sd2 = folder_and_file
  # The tiny file is not SD 1.5's / 2.1's size: the preset's U-Net names every mismatched weight.
  with pytest.raises(jaxsd.weights.WeightLoadError,
                     match=r"(?s)model.safetensors \(U-Net\): checkpoint does not match.*shape mismatches"):
    jaxsd.StableDiffusion.from_single_file(path, config="v2" if sd2 else "v1")
  with pytest.raises(ValueError, match="config='v3': choose one of v1, v2"):
    jaxsd.StableDiffusion.from_single_file(path, config="v3")
  partial = str(tmp_path / "partial.safetensors")
  model_folder.write_safetensors({"cond_stage_model.model.ln_final.weight": np.ones(4, np.float32)}, partial)
  with pytest.raises(ValueError, match="has no unet, vae weights"):
    jaxsd.StableDiffusion.from_single_file(partial, config=folder)
  (tmp_path / "model.ckpt").write_bytes(b"")
  with pytest.raises(ValueError, match="pickled checkpoint: .*allow_pickle=True"):
    jaxsd.StableDiffusion.from_single_file(str(tmp_path / "model.ckpt"), config=folder)
  with pytest.raises(ValueError, match="model.ckpt is not a readable PyTorch checkpoint"):
    jaxsd.StableDiffusion.from_single_file(str(tmp_path / "model.ckpt"), config=folder, allow_pickle=True)
  (tmp_path / "model.txt").write_bytes(b"")
  with pytest.raises(ValueError, match="must be a .safetensors checkpoint"):
    jaxsd.StableDiffusion.from_single_file(str(tmp_path / "model.txt"), config=folder)


def test_pickled_ckpt_with_allow_pickle(folder_and_file, tmp_path, capsys):
  """A CompVis / Lightning `.ckpt` ({"state_dict": ..., "global_step": ...}, as A1111 users have them) reads with
  allow_pickle (torch.load(weights_only=True), diffusers' way) into the same weights as the safetensors file, in the
  library and with `python -m sample --allow-pickle` (refused in one line without it)."""
  from sample import __main__ as sample_main

  folder, path, _ = folder_and_file
  tensors = {k: torch.from_numpy(np.array(v)) for k, v in single_file.read(path).items()}
  ckpt = str(tmp_path / "model.ckpt")
  torch.save({"state_dict": tensors, "global_step": 470000, "epoch": 3}, ckpt)
  want = jaxsd.StableDiffusion.from_single_file(path, config=folder)
  got = jaxsd.StableDiffusion.from_single_file(ckpt, config=folder, allow_pickle=True)
  for name in ("unet_params", "vae_params", "text_encoder_params"):
    jax.tree.map(np.testing.assert_array_equal, getattr(got, name), getattr(want, name))
  out = tmp_path / "out"
  argv = [
      "--model", ckpt, "--single-file-config", folder, "--prompt", "a cat", "--steps", "2", "--out",
      str(out), "--no-progress"
  ]
  assert sample_main.main(argv) == 2
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(err) == 1 and "--allow-pickle" in err[0] and not out.exists()
  assert sample_main.main(argv + ["--allow-pickle"]) == 0
  assert sorted(os.listdir(out)) == ["a_cat-seed0-0000.png", "grid.png"]


def test_v2_preset_is_sd21():
  # What the v2 preset means besides the U-Net: SD 2.1's text tower (read at the penultimate of
  # OpenCLIP's 24 layers), its v-prediction DDIM schedule, and "!" padding.
  p = single_file.preset("v2")
  assert p["text_encoder"]["num_hidden_layers"] == 23 and p["text_encoder"]["hidden_size"] == 1024
  assert p["scheduler"]["prediction_type"] == "v_prediction" and p["unet"]["cross_attention_dim"] == 1024
  assert single_file.PAD_TOKEN["v2"] == "!"


def test_the_sample_command_takes_a_single_file(folder_and_file, tmp_path, capsys):
  """`python -m sample --model FILE.safetensors`: "auto" picks the v1 or v2 preset by the text encoder's keys (the
  tiny file then fails on the preset's sizes, naming them), a folder's configs read it as that folder, and the
  command writes its images; an incomplete SDXL single file and a file that is no SD checkpoint are refused in one
  line."""
  from jaxsd import pipeline_xl
  from sample import __main__ as sample_main

  folder, path, sd2 = folder_and_file
  assert single_file.guess_config(single_file.read(path)) == ("v2" if sd2 else "v1")
  with pytest.raises(jaxsd.weights.WeightLoadError, match="shape mismatches"):
    pipeline_xl.load(path)
  got = pipeline_xl.load(path, single_file_config=folder)
  want = jaxsd.StableDiffusion.from_pretrained(folder)
  jax.tree.map(np.testing.assert_array_equal, got.unet_params, want.unet_params)
  out = tmp_path / "out"
  reference.assert_sample_command_reads(path, folder, out, capsys)
  for keys, message in (({
      "conditioner.embedders.1.model.ln_final.weight": np.ones(4, np.float32)
  }, "SDXL single file"), ({
      "state_dict.x": np.ones(4, np.float32)
  }, "not a Stable Diffusion 1.x / 2.x single file")):
    bad = str(tmp_path / "bad.safetensors")
    model_folder.write_safetensors(keys, bad)
    assert sample_main.main(["--model", bad, "--prompt", "a cat", "--out", str(out), "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0]
  garbage = tmp_path / "garbage.safetensors"
  garbage.write_bytes(b"not a checkpoint")
  assert sample_main.main(["--model", str(garbage), "--prompt", "a cat", "--out", str(out), "--no-progress"]) == 2
  assert "is not a readable safetensors file" in capsys.readouterr().err


def test_auto_config_knows_inpainting_and_instruct_pix2pix_files():
  """As diffusers' infer_diffusers_model_type: a 9-channel conv_in makes an SD 1 / SD 2 file an inpainting one, whose
  preset U-Net takes 9 channels (SD 2's at 512 px with epsilon prediction); 4 channels stay v1 / v2."""
  for te_key, version in (("cond_stage_model.transformer.text_model.final_layer_norm.weight", "v1"),
                          ("cond_stage_model.model.ln_final.weight", "v2")):
    for channels, name in ((4, version), (9, version + "-inpainting")):
      sd = {te_key: np.ones(4, np.float32), single_file.CONV_IN: np.zeros((320, channels, 3, 3), np.float32)}
      assert single_file.guess_config(sd) == name
      assert single_file.preset(name)["unet"]["in_channels"] == channels
  v2i = single_file.preset("v2-inpainting")
  assert v2i["scheduler"]["prediction_type"] == "epsilon" and v2i["unet"]["sample_size"] == 64
  assert single_file.PAD_TOKEN["v2-inpainting"] == "!" and single_file.PAD_TOKEN["v1-inpainting"] is None
  assert single_file.preset("v2")["scheduler"]["prediction_type"] == "v_prediction"  # the presets are copies
  # An 8-channel SD 1.x U-Net is InstructPix2Pix (diffusers' "instruct-pix2pix", timbrooks/instruct-pix2pix's configs);
  # an 8-channel SD 2.x one has no preset.
  for te_key, want in (("cond_stage_model.transformer.text_model.final_layer_norm.weight", "instruct-pix2pix"),
                       ("cond_stage_model.model.ln_final.weight", None)):
    sd = {te_key: np.ones(4, np.float32), single_file.CONV_IN: np.zeros((320, 8, 3, 3), np.float32)}
    if want is None:
      with pytest.raises(ValueError, match="8-channel .InstructPix2Pix. U-Net: no preset"):
        single_file.guess_config(sd)
    else:
      assert single_file.guess_config(sd) == want
  p2p = single_file.preset("instruct-pix2pix")
  assert p2p["unet"]["in_channels"] == 8 and p2p["scheduler"]["_class_name"] == "EulerAncestralDiscreteScheduler"
  assert single_file.PIPELINE_CLASS["instruct-pix2pix"] == "StableDiffusionInstructPix2PixPipeline"


def test_swap_vae_from_a_folder_and_single_files(tmp_path, capsys):
  """StableDiffusion.swap_vae takes another model's VAE as a diffusers folder, an A1111-style file in the original
  layout (no prefix, 1x1-conv attention; what vae-ft-mse-840000-ema-pruned.safetensors holds) or a file in
  diffusers' names: the same parameters each way, and the next images are decoded by it (programs compiled for the
  old VAE are not reused). A VAE of another latent shape is refused; `python -m sample --vae` names a missing path."""
  import diffusers

  from sample.__main__ import main as sample_main

  model = reference.make_tiny_sd_folder(str(tmp_path / "a"), seed=0)
  other = reference.make_tiny_sd_folder(str(tmp_path / "b"), seed=5)
  vae_dir = os.path.join(other, "vae")
  state = dict(model_folder.read_state_dict(vae_dir))
  config = model_folder.read_json(os.path.join(vae_dir, "config.json"))
  ldm = reference.to_ldm(state, single_file.vae_prefixes(config), "", unsqueeze_attention=True)
  model_folder.write_safetensors({k: np.asarray(v) for k, v in ldm.items()}, str(tmp_path / "ldm_vae.safetensors"))
  model_folder.write_safetensors({k: np.asarray(v) for k, v in state.items()}, str(tmp_path / "vae.safetensors"))
  want = jaxsd.StableDiffusion.from_pretrained(other).vae_params

  pipe = jaxsd.StableDiffusion.from_pretrained(model)
  before = pipe(["a red circle"], height=16, width=16, steps=2, sampler="ddim", seed=1)
  for source in (vae_dir, str(tmp_path / "ldm_vae.safetensors"), str(tmp_path / "vae.safetensors")):
    assert pipe.swap_vae(source) is pipe
    jax.tree.map(np.testing.assert_array_equal, pipe.vae_params, want)
  after = pipe(["a red circle"], height=16, width=16, steps=2, sampler="ddim", seed=1)
  assert np.abs(after.astype(int) - before.astype(int)).max() > 10

  small = diffusers.AutoencoderKL(latent_channels=8, block_out_channels=(16, 32), layers_per_block=1,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8)
  small.save_pretrained(tmp_path / "vae8")
  with pytest.raises(ValueError, match="8 latent channels at 1/2 .* U-Net works on 4 at 1/2"):
    pipe.swap_vae(str(tmp_path / "vae8"))
  capsys.readouterr()
  code = sample_main(["--model", model, "--prompt", "x", "--vae", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
  err = capsys.readouterr().err.strip()
  assert code == 2 and "\n" not in err and "--vae" in err and "no such file or folder" in err


def test_standalone_files_with_training_leftovers(tmp_path):
  """A VAE file as its training run saved it (kl-f8 checkpoints: `loss.logvar`, the LPIPS and discriminator
  weights under `loss.`, `model_ema.*`) was refused for unexpected keys; diffusers' converter reads the network's own
  keys only, and so does single_file now (a U-Net file's EMA entries likewise)."""
  folder = reference.make_tiny_sd_folder(str(tmp_path / "sd"))
  extra = {
      "loss.logvar": np.zeros((), np.float32),
      "loss.discriminator.main.0.weight": np.ones((4, 3, 4, 4), np.float32),
      "loss.perceptual_loss.net.slice1.0.weight": np.ones((4, 3, 3, 3), np.float32),
      "model_ema.decay": np.ones((), np.float32),
  }
  for name, prefixes, to_diffusers in (("vae", single_file.vae_prefixes, single_file.vae_state_dict),
                                       ("unet", single_file.unet_prefixes, single_file.unet_state_dict)):
    state = dict(model_folder.read_state_dict(os.path.join(folder, name)))
    config = model_folder.read_json(os.path.join(folder, name, "config.json"))
    ldm = {**reference.to_ldm(state, prefixes(config), "", unsqueeze_attention=name == "vae"), **extra}
    got = to_diffusers({k: np.asarray(v) for k, v in ldm.items()}, config)
    assert sorted(got) == sorted(state), name
    for k in state:
      np.testing.assert_array_equal(np.asarray(got[k]).reshape(state[k].shape), state[k], err_msg=k)
    if name == "vae":  # diffusers' own reading of the same file
      assert sorted(su.convert_ldm_vae_checkpoint({
          k: torch.from_numpy(np.asarray(v)) for k, v in ldm.items()
      }, config)) == sorted(state)


def test_swap_unet_from_a_folder_and_single_files(tmp_path):
  """StableDiffusion.swap_unet takes another U-Net as a diffusers folder (an LCM-distilled one: the pipeline then
  takes the guidance scale as the U-Net's input), a file in diffusers' names (as SDXL-Lightning's) or in the
  original layout: the same parameters each way, and the next images use it. A U-Net of another kind (SDXL's in an
  SD pipeline, another text width) is refused and the pipeline keeps its own."""
  model = reference.make_tiny_sd_folder(str(tmp_path / "a"), seed=0)
  other = reference.make_tiny_sd_folder(str(tmp_path / "b"), seed=5)
  lcm = reference.make_tiny_sd_folder(str(tmp_path / "lcm"), seed=6, time_cond_proj_dim=16)
  unet_dir = os.path.join(other, "unet")
  state = dict(model_folder.read_state_dict(unet_dir))
  config = model_folder.read_json(os.path.join(unet_dir, "config.json"))
  ldm = reference.to_ldm(state, single_file.unet_prefixes(config), "model.diffusion_model.")
  model_folder.write_safetensors({k: np.asarray(v) for k, v in ldm.items()}, str(tmp_path / "ldm_unet.safetensors"))
  model_folder.write_safetensors({k: np.asarray(v) for k, v in state.items()}, str(tmp_path / "unet.safetensors"))
  want = jaxsd.StableDiffusion.from_pretrained(other).unet_params

  pipe = jaxsd.StableDiffusion.from_pretrained(model)
  before = pipe(["a red circle"], height=16, width=16, steps=2, sampler="ddim", seed=1)
  for source in (str(tmp_path / "ldm_unet.safetensors"), str(tmp_path / "unet.safetensors"), unet_dir):
    assert pipe.swap_unet(source) is pipe
    jax.tree.map(np.testing.assert_array_equal, pipe.unet_params, want)
  after = pipe(["a red circle"], height=16, width=16, steps=2, sampler="ddim", seed=1)
  assert np.abs(after.astype(int) - before.astype(int)).max() > 10
  pipe.swap_unet(os.path.join(lcm, "unet"))
  assert pipe.guidance_embedded
  jax.tree.map(np.testing.assert_array_equal, pipe.unet_params, jaxsd.StableDiffusion.from_pretrained(lcm).unet_params)
  scales = [
      pipe(["a red circle"], height=16, width=16, steps=2, sampler="ddim", seed=1, guidance_scale=g).astype(int)
      for g in (8.0, 2.0)
  ]
  assert np.abs(scales[0] - scales[1]).max() > 1  # the scale reaches the U-Net as its input

  base, _, _ = reference.make_tiny_sdxl_folders(str(tmp_path / "xl"))
  with pytest.raises(ValueError, match="addition_embed_type='text_time'.* another kind of model"):
    pipe.swap_unet(os.path.join(base, "unet"))
  import diffusers
  diffusers.UNet2DConditionModel(sample_size=8, layers_per_block=1, block_out_channels=(32, 64),
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=48,
                                 norm_num_groups=8, attention_head_dim=4).save_pretrained(tmp_path / "wide")
  with pytest.raises(ValueError, match="cross_attention_dim=48 but the text encoder's hidden_size=32"):
    pipe.swap_unet(str(tmp_path / "wide"))
  assert pipe.guidance_embedded  # the LCM U-Net stayed


def test_sd_file_without_its_vae_and_a_folder_given_another(folder_and_file, tmp_path):
  """An SD file without VAE keys is refused with what to do and reads with vae=; `pipeline_xl.load(folder, vae=)`
  (what --vae does) swaps a folder's VAE: parameters as the given VAE's."""
  folder, path, _ = folder_and_file
  sd = {k: np.asarray(v) for k, v in single_file.read(path).items() if not k.startswith("first_stage_model.")}
  bare = str(tmp_path / "no_vae.safetensors")
  model_folder.write_safetensors(sd, bare)
  with pytest.raises(ValueError, match=r"no VAE weights .*--vae on the command line"):
    jaxsd.StableDiffusion.from_single_file(bare, config=folder)
  want = jaxsd.StableDiffusion.from_pretrained(folder)
  got = jaxsd.pipeline_xl.load(bare, single_file_config=folder, vae=os.path.join(folder, "vae"))
  for name in ("unet_params", "vae_params", "text_encoder_params"):
    jax.tree.map(np.testing.assert_array_equal, getattr(got, name), getattr(want, name))
  other = reference.make_tiny_sd_folder(str(tmp_path / "other"), seed=5)
  swapped = jaxsd.pipeline_xl.load(folder, vae=os.path.join(other, "vae"))
  jax.tree.map(np.testing.assert_array_equal, swapped.vae_params,
               jaxsd.StableDiffusion.from_pretrained(other).vae_params)
