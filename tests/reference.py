"""Tiny random Stable Diffusion folders built with the PyTorch reference (diffusers + transformers).

Nothing can be downloaded here, so tests make their own "checkpoints": random weights, real formats.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch


def _jitter(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
  # Default inits zero some layers (e.g. conv_out); perturb everything so every weight matters.
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def tiny_components(sd2: bool = False, seed: int = 0, in_channels: int = 4, time_cond_proj_dim: int | None = None):
  """(unet, vae, text_encoder, tokenizer, scheduler) as PyTorch objects; in_channels=9 for an inpainting U-Net;
  time_cond_proj_dim for a guidance-embedding (LCM-distilled) U-Net."""
  import diffusers
  import transformers

  from jaxsd import tokenizer as tok

  torch.manual_seed(seed)
  unet = diffusers.UNet2DConditionModel(sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1,
                                        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D",
                                                                                       "DownBlock2D"),
                                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                        norm_num_groups=8, attention_head_dim=(2, 4) if sd2 else 4,
                                        use_linear_projection=sd2, upcast_attention=sd2,
                                        time_cond_proj_dim=time_cond_proj_dim)
  vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=16)
  text_encoder = transformers.CLIPTextModel(
      transformers.CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=77,
                                  hidden_act="gelu" if sd2 else "quick_gelu", projection_dim=32, bos_token_id=49406,
                                  eos_token_id=49407, pad_token_id=1))
  for i, m in enumerate((unet, vae, text_encoder)):
    _jitter(m, seed=seed + i)
  sched_kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  steps_offset=1, set_alpha_to_one=False)
  if sd2:
    scheduler = diffusers.DDIMScheduler(prediction_type="v_prediction", clip_sample=False, **sched_kw)
  else:
    scheduler = diffusers.PNDMScheduler(skip_prk_steps=True, **sched_kw)
  return unet.eval(), vae.eval(), text_encoder.eval(), tok.load_tokenizer(), scheduler


def make_tiny_sd_folder(path: str, sd2: bool = False, seed: int = 0, in_channels: int = 4,
                        safe_serialization: bool = True, time_cond_proj_dim: int | None = None) -> str:
  """Writes a tiny random diffusers StableDiffusionPipeline folder to `path` (an inpainting one for
  in_channels=9, an InstructPix2Pix one with Euler ancestral for 8; pickled `.bin` weights with
  safe_serialization=False; a guidance-embedding U-Net with time_cond_proj_dim); returns it."""
  import diffusers

  unet, vae, text_encoder, tokenizer, scheduler = tiny_components(sd2, seed, in_channels, time_cond_proj_dim)
  cls = {
      9: diffusers.StableDiffusionInpaintPipeline,
      8: diffusers.StableDiffusionInstructPix2PixPipeline
  }.get(in_channels, diffusers.StableDiffusionPipeline)
  if in_channels == 8:  # timbrooks/instruct-pix2pix's scheduler
    scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(scheduler.config)
  pipe = cls(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(path, safe_serialization=safe_serialization)
  return os.fspath(path)


def torch_pipeline(path: str):
  import diffusers

  pipe = diffusers.StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  return pipe


def nhwc_to_nchw(x) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x, np.float32), (0, 3, 1, 2))))


def nchw_to_nhwc(x: torch.Tensor) -> np.ndarray:
  return np.transpose(x.detach().float().numpy(), (0, 2, 3, 1))


def inpaint_reference(monkeypatch, components, scheduler, prompts, negative, mask_images, image_latents, noise,
                      masked_image_latents, strength, steps, guidance_scale=7.5):
  """diffusers' StableDiffusionInpaintPipeline final latents (NHWC), given the image latents (a
  4-channel `image`), the masked-image latents and our noise (its `randn_tensor` returns it)."""
  import diffusers
  from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as module

  pipe = diffusers.StableDiffusionInpaintPipeline(**components)
  pipe.set_progress_bar_config(disable=True)
  pipe.scheduler = scheduler
  monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: nhwc_to_nchw(noise))
  w, h = mask_images[0].size  # PIL masks
  with torch.no_grad():
    out = pipe(prompts, image=nhwc_to_nchw(image_latents), mask_image=mask_images,
               masked_image_latents=nhwc_to_nchw(masked_image_latents), strength=strength, height=h, width=w,
               num_inference_steps=steps, guidance_scale=guidance_scale, negative_prompt=negative, output_type="latent")
  return nchw_to_nhwc(out.images)


def tiny_sdxl_components(seed: int = 0, in_channels: int = 4) -> dict:
  """A tiny random SDXL base model as diffusers' StableDiffusionXLPipeline components (an inpainting base for
  in_channels=9), and the refiner's U-Net (aesthetic-score time ids, second text encoder only) under
  "refiner_unet"."""
  import diffusers
  import transformers

  from jaxsd import tokenizer as tok

  torch.manual_seed(seed)
  common = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                norm_num_groups=8)
  # 32 + 32 text features; 32 pooled + 6 (base) or 5 (refiner) time ids of 8 Fourier features each.
  unet = diffusers.UNet2DConditionModel(**dict(common, in_channels=in_channels), transformer_layers_per_block=(1, 2),
                                        cross_attention_dim=64, projection_class_embeddings_input_dim=32 + 6 * 8)
  refiner_unet = diffusers.UNet2DConditionModel(**common, transformer_layers_per_block=(1, 1), cross_attention_dim=32,
                                                projection_class_embeddings_input_dim=32 + 5 * 8)
  vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=16,
                                scaling_factor=0.13025, force_upcast=True)
  text = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=77, projection_dim=32, bos_token_id=49406, pad_token_id=1)
  # The first encoder pools as SD 1.x's legacy config (eos_token_id 2: the highest id), the second at the
  # first end-of-text token, as the released SDXL configs do for their own vocabularies.
  text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text, hidden_act="quick_gelu",
                                                                        eos_token_id=2))
  text_encoder_2 = transformers.CLIPTextModelWithProjection(
      transformers.CLIPTextConfig(**text, hidden_act="gelu", eos_token_id=49407))
  for i, m in enumerate((unet, refiner_unet, vae, text_encoder, text_encoder_2)):
    _jitter(m, seed=seed + i)
  scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                               steps_offset=1, timestep_spacing="leading")
  tokenizer_2 = tok.load_tokenizer()
  tokenizer_2.pad_token = "!"  # SDXL's second tokenizer pads with "!" (id 0), not <|endoftext|>
  return dict(unet=unet.eval(), refiner_unet=refiner_unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
              text_encoder_2=text_encoder_2.eval(), tokenizer=tok.load_tokenizer(), tokenizer_2=tokenizer_2,
              scheduler=scheduler)


def make_tiny_sdxl_folders(path: str, seed: int = 0) -> tuple[str, str, dict]:
  """Writes a tiny random SDXL base (StableDiffusionXLPipeline) and refiner (StableDiffusionXLImg2ImgPipeline,
  requires_aesthetics_score, force_zeros_for_empty_prompt false) under `path`; returns (base folder, refiner
  folder, the diffusers components)."""
  import diffusers

  c = tiny_sdxl_components(seed)
  base = diffusers.StableDiffusionXLPipeline(vae=c["vae"], text_encoder=c["text_encoder"],
                                             text_encoder_2=c["text_encoder_2"], tokenizer=c["tokenizer"],
                                             tokenizer_2=c["tokenizer_2"], unet=c["unet"], scheduler=c["scheduler"],
                                             force_zeros_for_empty_prompt=True, add_watermarker=False)
  refiner = diffusers.StableDiffusionXLImg2ImgPipeline(vae=c["vae"], text_encoder=None,
                                                       text_encoder_2=c["text_encoder_2"], tokenizer=None,
                                                       tokenizer_2=c["tokenizer_2"], unet=c["refiner_unet"],
                                                       scheduler=c["scheduler"], requires_aesthetics_score=True,
                                                       force_zeros_for_empty_prompt=False, add_watermarker=False)
  paths = os.path.join(os.fspath(path), "base"), os.path.join(os.fspath(path), "refiner")
  for pipe, folder in zip((base, refiner), paths):
    pipe.save_pretrained(folder)
    # The released SDXL folders' scheduler_config.json, written by an older diffusers: keys Euler ignores
    # (clip_sample, set_alpha_to_one, ...) are there, and read by the other schedulers swapped in.
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
      json.dump(SDXL_SCHEDULER, f, indent=2)
  return paths[0], paths[1], c


SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False
}


def assert_sample_command_reads(model: str, single_file_config: str, out, capsys) -> None:
  """`python -m sample --model MODEL --single-file-config CONFIG` (2 steps) writes one image and the grid to `out`."""
  from sample.__main__ import main

  argv = [
      "--model", model, "--single-file-config", single_file_config, "--prompt", "a cat", "--steps", "2", "--out",
      str(out), "--no-progress"
  ]
  assert main(argv) == 0
  assert sorted(os.listdir(out)) == ["a_cat-seed0-0000.png", "grid.png"]
  assert "wrote 1 images" in capsys.readouterr().err


def randomize_peft_adapter(model: torch.nn.Module, g: torch.Generator) -> None:
  """Moves a fresh PEFT (DoRA) adapter off its init, in place: lora_A / lora_B to 0.1 N(0, 1), each
  lora_magnitude_vector times 1 + 0.3 N(0, 1)."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_A" in name or "lora_B" in name:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
      elif "lora_magnitude_vector" in name:
        p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))


