"""IP-Adapter parity with diffusers' `load_ip_adapter` + `ip_adapter_image=` (StableDiffusionPipeline, its Img2Img
pipeline, StableDiffusionXLPipeline) on tiny random models: a tiny transformers CLIPVisionModelWithProjection saved
with save_pretrained and a random IP-Adapter of the tiny U-Net's shapes saved with safetensors, loaded by both."""

from __future__ import annotations

import json
import os
import re

import diffusers
import jax
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file

import jaxsd
from jaxsd import ip_adapter_weights, weights
from tests import reference

HW = 16
PROMPTS = ["a red circle on the left", "a small blue square"]
NEGATIVE = ["", "a green triangle"]
EMBED_DIM = 24  # the tiny image encoder's projection_dim
WEIGHT = "ip-adapter_tiny.safetensors"


def _image_encoder(folder: str, seed: int = 0, projection_dim: int = EMBED_DIM) -> None:
  torch.manual_seed(seed)
  cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                      image_size=32, patch_size=8, projection_dim=projection_dim)
  transformers.CLIPVisionModelWithProjection(cfg).eval().save_pretrained(folder)


def random_ip_adapter(unet, seed: int = 0, embed_dim: int = EMBED_DIM) -> dict[str, torch.Tensor]:
  """A plain IP-Adapter state dict (`image_proj.*`, `ip_adapter.<k>.to_k_ip.weight`, ...) for a diffusers U-Net:
  the original numbering (k = index of the attn2 processor among `unet.attn_processors`), random weights large
  enough that the image moves the result far past the tolerance."""
  g = torch.Generator().manual_seed(seed)
  c = unet.config.cross_attention_dim
  rand = lambda *shape, s=0.3: s * torch.randn(*shape, generator=g)  # noqa: E731
  sd = {
      "image_proj.proj.weight": rand(4 * c, embed_dim),
      "image_proj.proj.bias": rand(4 * c, s=0.1),
      "image_proj.norm.weight": 1 + rand(c, s=0.1),
      "image_proj.norm.bias": rand(c, s=0.1),
  }
  for key_id, name in enumerate(unet.attn_processors):
    if name.endswith("attn2.processor"):
      inner = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
      sd[f"ip_adapter.{key_id}.to_k_ip.weight"] = rand(inner, c)
      sd[f"ip_adapter.{key_id}.to_v_ip.weight"] = rand(inner, c)
  return sd


def make_adapter_folder(folder: str, unet, seed: int = 0) -> str:
  """`folder` with the adapter file and image_encoder/, as h94/IP-Adapter's models/ folder."""
  os.makedirs(folder, exist_ok=True)
  _image_encoder(os.path.join(folder, "image_encoder"), seed)
  save_file(random_ip_adapter(unet, seed), os.path.join(folder, WEIGHT))
  return folder


