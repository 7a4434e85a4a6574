"""LoRA training (train/configs/lora.py) on a tiny diffusers folder: only the adapter trains, it learns, a
resumed run gives the same adapter to the bit, and the file it writes loads in diffusers as in jaxsd."""

from __future__ import annotations

import json
import os
import shutil

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import traverse_util

import jaxsd
from jaxsd import lora, pretrained
from jaxsd import tokenizer as tok
from jaxsd.diffusion import SchedulerConfig
from jaxsd.training import lora_training, run, stages
from jaxsd.training.optimizer import make_optimizer
from jaxsd.training.train_state import TrainState, make_train_step
from tests import reference
from tests.training import ONE_DEVICE
from train.configs import lora as lora_config

STEPS, HW = 6, 16
PROMPTS = ["a red circle on the left", "a small blue square"]


@pytest.fixture(scope="module")
def init(tmp_path_factory):
  return reference.make_tiny_sd_folder(str(tmp_path_factory.mktemp("sd")))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _cfg(init_dir, data_dir, **updates):
  cfg = lora_config.get_config("sd15")
  cfg.init = init_dir
  cfg.dtype = "float32"
  cfg.data.update(name="shapes/32x32_n512_128_s0", data_dir=data_dir, image_size=32, random_flip=False)
  cfg.log_every, cfg.checkpoint_every, cfg.progress = 1, 3, False
  cfg.unet.update(steps=STEPS, batch_size=8)
  cfg.unet.optimizer.update(lr=1e-2, total_steps=STEPS)  # large, so that a few steps move the tiny model
  cfg.update_from_flattened_dict({**ONE_DEVICE, **updates})
  return cfg


@pytest.fixture(scope="module")
def trained(init, data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("lora"))
  return workdir, run.train_and_evaluate(_cfg(init, data_dir), workdir)


def test_the_run_writes_an_attention_adapter(trained):
  workdir, results = trained
  r = results["lora"]
  # 4 transformer blocks (down, mid, 2 up) x 2 attentions x to_q/to_k/to_v/to_out.0
  assert r["steps"] == STEPS and r["layers"] == 32 and r["rank"] == 4 and r["scale"] == 1.0
  assert r["file"] == os.path.join(workdir, "lora", lora.WEIGHT_NAME)
  sd = safetensors.numpy.load_file(r["file"])
  assert len(sd) == 64 and all(k.startswith("unet.") and ".attn" in k for k in sd)
  assert {k.rsplit(".", 3)[-3] for k in sd} == {"to_q", "to_k", "to_v", "0"}
  assert sum(v.size for v in sd.values()) == r["adapter_parameters"]
  assert all(np.abs(v).max() > 0 for k, v in sd.items() if "lora_B" in k)  # lora_B started at zero and moved
  assert not os.path.exists(os.path.join(workdir, "model"))  # the base model is not re-exported


def _diffusers_latents(tpipe, prompts, latents):
  """diffusers' final latents (NHWC) for `prompts` from `latents`: 3 steps, guidance 7.5."""
  with torch.no_grad():
    out = tpipe(prompts, height=HW, width=HW, num_inference_steps=3, guidance_scale=7.5,
                latents=reference.nhwc_to_nchw(latents), output_type="latent")
  return reference.nchw_to_nhwc(out.images)


def test_the_adapter_loads_in_diffusers_as_in_jaxsd(trained, init):
  """diffusers' latents with the trained file loaded by its load_lora_weights against jaxsd's with
  `pipe.load_lora` of the same file: within the pipeline tolerance (1e-4 of the latents' scale). The adapter
  moves the latents far beyond that tolerance, so a file diffusers half-loaded would fail."""
  workdir, _ = trained
  tpipe = reference.torch_pipeline(init)
  tpipe.scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(init, subfolder="scheduler")
  pipe = jaxsd.StableDiffusion.from_pretrained(init)
  latents = np.asarray(pipe.noise(0, len(PROMPTS), HW, HW))

  base = _diffusers_latents(tpipe, PROMPTS, latents)
  tpipe.load_lora_weights(os.path.join(workdir, "lora"))
  ref = _diffusers_latents(tpipe, PROMPTS, latents)
  pipe.load_lora(os.path.join(workdir, "lora"))
  reference.assert_matches_and_moves(pipe, PROMPTS, HW, 7.5, latents, ref, base, "the trained adapter")


