"""The training exporter: a workdir's model/ folder round-trips through jaxsd and diffusers, and the newest
U-Net checkpoint replaces the exported U-Net when loading a workdir."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch

import jaxsd
from jaxsd import model_folder, pipeline
from jaxsd.training import export
from tests import reference


def _equal(a, b) -> bool:
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
  return jaxsd.StableDiffusion.from_pretrained(reference.make_tiny_sd_folder(str(tmp_path_factory.mktemp("sd"))))


def _export(pipe, workdir, step=3):
  for name, module, params in (("unet", pipe.unet, pipe.unet_params), ("vae", pipe.vae, pipe.vae_params),
                               ("text_encoder", pipe.text_encoder, pipe.text_encoder_params)):
    export.export_component(workdir, name, module, params, step)
  export.export_tokenizer(workdir, pipe.tokenizer)
  export.write_scheduler(pipe.scheduler_config, os.path.join(export.model_dir(workdir), "scheduler"))
  export.write_model_index(export.model_dir(workdir))


def test_round_trip_through_jaxsd_and_diffusers(pipe, tmp_path):
  workdir = str(tmp_path / "work")
  _export(pipe, workdir)
  assert model_folder.is_workdir(workdir)
  assert model_folder.exported_step(os.path.join(export.model_dir(workdir), "unet")) == 3
  back = pipeline.load(workdir)
  assert _equal(back.unet_params, pipe.unet_params) and _equal(back.vae_params, pipe.vae_params)
  assert _equal(back.text_encoder_params, pipe.text_encoder_params)
  assert back.scheduler_config == pipe.scheduler_config
  np.testing.assert_array_equal(back.tokenize(["a red circle"]), pipe.tokenize(["a red circle"]))
  # diffusers reads the folder unchanged, and computes what we compute.
  torch_pipe = reference.torch_pipeline(export.model_dir(workdir))
  assert type(torch_pipe.scheduler).__name__ == "PNDMScheduler"
  x, t = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32), np.array([10])
  ctx = np.array(pipe.encode_text(pipe.text_encoder_params, pipe.tokenize(["a red circle"])))
  ours = pipe.unet.apply({"params": back.unet_params}, x, t, ctx)
  with torch.no_grad():
    ref = torch_pipe.unet(reference.nhwc_to_nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample
  np.testing.assert_allclose(np.asarray(ours), reference.nchw_to_nhwc(ref), rtol=1e-4, atol=1e-4)


def test_newer_checkpoint_replaces_the_exported_unet(pipe, tmp_path):
  workdir = str(tmp_path / "work")
  _export(pipe, workdir, step=3)
  ema = jax.tree.map(lambda p: np.asarray(p) + 1.0, pipe.unet_params)
  state_dir = os.path.join(workdir, "unet", "checkpoints", "5", "state")
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(state_dir, {"params": jax.device_get(pipe.unet_params), "ema_params": ema})
  ckptr.wait_until_finished()
  assert model_folder.latest_unet_checkpoint(workdir) == (5, state_dir)
  loaded = pipeline.load_workdir(workdir)
  assert _equal(loaded.unet_params, ema)
  assert _equal(loaded.text_encoder_params, pipe.text_encoder_params)
  # An export at (or after) the checkpoint's step wins over it.
  export.export_component(workdir, "unet", pipe.unet, pipe.unet_params, step=5)
  assert _equal(pipeline.load(workdir).unet_params, pipe.unet_params)


def test_copy_from_init_takes_the_frozen_parts(pipe, tmp_path):
  init = str(tmp_path / "init")
  _export(pipe, init)
  init_model = export.model_dir(init)
  workdir = str(tmp_path / "work")
  export.copy_from_init(init_model, workdir)
  got = sorted(os.listdir(export.model_dir(workdir)))
  assert got == ["model_index.json", "scheduler", "text_encoder", "tokenizer", "vae"]
  assert model_folder.index_classes(export.model_dir(workdir)) == model_folder.index_classes(init_model)
  # An init whose model_index.json names another scheduler class: the fine-tune's names it too (diffusers builds
  # model_index's class; it said PNDMScheduler whatever the init's was).
  index = model_folder.read_json(os.path.join(init_model, "model_index.json"))
  index.update(_class_name="FlaxStableDiffusionPipeline", scheduler=["diffusers", "EulerDiscreteScheduler"])
  with open(os.path.join(init_model, "model_index.json"), "w") as f:
    json.dump(index, f)
  export.copy_from_init(init_model, workdir)
  index = model_folder.read_json(os.path.join(export.model_dir(workdir), "model_index.json"))
  assert (index["_class_name"], index["scheduler"]) == ("StableDiffusionPipeline",
                                                        ["diffusers", "EulerDiscreteScheduler"])
  with pytest.raises(FileNotFoundError, match="no unet/"):
    model_folder.check_model_folder(export.model_dir(workdir))
