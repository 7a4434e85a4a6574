"""The model-folder format: weight files (single, variant, sharded), folder checks, workdir facts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import tests
from jaxsd import model_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sd(seed=0):
  rng = np.random.default_rng(seed)
  return {"a.weight": rng.standard_normal((3, 2)).astype(np.float32), "b.bias": np.arange(4, dtype=np.float32)}


def test_safetensors_metadata_written_the_same_every_time(tmp_path):
  # safetensors writes the header's metadata from a Rust HashMap (another order on each call): a resumed LoRA
  # run must write the same bytes as an uninterrupted one.
  from safetensors import safe_open

  meta = {"lora_adapter_metadata": '{"r": 4, "note": "caf\u00e9 \\"x\\"\\n"}', "zz": "1", "ss_a": "é"}
  path = tmp_path / "a.safetensors"
  files = set()
  for _ in range(8):
    model_folder.write_safetensors(_sd(), str(path), meta)
    files.add(path.read_bytes())
  assert len(files) == 1
  with safe_open(str(path), "np") as f:
    assert f.metadata() == {"format": "pt", **meta}
    assert np.array_equal(f.get_tensor("a.weight"), _sd()["a.weight"])


def test_single_variant_and_sharded_weights(tmp_path):
  sd = _sd()
  model_folder.write_safetensors(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  model_folder.write_safetensors(_sd(1), str(tmp_path / "diffusion_pytorch_model.fp16.safetensors"))
  files, fmt = model_folder.find_weight_files(str(tmp_path))
  assert fmt == "safetensors" and [f.rsplit("/", 1)[1] for f in files] == ["diffusion_pytorch_model.safetensors"]
  got = model_folder.read_state_dict(str(tmp_path))
  assert sorted(got) == sorted(sd) and all(np.array_equal(got[k], sd[k]) for k in sd)
  assert np.array_equal(model_folder.read_state_dict(str(tmp_path), variant="fp16")["a.weight"], _sd(1)["a.weight"])

  sharded = tmp_path / "sharded"
  sharded.mkdir()
  model_folder.write_safetensors({"a.weight": sd["a.weight"]}, str(sharded / "model-00001-of-00002.safetensors"))
  model_folder.write_safetensors({"b.bias": sd["b.bias"]}, str(sharded / "model-00002-of-00002.safetensors"))
  (sharded / "model.safetensors.index.json").write_text(
      json.dumps({
          "weight_map": {
              "a.weight": "model-00001-of-00002.safetensors",
              "b.bias": "model-00002-of-00002.safetensors"
          }
      }))
  got = model_folder.read_state_dict(str(sharded))
  assert len(got) == 2 and all(np.array_equal(got[k], sd[k]) for k in sd)


def test_check_model_folder_names_what_is_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    model_folder.check_model_folder(str(tmp_path / "none"))
  for d in ("unet", "vae", "tokenizer"):
    (tmp_path / d).mkdir()
  with pytest.raises(FileNotFoundError, match=r"no text_encoder/, scheduler/"):
    model_folder.check_model_folder(str(tmp_path))
  (tmp_path / "text_encoder").mkdir()
  (tmp_path / "scheduler").mkdir()
  for f in model_folder.CONFIG_FILES[1:]:
    (tmp_path / f).write_text("{}")
  with pytest.raises(FileNotFoundError, match=r"no unet/config.json\. Each network's folder needs"):
    model_folder.check_model_folder(str(tmp_path))
  (tmp_path / "unet" / "config.json").write_text("{}")
  model_folder.check_model_folder(str(tmp_path))
  assert not model_folder.is_workdir(str(tmp_path))


def test_transformer_folders_are_named_for_what_they_are(tmp_path):
  for sub in ("transformer", "vae", "text_encoder", "scheduler"):
    os.makedirs(tmp_path / sub)
  (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
  with pytest.raises(FileNotFoundError, match="holds StableDiffusion3Pipeline .*jaxsd runs U-Net models"):
    model_folder.check_model_folder(str(tmp_path))


def test_workdir_steps_and_checkpoints(tmp_path):
  unet = tmp_path / "model" / "unet"
  unet.mkdir(parents=True)
  assert model_folder.is_workdir(str(tmp_path))
  assert model_folder.exported_step(str(unet)) == -1
  model_folder.write_step(str(unet), 7)
  assert model_folder.exported_step(str(unet)) == 7
  assert model_folder.latest_unet_checkpoint(str(tmp_path)) is None
  for step in ("2", "10", "tmp"):
    (tmp_path / "unet" / "checkpoints" / step / "state").mkdir(parents=True)
  (tmp_path / "unet" / "checkpoints" / "11").mkdir()  # an unfinished save: no state/
  assert model_folder.latest_unet_checkpoint(str(tmp_path)) == (10, str(tmp_path / "unet/checkpoints/10/state"))


def test_split_unet_params():
  assert model_folder.split_unet_params({"unet": 1, "text_encoder": 2}) == (1, 2)
  assert model_folder.split_unet_params({"conv_in": 1}) == ({"conv_in": 1}, None)


def test_pickled_pipeline_folder_with_allow_pickle(tmp_path, capsys):
  """A folder diffusers saved with safe_serialization=False (every network a pickled `.bin`) is refused by default
  and, with allow_pickle (`python -m sample --allow-pickle`), reads the same weights as its safetensors twin."""
  import jax

  import jaxsd
  from sample import __main__ as sample_main
  from tests import reference

  safe = reference.make_tiny_sd_folder(str(tmp_path / "safe"))
  pickled = reference.make_tiny_sd_folder(str(tmp_path / "pickled"), safe_serialization=False)
  assert os.path.exists(os.path.join(pickled, "unet", "diffusion_pytorch_model.bin"))
  with pytest.raises(ValueError, match=r"only pickled PyTorch weights.*allow_pickle=True.*--allow-pickle"):
    jaxsd.StableDiffusion.from_pretrained(pickled)
  want, got = jaxsd.StableDiffusion.from_pretrained(safe), jaxsd.StableDiffusion.from_pretrained(
      pickled, allow_pickle=True)
  for name in ("unet_params", "vae_params", "text_encoder_params"):
    jax.tree.map(np.testing.assert_array_equal, getattr(got, name), getattr(want, name))
  argv = ["--model", pickled, "--prompt", "a cat", "--steps", "2", "--out", str(tmp_path / "out"), "--no-progress"]
  capsys.readouterr()  # the references' warnings
  assert sample_main.main(argv) == 2
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(err) == 1 and "--allow-pickle" in err[0]
  assert sample_main.main(argv + ["--allow-pickle"]) == 0
  assert sorted(os.listdir(tmp_path / "out")) == ["a_cat-seed0-0000.png", "grid.png"]
  # Converted once: save_pretrained writes the safetensors folder diffusers and jaxsd load without unpickling.
  import diffusers

  got.save_pretrained(str(tmp_path / "converted"))
  again = jaxsd.StableDiffusion.from_pretrained(str(tmp_path / "converted"))
  for name in ("unet_params", "vae_params", "text_encoder_params"):
    jax.tree.map(np.testing.assert_array_equal, getattr(again, name), getattr(want, name))
  assert again.scheduler_config == want.scheduler_config and again.default_sampler == want.default_sampler
  diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "converted"), safety_checker=None)


def test_copy_components_makes_a_cut_or_outdated_copy_again(tmp_path):
  """The init's frozen parts copied into a workdir: a copy cut short, or one of an init repaired since, is made
  again (it was kept for good); an exported network (its step file) is left as training wrote it."""
  src, dst = tmp_path / "init", tmp_path / "work" / "model"
  for name in ("vae", "text_encoder"):
    (src / name).mkdir(parents=True)
    (src / name / "config.json").write_text("{}")
    (src / name / "weights.safetensors").write_bytes(b"0123456789")
  model_folder.copy_components(str(src), str(dst), ("vae", "text_encoder"))
  assert (dst / "vae" / "weights.safetensors").read_bytes() == b"0123456789"
  (dst / "vae" / "weights.safetensors").write_bytes(b"01234")  # cut short
  (src / "text_encoder" / "weights.safetensors").write_bytes(b"repaired!!!")  # the init repaired
  model_folder.write_step(str(dst / "text_encoder"), 7)  # ... but trained and exported here
  model_folder.copy_components(str(src), str(dst), ("vae", "text_encoder"))
  assert (dst / "vae" / "weights.safetensors").read_bytes() == b"0123456789"
  assert (dst / "text_encoder" / "weights.safetensors").read_bytes() == b"0123456789"
  assert sorted(os.listdir(dst)) == ["model_index.json", "text_encoder", "vae"]  # no .tmp / .old left


def test_a_checkpoint_saved_on_8_devices_is_read_on_1(tmp_path):
  """`python -m sample --model <workdir>` swaps in the newest U-Net checkpoint (model_folder.read_unet_checkpoint).
  orbax restored it, with no target, onto the shardings it was saved with: a checkpoint written on 8 devices was
  refused on 1 ("Topology mismatch"), logged as a warning, and the older exported U-Net used instead: images on 1
  device differed from those on 8 (max uint8 difference 108 on a tiny fine-tune killed after step 2's checkpoint).
  Saved here on 8 devices (split over them, as fsdp=8 does), read by a process with 1 device."""
  import orbax.checkpoint as ocp
  from jax.sharding import NamedSharding, PartitionSpec as P

  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:8])
  kernel = np.arange(16 * 24, dtype=np.float32).reshape(16, 24)
  split = lambda x: jax.device_put(x, NamedSharding(mesh, P("fsdp")))  # noqa: E731
  state = {
      "params": {
          "conv": {
              "kernel": split(kernel)
          }
      },
      "ema_params": {
          "conv": {
              "kernel": split(kernel + 0.5)
          }
      },
      "step": jax.device_put(np.int32(2), NamedSharding(mesh, P()))
  }
  ocp.StandardCheckpointer().save(tmp_path / "state", state)
  code = ("import sys, numpy as np; from jaxsd import model_folder; "
          "p, t, ema = model_folder.read_unet_checkpoint(sys.argv[1]); "
          "np.save(sys.argv[2], np.asarray(p['conv']['kernel'])); assert t is None and ema")
  env = dict(os.environ, XLA_FLAGS=tests.xla_flags(1), JAX_PLATFORMS="cpu")
  run = subprocess.run(
      [sys.executable, "-c", code, str(tmp_path / "state"),
       str(tmp_path / "k.npy")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  np.testing.assert_array_equal(np.load(tmp_path / "k.npy"), kernel + 0.5)


@pytest.mark.parametrize(
    "class_name, unet, sdxl",
    [
        ("StableDiffusionXLPipeline", {}, True),
        ("StableDiffusionXLInpaintPipeline", {
            "in_channels": 9
        }, True),  # diffusers/stable-diffusion-xl-1.0-inpainting-0.1
        ("StableDiffusionXLControlNetPipeline", {}, True),
        ("FlaxStableDiffusionXLPipeline", {}, True),
        ("StableDiffusionPipeline", {
            "addition_embed_type": "text_time"
        }, True),  # the U-Net says so
        ("StableDiffusionPipeline", {}, False),
        ("LatentConsistencyModelPipeline", {
            "time_cond_proj_dim": 256
        }, False),  # SimianLuo/LCM_Dreamshaper_v7
        ("StableDiffusionInpaintPipeline", {
            "in_channels": 9
        }, False),
    ])
def test_sdxl_folders_told_apart_by_pipeline_class_or_unet(tmp_path, class_name, unet, sdxl):
  os.makedirs(tmp_path / "unet")
  (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
  (tmp_path / "unet" / "config.json").write_text(json.dumps(unet))
  assert model_folder.is_sdxl_folder(str(tmp_path)) is sdxl


def test_saved_indexes_name_only_pipelines_of_the_components_written(tmp_path):
  """A folder jaxsd writes names its source's pipeline class only where that class's components are the ones
  written: a ControlNet pipeline's class (whose controlnet/ a copy does not hold) becomes the plain pipeline's, which
  diffusers can load; an SDXL init's settings stay (sdxl_index: what an SDXL fine-tune's model_index.json is)."""
  control = {
      "_class_name": "StableDiffusionXLControlNetPipeline",
      "controlnet": ["diffusers", "ControlNetModel"],
      "force_zeros_for_empty_prompt": False,
      "text_encoder": ["transformers", "CLIPTextModel"]
  }
  assert model_folder.sdxl_index(control) == {
      "_class_name": "StableDiffusionXLPipeline",
      "force_zeros_for_empty_prompt": False,
      "text_encoder": ["transformers", "CLIPTextModel"]
  }
  refiner = {"_class_name": "FlaxStableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None]}
  assert model_folder.sdxl_index(refiner)["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
  inpaint = {"_class_name": "StableDiffusionXLInpaintPipeline", "text_encoder": ["transformers", "CLIPTextModel"]}
  assert model_folder.sdxl_index(inpaint)["_class_name"] == "StableDiffusionXLInpaintPipeline"
  for given, written in (("StableDiffusionControlNetPipeline", "StableDiffusionPipeline"),
                         ("FlaxStableDiffusionInpaintPipeline",
                          "StableDiffusionInpaintPipeline"), (None, "StableDiffusionPipeline")):
    model_folder.write_model_index(str(tmp_path), given, "EulerDiscreteScheduler")
    index = model_folder.read_json(str(tmp_path / "model_index.json"))
    assert (index["_class_name"], index["scheduler"]) == (written, ["diffusers", "EulerDiscreteScheduler"])
    assert "controlnet" not in index