def check_close(ours, ref, what: str, rel: float = 1e-4) -> float:
  """Asserts max |ours - ref| < rel * max(1, max |ref|) (the pipelines' parity tolerance, scaled to the latents'
  size); prints and returns the difference."""
  diff = float(np.abs(np.asarray(ours) - ref).max())
  tol = rel * max(1.0, float(np.abs(ref).max()))
  print(f"{what}: max |jaxsd - diffusers| {diff:.1e} (tolerance {tol:.1e})")
  assert np.shape(ours) == np.shape(ref) and diff < tol, f"{what}: max |diff| {diff}"
  return diff


def assert_matches_and_moves(pipe, prompts, hw: int, guidance: float, latents, ref, base, what: str) -> None:
  """jaxsd's latents from `latents` (Euler, 3 steps, `guidance`) within the pipeline tolerance (1e-4 of the
  latents' scale) of diffusers' `ref`, and `ref` far (100 x that) from diffusers' `base`, made without `what`
  (an adapter, a learned embedding), so that a file half-loaded on either side fails."""
  ours = pipe(prompts, height=hw, width=hw, steps=3, guidance_scale=guidance, sampler="euler", latents=latents,
              output="latent")
  tol = 1e-4 * max(1.0, np.abs(ref).max())
  diff = np.abs(ours - ref).max()
  print(f"max |jaxsd - diffusers| with {what}: {diff:.2e} (tolerance {tol:.1e}); it moves diffusers' latents by "
        f"{np.abs(ref - base).max():.2e}")
  assert diff < tol
  assert np.abs(ref - base).max() > 100 * tol