def _images(n: int, seed: int = 0, size: int = 20) -> list:
  rng = np.random.default_rng(seed)
  return [Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
  root = tmp_path_factory.mktemp("ip_sd")
  path = reference.make_tiny_sd_folder(str(root / "sd"))
  tpipe = reference.torch_pipeline(path)
  adapter = make_adapter_folder(str(root / "adapter"), tpipe.unet)
  tpipe.load_ip_adapter(adapter, subfolder="", weight_name=WEIGHT, image_encoder_folder="image_encoder")
  pipe = jaxsd.StableDiffusion.from_pretrained(path)
  pipe.load_ip_adapter(adapter, weight_name=WEIGHT)
  return path, adapter, tpipe, pipe


def _euler(path):
  return diffusers.EulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")


def _run_diffusers(tpipe, prompts, negative, latents, steps=3, guidance=7.5, **kw) -> np.ndarray:
  with torch.no_grad():
    out = tpipe(prompts, negative_prompt=negative, height=HW, width=HW, num_inference_steps=steps,
                guidance_scale=guidance, latents=reference.nhwc_to_nchw(latents), output_type="latent", **kw)
  return reference.nchw_to_nhwc(out.images)


def test_sd_text_to_image_matches_diffusers(sd):
  """Guidance, scale 0.7 (Euler, final latents): one image for every prompt, diffusers' [[image, image]] (both in
  every prompt), its precomputed embeddings (prepare_ip_adapter_image_embeds' (2, 1, D)), and one image per prompt
  (which diffusers has no argument for: each prompt run alone there); the images' changes do not recompile."""
  path, _, tpipe, pipe = sd
  images = _images(2)
  latents = np.asarray(pipe.noise(0, 2, HW, HW))
  pipe.set_ip_adapter_scale(0.7)
  tpipe.set_ip_adapter_scale(0.7)
  tpipe.scheduler = _euler(path)
  run = lambda **kw: pipe(PROMPTS, NEGATIVE, steps=3, sampler="euler", latents=latents, output="latent", **kw)
  diffs = {}
  ref = _run_diffusers(tpipe, PROMPTS, NEGATIVE, latents, ip_adapter_image=images[1])
  diffs["one image"] = reference.check_close(run(ip_adapter_image=images[1]), ref, "one image for both prompts")
  with torch.no_grad():
    embeds = tpipe.prepare_ip_adapter_image_embeds(images[1], None, "cpu", 1, True)
  assert embeds[0].shape == (2, 1, EMBED_DIM)
  diffs["embeds"] = reference.check_close(run(ip_adapter_image_embeds=embeds), ref, "diffusers' image embeddings")
  both = _run_diffusers(tpipe, PROMPTS, NEGATIVE, latents, ip_adapter_image=[images])
  diffs["all images"] = reference.check_close(run(ip_adapter_image=[images]), both,
                                              "[[image, image]]: both in every prompt")
  each = np.concatenate([
      _run_diffusers(tpipe, [p], [n], latents[i:i + 1], ip_adapter_image=im)
      for i, (p, n, im) in enumerate(zip(PROMPTS, NEGATIVE, images))
  ])
  diffs["per prompt"] = reference.check_close(run(ip_adapter_image=images), each, "an image per prompt")
  print("SD text-to-image max |diff|:", {k: f"{v:.1e}" for k, v in diffs.items()})


def test_scale_zero_is_the_plain_model_unload_restores_it_and_nothing_recompiles(sd):
  """Scale 0 gives the plain pipeline's latents, scale 1 moves them far past the tolerance (an adapter ignored fails
  here); new scales and images reuse the one program; unload_ip_adapter gives the plain pipeline back, bit for bit."""
  path, adapter, _, _ = sd
  pipe = jaxsd.StableDiffusion.from_pretrained(path)
  images = _images(2, seed=5)
  latents = np.asarray(pipe.noise(3, 2, HW, HW))
  run = lambda **kw: pipe(PROMPTS, NEGATIVE, steps=3, sampler="euler", latents=latents, output="latent", **kw)
  plain = run()
  structure = jax.tree.structure(pipe.params)
  shapes = ip_adapter_weights._flat_shapes_with_adapter.cache_info().hits
  pipe.load_ip_adapter(os.path.join(adapter, WEIGHT), scale=0.0)
  # The fixture loaded this adapter into a U-Net of the same config: its shapes are not traced again.
  assert ip_adapter_weights._flat_shapes_with_adapter.cache_info().hits == shapes + 1
  zero = run(ip_adapter_image=images[0])
  program = pipe._jitted(True, "latent", "text", True)
  traces = program._cache_size()
  pipe.set_ip_adapter_scale(1.0)
  one = run(ip_adapter_image=images[1])
  again = run(ip_adapter_image=images)
  assert program._cache_size() == traces  # scale and images are inputs
  tol = 1e-4 * max(1.0, float(np.abs(plain).max()))
  print(f"scale 0 vs no adapter: {np.abs(zero - plain).max():.1e}; scale 1 moves the latents by "
        f"{np.abs(one - plain).max():.1e} (tolerance {tol:.1e})")
  assert np.abs(zero - plain).max() <= 1e-6 * max(1.0, float(np.abs(plain).max()))
  assert np.abs(one - plain).max() > 100 * tol and np.abs(again - one).max() > 100 * tol
  pipe.unload_ip_adapter()
  assert pipe.ip_adapter is None and jax.tree.structure(pipe.params) == structure
  np.testing.assert_array_equal(run(), plain)
  with pytest.raises(ValueError, match="need an IP-Adapter"):
    run(ip_adapter_image=images[0])


PER_BLOCK = [
    {
        "up": {
            "block_1": [0.0, 1.0]
        }
    },  # InstantStyle's form: one attention of one block, everything else 0
    {
        "down": {
            "block_0": [0.6]
        },
        "mid": [0.4],
        "up": {
            "block_1": [1.2, -0.3]
        }
    },
    {
        "down": 0.9,
        "up": 0.5
    },  # a number for every block of a part
]


def test_per_block_scales_match_diffusers_and_compile_once(sd):
  """InstantStyle's per-block scales (set_ip_adapter_scale with a dict; parts left out are 0) against diffusers'
  expansion on the tiny U-Net (down block_0: 1 attention, mid, up block_1: 2), Euler under guidance; new values
  compile nothing; a dict of one value everywhere is the plain number."""
  path, _, tpipe, pipe = sd
  image = _images(1, seed=21)[0]
  latents = np.asarray(pipe.noise(8, 2, HW, HW))
  tpipe.scheduler = _euler(path)
  run = lambda: pipe(PROMPTS, NEGATIVE, steps=3, sampler="euler", latents=latents, output="latent", ip_adapter_image=
                     image)
  outs = []
  for i, scale in enumerate(PER_BLOCK):
    pipe.set_ip_adapter_scale(scale)
    tpipe.set_ip_adapter_scale(scale)
    if i == 1:
      traces = pipe._jitted(True, "latent", "text", True)._cache_size()
    outs.append(run())
    reference.check_close(outs[-1], _run_diffusers(tpipe, PROMPTS, NEGATIVE, latents, ip_adapter_image=image),
                          f"per-block scales {scale}")
  assert pipe._jitted(True, "latent", "text", True)._cache_size() == traces  # dict values are inputs
  for a, b in ((0, 1), (1, 2)):
    assert np.abs(outs[a] - outs[b]).max() > 1e-2 * np.abs(outs[b]).max()  # each block's value acts
  pipe.set_ip_adapter_scale({"down": 0.7, "mid": 0.7, "up": 0.7})
  every = run()
  pipe.set_ip_adapter_scale(0.7)
  np.testing.assert_allclose(every, run(), rtol=0, atol=1e-6 * np.abs(every).max())
  for p in (pipe, tpipe):
    p.set_ip_adapter_scale(1.0)


def test_per_block_scales_on_sdxl_match_diffusers(sdxl):
  """SDXL's InstantStyle form on the tiny SDXL U-Net: its up block_0 has 2 attentions of 2 transformer blocks each;
  one value per attention covers both blocks, as diffusers' prefix match."""
  base, _, tpipe, pipe = sdxl
  image = _images(1, seed=23)[0]
  latents = np.asarray(pipe.noise(9, 2, HW, HW))
  tpipe.scheduler = _euler(base)
  scale = {"up": {"block_0": [0.0, 1.0]}}
  for p in (pipe, tpipe):
    p.set_ip_adapter_scale(scale)
  ours = pipe(PROMPTS, steps=3, guidance_scale=5.0, sampler="euler", latents=latents, output="latent",
              ip_adapter_image=image)
  ref = _run_diffusers(tpipe, PROMPTS, None, latents, guidance=5.0, ip_adapter_image=image)
  reference.check_close(ours, ref, f"SDXL per-block scales {scale}")
  for p in (pipe, tpipe):
    p.set_ip_adapter_scale(0.8)


def test_per_block_scales_that_do_not_fit_are_refused_in_one_line(sd):
  """Parts and blocks this U-Net lacks (diffusers drops a block without attention silently), wrong counts,
  non-finite values: one-line ValueErrors, the scale left as it was."""
  pipe = sd[3]
  before = pipe.ip_adapter.scale
  for scale, match in (({
      "up": {
          "block_0": [0.0, 1.0]
      }
  }, "'block_0' is not a block with cross-attention in this "
                        "U-Net (those are block_1)"), ({
                            "left": 1.0
                        }, "unknown part 'left'"), ({
                            "up": {
                                "block_1": [1.0, 1.0, 1.0]
                            }
                        }, "3 values for up block_1, which has 2 attentions"), ({
                            "mid": [1.0, 2.0]
                        }, "2 values for mid"), ({
                            "down": float("inf")
                        }, "finite number"), ({
                            "down": {
                                "block_0": "high"
                            }
                        }, "finite number"), ([{
                            "up": 1.0
                        }, 0.5], "2 scales for 1 IP-Adapter")):
    with pytest.raises(ValueError, match=re.escape(match)) as e:
      pipe.set_ip_adapter_scale(scale)
    _one_line(e)
  assert pipe.ip_adapter.scale == before


def test_sd_img2img_matches_diffusers(sd, monkeypatch):
  """StableDiffusionImg2ImgPipeline with the adapter (scale 0.5, strength 0.6, Euler), given the image latents and
  our noise (its randn_tensor returns it)."""
  from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as module

  path, _, tpipe, pipe = sd
  image = _images(1, seed=7)[0]
  noise = np.asarray(pipe.noise(4, 2, HW, HW))
  image_latents = np.asarray(pipe.noise(5, 2, HW, HW))
  pipe.set_ip_adapter_scale(0.5)
  ours = pipe.img2img(PROMPTS, None, strength=0.6, negative_prompts=NEGATIVE, steps=5, sampler="euler", noise=noise,
                      image_latents=image_latents, output="latent", ip_adapter_image=image)
  ref_pipe = diffusers.StableDiffusionImg2ImgPipeline(**tpipe.components)
  ref_pipe.set_progress_bar_config(disable=True)
  ref_pipe.scheduler = _euler(path)
  ref_pipe.set_ip_adapter_scale(0.5)
  monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: reference.nhwc_to_nchw(noise))
  with torch.no_grad():
    ref = ref_pipe(PROMPTS, image=reference.nhwc_to_nchw(image_latents), strength=0.6, num_inference_steps=5,
                   guidance_scale=7.5, negative_prompt=NEGATIVE, output_type="latent", ip_adapter_image=image).images
  reference.check_close(ours, reference.nchw_to_nhwc(ref), "SD img2img, scale 0.5")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
  root = tmp_path_factory.mktemp("ip_sdxl")
  base, _, components = reference.make_tiny_sdxl_folders(str(root))
  tpipe = diffusers.StableDiffusionXLPipeline.from_pretrained(base)
  tpipe.set_progress_bar_config(disable=True)
  adapter = make_adapter_folder(str(root / "adapter"), tpipe.unet, seed=1)
  tpipe.load_ip_adapter(adapter, subfolder="", weight_name=WEIGHT, image_encoder_folder="image_encoder")
  pipe = jaxsd.StableDiffusionXL.from_pretrained(base)
  pipe.load_ip_adapter(adapter, weight_name=WEIGHT, scale=0.8)
  tpipe.set_ip_adapter_scale(0.8)
  return base, adapter, tpipe, pipe


