"""Model folders in and out: jaxsd.pretrained against diffusers' / transformers' own from_pretrained.

Every network is checked both ways on tiny random models: a folder PyTorch wrote loads here with
the same outputs, and a folder written here loads in PyTorch with every weight and the same outputs.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from jaxsd import model_folder, pretrained, weights  # noqa: E402
from jaxsd.models import unet  # noqa: E402
from tests import reference  # noqa: E402

TOL = 1e-4  # max abs difference, fp32
KINDS = ("unet", "vae", "text_encoder", "clip")
LOAD = {
    "unet": pretrained.load_unet,
    "vae": pretrained.load_vae,
    "text_encoder": pretrained.load_text_encoder,
    "clip": pretrained.load_clip
}
DIFFUSERS_FILE = "diffusion_pytorch_model.safetensors"
WEIGHTS_FILE = {
    "unet": DIFFUSERS_FILE,
    "vae": DIFFUSERS_FILE,
    "text_encoder": "model.safetensors",
    "clip": "model.safetensors"
}


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options={"xla_backend_optimization_level": 0})
def _apply(module, method, params, *args):
  # Modules with equal configs and dtypes hash equal, so each network compiles once per dtype.
  return module.apply({"params": params}, *args, method=method)


def _torch_classes():
  return {
      "unet": diffusers.UNet2DConditionModel,
      "vae": diffusers.AutoencoderKL,
      "text_encoder": transformers.CLIPTextModel,
      "clip": transformers.CLIPModel
  }


def _tiny_clip_model() -> torch.nn.Module:
  torch.manual_seed(3)
  cfg = transformers.CLIPConfig(
      text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=16, pad_token_id=1, bos_token_id=97, eos_token_id=98),
      vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         image_size=12, patch_size=4), projection_dim=16, logit_scale_init_value=2.0)
  model = transformers.CLIPModel(cfg)
  reference._jitter(model, seed=3)
  return model.eval()


@pytest.fixture(scope="module")
def torch_folders(tmp_path_factory):
  """kind -> (PyTorch model, the folder its save_pretrained wrote)."""
  root = tmp_path_factory.mktemp("torch")
  unet, vae, text_encoder, _, _ = reference.tiny_components()
  out = {}
  for kind, model in zip(KINDS, (unet, vae, text_encoder, _tiny_clip_model())):
    model.save_pretrained(root / kind)
    out[kind] = (model, str(root / kind))
  return out


def _token_ids(eos: int, bos: int, length: int, high: int, ends=(None, 6)) -> np.ndarray:
  """Rows `bos tokens... eos eos...` (right-padded with eos, as SD's tokenizer pads)."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, high, size=(len(ends), length))
  for i, end in enumerate(ends):
    ids[i, 0] = bos
    ids[i, (end or length) - 1:] = eos
  return ids.astype(np.int32)


def _inputs(kind: str) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(1)
  if kind == "unet":
    return {
        "sample": rng.standard_normal((2, 16, 16, 4), np.float32),
        "t": np.array([3, 901], np.int32),
        "context": rng.standard_normal((2, 7, 32), np.float32)
    }
  if kind == "vae":
    return {
        "images": rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32),
        "latents": rng.standard_normal((2, 8, 8, 4), np.float32)
    }
  if kind == "text_encoder":
    return {"ids": _token_ids(eos=49407, bos=49406, length=77, high=49400)}
  return {
      "ids": _token_ids(eos=98, bos=97, length=16, high=96),
      "pixels": rng.uniform(-1, 1, (2, 12, 12, 3)).astype(np.float32)
  }


def _ours(kind: str, module, params) -> dict[str, np.ndarray]:
  """The outputs compared with PyTorch's, NHWC."""
  x = _inputs(kind)
  if kind == "unet":
    return {"eps": _apply(module, None, params, x["sample"], x["t"], x["context"])}
  if kind == "vae":
    post = _apply(module, "encode", params, x["images"])
    return {"mean": post.mean, "logvar": post.logvar, "decoded": _apply(module, "decode", params, x["latents"])}
  if kind == "text_encoder":
    out = _apply(module, None, params, x["ids"])
    return {
        "last_hidden_state": out.last_hidden_state,
        "pooler_output": out.pooler_output,
        **{
            f"hidden_states_{i}": h for i, h in enumerate(out.hidden_states)
        }
    }
  out = _apply(module, None, params, x["ids"], x["pixels"])
  return {
      "logits_per_image": out.logits_per_image,
      "text_embeds": out.text_embeds,
      "image_embeds": out.image_embeds,
      "text_last": out.text_model_output.last_hidden_state,
      "vision_last": out.vision_model_output.last_hidden_state
  }


