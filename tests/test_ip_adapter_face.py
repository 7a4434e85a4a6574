"""IP-Adapter Full Face and FaceID parity with diffusers' `load_ip_adapter` on tiny random models: checkpoints in
the original key layout (Full Face's `image_proj.proj.{0,2,3}`, FaceID's `image_proj.proj.{0,2}` + `norm` and its
LoRA `ip_adapter.<n>.to_q_lora.down.weight`, ...) of the tiny U-Net's shapes, loaded by both, final latents of a
few Euler steps under guidance compared (`reference.check_close`: 1e-4 of the latents' scale), and the projections'
tokens to 1e-5."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import jaxsd
from jaxsd import weights
from tests import reference
from tests.test_ip_adapter import (HW, NEGATIVE, PROMPTS, _euler, _image_encoder, _images, _one_line, _run_diffusers,
                                   random_ip_adapter)

HIDDEN = 32  # the tiny image encoder's hidden_size: Full Face's input width
ID_DIM = 24  # the face embedding's width (insightface's: 512)
FULL = "ip-adapter-full-face_tiny.safetensors"
FACEID = "ip-adapter-faceid_tiny.bin"


def _rand(g: torch.Generator):
  return lambda *shape, s=0.3: s * torch.randn(*shape, generator=g)  # noqa: E731


def random_full_face_adapter(unet, seed: int = 0) -> dict[str, torch.Tensor]:
  """IP-Adapter Full Face (ip-adapter-full-face_sd15's layout): `image_proj.proj.0` (Linear D -> D), `.2` (Linear
  D -> cross_attention_dim), `.3` (LayerNorm) over the image encoder's hidden states; the plain adapter's layers."""
  rand, c = _rand(torch.Generator().manual_seed(seed)), unet.config.cross_attention_dim
  proj = {
      "proj.0.weight": rand(HIDDEN, HIDDEN),
      "proj.0.bias": rand(HIDDEN, s=0.1),
      "proj.2.weight": rand(c, HIDDEN),
      "proj.2.bias": rand(c, s=0.1),
      "proj.3.weight": 1 + rand(c, s=0.1),
      "proj.3.bias": rand(c, s=0.1),
  }
  layers = {k: v for k, v in random_ip_adapter(unet, seed).items() if k.startswith("ip_adapter.")}
  return {**{f"image_proj.{k}": v for k, v in proj.items()}, **layers}


def random_faceid_adapter(unet, seed: int = 0, tokens: int = 4, mult: int = 2, rank: int = 4) -> dict:
  """IP-Adapter FaceID (ip-adapter-faceid_sd15.bin's nested layout): `image_proj` {proj.0 (Linear ID_DIM -> mult x
  ID_DIM), proj.2 (-> tokens x cross_attention_dim), norm}, `ip_adapter` {the plain adapter's to_k_ip / to_v_ip, and
  a LoRA of every attention processor (numbered as `unet.attn_processors`): to_q / to_k / to_v / to_out, down and
  up}."""
  g = torch.Generator().manual_seed(seed)
  rand, c = _rand(g), unet.config.cross_attention_dim
  image_proj = {
      "proj.0.weight": rand(mult * ID_DIM, ID_DIM, s=2.0),  # GELU inputs of order 1 (a face embedding: unit norm)
      "proj.0.bias": rand(mult * ID_DIM, s=0.1),
      "proj.2.weight": rand(tokens * c, mult * ID_DIM),
      "proj.2.bias": rand(tokens * c, s=0.1),
      "norm.weight": 1 + rand(c, s=0.1),
      "norm.bias": rand(c, s=0.1),
  }
  ip_adapter = {
      k.removeprefix("ip_adapter."): v
      for k, v in random_ip_adapter(unet, seed).items()
      if "to_k_ip" in k or "to_v_ip" in k
  }
  for key_id, name in enumerate(unet.attn_processors):
    attn = unet.get_submodule(name.removesuffix(".processor"))
    for proj, layer in (("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v), ("to_out", attn.to_out[0])):
      ip_adapter[f"{key_id}.{proj}_lora.down.weight"] = rand(rank, layer.in_features, s=0.2)
      ip_adapter[f"{key_id}.{proj}_lora.up.weight"] = rand(layer.out_features, rank, s=0.2)
  return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def _face_embeds(n: int = 1, seed: int = 0) -> torch.Tensor:
  """FaceID's input as diffusers' documentation builds it from insightface's normed embeddings: (2, n, 1, D), the
  unconditional zeros first (with n = 1: `torch.stack([face.unsqueeze(0)]).unsqueeze(0)` and `zeros_like`)."""
  g = torch.Generator().manual_seed(seed)
  faces = torch.nn.functional.normalize(torch.randn(n, ID_DIM, generator=g), dim=-1)
  ref = faces[:, None][None]  # torch.stack([face.unsqueeze(0)], dim=0).unsqueeze(0): (1, n, 1, D)
  return torch.cat([torch.zeros_like(ref), ref])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("ip_face")
  path = reference.make_tiny_sd_folder(str(root / "sd"))
  unet = reference.torch_pipeline(path).unet
  adapter = root / "adapter"
  adapter.mkdir()
  _image_encoder(str(adapter / "image_encoder"))
  save_file(random_full_face_adapter(unet, seed=4), str(adapter / FULL))
  torch.save(random_faceid_adapter(unet, seed=5), str(adapter / FACEID))
  return path, str(adapter)


def _projection_keys(tpipe) -> set[str]:
  return {
      k.removeprefix("encoder_hid_proj.image_projection_layers.0.")
      for k in tpipe.unet.state_dict()
      if k.startswith("encoder_hid_proj.")
  }


def _check_tokens(pipe, tpipe, embeds, what: str) -> None:
  """The projection's tokens (the U-Net's `encoder_hid_proj`) of diffusers' image embeddings (2, n, ..., D) against
  diffusers' own, to 1e-5: a check of the projection alone, finer than the latents' (a tanh GELU for the exact one
  moves the tokens by ~1e-4)."""
  from jaxsd.models.image_projection import IPAdapterImageProjections, projection_config

  params = pipe.ip_adapter.params["encoder_hid_proj"]
  x = np.asarray(embeds, np.float32)
  config = projection_config(params["image_projection_layers_0"], x.ndim == 4)
  ours = IPAdapterImageProjections(pipe.unet.config.context_dim, config).apply({"params": params}, x)
  with torch.no_grad():
    ref = tpipe.unet.encoder_hid_proj([torch.from_numpy(x)])[0].numpy()
  ref = ref.reshape(ref.shape[0], -1, ref.shape[-1])  # (2, n, tokens, C) -> each image's tokens in turn
  diff = float(np.abs(np.asarray(ours) - ref).max())
  print(f"{what} tokens: max |jaxsd - diffusers| {diff:.1e}")
  assert diff < 1e-5 * max(1.0, float(np.abs(ref).max())), f"{what} tokens: max |diff| {diff}"


def _moves(ours, ref) -> None:
  """`ours` (made without part of the adapter) far (100 x the parity tolerance) from diffusers' `ref`."""
  diff, tol = float(np.abs(ours - ref).max()), 1e-4 * max(1.0, float(np.abs(ref).max()))
  print(f"  ... and without it: max |diff| {diff:.1e} (> {100 * tol:.1e})")
  assert diff > 100 * tol