def assert_same_adapter(got, want) -> None:
  """Two loaded `jaxsd.lora` adapters hold the same layers: equal down / up weights, the same scale."""
  assert {n: set(layers) for n, layers in got.layers.items()} == {n: set(layers) for n, layers in want.layers.items()}
  for net, layers in want.layers.items():
    for path, w in layers.items():
      g = got.layers[net][path]
      np.testing.assert_array_equal(g.down, w.down, err_msg=f"{net} {path}")
      np.testing.assert_array_equal(g.up, w.up, err_msg=f"{net} {path}")
      np.testing.assert_allclose(g.scale, w.scale, rtol=1e-7, err_msg=f"{net} {path}")


def captioned_image_folder(root, sizes, seed: int = 0) -> tuple[str, str, dict]:
  """Random RGB PNGs of the given (height, width) sizes captioned "picture number i", prepared as a TFDS dataset
  under root/tfds: (data_dir, dataset name, caption -> uint8 pixels)."""
  from PIL import Image  # noqa: PLC0415
  from jaxsd.data import prepare_image_folder  # noqa: PLC0415

  images = os.path.join(root, "images")
  os.makedirs(images)
  rng = np.random.default_rng(seed)
  sources = {}
  for i, (h, w) in enumerate(sizes):
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(os.path.join(images, f"{i:02d}.png"))
    with open(os.path.join(images, f"{i:02d}.txt"), "w") as f:
      f.write(f"picture number {i}")
    sources[f"picture number {i}"] = pixels
  name, _ = prepare_image_folder(images, os.path.join(root, "tfds"))
  return os.path.join(root, "tfds"), name, sources