@torch.no_grad()
def _theirs(kind: str, model) -> dict[str, np.ndarray]:
  """The same outputs from the PyTorch model, converted to NHWC."""
  x = _inputs(kind)
  if kind == "unet":
    eps = model(reference.nhwc_to_nchw(x["sample"]),
                torch.from_numpy(x["t"]).long(), torch.from_numpy(x["context"])).sample
    return {"eps": reference.nchw_to_nhwc(eps)}
  if kind == "vae":
    post = model.encode(reference.nhwc_to_nchw(x["images"])).latent_dist
    return {
        "mean": reference.nchw_to_nhwc(post.mean),
        "logvar": reference.nchw_to_nhwc(post.logvar),
        "decoded": reference.nchw_to_nhwc(model.decode(reference.nhwc_to_nchw(x["latents"])).sample)
    }
  ids = torch.from_numpy(x["ids"]).long()
  if kind == "text_encoder":
    out = model(ids, output_hidden_states=True)
    return {
        "last_hidden_state": out.last_hidden_state.numpy(),
        "pooler_output": out.pooler_output.numpy(),
        **{
            f"hidden_states_{i}": h.numpy() for i, h in enumerate(out.hidden_states)
        }
    }
  out = model(input_ids=ids, pixel_values=reference.nhwc_to_nchw(x["pixels"]))
  return {
      "logits_per_image": out.logits_per_image.numpy(),
      "text_embeds": out.text_embeds.numpy(),
      "image_embeds": out.image_embeds.numpy(),
      "text_last": out.text_model_output.last_hidden_state.numpy(),
      "vision_last": out.vision_model_output.last_hidden_state.numpy()
  }


def _max_diffs(ours: dict, theirs: dict) -> dict[str, float]:
  assert set(ours) == set(theirs)
  out = {}
  for k in theirs:
    a, b = np.asarray(ours[k], np.float32), np.asarray(theirs[k], np.float32)
    assert a.shape == b.shape, (k, a.shape, b.shape)
    out[k] = float(np.max(np.abs(a - b)))
  return out


def _assert_close(ours: dict, theirs: dict, tol: float = TOL) -> None:
  diffs = _max_diffs(ours, theirs)
  assert max(diffs.values()) < tol, diffs


def _perturb(params, seed: int = 2, scale: float = 0.05):
  # Our inits zero the biases and set norm scales to 1 too; move every weight off its init value.
  # numpy, not jax.random: eager jax ops compile once per shape, seconds over a U-Net's ~300 leaves.
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (x + scale * rng.standard_normal(x.shape)).astype(x.dtype), params)


_init = jax.jit(pretrained.init_params, static_argnums=0, compiler_options={"xla_backend_optimization_level": 0})


def _fresh_params(kind: str, module):
  """Parameters unrelated to the PyTorch model's: our own init for CLIP; for the U-Net and VAE
  (whose init compiles for ~15 s on this CPU) random draws over `abstract_params`."""
  if kind in ("text_encoder", "clip"):
    return _perturb(_init(module, jax.random.key(1)))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), pretrained.abstract_params(module))
  return _perturb(jax.tree.map_with_path(lambda p, x: x + 1 if p[-1].key == "scale" else x, zeros), seed=1)


def _read(path) -> dict[str, np.ndarray]:
  return dict(safetensors_numpy.load_file(str(path)))


def _folder_with(tmp_path, src_folder: str, state_dict: dict, file_name: str) -> str:
  """A copy of `src_folder`'s config.json beside the given weights."""
  tmp_path.mkdir(parents=True, exist_ok=True)
  shutil.copy(os.path.join(src_folder, "config.json"), tmp_path / "config.json")
  model_folder.write_safetensors(state_dict, str(tmp_path / file_name))
  return str(tmp_path)