def test_sdxl_text_to_image_matches_diffusers(sdxl):
  """StableDiffusionXLPipeline with the adapter at scale 0.8 under guidance (Euler, no negative prompt: zero
  unconditional text embeddings), one image for both prompts."""
  base, _, tpipe, pipe = sdxl
  image = _images(1, seed=9)[0]
  latents = np.asarray(pipe.noise(6, 2, HW, HW))
  tpipe.scheduler = _euler(base)
  ours = pipe(PROMPTS, steps=3, guidance_scale=5.0, sampler="euler", latents=latents, output="latent",
              ip_adapter_image=image)
  ref = _run_diffusers(tpipe, PROMPTS, None, latents, guidance=5.0, ip_adapter_image=image)
  reference.check_close(ours, ref, "SDXL text-to-image, scale 0.8")


def _state_dict(adapter) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file

  return load_file(os.path.join(adapter, WEIGHT))


def _one_line(excinfo) -> str:
  message = str(excinfo.value)
  assert "\n" not in message, message
  return message


def test_other_models_and_kinds_are_refused_in_one_line(sd, sdxl):
  """An SDXL adapter on SD 1.x (the cross-attention width), adapters of other kinds by name, several adapters,
  per-block scales; nothing is loaded then."""
  path, adapter, _, _ = sd
  pipe = jaxsd.StableDiffusion.from_pretrained(path)
  sd_keys = _state_dict(adapter)
  with pytest.raises(ValueError, match="cross-attention width") as e:
    pipe.load_ip_adapter(os.path.join(sdxl[1], WEIGHT))
  assert "is 32" in _one_line(e) and "another model" in _one_line(e)
  image_proj = {k: v for k, v in sd_keys.items() if "image_proj" in k}
  eight_layers = {f"ip_adapter.{i}.to_k_ip.weight": np.zeros((32, 32), np.float32) for i in range(1, 17, 2)}
  with pytest.raises(ValueError, match="for 8 cross-attention layers, this U-Net has 4") as e:
    pipe.load_ip_adapter({**image_proj, **eight_layers}, image_encoder_folder=None)
  faceid_plus = {  # (Full Face and FaceID load: tests/test_ip_adapter_face.py)
      "image_proj.perceiver_resampler.proj_in.weight": np.zeros((64, 24)),
      "image_proj.norm.weight": np.zeros(32),
      "image_proj.proj.0.weight": np.zeros((64, 24)),
  }
  with pytest.raises(ValueError, match="IP-Adapter FaceID Plus .* is not supported") as e:
    pipe.load_ip_adapter({**faceid_plus, "ip_adapter.1.to_k_ip.weight": np.zeros((32, 32))})
  _one_line(e)
  with pytest.raises(ValueError, match="LoRA lacks 0.to_k_lora.up.weight") as e:
    pipe.load_ip_adapter({**sd_keys, "ip_adapter.0.to_k_lora.down.weight": np.zeros((4, 32))})
  _one_line(e)
  with pytest.raises(ValueError, match="3 sources, 1 subfolders and 2 weight names"):
    pipe.load_ip_adapter([adapter] * 3, weight_name=[WEIGHT, WEIGHT])
  with pytest.raises(ValueError, match="no IP-Adapter is loaded"):
    pipe.set_ip_adapter_scale(0.5)
  assert pipe.ip_adapter is None
  pipe.load_ip_adapter(adapter, weight_name=WEIGHT)
  for scale, match in (([0.5,
                         0.5], "2 scales for 1 IP-Adapter"), (float("nan"), "finite number"), (1e39, "finite number")):
    with pytest.raises(ValueError, match=match):
      pipe.set_ip_adapter_scale(scale)


