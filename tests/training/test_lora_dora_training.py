"""DoRA in LoRA training (`lora.use_dora`, diffusers' scripts' --use_dora): the merged kernels, the U-Net's output and
the gradients against peft's DoRA (`LoraConfig(use_dora=True)`) on the same factors and magnitudes, the magnitudes'
init against peft's, a fresh adapter merging to the base kernels bit for bit, train steps whose gradients reach m,
down and up and that learn through the magnitudes too, the written file in diffusers (peft DoRA) against jaxsd's
pipeline with it, its kohya export refused, and a resumed run to the bit."""

from __future__ import annotations

import copy
import json
import os
import shutil
import types

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import torch
import transformers
from flax import traverse_util
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

import jaxsd
from jaxsd import lora, lora_export, pretrained, weights
from jaxsd import tokenizer as tok
from jaxsd.diffusion import SchedulerConfig
from jaxsd.training import lora_training, run, stages
from jaxsd.training.optimizer import make_optimizer
from jaxsd.training.train_state import TrainState, make_train_step
from tests import reference
from tests.training.test_lora_training import HW, PROMPTS, STEPS, _cfg, _diffusers_latents

UNET_TARGETS = "to_q,to_k,to_v,to_out.0,proj_in,conv1"  # linear layers, 1x1 (proj_in) and 3x3 (conv1) convolutions
RUN_TARGETS = "to_q,to_k,to_v,to_out.0,proj_in"  # the runs': 3x3 kernels' gradients would add 2 s of compilation
N_UNET, N_RUN, N_TEXT = 44, 36, 8  # 4 transformers x (8 projections + proj_in) (+ 8 ResNets' conv1); 2 CLIP layers x 4
DORA = {"lora.use_dora": True, "lora.target_modules": RUN_TARGETS, "lora.train_text_encoder": True}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  """torch's 2-thread CPU pool spends ~25 ms per call of these tiny convolutions on this 2-core VM, one thread
  0.1 ms: the PyTorch references run single-threaded here (the number is restored after the module)."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def init(tmp_path_factory):
  return reference.make_tiny_sd_folder(str(tmp_path_factory.mktemp("sd")))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def trained(init, data_dir, tmp_path_factory):
  """A DoRA run on the U-Net's attention and proj_in (1x1 convolutions) and the text encoder's attention."""
  workdir = str(tmp_path_factory.mktemp("dora"))
  return workdir, run.train_and_evaluate(_cfg(init, data_dir, **DORA), workdir)["lora"]


# --- the merge against peft's DoRA ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_unet(init):
  """diffusers' tiny U-Net with peft's DoRA on UNET_TARGETS (rank 4, alpha 8: scale 2) as peft initialised it, a copy
  with random lora_A, lora_B and magnitudes moved off the norms (so that the rescaling matters), jaxsd's U-Net, and
  one compiled program: trained pytree -> (U-Net output on fixed inputs, merged parameters)."""
  unet = diffusers.UNet2DConditionModel.from_pretrained(init, subfolder="unet")
  config = LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS.split(","), use_dora=True)
  fresh = inject_adapter_in_model(config, copy.deepcopy(unet))
  moved = copy.deepcopy(fresh)
  g = torch.Generator().manual_seed(0)
  reference.randomize_peft_adapter(moved, g)
  module, params = pretrained.load_unet(os.path.join(init, "unet"))
  x, t, context = _inputs()

  def forward(tree):
    merged = lora_training.apply_adapter(params, tree, 2.0)
    return module.apply({"params": merged}, x, t, context), merged

  program = jax.jit(forward)
  return types.SimpleNamespace(fresh=fresh, moved=moved, module=module, params=params, program=program,
                               inputs=(x, t, context))


def _trained_tree(sd: dict, params) -> dict:
  """A peft U-Net state dict as lora_training's trained pytree ({layer: {"down", "up", "magnitude"}}), read by
  `jaxsd.lora` (the layout conversion of loading)."""
  adapter = lora.from_state_dict({"unet." + k: v for k, v in sd.items()}, {"unet": params}, {"unet.lora_alpha": 8})
  flat = {}
  for path, f in adapter.layers["unet"].items():
    assert f.scale == 2.0 and f.magnitude is not None
    flat.update({path[:-1] + ("down",): f.down, path[:-1] + ("up",): f.up})
    flat[path[:-1] + ("magnitude",)] = np.asarray(f.magnitude).reshape(-1)
  return jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(flat))


def _inputs(seed: int = 0):
  rng = np.random.RandomState(seed)
  return rng.randn(2, 8, 8, 4).astype(np.float32), np.array([3, 781]), rng.randn(2, 7, 32).astype(np.float32)


def _torch_sample(model, x, t, context):
  with torch.no_grad():
    out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.as_tensor(t), torch.from_numpy(context)).sample
  return out.numpy().transpose(0, 2, 3, 1)


def _layer_gradients(layer, tree: dict, kernel, bias, padding: int = 0) -> dict:
  """One DoRA layer: the gradients of a random projection of its output with respect to m, down and up, by torch's
  autograd through peft's forward (`layer`, a peft LoraLayer) and by JAX through `apply_adapter`'s merge, in PyTorch
  layout: {role: (jaxsd's, peft's)}."""
  conv = kernel.ndim == 4
  rng = np.random.RandomState(1)
  x = rng.randn(*((2, 6, 6, kernel.shape[2]) if conv else (2, 5, kernel.shape[0]))).astype(np.float32)

  def apply(tr):
    p = lora_training.apply_adapter({"kernel": kernel, "bias": bias}, tr, 2.0)
    if not conv:
      return x @ p["kernel"] + p["bias"]
    return jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), [(padding, padding)] * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"]

  probe = rng.randn(*jax.eval_shape(apply, tree).shape).astype(np.float32)
  grads = jax.jit(jax.grad(lambda tr: jnp.sum(apply(tr) * probe)))(tree)
  layer.zero_grad()
  to_torch = (lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2))) if conv else torch.from_numpy
  (layer(to_torch(x)) * to_torch(probe)).sum().backward()
  factors = lora.Factors(grads["down"], grads["up"], 2.0, kernel.shape)
  a, b = lora_export._torch_factors(factors)  # flax -> PyTorch layout
  theirs = {n.split(".")[0]: p.grad.numpy() for n, p in layer.named_parameters() if "lora_" in n}
  return {
      "lora_A": (a, theirs["lora_A"]),
      "lora_B": (b, theirs["lora_B"]),
      "lora_magnitude_vector": (np.asarray(grads["magnitude"]), theirs["lora_magnitude_vector"].reshape(-1))
  }


def test_merged_kernels_output_and_gradients_match_peft(peft_unet):
  """On the same factors and magnitudes: every merged kernel (`apply_adapter`, the training step's merge) against peft's
  merge (`LoraLayer.merge`), the U-Net's output against peft's unfused DoRA forward, and, for a linear layer, a 1x1
  and a 3x3 convolution, the gradients of a random projection of the layer's output with respect to m, down and up
  against torch's autograd through peft's forward (which detaches the norm). Measured: kernels 6e-8, output 2.4e-6
  (of outputs up to 2.2), gradients within 6e-7 of their largest; without the stop_gradient in lora_dora.rescale the
  gradients of down and up are off by 0.18 and 0.48 of their largest (m's is the same either way) and this fails."""
  moved, params, (x, t, context) = peft_unet.moved, peft_unet.params, peft_unet.inputs
  tree = _trained_tree(get_peft_model_state_dict(moved), params)
  assert len({p[:-1] for p in traverse_util.flatten_dict(tree)}) == N_UNET
  out, merged = peft_unet.program(tree)

  fused = copy.deepcopy(moved)
  for m in fused.modules():
    if isinstance(m, LoraLayer):
      m.merge()
  theirs = {k.replace(".base_layer", ""): v.detach().numpy() for k, v in fused.state_dict().items() if "lora_" not in k}
  want = traverse_util.flatten_dict(weights.state_dict_to_params(theirs, params))
  kernel_diff = max(float(np.abs(np.asarray(v) - want[p]).max()) for p, v in traverse_util.flatten_dict(merged).items())
  ref = _torch_sample(moved, x, t, context)
  out_diff = float(np.abs(np.asarray(out) - ref).max())
  assert np.abs(ref - _torch_sample(fused, x, t, context)).max() < 1e-5  # peft's merge is its forward

  modules = lora.kernel_modules(params)
  flat, trained = traverse_util.flatten_dict(params), traverse_util.flatten_dict(tree)
  worst = {}
  for name, padding in (("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q", 0),
                        ("down_blocks.0.attentions.0.proj_in", 0), ("down_blocks.0.resnets.0.conv1", 1)):
    path = modules[name][0][:-1]
    layer_tree = {r: trained[path + (r,)] for r in ("down", "up", "magnitude")}
    got = _layer_gradients(moved.get_submodule(name), layer_tree, flat[path + ("kernel",)],
                           flat.get(path + ("bias",), np.zeros(modules[name][1][-1], np.float32)), padding)
    for role, (ours, peft) in got.items():
      worst[role] = max(worst.get(role, 0.0), float(np.abs(ours - peft.reshape(ours.shape)).max() / np.abs(peft).max()))
  print(f"merged kernels: max |jaxsd - peft merge| = {kernel_diff:.1e}; U-Net output: max |jaxsd - peft| = "
        f"{out_diff:.1e} (output up to {np.abs(ref).max():.2f}); gradients, max |diff| / max |peft's|: " +
        ", ".join(f"{r} {v:.1e}" for r, v in worst.items()))
  assert kernel_diff < 1e-5 and out_diff < 1e-5
  assert max(worst.values()) < 1e-4


def test_magnitudes_start_as_peft_starts_them(peft_unet, init):
  """`initial_magnitudes` against the `lora_magnitude_vector` peft gives a fresh DoRA layer (lora_B zero: the base
  weight's norm per output channel), for the U-Net's linear layers and convolutions and the text encoder's
  attention. Measured: 2.4e-7 (U-Net) and 1.2e-7 (text encoder) apart (summation order); within 1e-6 asked."""
  fresh, params = peft_unet.fresh, peft_unet.params
  te = transformers.CLIPTextModel.from_pretrained(init, subfolder="text_encoder")
  te_fresh = inject_adapter_in_model(
      LoraConfig(r=4, target_modules=lora_training.TEXT_ATTENTION.split(","), use_dora=True), te)
  _, te_params = pretrained.load_text_encoder(os.path.join(init, "text_encoder"))
  spec = lora_training.LoraSpec(4, 4.0, lora_training.target_layers(params, UNET_TARGETS),
                                text_targets=lora_training.target_layers(te_params,
                                                                         lora_training.TEXT_ATTENTION), dora=True)
  ours = lora_training.initial_magnitudes(spec, {"unet": params, "text_encoder": te_params})
  for network, model, tree in (("unet", fresh, params), ("text_encoder", te_fresh, te_params)):
    theirs = {
        n.removesuffix(".lora_magnitude_vector.default.weight"): p.detach().numpy().reshape(-1)
        for n, p in model.named_parameters()
        if "lora_magnitude_vector" in n
    }
    paths = {m.removeprefix("text_model."): path[:-1] for m, (path, _) in lora.kernel_modules(tree).items()}
    assert len(theirs) == len(ours[network]) == len(spec.targets if network == "unet" else spec.text_targets)
    diff = max(float(np.abs(np.asarray(ours[network][paths[m]]) - v).max()) for m, v in theirs.items())
    print(f"{network}: {len(theirs)} magnitudes, max |jaxsd - peft| = {diff:.1e}")
    assert diff < 1e-6


def test_a_fresh_adapter_merges_to_the_base_kernels_bit_for_bit(peft_unet):
  """jaxsd's fresh DoRA adapter (lora_B zero, m = ||W||: peft's init) merged inside a compiled program (the merge and
  the U-Net's forward): every kernel it runs is the base kernel bit for bit, so the first forward is the base model's
  (as peft's init makes it). Checked to fail with the norm summed by jnp.sum (XLA's reduce: 6336 elements of a 3x3
  kernel 1 ulp off) and without the barrier before `rescale`'s division (XLA's m * rsqrt(.): 544 of 1024 elements of
  a kernel). At XLA's default -O2 (the suite compiles at -O0) the jitted `initial_magnitude` matters too, checked by
  hand: m computed op by op leaves 71 of 77 kernels of a U-Net-wide merge 1 ulp off. (The program's output is not
  the output of a program without the merge to the bit: two programs compiled apart round apart, by 1.9e-6 here, as
  much for a plain LoRA with up zero.)"""
  params = peft_unet.params
  spec = lora_training.LoraSpec(4, 8.0, lora_training.target_layers(params, UNET_TARGETS), dora=True)
  tree = lora_training.init_adapter(spec, jax.random.key(0), None,
                                    lora_training.initial_magnitudes(spec, {"unet": params}))
  _, merged = peft_unet.program(tree)
  merged = traverse_util.flatten_dict(merged)
  for p, v in traverse_util.flatten_dict(params).items():
    np.testing.assert_array_equal(np.asarray(merged[p]), np.asarray(v), err_msg=str(p))


# --- the training step -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def step_setup(init, data_dir):
  """The DoRA stage (U-Net and text encoder) on one batch and its jitted train step. No weight decay, so that a
  parameter no gradient reaches stays where it started."""
  cfg = _cfg(init, data_dir, **DORA, **{"unet.caption_dropout": 0.0, "unet.optimizer.weight_decay": 0.0})
  tokenizer = tok.load_tokenizer(init)
  unet, unet_params = pretrained.load_unet(os.path.join(init, "unet"))
  vae, vae_params = pretrained.load_vae(os.path.join(init, "vae"))
  te, te_params = pretrained.load_text_encoder(os.path.join(init, "text_encoder"))
  base = stages.unet_stage(cfg, unet=unet, vae=vae, vae_params=vae_params, text_encoder=te, text_params=te_params,
                           scheduler=SchedulerConfig.from_json(os.path.join(init, "scheduler")), tokenizer=tokenizer,
                           text_gradient=True)
  spec = lora_training.make_spec(unet_params, cfg.lora, te_params, tokenizer=tokenizer)
  stage = lora_training.lora_stage(base, unet_params, spec)
  ids = tok.tokenize(tokenizer, ["a red circle", "a blue square"] * 2, max_length=77)
  images = np.asarray(jax.random.uniform(jax.random.key(3), (4, 32, 32, 3), minval=-1, maxval=1))
  batch = dict(image=images, input_ids=np.asarray(ids))
  tx, _ = make_optimizer(cfg.unet.optimizer)
  return types.SimpleNamespace(stage=stage, spec=spec, te_params=te_params, tx=tx, batch=batch, rng=jax.random.key(1),
                               step=jax.jit(make_train_step(stage.loss_fn, tx)))


def _leaves(tree, role):
  return {p[:-1]: np.asarray(v) for p, v in traverse_util.flatten_dict(tree).items() if p[-1] == role}


def test_dora_learns_through_its_magnitudes_too_and_train_steps_move_m_down_and_up(step_setup):
  """The stage's train step (U-Net and text-encoder DoRA) on one batch, AdamW without weight decay. 12 steps: the loss
  of the last 4 is below 0.9 of the zero-learning-rate control's (the untouched adapter, i.e. the base model, with the
  same noise draws; all losses read from the same compiled step), and the trained magnitudes alone (down / up as
  they started: the base weights' directions) lower it below 0.995 of the control's too. Measured: ratios 0.80 and
  0.92; with the gradient to m zeroed (jax.lax.stop_gradient on the magnitude in apply_adapter) the second is 1.000
  and this fails. Then: a fresh adapter merges into the text encoder's kernels bit for bit (the U-Net's: the test
  above), and, AdamW's first update being -lr * g / (|g| + eps) (zero exactly where the gradient is), step 1 moves m
  and up of every layer and not down (up was zero), step 2 moves down too: gradients reach all three, in both
  networks. The norm over the wrong axis (per input channel) fails here at the bit-exact start (not at the learning
  ratios, 0.80 and 0.92 then: the parity test above fails too)."""
  s = step_setup
  start = TrainState.create(s.stage.init_params(jax.random.key(0)), s.tx)
  loss_at = lambda params, i: float(  # noqa: E731
      s.step(start.replace(params=params, step=jnp.int32(i)), s.batch, s.rng, s.stage.frozen)[1]["loss"])
  states, losses = [start], []
  for _ in range(12):
    state, m = s.step(states[-1], s.batch, s.rng, s.stage.frozen)
    states.append(state)
    losses.append(float(m["loss"]))
  control = np.mean([loss_at(start.params, i) for i in range(8, 12)])
  ratio = np.mean(losses[-4:]) / control
  magnitudes_only = jax.tree_util.tree_map_with_path(lambda p, a, b: b if p[-1].key == "magnitude" else a, start.params,
                                                     states[-1].params)
  only_m = np.mean([loss_at(magnitudes_only, i) for i in range(8, 12)]) / control
  print(f"last 4 steps: loss {np.mean(losses[-4:]):.4f}, control {control:.4f}, ratio {ratio:.3f}; the trained "
        f"magnitudes alone: ratio {only_m:.3f}")
  assert ratio < 0.9
  assert only_m < 0.995

  merge = jax.jit(lambda text, tree: lora_training.apply_adapter(text, tree, s.spec.scale))
  merged = traverse_util.flatten_dict(merge(s.te_params, start.params["text_encoder"]))
  for p, v in traverse_util.flatten_dict(s.te_params).items():
    np.testing.assert_array_equal(np.asarray(merged[p]), np.asarray(v), err_msg=str(p))
  layers = {(n,) + p for n in ("unet", "text_encoder") for p in _leaves(start.params[n], "up")}
  assert len(layers) == N_RUN + N_TEXT
  for role, first in (("magnitude", True), ("up", True), ("down", False)):
    before, after, second = (_leaves(st.params, role) for st in states[:3])
    assert set(before) == set(after) == layers
    assert all((not np.array_equal(before[p], after[p])) == first for p in layers), role
    assert all(not np.array_equal(after[p], second[p]) for p in layers), role


# --- the run: export, diffusers, resume ----------------------------------------------------------------------------


def test_the_written_dora_adapter_loads_in_diffusers_as_in_jaxsd(trained, init):
  """The run's file: PEFT keys with lora_magnitude_vector on every layer (the text encoder's spelled `.weight`, as
  transformers 5 loads them) and use_dora in both networks' metadata. diffusers' load_lora_weights makes peft DoRA
  layers whose magnitudes are the file's (U-Net and text encoder), and its latents match jaxsd's with
  `pipe.load_lora` of the same file within 1e-4 (measured 3e-5; latents up to 13), the adapter moving them by 4."""
  workdir, r = trained
  assert r["steps"] == STEPS and r["dora"] and r["layers"] == N_RUN
  with safetensors.safe_open(r["file"], "np") as f:
    meta = json.loads(f.metadata()[lora.METADATA_KEY])
    sd = {k: f.get_tensor(k) for k in f.keys()}
  assert meta["unet.use_dora"] is True and meta["text_encoder.use_dora"] is True
  mags = {k: v for k, v in sd.items() if "lora_magnitude_vector" in k}
  assert len(mags) == N_RUN + N_TEXT and len(sd) == 3 * len(mags)
  assert sum(v.size for v in sd.values()) == r["adapter_parameters"]  # U-Net and text encoder, magnitudes too
  assert {v.shape for k, v in mags.items() if "proj_in" in k} == {(1, 32, 1, 1), (1, 64, 1, 1)}

  tpipe = reference.torch_pipeline(init)
  tpipe.scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(init, subfolder="scheduler")
  pipe = jaxsd.StableDiffusion.from_pretrained(init)
  latents = np.asarray(pipe.noise(0, len(PROMPTS), HW, HW))
  base = _diffusers_latents(tpipe, PROMPTS, latents)
  tpipe.load_lora_weights(os.path.join(workdir, "lora"))
  checked = 0
  for network, model in (("unet", tpipe.unet), ("text_encoder", tpipe.text_encoder)):
    for name, layer in model.named_modules():
      if isinstance(layer, LoraLayer):
        assert layer.use_dora["default_0"]
        got = layer.lora_magnitude_vector["default_0"].weight.detach().numpy()
        key = f"{network}.{name}.lora_magnitude_vector"
        want = sd.get(key, sd.get(key + ".weight", sd.get(f"{network}.text_model.{name}.lora_magnitude_vector.weight")))
        np.testing.assert_array_equal(got.reshape(-1), want.reshape(-1), err_msg=key)
        checked += 1
  assert checked == len(mags)
  ref = _diffusers_latents(tpipe, PROMPTS, latents)
  pipe.load_lora(os.path.join(workdir, "lora"))
  adapter = next(iter(pipe._loras.adapters.values()))
  assert all(f.magnitude is not None for layers in adapter.layers.values() for f in layers.values())
  ours = pipe(PROMPTS, height=HW, width=HW, steps=3, guidance_scale=7.5, sampler="euler", latents=latents,
              output="latent")
  diff, moved = float(np.abs(ours - ref).max()), float(np.abs(ref - base).max())
  print(f"max |jaxsd - diffusers| with the trained DoRA adapter: {diff:.2e} (latents up to {np.abs(ref).max():.1f}); "
        f"the adapter moves diffusers' latents by {moved:.2e}")
  assert diff < 1e-4 and moved > 1e-1


def test_a_resumed_dora_run_gives_the_same_adapter_to_the_bit(trained, init, data_dir, tmp_path):
  """The run's step-3 checkpoint alone (as a kill after it leaves; the magnitudes and their optimizer moments in it
  with the factors), run again to 6 steps: the file is byte-identical to the uninterrupted run's."""
  workdir = str(tmp_path / "resumed")
  shutil.copytree(os.path.join(trained[0], "lora", "checkpoints"), os.path.join(workdir, "lora", "checkpoints"))
  shutil.rmtree(os.path.join(workdir, "lora", "checkpoints", str(STEPS)))
  r = run.train_and_evaluate(_cfg(init, data_dir, **DORA), workdir)["lora"]
  assert r["steps"] == STEPS
  a, b = (open(f, "rb").read() for f in (trained[1]["file"], r["file"]))
  assert a == b


@pytest.mark.parametrize("updates,message", [
    ({
        "lora.export_format": "kohya"
    }, "use_dora=True with export_format='kohya'"),
    ({
        "lora.target_modules": "",
        "lora.train_text_encoder": False,
        "lora.token_embeddings": "circle"
    }, "use_dora=True adds a magnitude to every adapted layer, but target_modules is empty"),
])
def test_dora_with_what_it_cannot_go_with_is_refused(init, data_dir, tmp_path, updates, message):
  with pytest.raises(run.ConfigError, match=message) as e:
    run.train_and_evaluate(_cfg(init, data_dir, **dict(DORA, **updates)), str(tmp_path / "w"))
  assert "\n" not in str(e.value)


def test_the_file_reads_back_to_itself_and_kohya_export_of_dora_is_refused(trained, init):
  """`lora.load` then `lora_export.to_state_dict` gives the run's file back, tensors (magnitudes included) and
  metadata; the kohya format refuses DoRA in one line."""
  pipe = jaxsd.StableDiffusion.from_pretrained(init)
  params = {"unet": pipe.unet_params, "text_encoder": pipe.text_encoder_params}
  adapter = lora.load(trained[1]["file"], params)
  sd, meta = lora_export.to_state_dict(adapter)
  want, want_meta = lora.read(trained[1]["file"])
  assert meta == want_meta and sorted(sd) == sorted(want)
  for k, v in want.items():
    np.testing.assert_array_equal(sd[k], v, err_msg=k)
  with pytest.raises(ValueError, match="DoRA adapter in kohya format") as e:
    lora_export.to_state_dict(adapter, "kohya")
  assert "\n" not in str(e.value)