# --- PyTorch folder -> jaxsd ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_load_matches_torch(torch_folders, kind):
  model, folder = torch_folders[kind]
  module, params = LOAD[kind](folder, dtype=jnp.float32)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  _assert_close(_ours(kind, module, params), _theirs(kind, model))


def test_cross_attention_dim_per_block(torch_folders, tmp_path):
  """A U-Net config giving cross_attention_dim once per block (diffusers accepts a list; one text width feeds
  every block) loads and matches PyTorch; per-block widths that differ are refused in one line."""
  import diffusers

  model, folder = torch_folders["unet"]
  config = json.load(open(os.path.join(folder, "config.json")))
  n = len(config["block_out_channels"])
  listed = diffusers.UNet2DConditionModel.from_config({**config, "cross_attention_dim": [32] * n})
  listed.load_state_dict(model.state_dict())
  listed.save_pretrained(tmp_path / "listed")
  module, params = pretrained.load_unet(str(tmp_path / "listed"), dtype=jnp.float32)
  _assert_close(_ours("unet", module, params), _theirs("unet", listed))
  with pytest.raises(ValueError, match=r"cross_attention_dim=\[32, 48.*differs between blocks"):
    unet.UNet2DConditionConfig.from_dict({**config, "cross_attention_dim": [32, 48] + [32] * (n - 2)})


# --- jaxsd -> PyTorch folder ---------------------------------------------------------------------


def _without_text_prefix(key: str) -> str:
  # transformers 5's standalone CLIPTextModel has no `text_model.` level; ours (and SD folders) do.
  return key.removeprefix("text_model.")


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_loads_in_torch(torch_folders, kind, tmp_path):
  torch_model, folder = torch_folders[kind]
  module, torch_params = LOAD[kind](folder)
  params = _fresh_params(kind, module)
  pretrained.save_pretrained(module, params, tmp_path / "out")
  assert sorted(os.listdir(tmp_path / "out")) == sorted(["config.json", WEIGHTS_FILE[kind]])
  # transformers 4 refuses safetensors files without this entry (5 no longer checks).
  with safetensors.safe_open(str(tmp_path / "out" / WEIGHTS_FILE[kind]), "numpy") as f:
    assert f.metadata() == {"format": "pt"}

  reloaded, info = _torch_classes()[kind].from_pretrained(tmp_path / "out", output_loading_info=True)
  reloaded.eval()
  for what in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
    assert not info.get(what), (what, info[what])
  # Every tensor arrived exactly (nothing left at PyTorch's random init, nothing transposed wrongly).
  ours = {
      _without_text_prefix(k) if kind == "text_encoder" else k: v
      for k, v in weights.params_to_state_dict(params).items()
  }
  theirs = {k: v.numpy() for k, v in reloaded.state_dict().items() if not k.endswith("position_ids")}
  assert set(ours) == set(theirs)
  for k, v in theirs.items():
    np.testing.assert_array_equal(v, ours[k], err_msg=k)
  # The round trip started away from the reference's weights, so the checks above are not vacuous.
  leaf = jax.tree.leaves(params)[0]
  assert not np.allclose(leaf, jax.tree.leaves(torch_params)[0])
  _assert_close(_ours(kind, module, params), _theirs(kind, reloaded))

  # And back here: the folder we wrote reloads bit-exactly.
  module2, params2 = LOAD[kind](tmp_path / "out")
  assert module2 == module
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_save_pretrained_casts_dtype(torch_folders, tmp_path):
  _, folder = torch_folders["vae"]
  module, params = pretrained.load_vae(folder)
  pretrained.save_pretrained(module, params, tmp_path, dtype=np.float16)
  saved = _read(tmp_path / DIFFUSERS_FILE)
  assert {v.dtype for v in saved.values()} == {np.dtype(np.float16)}
  # diffusers upcasts to its default fp32 on load; the values are the fp16 ones.
  model = diffusers.AutoencoderKL.from_pretrained(tmp_path)
  ours = weights.params_to_state_dict(params)
  for k, v in model.state_dict().items():
    np.testing.assert_array_equal(v.numpy(), ours[k].astype(np.float16).astype(np.float32), err_msg=k)