def test_a_resumed_run_gives_the_same_adapter_to_the_bit(trained, init, data_dir, tmp_path):
  """Stopped after step 3's checkpoint (a run with steps=3; its result.json removed, as a kill leaves none),
  then run again to 6 steps: the adapter is bit-identical to the uninterrupted run's. Checked to fail when the
  data position is not restored (the resumed run then sees other batches)."""
  workdir = str(tmp_path / "resumed")
  run.train_and_evaluate(_cfg(init, data_dir, **{"unet.steps": 3}), workdir)
  os.remove(os.path.join(workdir, "lora", "result.json"))
  results = run.train_and_evaluate(_cfg(init, data_dir), workdir)
  assert results["lora"]["steps"] == STEPS
  # The files' bytes (safetensors' header metadata is written in sorted order: model_folder.write_safetensors).
  a, b = (open(r["lora"]["file"], "rb").read() for r in (trained[1], results))
  assert a == b


def test_kohya_export(trained, init, data_dir, tmp_path):
  """--config.lora.export_format=kohya (resuming the finished run's checkpoint: no training) writes
  lora_unet_ keys with an alpha per layer, the same adapter as the PEFT file."""
  workdir = reference.reuse_checkpoints(trained[0], str(tmp_path / "kohya"), "lora")
  results = run.train_and_evaluate(_cfg(init, data_dir, **{"lora.export_format": "kohya"}), workdir)
  sd = safetensors.numpy.load_file(results["lora"]["file"])
  assert all(k.startswith("lora_unet_") for k in sd) and len(sd) == 96
  params = {"unet": jaxsd.load_unet(os.path.join(init, "unet"))[1]}
  a, b = lora.load(trained[1]["lora"]["file"], params), lora.load(results["lora"]["file"], params)
  reference.assert_same_adapter(b, a)


def test_only_process_0_writes_the_adapter(trained, init, data_dir, tmp_path, monkeypatch):
  """On several hosts every process holds the adapter, and process 0 alone writes it (as the exported model):
  every process saving one file through one .tmp raced. Here the finished run's checkpoint is resumed as a
  process other than 0: it exports nothing."""
  workdir = reference.reuse_checkpoints(trained[0], str(tmp_path / "host1"), "lora")
  monkeypatch.setattr(run, "primary", lambda: False)
  results = run.train_and_evaluate(_cfg(init, data_dir), workdir)
  assert results["lora"]["file"] == os.path.join(workdir, "lora", lora.WEIGHT_NAME)
  assert not [f for f in os.listdir(os.path.join(workdir, "lora")) if "safetensors" in f]


def _stage(init, cfg):
  tokenizer = tok.load_tokenizer(init)
  unet, unet_params = pretrained.load_unet(os.path.join(init, "unet"))
  vae, vae_params = pretrained.load_vae(os.path.join(init, "vae"))
  te, te_params = pretrained.load_text_encoder(os.path.join(init, "text_encoder"))
  base = stages.unet_stage(cfg, unet=unet, vae=vae, vae_params=vae_params, text_encoder=te, text_params=te_params,
                           scheduler=SchedulerConfig.from_json(os.path.join(init, "scheduler")), tokenizer=tokenizer)
  spec = lora_training.make_spec(unet_params, cfg.lora)
  ids = tok.tokenize(tokenizer, ["a red circle", "a blue square"] * 2, max_length=77)
  images = np.asarray(jax.random.uniform(jax.random.key(3), (4, 32, 32, 3), minval=-1, maxval=1))
  return lora_training.lora_stage(base, unet_params, spec), spec, {"image": images, "input_ids": np.asarray(ids)}