def test_strict_conversion_names_each_mismatch(sd):
  """A missing key, an unexpected one and a wrong shape are all listed, under the U-Net's names."""
  path, adapter, _, _ = sd
  pipe = jaxsd.StableDiffusion.from_pretrained(path)
  sd_keys = _state_dict(adapter)
  broken = dict(sd_keys)
  del broken["ip_adapter.1.to_v_ip.weight"]
  broken["ip_adapter.3.to_k_ip.weight"] = broken["ip_adapter.3.to_k_ip.weight"].T[:16]
  broken["ip_adapter.3.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(weights.WeightLoadError) as e:
    pipe.load_ip_adapter(broken, image_encoder_folder=None)
  message = str(e.value)
  assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v_ip.0.weight" in message  # missing
  assert "ip_adapter.ip_adapter.3.extra.weight" not in message and "ip_adapter.3.extra.weight" in message
  assert "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k_ip.0.weight: checkpoint" in message
  assert pipe.ip_adapter is None


def test_pickled_bin_nested_layout_and_precomputed_embeddings_only(sd, tmp_path):
  """The original .bin layout ({"image_proj": ..., "ip_adapter": ...}) loads the same parameters, only with
  allow_pickle; image_encoder_folder=None loads no encoder: precomputed embeddings then, and images refused."""
  path, adapter, tpipe, pipe = sd
  nested = {"image_proj": {}, "ip_adapter": {}}
  for k, v in _state_dict(adapter).items():
    head, _, rest = k.partition(".")
    nested[head][rest] = torch.from_numpy(v)
  torch.save(nested, tmp_path / "ip.bin")
  other = jaxsd.StableDiffusion.from_pretrained(path)
  with pytest.raises(ValueError, match="is pickled") as e:
    other.load_ip_adapter(tmp_path / "ip.bin")
  _one_line(e)
  other.load_ip_adapter(tmp_path / "ip.bin", allow_pickle=True, image_encoder_folder=None)
  assert other.ip_adapter.image_encoder is None
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), other.ip_adapter.params, pipe.ip_adapter.params)
  assert all(jax.tree.leaves(same))
  with pytest.raises(ValueError, match="without an image encoder"):
    other.ip_adapter_inputs(_images(1)[0], None, 1, True)
  with torch.no_grad():
    embeds = tpipe.prepare_ip_adapter_image_embeds(_images(1)[0], None, "cpu", 1, True)
  got = other.ip_adapter_inputs(None, embeds, 2, True)
  assert got["image_embeds"].shape == (2, 1, EMBED_DIM)
  np.testing.assert_array_equal(got["image_embeds"][1], embeds[0][1].numpy())
  np.testing.assert_array_equal(got["uncond_image_embeds"][0], embeds[0][0].numpy())
  for bad, match in (([embeds[0][:, 0]],
                      r"has shape \(2, 24\)"), ([embeds[0][:1]], r"has 1 row first.* takes 2 \(or 4, one per prompt\)"),
                     (embeds[0], "a list with one array per IP-Adapter"), ([embeds[0], embeds[0]], "2 arrays for 1 IP"),
                     ([embeds[0][..., None]], "this plain adapter takes pooled embeddings")):
    with pytest.raises(ValueError, match=match):
      other.ip_adapter_inputs(None, bad, 2, True)