# --- dtypes --------------------------------------------------------------------------------------

# bf16 (params and compute) vs fp32 on the tiny U-Net, outputs of std 0.64 and max abs 2.9:
# measured max abs 0.046, mean abs 0.0075; diffusers' own bf16 forward differs from our fp32 one
# by 0.048 / 0.0069 on the same inputs. The bounds leave ~3x margin.
BF16_MAX_ABS, BF16_MEAN_ABS = 0.15, 0.025


def test_bf16_load(torch_folders):
  _, folder = torch_folders["unet"]
  module32, params32 = pretrained.load_unet(folder)
  ref = np.asarray(_ours("unet", module32, params32)["eps"])

  module, params = pretrained.load_unet(folder, dtype=jnp.bfloat16)
  assert module.dtype == jnp.bfloat16 and module.param_dtype == jnp.bfloat16
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  eps = _ours("unet", module, params)["eps"]
  assert eps.dtype == jnp.bfloat16
  diff = np.abs(np.asarray(eps, np.float32) - ref)
  assert diff.max() < BF16_MAX_ABS and diff.mean() < BF16_MEAN_ABS, (diff.max(), diff.mean())

  # Mixed precision: fp32 params as loaded, bf16 compute (its forward is tested in models/test_unet.py).
  module, params = pretrained.load_unet(folder, dtype=jnp.bfloat16, param_dtype=jnp.float32)
  assert module.dtype == jnp.bfloat16 and module.param_dtype == jnp.float32
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  jax.tree.map(np.testing.assert_array_equal, params, params32)


# --- strict loading and file errors --------------------------------------------------------------


def test_mismatched_checkpoint_names_every_key_and_the_folder(torch_folders, tmp_path):
  _, folder = torch_folders["unet"]
  sd = _read(os.path.join(folder, DIFFUSERS_FILE))
  del sd["conv_in.bias"]
  sd["down_blocks.0.resnets.0.extra.weight"] = np.zeros((3,), np.float32)
  assert sd["conv_out.weight"].shape == (4, 32, 3, 3)
  sd["conv_out.weight"] = np.zeros((4, 24, 3, 3), np.float32)
  bad = _folder_with(tmp_path / "bad", folder, sd, DIFFUSERS_FILE)
  with pytest.raises(weights.WeightLoadError) as e:
    pretrained.load_unet(bad)
  msg = str(e.value)
  assert bad in msg
  assert "conv_in.bias" in msg and "down_blocks.0.resnets.0.extra.weight" in msg
  # Both shapes, in either layout (the message says which).
  assert "(4, 24, 3, 3)" in msg or "(3, 3, 24, 4)" in msg, msg
  assert "(4, 32, 3, 3)" in msg or "(3, 3, 32, 4)" in msg, msg
  assert msg.count("conv_out.weight") == 1, msg  # a mismatch, not also "missing"


def test_mismatch_under_a_renamed_key_is_reported_once(torch_folders, tmp_path):
  # transformers 5 text encoder files lack the `text_model.` prefix the loader adds.
  _, folder = torch_folders["text_encoder"]
  sd = _read(os.path.join(folder, "model.safetensors"))
  sd["final_layer_norm.weight"] = np.ones((31,), np.float32)
  bad = _folder_with(tmp_path, folder, sd, "model.safetensors")
  with pytest.raises(weights.WeightLoadError) as e:
    pretrained.load_text_encoder(bad)
  msg = str(e.value)
  assert "final_layer_norm.weight" in msg and "(31)" in msg and "(32)" in msg, msg
  assert "missing" not in msg and "unexpected" not in msg, msg


def test_pickled_weights_need_opt_in(torch_folders, tmp_path):
  model, _ = torch_folders["vae"]
  model.save_pretrained(tmp_path, safe_serialization=False)
  assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.bin"]
  with pytest.raises(ValueError, match="allow_pickle=True"):
    pretrained.load_vae(tmp_path)
  module, params = pretrained.load_vae(tmp_path, allow_pickle=True)
  _assert_close(_ours("vae", module, params), _theirs("vae", model))