def test_full_face_matches_diffusers(folders):
  """Full Face (IPAdapterFullImageProjection over the image encoder's penultimate hidden states, all of its tokens;
  the unconditional half a zero image's, as Plus): SD text-to-image, Euler, guidance 7.5, scale 0.6, from the image
  and from diffusers' precomputed (2, 1, L, D) hidden states; the projection's parameters under diffusers' names."""
  path, adapter = folders
  tpipe = reference.torch_pipeline(path)
  tpipe.load_ip_adapter(adapter, subfolder="", weight_name=FULL)
  tpipe.set_ip_adapter_scale(0.6)
  tpipe.scheduler = _euler(path)
  pipe = jaxsd.StableDiffusion.from_pretrained(path)
  pipe.load_ip_adapter(adapter, weight_name=FULL, scale=0.6)
  assert pipe.ip_adapter.kind == "full_face" and pipe.ip_adapter.embed_dim == HIDDEN
  projection = pipe.ip_adapter.params["encoder_hid_proj"]["image_projection_layers_0"]
  assert set(weights.params_to_state_dict(projection)) == _projection_keys(tpipe)
  image = _images(1, seed=11)[0]
  with torch.no_grad():
    embeds = tpipe.prepare_ip_adapter_image_embeds(image, None, "cpu", 1, True)
  assert embeds[0].shape == (2, 1, 17, HIDDEN)  # (halves, images, CLIP tokens: 16 patches + CLS, hidden_size)
  _check_tokens(pipe, tpipe, embeds[0], "IP-Adapter Full Face")
  latents = np.asarray(pipe.noise(2, 2, HW, HW))
  ref = _run_diffusers(tpipe, PROMPTS, NEGATIVE, latents, ip_adapter_image=image)
  run = lambda **kw: pipe(PROMPTS, NEGATIVE, steps=3, sampler="euler", latents=latents, output="latent", **kw)
  reference.check_close(run(ip_adapter_image=image), ref, "IP-Adapter Full Face, SD text-to-image, scale 0.6")
  reference.check_close(run(ip_adapter_image_embeds=embeds), ref, "IP-Adapter Full Face, diffusers' hidden states")
  pipe.set_ip_adapter_scale(0.0)
  _moves(run(ip_adapter_image=image), ref)