def test_call_arguments_are_checked(sd):
  path, adapter, _, pipe = sd
  image = _images(1)[0]
  with pytest.raises(ValueError, match="an IP-Adapter is loaded: pass ip_adapter_image"):
    pipe(PROMPTS, steps=1, height=HW, width=HW)
  with pytest.raises(ValueError, match="not both"):
    pipe(PROMPTS, steps=1, height=HW, width=HW, ip_adapter_image=image, ip_adapter_image_embeds=[np.zeros((2, 1, 24))])
  with pytest.raises(ValueError, match="3 IP-Adapter images for 2 prompts"):
    pipe(PROMPTS, steps=1, height=HW, width=HW, ip_adapter_image=[image] * 3)
  with pytest.raises(ValueError, match="2 lists of images"):
    pipe(PROMPTS, steps=1, height=HW, width=HW, ip_adapter_image=[[image], [image]])
  small = os.path.join(os.path.dirname(adapter), "encoder16")
  _image_encoder(small, projection_dim=16)
  other = jaxsd.StableDiffusion.from_pretrained(path)
  with pytest.raises(ValueError, match="takes 24-wide image embeddings; the image encoder .*encoder16 gives 16"):
    other.load_ip_adapter(os.path.join(adapter, WEIGHT), image_encoder_folder=small)
  with pytest.raises(FileNotFoundError, match="no image encoder"):
    other.load_ip_adapter(os.path.join(adapter, WEIGHT), image_encoder_folder="elsewhere")


def test_pipeline_folders_own_image_encoder_and_feature_extractor(sd, tmp_path):
  """A pipeline folder saved with an image_encoder/ and feature_extractor/ (model_index.json names them): its own
  encoder and processor are used, as diffusers' pipeline has them loaded (the adapter's folder has no encoder)."""
  path, adapter, tpipe, _ = sd
  folder = str(tmp_path / "with_encoder")
  encoder = tpipe.image_encoder
  processor = transformers.CLIPImageProcessor(size=40, crop_size=32)  # not load_ip_adapter's default
  ref = diffusers.StableDiffusionPipeline(vae=tpipe.vae, text_encoder=tpipe.text_encoder, tokenizer=tpipe.tokenizer,
                                          unet=reference.torch_pipeline(path).unet, scheduler=tpipe.scheduler,
                                          safety_checker=None, feature_extractor=processor, image_encoder=encoder,
                                          requires_safety_checker=False)
  ref.save_pretrained(folder)
  alone = tmp_path / "adapter_alone"
  alone.mkdir()
  save_file({k: torch.from_numpy(v) for k, v in _state_dict(adapter).items()}, str(alone / WEIGHT))
  pipe = jaxsd.StableDiffusion.from_pretrained(folder)
  pipe.load_ip_adapter(str(alone / WEIGHT))
  assert pipe.ip_adapter.image_encoder_folder == os.path.join(folder, "image_encoder")
  images = _images(2, seed=11)
  with torch.no_grad():
    want, _ = ref.encode_image(images, "cpu", 1)
  diff = np.abs(pipe.encode_ip_adapter_image(images)[0] - want.numpy()).max()
  print(f"image embeddings through the folder's feature extractor: max |diff| {diff:.1e}")
  assert diff < 1e-5


@pytest.mark.parametrize("args, message", [
    (["--ip-adapter-image", "x.png"], "--ip-adapter-image needs --ip-adapter FILE"),
    (["--ip-adapter-scale", "0.5"], "--ip-adapter-scale needs --ip-adapter FILE"),
    (["--image-encoder", "enc"], "--image-encoder needs --ip-adapter FILE"),
    (["--ip-adapter", "{adapter}"], "--ip-adapter needs --ip-adapter-image IMG"),
    (["--ip-adapter", "/nonexistent/ip.safetensors", "--ip-adapter-image", "x.png"], "no such file"),
    (["--ip-adapter", "{bin}", "--ip-adapter-image", "x.png"], "is pickled"),
    (["--ip-adapter", "{adapter}", "--ip-adapter-image", "x.png", "--ip-adapter-scale", "nan"], "finite number"),
    (["--ip-adapter", "{adapter}", "--ip-adapter-image", "x.png", "--ip-adapter-image", "y.png"
     ], "2 --ip-adapter-image for 1 --ip-adapter"),
    ([
        "--ip-adapter", "{adapter}", "--ip-adapter", "{adapter}", "--ip-adapter-image", "x.png", "--ip-adapter-image",
        "x.png", "--ip-adapter-scale", "1", "--ip-adapter-scale", "1", "--ip-adapter-scale", "1"
    ], "3 --ip-adapter-scale for 2 --ip-adapter"),
    (["--ip-adapter", "{adapter}", "--ip-adapter-image", "x.png", "--ip-adapter-scale", "{{up: 1}}"], "not valid JSON"),
    (["--ip-adapter", "{adapter}", "--ip-adapter-image", "x.png", "--ip-adapter-scale", "[1, 2]"], "JSON object"),
    (["--ip-adapter", "{lonely}", "--ip-adapter-image", "x.png"], "give --image-encoder FOLDER"),
    (["--ip-adapter", "{adapter}", "--ip-adapter-image", "x.png", "--image-encoder", "{tmp}"], "no config.json"),
    (["--ip-adapter", "{adapter}", "--ip-adapter-image", "/nonexistent.png"], "--ip-adapter-image /nonexistent.png"),
])
def test_sample_ip_adapter_flags_exit_2_before_loading(tmp_path, capsys, monkeypatch, args, message):
  from jaxsd import pipeline_xl
  from sample import __main__ as sample_main
  from tests.test_commands import _one_error_line, _sample

  folder = tmp_path / "models"
  (folder / "image_encoder").mkdir(parents=True)
  (folder / WEIGHT).write_bytes(b"")
  (folder / "ip.bin").write_bytes(b"")
  (tmp_path / "lonely.safetensors").write_bytes(b"")
  names = dict(adapter=folder / WEIGHT, bin=folder / "ip.bin", lonely=tmp_path / "lonely.safetensors", tmp=tmp_path)
  monkeypatch.setattr(pipeline_xl, "load", lambda *a, **k: pytest.fail("loaded a model"))
  assert sample_main.main(_sample(tmp_path, "--prompt", "a cat", *(a.format(**names) for a in args))) == 2
  assert message in _one_error_line(capsys)