def test_missing_config_or_weights(torch_folders, tmp_path):
  _, folder = torch_folders["vae"]
  (tmp_path / "no_config").mkdir()
  shutil.copy(os.path.join(folder, DIFFUSERS_FILE), tmp_path / "no_config")
  with pytest.raises(FileNotFoundError, match="config.json"):
    pretrained.load_vae(tmp_path / "no_config")
  (tmp_path / "no_weights").mkdir()
  shutil.copy(os.path.join(folder, "config.json"), tmp_path / "no_weights")
  with pytest.raises(FileNotFoundError, match=r"no weights found.*diffusion_pytorch_model\.safetensors"):
    pretrained.load_vae(tmp_path / "no_weights")
  with pytest.raises(FileNotFoundError, match="config.json"):
    pretrained.load_unet(tmp_path / "does_not_exist")


# --- legacy layouts ------------------------------------------------------------------------------


def test_legacy_vae_attention_names(torch_folders, tmp_path):
  model, folder = torch_folders["vae"]
  legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  sd = {}
  for k, v in _read(os.path.join(folder, DIFFUSERS_FILE)).items():
    for new, old in legacy.items():
      k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
    sd[k] = v
  # Both the encoder's and the decoder's mid-block attention now use the old names.
  assert sum(".attentions.0.query." in k or ".attentions.0.proj_attn." in k for k in sd) == 8
  assert not any(".to_q." in k for k in sd)
  module, params = pretrained.load_vae(_folder_with(tmp_path, folder, sd, DIFFUSERS_FILE))
  _assert_close(_ours("vae", module, params), _theirs("vae", model))


def test_text_encoder_with_and_without_text_model_prefix(torch_folders, tmp_path):
  model, folder = torch_folders["text_encoder"]
  sd = _read(os.path.join(folder, "model.safetensors"))
  assert not any(k.startswith("text_model.") for k in sd)  # transformers 5's layout
  module, params = pretrained.load_text_encoder(folder)
  _assert_close(_ours("text_encoder", module, params), _theirs("text_encoder", model))
  # A transformers-4-era SD folder: every key under `text_model.`.
  prefixed = _folder_with(tmp_path, folder, {"text_model." + k: v for k, v in sd.items()}, "model.safetensors")
  module4, params4 = pretrained.load_text_encoder(prefixed)
  assert module4 == module
  jax.tree.map(np.testing.assert_array_equal, params4, params)


# --- host memory ---------------------------------------------------------------------------------

_MEMORY_PROBE = textwrap.dedent("""
    import json, os, sys
    import jax
    from jaxsd import pretrained

    def rss():
      with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def peak():
      with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))

    pretrained.load_unet(sys.argv[2])  # warm up jax (tracing, the CPU client) on a tiny model
    before = rss()
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets VmHWM to the current RSS
    module, params = pretrained.load_unet(sys.argv[1])
    size = sum(x.nbytes for x in jax.tree.leaves(params))
    print(json.dumps({"weights": size, "peak_growth": peak() - before}))
""")


def test_loading_keeps_at_most_two_copies_in_host_memory(torch_folders, tmp_path):
  if not (os.path.exists("/proc/self/clear_refs") and os.access("/proc/self/clear_refs", os.W_OK)):
    pytest.skip("needs Linux /proc peak-RSS reset")
  from jaxsd.models import unet

  # ~114 MB of fp32 weights: large enough that jax's own allocations are noise.
  boc = (96, 192, 384)
  cfg = unet.UNet2DConditionConfig(block_out_channels=boc, layers_per_block=1, cross_attention_dim=256,
                                   attention_head_dim=8,
                                   down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                                   up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2)
  abstract = pretrained.abstract_params(unet.UNet2DConditionModel(cfg))
  rng = np.random.default_rng(0)
  flat = jax.tree.map(lambda s: np.empty(s.shape, s.dtype), abstract)
  sd = {k: rng.random(v.shape, np.float32) for k, v in weights.params_to_state_dict(flat).items()}
  del flat
  model_folder.write_safetensors(sd, str(tmp_path / DIFFUSERS_FILE))
  del sd
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"_class_name": "UNet2DConditionModel", **cfg.to_dict()}, f)

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {
      **os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": ""
  }
  proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE,
                         str(tmp_path), torch_folders["unet"][1]], capture_output=True, text=True, env=env, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  size, growth = result["weights"], result["peak_growth"]
  assert size > 100e6
  # Measured: peak growth 2.04x the weights (the numpy tree plus its device copy). The lower bound
  # checks that the probe sees the load at all.
  assert 0.9 * size < growth < 2.5 * size, (growth / size, result)