@pytest.fixture(scope="module")
def faceid(folders):
  path, adapter = folders
  tpipe = reference.torch_pipeline(path)
  tpipe.load_ip_adapter(adapter, subfolder="", weight_name=FACEID, image_encoder_folder=None)
  tpipe.set_ip_adapter_scale(0.7)
  tpipe.scheduler = _euler(path)
  assert "faceid_0" in tpipe.unet.peft_config  # diffusers loaded the checkpoint's LoRA itself
  pipe = jaxsd.StableDiffusion.from_pretrained(path)
  pipe.load_ip_adapter(adapter, weight_name=FACEID, image_encoder_folder=None, scale=0.7, allow_pickle=True)
  return tpipe, pipe


def test_faceid_matches_diffusers(faceid):
  """FaceID (IPAdapterFaceIDImageProjection: the face embedding -> 4 tokens) and the LoRA its checkpoint carries,
  which diffusers loads as the adapter "faceid_0": SD text-to-image, Euler, guidance 7.5, scale 0.7, from the
  embeddings as diffusers' documentation builds them ((2, n, 1, D), zeros first) and as (2, n, D); one face and two;
  without the LoRA, or at scale 0, the latents move far past the tolerance."""
  tpipe, pipe = faceid
  assert pipe.ip_adapter.kind == "faceid" and pipe.ip_adapter.image_encoder is None
  assert pipe.lora_adapters == {"faceid_0": 1.0}
  projection = pipe.ip_adapter.params["encoder_hid_proj"]["image_projection_layers_0"]
  assert set(weights.params_to_state_dict(projection)) == _projection_keys(tpipe)
  latents = np.asarray(pipe.noise(4, 2, HW, HW))
  run = lambda e: pipe(PROMPTS, NEGATIVE, steps=3, sampler="euler", latents=latents, output="latent",
                       ip_adapter_image_embeds=[e])
  for n in (1, 2):
    embeds = _face_embeds(n, seed=n)
    _check_tokens(pipe, tpipe, embeds[:, :, 0], f"IP-Adapter FaceID, {n} face(s)")
    ref = _run_diffusers(tpipe, PROMPTS, NEGATIVE, latents, ip_adapter_image_embeds=[embeds])
    reference.check_close(run(embeds), ref, f"IP-Adapter FaceID, {n} face(s) (2, {n}, 1, D), scale 0.7")
    if n == 1:
      reference.check_close(run(embeds[:, :, 0]), ref, "IP-Adapter FaceID, (2, 1, D)")
      pipe.set_adapters([])  # the checkpoint's LoRA off
      _moves(run(embeds), ref)
      pipe.set_adapters(["faceid_0"])
      pipe.set_ip_adapter_scale(0.0)  # the face tokens off
      _moves(run(embeds), ref)
      pipe.set_ip_adapter_scale(0.7)


def test_faceid_takes_embeddings_only_and_faceid_plus_is_refused(faceid, folders):
  """ip_adapter_image with FaceID: a one-line error naming ip_adapter_image_embeds; hidden states or a wrong width
  refused in one line; FaceID Plus refused by name, in one line; unload_ip_adapter leaves the LoRA, as diffusers'."""
  path, _ = folders
  _, pipe = faceid
  call = lambda **kw: pipe(PROMPTS, steps=1, sampler="euler", height=HW, width=HW, output="latent", **kw)
  with pytest.raises(ValueError, match="pass ip_adapter_image_embeds") as e:
    call(ip_adapter_image=_images(1)[0])
  assert "FaceID" in _one_line(e)
  with pytest.raises(ValueError, match=r"has shape \(2, 1, 17, 24\)") as e:
    call(ip_adapter_image_embeds=[np.zeros((2, 1, 17, ID_DIM), np.float32)])
  _one_line(e)
  with pytest.raises(ValueError, match=f"is 512 wide; the adapter takes {ID_DIM}-wide embeddings") as e:
    call(ip_adapter_image_embeds=[np.zeros((2, 1, 512), np.float32)])
  _one_line(e)
  other = jaxsd.StableDiffusion.from_pretrained(path)
  plus = {
      "image_proj.perceiver_resampler.proj_in.weight": np.zeros((64, 24)),
      "image_proj.norm.weight": np.zeros(32),
      "image_proj.proj.0.weight": np.zeros((64, 24)),
      "ip_adapter.1.to_k_ip.weight": np.zeros((32, 32)),
  }
  with pytest.raises(ValueError, match="IP-Adapter FaceID Plus .* is not supported") as e:
    other.load_ip_adapter(plus, image_encoder_folder=None)
  _one_line(e)
  assert other.ip_adapter is None and not other.lora_adapters
  pipe.unload_ip_adapter()
  assert pipe.ip_adapter is None and pipe.lora_adapters == {"faceid_0": 1.0}