def test_only_the_adapter_trains_and_it_learns_a_repeated_batch(init, data_dir):
  """15 steps on one batch: the optimizer state holds the adapter's moments only, the frozen U-Net is
  bit-identical afterwards, and the merged U-Net differs from the base in the 32 target kernels alone. The
  loss of the last 5 steps is below 0.9 of the zero-learning-rate control's: the loss of the untouched adapter
  (lora_B = 0, the base model) with the same noise draws, read from the same compiled step. Measured: ratio
  0.82; with the gradient zeroed (jax.lax.stop_gradient on the adapter inside loss_fn) it is 1.0 and the test
  fails."""
  cfg = _cfg(init, data_dir, **{"unet.caption_dropout": 0.0})
  stage, spec, batch = _stage(init, cfg)
  tx, _ = make_optimizer(cfg.unet.optimizer)
  state = start = TrainState.create(stage.init_params(jax.random.key(0)), tx)
  n_adapter = sum(x.size for x in jax.tree.leaves(state.params))
  assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim) == 2 * n_adapter  # Adam's mu and nu
  before = jax.tree.map(np.array, stage.frozen)
  step = jax.jit(make_train_step(stage.loss_fn, tx))
  rng = jax.random.key(1)
  losses, controls = [], []
  for i in range(15):
    controls.append(float(step(start.replace(step=jnp.int32(i)), batch, rng, stage.frozen)[1]["loss"]))
    state, m = step(state, batch, rng, stage.frozen)
    losses.append(float(m["loss"]))
  ratio = np.mean(losses[-5:]) / np.mean(controls[-5:])
  print(f"last 5 steps: loss {np.mean(losses[-5:]):.4f}, control {np.mean(controls[-5:]):.4f}, ratio {ratio:.3f}")
  assert ratio < 0.9
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(stage.frozen)):
    np.testing.assert_array_equal(a, np.asarray(b))
  base = traverse_util.flatten_dict(stage.frozen["unet"])
  merged = traverse_util.flatten_dict(lora_training.apply_adapter(stage.frozen["unet"], state.params, spec.scale))
  changed = {p[:-1] for p, v in merged.items() if not np.array_equal(np.asarray(v), np.asarray(base[p]))}
  assert changed == set(spec.targets) and len(changed) == 32


@pytest.mark.parametrize("updates,message", [
    ({
        "lora.dropout": 0.1
    }, "dropout=0.1: only 0 is supported"),
    ({
        "lora.target_modules": "to_q,to_qq"
    }, "target_modules to_qq match no Dense or Conv layer"),
    ({
        "lora.export_format": "civitai"
    }, "choose one of peft, kohya"),
    ({
        "unet.train_text_encoder": True
    }, "train_text_encoder=False"),
    ({
        "init": ""
    }, "set --config.init"),
    ({
        "lora.rank": 0
    }, "rank=0: the adapter rank must be >= 1"),
    ({
        "lora.alpha": -3.0
    }, r"alpha=-3.0: the adapter's alpha must be a finite number >= 0"),
    ({
        "lora.alpha": float("inf")
    }, r"alpha=inf: the adapter's alpha must be a finite number >= 0"),
    ({
        "lora.token_embeddings": "<teal>"
    }, "'<teal>' is 3 tokens .* one token each"),
    ({
        "lora.token_init": "red"
    }, "token_embeddings names none"),
    ({
        "lora.token_embeddings": "sks,SKS"
    }, "'sks' and 'SKS' are the same token for this tokenizer"),
    ({
        "unet.sample_every": 2
    }, "sample_every=2: a LoRA run draws no samples while it trains"),
    ({
        "lora.target_modules": ""
    }, "nothing would train"),
    ({
        "lora.text_target_modules": "q_proj,v_proj"
    }, "text_target_modules='q_proj,v_proj' names the text encoder's layers to adapt, but train_text_encoder is "
     "False"),
    ({
        "lora.train_text_encoder": True,
        "lora.text_target_modules": ""
    }, "text_target_modules is empty: name the text encoder's layers to adapt, e.g. q_proj"),
])
def test_bad_lora_config_is_refused(init, data_dir, tmp_path, updates, message):
  with pytest.raises(run.ConfigError, match=message):
    run.train_and_evaluate(_cfg(init, data_dir, **updates), str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "lora" / "checkpoints")