# --- variants and shards, named as diffusers / transformers name them -----------------------------

LAYOUTS = {
    "fp16": dict(variant="fp16"),  # diffusion_pytorch_model.fp16.safetensors / model.fp16.safetensors
    "sharded": dict(max_shard_size="100KB"),  # *-00001-of-0000N.safetensors + *.safetensors.index.json
    "fp16_sharded": dict(variant="fp16", max_shard_size="100KB"),  # *.fp16-00001-of-... + *.safetensors.index.fp16.json
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ("unet", "vae", "text_encoder"))
def test_variant_and_sharded_folders_load_the_same_weights(torch_folders, kind, layout, tmp_path):
  model, folder = torch_folders[kind]
  kw = LAYOUTS[layout]
  variant = kw.get("variant")
  (copy.deepcopy(model).half() if variant else model).save_pretrained(tmp_path, **kw)
  names = os.listdir(tmp_path)
  base = WEIGHTS_FILE[kind].removesuffix(".safetensors")
  if "max_shard_size" in kw:
    assert model_folder.add_variant(f"{base}.safetensors.index.json", variant) in names
    assert sum(n.startswith(f"{base}{'.' + variant if variant else ''}-0000") for n in names) >= 2, names
  else:
    assert model_folder.add_variant(WEIGHTS_FILE[kind], variant) in names
  _, want = LOAD[kind](folder)
  _, got = LOAD[kind](str(tmp_path), variant=variant)
  assert {x.dtype for x in jax.tree.leaves(got)} == {jnp.dtype(jnp.float32)}  # fp16 files, upcast
  if variant:  # exactly the fp32 folder's weights rounded to fp16
    want = jax.tree.map(lambda x: np.asarray(x).astype(np.float16).astype(np.float32), want)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  if variant:
    with pytest.raises(FileNotFoundError, match="no weights found.*holds the fp16 variant: pass variant='fp16'"):
      LOAD[kind](str(tmp_path))  # the default files are not there; the message names the variant that is


def test_index_naming_a_missing_shard(torch_folders, tmp_path):
  model, _ = torch_folders["vae"]
  model.save_pretrained(tmp_path, max_shard_size="100KB")
  os.remove(tmp_path / "diffusion_pytorch_model-00002-of-00008.safetensors")
  with pytest.raises(FileNotFoundError, match="lists shards that are not in the folder.*00002-of-00008"):
    pretrained.load_vae(str(tmp_path))


def test_abstract_params_traces_a_configuration_once_and_hands_out_its_own_tree():
  """A second load of the same network configuration does not trace its init again (0.1-1 s of Python per
  network); each caller gets its own containers, and another configuration its own shapes."""
  cfg = unet.UNet2DConditionConfig(sample_size=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(8, 16),
                                   layers_per_block=1, norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2)
  a = pretrained.abstract_params(unet.UNet2DConditionModel(cfg))
  hits = pretrained._cached_abstract_params.cache_info().hits
  b = pretrained.abstract_params(unet.UNet2DConditionModel(cfg))
  assert pretrained._cached_abstract_params.cache_info().hits == hits + 1
  assert jax.tree.structure(a) == jax.tree.structure(b) and a == b
  b.pop("conv_in")
  assert "conv_in" in pretrained.abstract_params(unet.UNet2DConditionModel(cfg))
  wider = pretrained.abstract_params(unet.UNet2DConditionModel(dataclasses.replace(cfg, block_out_channels=(16, 16))))
  assert wider["conv_out"]["kernel"].shape[2] == 16 and a["conv_out"]["kernel"].shape[2] == 8