def test_sample_ip_adapter_writes_the_pipelines_image(sd, tmp_path, capsys, monkeypatch):
  """python -m sample --ip-adapter ... --ip-adapter-image ... --ip-adapter-scale: the image is the pipeline call's
  (generate on one device, for time)."""
  from jaxsd import generate
  from sample.__main__ import main

  real = generate.generate
  monkeypatch.setattr(generate, "generate", lambda *a, **kw: real(*a, devices=jax.local_devices()[:1], **kw))

  path, adapter, _, pipe = sd
  png, out = str(tmp_path / "prompt.png"), str(tmp_path / "out")
  _images(1, seed=13)[0].save(png)
  argv = ["--model", path, "--prompt", "a cat", "--steps", "2", "--height", "16", "--width", "16", "--out", out]
  argv += ["--sampler", "euler", "--no-progress", "--ip-adapter", os.path.join(adapter, WEIGHT)]
  argv += ["--ip-adapter-image", png, "--ip-adapter-scale", "0.6"]
  assert main(argv) == 0, capsys.readouterr().err
  written = np.asarray(Image.open(os.path.join(out, "a_cat-seed0-0000.png")))
  pipe.set_ip_adapter_scale(0.6)
  want = pipe(["a cat"], height=16, width=16, steps=2, sampler="euler", ip_adapter_image=Image.open(png))[0]
  assert np.abs(written.astype(int) - want.astype(int)).max() <= 1
  pipe.set_ip_adapter_scale(0.0)  # the plain model's image (the same program)
  plain = pipe(["a cat"], height=16, width=16, steps=2, sampler="euler", ip_adapter_image=Image.open(png))[0]
  assert np.abs(written.astype(int) - plain.astype(int)).max() > 10


def test_sample_per_block_scale_flag(sd, tmp_path, capsys):
  """--ip-adapter-scale takes per-block weights as JSON; a block this U-Net lacks exits 2 in one line once the model
  is read, before anything compiles or is written."""
  from sample.__main__ import main
  from sample.ip_adapter_flags import scale_flag as ip_adapter_scale_flag
  from tests.test_commands import _one_error_line

  assert ip_adapter_scale_flag(' {"up": {"block_1": [0, 1]}}') == {"up": {"block_1": [0, 1]}}
  assert ip_adapter_scale_flag("0.25") == 0.25
  path, adapter, _, _ = sd
  png, out = str(tmp_path / "prompt.png"), tmp_path / "out"
  _images(1)[0].save(png)
  argv = [
      "--model", path, "--prompt", "a cat", "--steps", "2", "--height", "16", "--width", "16", "--out",
      str(out), "--no-progress", "--ip-adapter",
      os.path.join(adapter, WEIGHT), "--ip-adapter-image", png, "--ip-adapter-scale", '{"up": {"block_0": [0, 1]}}'
  ]
  assert main(argv) == 2
  assert "'block_0' is not a block with cross-attention" in _one_error_line(capsys)
  assert not out.exists()


def random_plus_adapter(unet, seed: int = 0, embed_dim: int = 32, hidden: int = 32, queries: int = 4,
                        heads: int = 1) -> dict[str, torch.Tensor]:
  """An IP-Adapter Plus state dict in the original layout (the Resampler's `layers.<i>.0.to_kv`, `.1.1`, ...):
  image tokens from the image encoder's hidden states (`embed_dim` = its hidden_size), 64-wide heads, 4 layers."""
  g = torch.Generator().manual_seed(seed)
  c, inner = unet.config.cross_attention_dim, 64 * heads
  rand = lambda *shape, s=0.3: s * torch.randn(*shape, generator=g)  # noqa: E731
  norm = lambda name, n: {f"{name}.weight": 1 + rand(n, s=0.1), f"{name}.bias": rand(n, s=0.1)}  # noqa: E731
  proj = {
      "latents": rand(1, queries, hidden, s=hidden**-0.5),
      "proj_in.weight": rand(hidden, embed_dim),
      "proj_in.bias": rand(hidden, s=0.1),
      "proj_out.weight": rand(c, hidden),
      "proj_out.bias": rand(c, s=0.1),
      **norm("norm_out", c)
  }
  for i in range(4):
    proj.update({
        **norm(f"layers.{i}.0.norm1", hidden),
        **norm(f"layers.{i}.0.norm2", hidden),
        f"layers.{i}.0.to_q.weight": rand(inner, hidden),
        f"layers.{i}.0.to_kv.weight": rand(2 * inner, hidden),
        f"layers.{i}.0.to_out.weight": rand(hidden, inner),
        **norm(f"layers.{i}.1.0", hidden),
        f"layers.{i}.1.1.weight": rand(4 * hidden, hidden),
        f"layers.{i}.1.3.weight": rand(hidden, 4 * hidden),
    })
  layers = {k: v for k, v in random_ip_adapter(unet, seed).items() if k.startswith("ip_adapter.")}
  return {**{f"image_proj.{k}": v for k, v in proj.items()}, **layers}