def test_sdxl_faceid_matches_diffusers(tmp_path):
  """FaceID on StableDiffusionXLPipeline (ip-adapter-faceid_sdxl's layout, a flat safetensors file; its LoRA on
  every attention of the transformer blocks): Euler, guidance 5, no negative prompt, scale 0.8."""
  import diffusers

  base, _, _ = reference.make_tiny_sdxl_folders(str(tmp_path))
  tpipe = diffusers.StableDiffusionXLPipeline.from_pretrained(base)
  tpipe.set_progress_bar_config(disable=True)
  save_file({
      f"{h}.{k}": v for h, d in random_faceid_adapter(tpipe.unet, seed=6).items() for k, v in d.items()
  }, str(tmp_path / "faceid_sdxl.safetensors"))
  tpipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="faceid_sdxl.safetensors", image_encoder_folder=None)
  tpipe.set_ip_adapter_scale(0.8)
  tpipe.scheduler = _euler(base)
  assert "faceid_0" in tpipe.unet.peft_config
  pipe = jaxsd.StableDiffusionXL.from_pretrained(base)
  pipe.load_ip_adapter(tmp_path / "faceid_sdxl.safetensors", image_encoder_folder=None, scale=0.8)
  embeds = _face_embeds(1, seed=7)
  latents = np.asarray(pipe.noise(6, 2, HW, HW))
  ours = pipe(PROMPTS, steps=3, guidance_scale=5.0, sampler="euler", latents=latents, output="latent",
              ip_adapter_image_embeds=[embeds])
  ref = _run_diffusers(tpipe, PROMPTS, None, latents, guidance=5.0, ip_adapter_image_embeds=[embeds])
  reference.check_close(ours, ref, "IP-Adapter FaceID, SDXL text-to-image, scale 0.8")


def test_sample_faceid_embeds_writes_the_pipelines_image(folders, tmp_path, capsys, monkeypatch):
  """python -m sample --ip-adapter FaceID.bin --allow-pickle --ip-adapter-embeds face.npy (n, D): the image is the
  pipeline call's with ip_adapter_image_embeds=[(2, n, 1, D), zeros first] (generate on one device, for time);
  another face gives another image from the same program."""
  import jax
  from PIL import Image

  from jaxsd import generate
  from sample.__main__ import main

  real = generate.generate
  monkeypatch.setattr(generate, "generate", lambda *a, **kw: real(*a, devices=jax.local_devices()[:1], **kw))
  path, adapter = folders
  embeds = _face_embeds(1, seed=3)
  npy, out = str(tmp_path / "face.npy"), str(tmp_path / "out")
  np.save(npy, embeds[1, :, 0].numpy())  # (1, D): the face alone, the unconditional row zeros
  argv = ["--model", path, "--prompt", "a cat", "--steps", "2", "--height", "16", "--width", "16", "--out", out]
  argv += ["--sampler", "euler", "--no-progress", "--allow-pickle", "--ip-adapter", f"{adapter}/{FACEID}"]
  argv += ["--ip-adapter-embeds", npy, "--ip-adapter-scale", "0.7"]
  assert main(argv) == 0, capsys.readouterr().err
  written = np.asarray(Image.open(f"{out}/a_cat-seed0-0000.png"))
  pipe = jaxsd.StableDiffusion.from_pretrained(path)
  pipe.load_ip_adapter(adapter, weight_name=FACEID, image_encoder_folder=None, scale=0.7, allow_pickle=True)
  call = lambda e: pipe(["a cat"], height=16, width=16, steps=2, sampler="euler", ip_adapter_image_embeds=[e])[0]
  want = call(embeds.numpy())
  assert np.abs(written.astype(int) - want.astype(int)).max() <= 1
  other = call(_face_embeds(1, seed=8).numpy())
  print(f"another face: max |diff| {np.abs(written.astype(int) - other.astype(int)).max()}")
  assert np.abs(written.astype(int) - other.astype(int)).max() > 10