def test_an_init_with_only_fp16_weights_is_refused_naming_the_conversion(init, data_dir, tmp_path):
  """A folder of *.fp16.safetensors weights only (as some hub repositories are): the loader's hint named sampling's
  --variant flag, which `python -m train` does not have; training names the conversion instead."""
  fp16 = str(tmp_path / "fp16_only")
  shutil.copytree(init, fp16)
  for name in ("unet", "vae"):
    os.rename(os.path.join(fp16, name, "diffusion_pytorch_model.safetensors"),
              os.path.join(fp16, name, "diffusion_pytorch_model.fp16.safetensors"))
  message = r"fp16_only/unet holds only fp16 weights.*from_pretrained\('INIT', variant='fp16'\).save_pretrained"
  with pytest.raises(run.ConfigError, match=message) as e:
    run.check_config(_cfg(fp16, data_dir), 1)
  assert "--variant" not in str(e.value)


def test_benchmark_times_the_adapter_step(init, data_dir, tmp_path):
  figures = run.train_and_evaluate(_cfg(init, data_dir, benchmark_steps=2), str(tmp_path / "bench"))
  assert figures["stage"] == "lora" and figures["images_per_sec"] > 0 and figures["layers"] == 32
  print(json.dumps(figures))


def test_textual_inversion_trains_one_row_and_loads_in_diffusers(init, data_dir, tmp_path):
  """`lora.token_embeddings="circle"` with no adapter layers: only the word's row of the token-embedding table
  trains; it is written as diffusers' learned_embeds.safetensors, which diffusers' load_textual_inversion loads
  under a new token "<circle>": its latents for "... <circle> ..." match jaxsd's for "... circle ..." with
  `pipe.load_token_embeddings` of the same file, within the pipeline tolerance, and the embedding moves them
  far beyond it (so a row put in the wrong place, or not at all, fails)."""
  from jaxsd import token_embeddings

  workdir = str(tmp_path / "ti")
  r = run.train_and_evaluate(_cfg(init, data_dir, **{
      "lora.token_embeddings": "circle",
      "lora.target_modules": ""
  }), workdir)["lora"]
  assert r["steps"] == STEPS and r["token_embeddings"] == ["circle"] and r["layers"] == 0 and "file" not in r
  assert r["embeddings_file"] == os.path.join(workdir, "lora", token_embeddings.WEIGHT_NAME)
  assert not os.path.exists(os.path.join(workdir, "lora", lora.WEIGHT_NAME))  # no adapter layers, no LoRA file
  rows = safetensors.numpy.load_file(r["embeddings_file"])
  pipe = jaxsd.StableDiffusion.from_pretrained(init)
  before = np.asarray(token_embeddings.table(pipe.text_encoder_params))
  (circle,) = pipe.tokenizer("circle", add_special_tokens=False)["input_ids"]
  assert list(rows) == ["circle"] and rows["circle"].shape == (1, before.shape[1])
  assert np.abs(rows["circle"][0] - before[circle]).max() > 1e-2  # it trained

  tpipe = reference.torch_pipeline(init)
  tpipe.scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(init, subfolder="scheduler")
  latents = np.asarray(pipe.noise(0, len(PROMPTS), HW, HW))

  prompts = ["a red circle on the left", "a small blue circle"]
  base = _diffusers_latents(tpipe, prompts, latents)
  tpipe.load_textual_inversion(r["embeddings_file"], token="<circle>")
  ref = _diffusers_latents(tpipe, [p.replace("circle", "<circle>") for p in prompts], latents)
  assert pipe.load_token_embeddings(os.path.join(workdir, "lora")) == ["circle"]
  after = np.asarray(token_embeddings.table(pipe.text_encoder_params))
  assert np.array_equal(np.delete(after, circle, 0), np.delete(before, circle, 0))  # one row replaced, no other
  reference.assert_matches_and_moves(pipe, prompts, HW, 7.5, latents, ref, base, "the learned embedding")