def test_plus_matches_diffusers(sd, tmp_path):
  """IP-Adapter Plus (the Resampler over the image encoder's penultimate hidden states; the unconditional half gets a
  zero image's): SD text-to-image under guidance at scale 0.6 as diffusers', from the image and from diffusers'
  precomputed (2, 1, L, D) hidden states; the pipeline's Resampler parameters under diffusers' names."""
  path, adapter, _, _ = sd
  tpipe = reference.torch_pipeline(path)
  folder = tmp_path / "plus"
  folder.mkdir()
  os.symlink(os.path.join(adapter, "image_encoder"), folder / "image_encoder")
  save_file(random_plus_adapter(tpipe.unet, seed=3), str(folder / "ip-adapter-plus.safetensors"))
  tpipe.load_ip_adapter(str(folder), subfolder="", weight_name="ip-adapter-plus.safetensors")
  tpipe.set_ip_adapter_scale(0.6)
  tpipe.scheduler = _euler(path)
  pipe = jaxsd.StableDiffusion.from_pretrained(path)
  pipe.load_ip_adapter(folder / "ip-adapter-plus.safetensors", scale=0.6)
  assert pipe.ip_adapter.kind == "plus"
  resampler = pipe.ip_adapter.params["encoder_hid_proj"]["image_projection_layers_0"]
  want = {
      k.removeprefix("encoder_hid_proj.image_projection_layers.0.")
      for k in tpipe.unet.state_dict()
      if k.startswith("encoder_hid_proj.")
  }
  assert {k for k in weights.params_to_state_dict(resampler)} == want
  image = _images(1, seed=21)[0]
  latents = np.asarray(pipe.noise(8, 2, HW, HW))
  ref = _run_diffusers(tpipe, PROMPTS, NEGATIVE, latents, ip_adapter_image=image)
  run = lambda **kw: pipe(PROMPTS, NEGATIVE, steps=3, sampler="euler", latents=latents, output="latent", **kw)
  reference.check_close(run(ip_adapter_image=image), ref, "IP-Adapter Plus, SD text-to-image, scale 0.6")
  with torch.no_grad():
    embeds = tpipe.prepare_ip_adapter_image_embeds(image, None, "cpu", 1, True)
  assert embeds[0].shape == (2, 1, 17, 32)  # (halves, images, CLIP tokens, hidden_size)
  reference.check_close(run(ip_adapter_image_embeds=embeds), ref, "IP-Adapter Plus, diffusers' hidden states")
  pipe.set_ip_adapter_scale(0.0)  # the adapter moves the latents far past the tolerance
  assert np.abs(run(ip_adapter_image=image) - ref).max() > 100 * 1e-4 * max(1.0, float(np.abs(ref).max()))


def test_controlnet_pipeline_takes_the_adapter_and_matches_diffusers(sd, tmp_path):
  """with_controlnet after load_ip_adapter keeps the adapter (it steers the U-Net, not the ControlNet): latents as
  diffusers' StableDiffusionControlNetPipeline with ip_adapter_image."""
  path, _, tpipe, pipe = sd
  plain_unet = reference.torch_pipeline(path).unet  # (tpipe's has the adapter in its config)
  net = diffusers.ControlNetModel.from_unet(plain_unet, conditioning_embedding_out_channels=(8, 16))
  with torch.no_grad():
    for p in net.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
  net.eval().save_pretrained(tmp_path / "cn")
  controlled = pipe.with_controlnet(str(tmp_path / "cn"))
  controlled.set_ip_adapter_scale(0.9)
  assert pipe.ip_adapter.scale == 0.9  # one adapter, shared
  control, image = _images(1, seed=30, size=HW)[0].resize((HW, HW)), _images(1, seed=31)[0]
  latents = np.asarray(pipe.noise(9, 1, HW, HW))
  ours = controlled(PROMPTS[:1], control, NEGATIVE[:1], steps=3, sampler="euler", latents=latents, output="latent",
                    ip_adapter_image=image)
  ref_pipe = diffusers.StableDiffusionControlNetPipeline(**{**tpipe.components, "controlnet": net})
  ref_pipe.set_progress_bar_config(disable=True)
  ref_pipe.scheduler = _euler(path)
  ref_pipe.set_ip_adapter_scale(0.9)
  reference.check_close(
      ours, _run_diffusers(ref_pipe, PROMPTS[:1], NEGATIVE[:1], latents, image=control, ip_adapter_image=image),
      "ControlNet + IP-Adapter, scale 0.9")


def _two_adapter_folder(adapter: str, unet, folder) -> tuple:
  """(folder, weight names): the sd fixture's plain adapter and a random Plus one beside its image encoder."""
  folder.mkdir()
  os.symlink(os.path.join(adapter, "image_encoder"), folder / "image_encoder")
  os.symlink(os.path.join(adapter, WEIGHT), folder / WEIGHT)
  save_file(random_plus_adapter(unet, seed=4), str(folder / "ip-adapter-plus.safetensors"))
  return folder, [WEIGHT, "ip-adapter-plus.safetensors"]