def reuse_checkpoints(finished_workdir: str, workdir: str, stage: str) -> str:
  """A new workdir whose `stage` checkpoints are the finished run's (linked): a rerun there resumes at the last
  step, so it only exports (e.g. in another format)."""
  os.makedirs(os.path.join(workdir, stage))
  os.symlink(os.path.join(finished_workdir, stage, "checkpoints"), os.path.join(workdir, stage, "checkpoints"))
  return workdir


def to_ldm(sd: dict, pairs: list[tuple[str, str]], prefix: str, unsqueeze_attention: bool = False) -> dict:
  """A diffusers state dict renamed to the original (LDM) single-file keys under `prefix`, with jaxsd's (LDM,
  diffusers) prefix pairs inverted (`jaxsd.single_file.unet_prefixes` / `vae_prefixes`); unsqueeze_attention: the
  VAE's mid-block attention as LDM's 1x1 convolutions. Tests check the result with diffusers' own converters."""
  inverse = sorted(((d, l) for l, d in pairs), key=lambda p: -len(p[0]))
  out = {}
  for key, value in sd.items():
    new = next((l + key[len(d):] for d, l in inverse if key.startswith(d)), key)
    if unsqueeze_attention and ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
      value = value[:, :, None, None]  # LDM's VAE attention is 1x1 convolutions
    out[prefix + new] = value
  return out


_OPEN_CLIP_NAMES = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "self_attn.out_proj.": "attn.out_proj.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj."
}


def to_open_clip(text: dict, prefix: str = "cond_stage_model.model.", extra_layer: bool = False) -> dict:
  """A transformers CLIPTextModel / CLIPTextModelWithProjection state dict (with or without `text_model.`) in
  OpenCLIP's layout under `prefix`: fused q/k/v, `text_projection` as the (width, dim) matrix OpenCLIP applies as
  x @ P (the transpose of the linear layer's weight; an unused (width, 8) one without it, as SD 2's file has); with
  extra_layer one more last layer (SD 2 reads the penultimate layer of its tower: its file has a layer more)."""
  text = {k.removeprefix("text_model."): v for k, v in text.items()}
  width = text["final_layer_norm.weight"].shape[0]
  projection = text.pop("text_projection.weight", None)
  out = {
      "token_embedding.weight":
          text["embeddings.token_embedding.weight"],
      "positional_embedding":
          text["embeddings.position_embedding.weight"],
      "ln_final.weight":
          text["final_layer_norm.weight"],
      "ln_final.bias":
          text["final_layer_norm.bias"],
      "text_projection":
          np.eye(width, 8, dtype=np.float32) if projection is None else np.ascontiguousarray(np.asarray(projection).T),
      "logit_scale":
          np.float32(4.6),
  }
  layers = sorted({int(k.split(".")[2]) for k in text if k.startswith("encoder.layers.")})
  for i in layers + ([layers[-1] + 1] if extra_layer else []):
    extra = i > layers[-1]
    pre = f"encoder.layers.{layers[-1] if extra else i}."
    for kind in ("weight", "bias"):
      out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = np.concatenate(
          [text[f"{pre}self_attn.{p}_proj.{kind}"] for p in "qkv"])
    for k, v in text.items():
      for a, b in _OPEN_CLIP_NAMES.items():
        if k.startswith(pre + a):
          out[f"transformer.resblocks.{i}.{b}{k[len(pre + a):]}"] = v + np.float32(1.0 if extra else 0.0)
  return {prefix + k: v for k, v in out.items()}


def kill_while_saving_images(monkeypatch) -> None:
  """Makes PIL's Image.save write half of its file and then raise KeyboardInterrupt, as a process killed while
  writing an image (fault-injection tests); `monkeypatch.undo()` ends it."""
  from PIL import Image

  real_save = Image.Image.save

  def cut_short(self, fp, format=None, **kw):  # half the file reaches the disk, then the process is gone
    real_save(self, fp, format=format, **kw)
    if hasattr(fp, "write"):
      fp.truncate(fp.tell() // 2)
    else:
      os.truncate(fp, os.path.getsize(fp) // 2)
    raise KeyboardInterrupt

  monkeypatch.setattr(Image.Image, "save", cut_short)