def test_two_adapters_match_diffusers(sd, tmp_path):
  """Several IP-Adapters at once (diffusers' lists): a plain one and a Plus one sharing the image encoder, each with
  its own image and scale (the second per-block), from images and from diffusers' precomputed embeddings; new
  scales compile nothing; scales [0, 0] are the plain model; unload removes both."""
  path, adapter, _, _ = sd
  tpipe = reference.torch_pipeline(path)
  folder, names = _two_adapter_folder(adapter, tpipe.unet, tmp_path / "two")
  scales = [0.7, {"down": 0.4, "up": {"block_1": [1.2, 0.0]}}]
  tpipe.load_ip_adapter(str(folder), subfolder="", weight_name=names)
  tpipe.set_ip_adapter_scale(scales)
  tpipe.scheduler = _euler(path)
  pipe = jaxsd.StableDiffusion.from_pretrained(path)
  pipe.load_ip_adapter(folder, weight_name=names, scale=scales)
  assert [a.kind for a in pipe.ip_adapters] == ["plain", "plus"]
  assert pipe.ip_adapters[0].image_encoder is pipe.ip_adapters[1].image_encoder  # one encoder, two outputs
  ours_keys = set(weights.params_to_state_dict(pipe.params["unet"]))
  theirs = {k for k in tpipe.unet.state_dict() if "_ip" in k or k.startswith("encoder_hid_proj.")}
  assert {k.replace(".processor.", ".") for k in theirs} <= ours_keys
  images = _images(2, seed=31)
  latents = np.asarray(pipe.noise(10, 2, HW, HW))
  ref = _run_diffusers(tpipe, PROMPTS, NEGATIVE, latents, ip_adapter_image=images)
  run = lambda **kw: pipe(PROMPTS, NEGATIVE, steps=3, sampler="euler", latents=latents, output="latent", **kw)
  ours = run(ip_adapter_image=images)
  reference.check_close(ours, ref, "two IP-Adapters (plain 0.7, Plus per-block)")
  with torch.no_grad():
    embeds = tpipe.prepare_ip_adapter_image_embeds(images, None, "cpu", 1, True)
  reference.check_close(run(ip_adapter_image_embeds=embeds), ref, "two IP-Adapters, diffusers' embeddings")
  program = pipe._jitted(True, "latent", "text", True)
  traces = program._cache_size()
  for s in ([0.0, scales[1]], [0.7, {"down": 0.0, "mid": 0.0, "up": 0.0}]):  # each adapter matters on its own
    pipe.set_ip_adapter_scale(s)
    assert np.abs(run(ip_adapter_image=images) - ours).max() > 1e-2 * np.abs(ours).max()
  assert program._cache_size() == traces
  pipe.set_ip_adapter_scale([0.0, {"down": 0.0, "mid": 0.0, "up": 0.0}])
  plain = jaxsd.StableDiffusion.from_pretrained(path)
  want = plain(PROMPTS, NEGATIVE, steps=3, sampler="euler", latents=latents, output="latent")
  assert np.abs(run(ip_adapter_image=images) - want).max() <= 1e-6 * max(1.0, float(np.abs(want).max()))
  for bad, match in ((images[0], "one image for 2 IP-Adapters"), ([images[0]], "1 entries for 2 IP-Adapters")):
    with pytest.raises(ValueError, match=match):
      run(ip_adapter_image=bad)
  with pytest.raises(ValueError, match="3 scales for 2 IP-Adapters"):
    pipe.set_ip_adapter_scale([1.0, 1.0, 1.0])
  pipe.unload_ip_adapter()
  assert pipe.ip_adapters == () and pipe.ip_adapter is None
  np.testing.assert_array_equal(run(), want)


def test_sample_two_ip_adapters(sd, tmp_path, capsys, monkeypatch):
  """python -m sample with --ip-adapter / --ip-adapter-image twice and a scale each (one as JSON): the pipeline call's
  image (generate on one device, for time)."""
  from jaxsd import generate
  from sample.__main__ import main

  real = generate.generate
  monkeypatch.setattr(generate, "generate", lambda *a, **kw: real(*a, devices=jax.local_devices()[:1], **kw))
  path, adapter, _, _ = sd
  folder, names = _two_adapter_folder(adapter, reference.torch_pipeline(path).unet, tmp_path / "two")
  pngs = [str(tmp_path / f"{i}.png") for i in range(2)]
  for im, png in zip(_images(2, seed=33), pngs):
    im.save(png)
  scales = [0.6, {"up": {"block_1": [0.0, 1.0]}}]
  out = str(tmp_path / "out")
  argv = [
      "--model", path, "--prompt", "a cat", "--steps", "2", "--height", "16", "--width", "16", "--out", out,
      "--sampler", "euler", "--no-progress"
  ]
  for name, png, scale in zip(names, pngs, scales):
    argv += ["--ip-adapter", str(folder / name), "--ip-adapter-image", png, "--ip-adapter-scale", json.dumps(scale)]
  assert main(argv) == 0, capsys.readouterr().err
  written = np.asarray(Image.open(os.path.join(out, "a_cat-seed0-0000.png")))
  pipe = jaxsd.StableDiffusion.from_pretrained(path)
  pipe.load_ip_adapter(folder, weight_name=names, scale=scales)
  want = pipe(["a cat"], height=16, width=16, steps=2, sampler="euler",
              ip_adapter_image=[Image.open(p) for p in pngs])[0]
  assert np.abs(written.astype(int) - want.astype(int)).max() <= 1
