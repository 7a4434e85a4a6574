"""python -m sample: text-to-image, img2img (--init-image), inpainting (--init-image --mask [--padding-mask-crop])
and all three under ControlNets (--controlnet --control-image, or a ControlNet pipeline's --model folder) and with an
image prompt (--ip-adapter --ip-adapter-image, or its embeddings: --ip-adapter-embeds FILE.npy, FaceID's face
embeddings; in a region: --ip-adapter-mask), text-to-image under T2I-Adapters (--t2i-adapter --adapter-image), and
instruction edits with an InstructPix2Pix model (--init-image [--image-guidance-scale]), across every local
accelerator. Flags only; the work is in jaxsd.generate.

Images of another colour mode (RGBA, L, P) are converted to RGB, masks to greyscale (white = repaint), as
diffusers does; 16-bit, 32-bit and float grey files (depth maps) are scaled to 8 bits first, CMYK, LAB and YCbCr
files refused."""

from __future__ import annotations

import argparse
import codecs
import importlib.util
import json
import os
import sys

from jaxsd import hub
from jaxsd.config import DTYPES, finite32
from sample import ip_adapter_flags


def parse(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m sample", description=__doc__)
  p.add_argument(
      "--model", required=True,
      help="diffusers Stable Diffusion or SDXL (base or refiner) folder or Hub id, a training workdir, or an SD "
      "1.x / 2.x / SDXL single-file .safetensors checkpoint (A1111 / CompVis layout; a pickled .ckpt with "
      "--allow-pickle); a diffusers ControlNet pipeline's folder (controlnet/, ...) runs with its ControlNets, "
      "one --control-image each")
  p.add_argument(
      "--single-file-config", default="auto",
      help="with a single-file --model: v1 (SD 1.5), v2 (SD 2.1 768 px, v-prediction), v1-inpainting, "
      "v2-inpainting (SD 2 inpainting, 512 px), instruct-pix2pix, xl (SDXL 1.0 base), xl-refiner, xl-inpainting "
      "(SDXL inpainting 0.1) or a diffusers SD / SDXL folder whose configs describe the checkpoint; auto: from its "
      "keys, as diffusers: SDXL base when its text encoders are under conditioner.embedders.0 and .1, the refiner "
      "when OpenCLIP's alone is under .0, else v2 when its text encoder is OpenCLIP's, else v1; -inpainting when "
      "its U-Net takes 9 channels, instruct-pix2pix when an SD 1.x one takes 8")
  p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
  p.add_argument("--prompts-file", help="a text file with one prompt per line")
  p.add_argument("--negative-prompt", default=None,
                 help="default: none (SD: the empty prompt; SDXL: as its folder's force_zeros_for_empty_prompt says)")
  p.add_argument("--long-prompts", action="store_true",
                 help="encode prompts past 77 tokens in 75-token windows (A1111) instead of truncating them")
  p.add_argument("--prompt-weighting", action="store_true",
                 help="read A1111's (word:1.3), (word) = x1.1, [word] = /1.1 weights and BREAK; \\( for a literal (")
  p.add_argument("--num-images", type=int, default=1, help="images per prompt")
  p.add_argument("--steps", type=int, default=None, help="denoising steps (default 25; 4 with the lcm sampler)")
  p.add_argument("--sampler", default=None,
                 help="default: the model folder's own scheduler (as diffusers runs it; PNDM for SD 1.5)")
  p.add_argument(
      "--timestep-spacing", default=None, choices=("leading", "trailing", "linspace"),
      help="override the scheduler config's timestep_spacing (trailing for few-step models: SDXL-Turbo / Lightning "
      "/ Hyper-SD, zero terminal SNR)")
  p.add_argument(
      "--guidance", type=float, default=None,
      help="classifier-free guidance scale (<= 1: off; default, as diffusers: 7.5, SDXL 5; an LCM-distilled "
      "model takes it as an input, default 8.5)")
  p.add_argument("--eta", type=float, default=0.0,
                 help="DDIM's eta (0: deterministic DDIM, 1: DDPM-like) and TCD's gamma; as diffusers' pipelines' eta")
  p.add_argument(
      "--freeu", type=float, nargs=4, default=None, metavar=("S1", "S2", "B1", "B2"),
      help="FreeU (diffusers' enable_freeu): skip factors s1 s2, backbone factors b1 b2 of the first two up blocks; "
      "the FreeU authors': SD 1.4/1.5 0.9 0.2 1.5 1.6, SD 2.1 0.9 0.2 1.4 1.6, SDXL 0.6 0.4 1.1 1.2 (0: off)")
  p.add_argument(
      "--vae-tiling", action="store_true",
      help="decode (and encode) images larger than the VAE's sample_size in overlapping tiles, blended (diffusers' "
      "vae.enable_tiling()): large images in bounded memory; their pixels differ a little from untiled ones")
  p.add_argument("--vae-slicing", action="store_true",
                 help="decode (and encode) a device's batch one image at a time (diffusers' vae.enable_slicing())")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--height", type=int, default=None, help="default: the model's native size")
  p.add_argument("--width", type=int, default=None)
  p.add_argument("--init-image", help="img2img: start from this image (its size is the output size)")
  p.add_argument("--mask", help="inpainting (with --init-image): white = repaint, black = keep; the image's size")
  p.add_argument(
      "--strength", type=float, default=None,
      help="how much of the schedule runs from the noised image, in (0, 1]; default the pipeline's, as diffusers': "
      "img2img 0.8 (SDXL 0.3; on an LCM folder with lcm, strength picks the LCM "
      "timesteps and all --steps run), inpainting 1 (SDXL 0.9999)")
  p.add_argument(
      "--image-guidance-scale", type=float, default=None, metavar="S",
      help="an InstructPix2Pix model (timbrooks/instruct-pix2pix) edits --init-image as the prompt instructs: how "
      "closely to keep to the image (default 1.5, as diffusers; below 1 no guidance)")
  p.add_argument(
      "--padding-mask-crop", type=int, default=None, metavar="N",
      help="inpainting: repaint only a box N pixels around the mask, at --height x --width (default: the "
      "model's size), and paste it back into the image (as diffusers' padding_mask_crop)")
  p.add_argument(
      "--controlnet", action="append", default=[], metavar="PATH",
      help="a diffusers ControlNet folder or Hub id (repeatable: MultiControlNet, residuals summed); "
      "replaces a ControlNet pipeline --model folder's own")
  p.add_argument(
      "--control-image", action="append", default=[], metavar="IMG",
      help="the conditioning image of each --controlnet, in the same order (resized to the output; "
      "--height/--width default to the first one's size)")
  p.add_argument(
      "--controlnet-scale", type=float, nargs="+", default=None, metavar="S",
      help="conditioning scale: one for all ControlNets, or one per ControlNet (default, as diffusers: 1; "
      "0.8 with --init-image, 0.5 with --mask; 1 with --mask on SDXL)")
  p.add_argument(
      "--control-guidance-start", type=float, nargs="+", default=None, metavar="F",
      help="fraction of the steps where each ControlNet starts acting (one, or one per ControlNet; default 0)")
  p.add_argument(
      "--control-guidance-end", type=float, nargs="+", default=None, metavar="F",
      help="fraction of the steps where each ControlNet stops acting (one, or one per ControlNet; default 1)")
  p.add_argument("--guess-mode", action="store_true",
                 help="ControlNet guess mode: residuals 0.1x..1x, only the conditional half of guidance steered")
  p.add_argument(
      "--t2i-adapter", action="append", default=[], metavar="FOLDER",
      help="a diffusers T2IAdapter folder or Hub id (TencentARC t2iadapter_* for SD 1.x, t2i-adapter-*-sdxl-1.0 for "
      "SDXL; repeatable: MultiAdapter, features summed); text-to-image only")
  p.add_argument(
      "--adapter-image", action="append", default=[], metavar="IMG",
      help="the conditioning image of each --t2i-adapter, in the same order (resized to the output; --height/--width "
      "default to the first one's size, rounded down to the adapter's factor)")
  p.add_argument("--adapter-scale", type=float, nargs="+", default=None, metavar="S",
                 help="the adapters' conditioning scale: one for all, or one per --t2i-adapter (default 1; 0: off)")
  p.add_argument(
      "--adapter-factor", type=float, default=None, metavar="F",
      help="SDXL: the fraction of the steps that get the adapters' features (diffusers' adapter_conditioning_factor, "
      "default 1)")
  p.add_argument(
      "--lora", action="append", default=[], metavar="FILE[:SCALE]",
      help="a LoRA adapter (diffusers/PEFT or kohya .safetensors, or a Hub id owner/name) at weight SCALE "
      "(default 1; repeatable)")
  p.add_argument(
      "--lora-ignore-unmatched", action="store_true",
      help="load a LoRA's keys that match layers of the model and skip (and log) the others, instead of "
      "refusing the file")
  p.add_argument(
      "--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
      help="a textual-inversion embedding (diffusers' learned_embeds, A1111 .pt / .safetensors / .png, SDXL clip_l + "
      "clip_g) under TOKEN (default: the file's name for it, else its file name); use TOKEN in --prompt or "
      "--negative-prompt (repeatable; loaded after --lora; .pt / .bin need --allow-pickle)")
  ip_adapter_flags.add_flags(p)
  p.add_argument(
      "--pag-scale", type=float, default=None, metavar="S",
      help="Perturbed-Attention Guidance (diffusers' PAG pipelines) at scale S (diffusers' default 3; 0: off) on the "
      "self-attention layers of --pag-layers; with --guidance <= 1 it guides alone")
  p.add_argument(
      "--pag-layers", nargs="+", default=None, metavar="NAME",
      help="with --pag-scale: the layers PAG perturbs, diffusers' pag_applied_layers: regular expressions searched "
      "in self-attention names such as down_blocks.1.attentions.0.transformer_blocks.0.attn1 (default: mid)")
  p.add_argument(
      "--pag-adaptive-scale", type=float, default=None, metavar="A",
      help="with --pag-scale: diffusers' pag_adaptive_scale, the scale at timestep t is max(S - A (1000 - t), 0) "
      "(default 0: S at every step)")
  p.add_argument(
      "--vae", default=None, metavar="PATH",
      help="another VAE: a diffusers AutoencoderKL folder or Hub id (e.g. stabilityai/sd-vae-ft-mse), or a "
      "single VAE file (.safetensors, original or diffusers names)")
  p.add_argument(
      "--unet", default=None, metavar="PATH",
      help="another U-Net: a diffusers U-Net folder or Hub id (e.g. latent-consistency/lcm-sdxl), or a single U-Net "
      "file (.safetensors, e.g. SDXL-Lightning's sdxl_lightning_4step_unet.safetensors)")
  p.add_argument("--batch-per-device", type=int, default=1)
  p.add_argument("--dtype", default="float32", choices=list(DTYPES))
  p.add_argument("--variant", default=None, help="weight files of this variant (e.g. fp16: *.fp16.safetensors)")
  p.add_argument(
      "--allow-pickle", action="store_true",
      help="also read pickled PyTorch weights (.bin folders, .ckpt single files) with torch.load(weights_only=True); "
      "unpickling a file can run code: only for files you trust")
  p.add_argument("--out", default="samples")
  p.add_argument("--benchmark", action="store_true", help="print one JSON line of timings")
  p.add_argument(
      "--distributed", action="store_true",
      help="multi-host: call jax.distributed.initialize() (cluster auto-detection, or the three flags below)")
  p.add_argument("--coordinator-address", default=None,
                 help="with --distributed: host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS or auto-detected)")
  p.add_argument("--num-processes", type=int, default=None, help="with --distributed: how many processes")
  p.add_argument("--process-id", type=int, default=None,
                 help="with --distributed: this process, 0 .. num-processes - 1")
  p.add_argument("--no-progress", action="store_true")
  return p.parse_args(argv)


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
  out = list(prompts)
  if prompts_file:
    if not os.path.exists(prompts_file):
      raise FileNotFoundError(f"--prompts-file {prompts_file}: no such file.")
    if os.path.isdir(prompts_file):
      raise ValueError(f"--prompts-file {prompts_file} is a folder: give a text file with one prompt per line.")
    try:
      with open(prompts_file, "rb") as f:
        data = f.read()
    except OSError as e:  # not readable by this user, a device error
      raise ValueError(f"--prompts-file {prompts_file} cannot be read ({e.strerror or e}).") from None
    # UTF-8 with or without a byte-order mark (Windows editors write one), or UTF-16 / 32 with one (PowerShell 5's
    # `> prompts.txt`), as training reads captions; the mark is not part of the first prompt.
    boms = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
            (codecs.BOM_UTF16_BE, "utf-16"))
    codec = next((c for bom, c in boms if data.startswith(bom)), "utf-8-sig")
    try:
      text = data.decode(codec)
    except UnicodeDecodeError as e:
      raise ValueError(
          f"--prompts-file {prompts_file} is not {codec.upper().removesuffix('-SIG')} text (byte "
          f"{e.start}: {e.object[e.start:e.start + 1]!r}); save it as UTF-8, one prompt per line.") from None
    if "\0" in text:  # valid UTF-8, but no prompt: UTF-16 without a byte-order mark read as UTF-8 ("a\0 \0c\0...")
      raise ValueError(f"--prompts-file {prompts_file} holds NUL characters (UTF-16 text without a byte-order "
                       "mark?); save it as UTF-8, one prompt per line.")
    lines = text.splitlines()
    out += [line.strip() for line in lines if line.strip()]
  if not out:
    raise ValueError("no prompts: give --prompt \"...\" or a --prompts-file with one prompt per line"
                     f"{' (' + prompts_file + ' has only blank lines)' if prompts_file else ''}.")
  for p in prompts:
    utf8(p, "--prompt")
  return out


def utf8(text: str, flag: str) -> str:
  """`text` from the command line, or ValueError when it was not UTF-8 (Python keeps such bytes as surrogates)."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    raise ValueError(
        f"{flag} {text.encode('utf-8', 'surrogateescape')!r} is not UTF-8 text: give it in UTF-8.") from None
  return text


def split_spec(spec: str) -> tuple[str, str | None]:
  """FILE[:X] -> (FILE, X, or None without one); a path that exists is whole, colons and all."""
  head, sep, tail = spec.rpartition(":")
  if sep and head and not os.path.exists(spec):
    return head, tail
  return spec, None


def parse_loras(specs: list[str]) -> list[tuple[str, float]]:
  """--lora FILE[:SCALE] -> [(file, scale)]; a missing file or a bad scale raises, naming the flag."""
  out = []
  for spec in specs:
    path, tail = split_spec(spec)
    scale = 1.0
    if tail is not None:
      try:
        scale = float(tail)
      except ValueError:
        raise ValueError(f"--lora {spec}: the weight after ':' must be a number (FILE[:SCALE], e.g. "
                         f"{path}:0.8).") from None
      if not finite32(scale):
        raise ValueError(f"--lora {spec}: the weight must be a finite number (1: as trained, 0: off).")
    if not os.path.exists(path) and not hub.is_repo_id(path):  # a Hub id (owner/name) is the loader's to find
      raise FileNotFoundError(f"--lora {path}: no such file; give a LoRA .safetensors file (FILE[:SCALE]).")
    out.append((path, scale))
  return out


def parse_embeddings(specs: list[str]) -> list[tuple[str, str | None]]:
  """--embedding FILE[:TOKEN] -> [(file, token or None)]; a missing file raises, naming the flag."""
  out = []
  for spec in specs:
    path, token = split_spec(spec)
    token = token or None
    if not os.path.exists(path):
      raise FileNotFoundError(f"--embedding {path}: no such file; give a textual-inversion embedding (FILE[:TOKEN]).")
    out.append((path, token))
  return out


def check_flags(args) -> None:
  """The checks that need no model, done before anything is loaded."""
  from jaxsd.diffusion import samplers

  if args.steps is not None and args.steps < 1:
    raise ValueError(f"--steps {args.steps}: need at least 1 denoising step.")
  if args.allow_pickle and importlib.util.find_spec("torch") is None:
    raise ValueError("--allow-pickle reads pickled weights with PyTorch, which is not installed: pip install torch "
                     "(the CPU build is enough), or convert the weights to safetensors.")
  if args.guidance is not None and not finite32(args.guidance):
    raise ValueError(f"--guidance {args.guidance}: the guidance scale must be a finite number (7.5 is usual; "
                     "<= 1 turns guidance off).")
  if args.sampler is not None:
    samplers.get(args.sampler)  # raises for an unknown name (whether it fits the model is known once loaded)
  if not finite32(args.eta) or args.eta < 0:
    raise ValueError(f"--eta {args.eta}: must be a finite number >= 0 (0: deterministic DDIM, 1: DDPM-like; "
                     "TCD's gamma in [0, 1]).")
  if args.freeu is not None:
    from jaxsd.freeu import check_factors

    check_factors(args.freeu, "--freeu")
  named = samplers.ALIASES.get(args.sampler, args.sampler)
  if args.eta and named is not None and named not in samplers.ETA_SAMPLERS:  # (others once the model's is known)
    raise ValueError(f"--eta {args.eta} with --sampler {args.sampler}, which has no eta: use one of "
                     f"{', '.join(samplers.ETA_SAMPLERS)}, or drop --eta.")
  if not 0 <= args.seed < 2**64:
    raise ValueError(f"--seed {args.seed}: use a whole number in [0, 2**64).")
  if not args.out.strip():
    raise ValueError("--out is empty: give a folder for the images.")
  if args.single_file_config != "auto" and os.path.isdir(args.model):  # it would be ignored
    raise ValueError(f"--single-file-config applies to a single-file --model (.safetensors); {args.model} is a "
                     "folder, read with its own configs: drop --single-file-config.")
  if args.negative_prompt is not None:
    utf8(args.negative_prompt, "--negative-prompt")
  for name in ("height", "width"):
    v = getattr(args, name)
    if v is not None and (v <= 0 or v % 8):
      raise ValueError(f"--{name} {v} must be a positive multiple of 8.")
  if args.num_images < 1 or args.batch_per_device < 1:
    raise ValueError("--num-images and --batch-per-device must be at least 1.")
  if args.mask and not args.init_image:
    raise ValueError("--mask needs --init-image (the image to inpaint).")
  if args.strength is not None:
    if not args.init_image:
      raise ValueError("--strength applies to img2img and inpainting: give --init-image.")
    if not 0.0 < args.strength <= 1.0:
      raise ValueError(f"--strength {args.strength} must be in (0, 1].")
  if args.image_guidance_scale is not None and (not args.init_image or args.mask):
    raise ValueError("--image-guidance-scale applies to an InstructPix2Pix model editing --init-image (no --mask).")
  if args.padding_mask_crop is not None:
    if not args.mask:
      raise ValueError("--padding-mask-crop applies to inpainting: give --init-image and --mask.")
    if args.padding_mask_crop < 0:
      raise ValueError(f"--padding-mask-crop {args.padding_mask_crop}: the margin around the mask must be >= 0 "
                       "pixels.")
  ip_adapter_flags.check(args)
  check_pag_flags(args)
  for flag, value, what in (("--vae", args.vae, "VAE"), ("--unet", args.unet, "U-Net")):
    if value is not None and not os.path.exists(value) and not hub.is_repo_id(value):
      raise FileNotFoundError(f"{flag} {value}: no such file or folder; give a diffusers {what} folder, a Hub id "
                              f"(owner/name) or a {what} .safetensors file.")
  check_controlnet_flags(args)
  check_t2i_adapter_flags(args)


def check_t2i_adapter_flags(args) -> None:
  """The T2I-Adapter flags: one --adapter-image per --t2i-adapter, scales one or one per adapter, a factor in
  [0, 1], text-to-image only, no ControlNets beside them."""
  n = len(args.t2i_adapter)
  if not n:
    for flag, value in (("--adapter-image", args.adapter_image), ("--adapter-scale", args.adapter_scale),
                        ("--adapter-factor", args.adapter_factor)):
      if value not in (None, []):
        raise ValueError(f"{flag} needs --t2i-adapter FOLDER (a diffusers T2IAdapter folder).")
    return
  if len(args.adapter_image) != n:
    raise ValueError(f"{len(args.adapter_image)} --adapter-image for {n} --t2i-adapter: give one image per adapter, in "
                     "the same order.")
  if args.adapter_scale is not None and len(args.adapter_scale) not in (1, n):
    raise ValueError(f"--adapter-scale has {len(args.adapter_scale)} values for {n} T2I-Adapters: give one, or one "
                     "per adapter.")
  if args.adapter_scale is not None and not finite32(args.adapter_scale):
    raise ValueError(f"--adapter-scale {args.adapter_scale}: must be finite numbers (1: as trained, 0: off).")
  if args.adapter_factor is not None and not 0.0 <= args.adapter_factor <= 1.0:
    raise ValueError(f"--adapter-factor {args.adapter_factor}: the fraction of the steps, in [0, 1].")
  if args.init_image:
    raise ValueError("--t2i-adapter does text-to-image only (as diffusers' adapter pipelines): drop --init-image.")
  if args.controlnet:
    raise ValueError("--t2i-adapter with --controlnet is not supported (diffusers has no such pipeline): use one.")
  for path in args.t2i_adapter:
    if not os.path.isdir(path) and not hub.is_repo_id(path):  # a Hub id (owner/name) is the loader's to find
      raise FileNotFoundError(f"--t2i-adapter {path}: no such folder; give a diffusers T2IAdapter folder "
                              "(config.json and weights).")


def check_pag_flags(args) -> None:
  """The Perturbed-Attention Guidance flags: --pag-layers and --pag-adaptive-scale go with --pag-scale; finite
  values >= 0, layer names that are regular expressions (whether they match the model's layers is known once
  loaded)."""
  from jaxsd import pag

  if args.pag_scale is None:
    for flag, value in (("--pag-layers", args.pag_layers), ("--pag-adaptive-scale", args.pag_adaptive_scale)):
      if value is not None:
        raise ValueError(f"{flag} needs --pag-scale S (Perturbed-Attention Guidance's scale; diffusers' default 3).")
    return
  for flag, value in (("--pag-scale", args.pag_scale), ("--pag-adaptive-scale", args.pag_adaptive_scale)):
    if value is not None and (not finite32(value) or value < 0):
      raise ValueError(f"{flag} {value}: must be a finite number >= 0 (diffusers' defaults: --pag-scale 3, "
                       "--pag-adaptive-scale 0).")
  if args.pag_layers is not None:
    pag.check_layer_ids(args.pag_layers, "--pag-layers")
  if args.guess_mode:
    raise ValueError("--pag-scale with --guess-mode is not supported (diffusers' PAG ControlNet pipelines fail on "
                     "it): drop one of them.")


def check_controlnet_flags(args, model_controlnets: int | None = None) -> None:
  """The ControlNet flags against the --controlnet given or, without one, the ControlNets of the --model folder
  (`model_controlnets`; by default read from a local folder's model_index.json, and a Hub id's checked once
  loaded, with this again)."""
  n = len(args.controlnet)
  if not n:
    if model_controlnets is None and not os.path.exists(args.model) and hub.is_repo_id(args.model):
      return  # resolved when loaded
    n = _model_controlnets(args.model) if model_controlnets is None else model_controlnets
    if n and len(args.control_image) != n:
      raise ValueError(f"--model {args.model}: this folder is a ControlNet pipeline ({n} ControlNet{'s' * (n > 1)}): "
                       f"give --control-image IMG, one per ControlNet in order (got {len(args.control_image)}), or "
                       "--controlnet PATH to use others.")
  control_flags = [("--control-image", args.control_image), ("--controlnet-scale", args.controlnet_scale),
                   ("--control-guidance-start", args.control_guidance_start),
                   ("--control-guidance-end", args.control_guidance_end), ("--guess-mode", args.guess_mode)]
  if not n:
    for flag, value in control_flags:
      if value:
        raise ValueError(f"{flag} needs --controlnet PATH (a diffusers ControlNet folder), or a ControlNet "
                         "pipeline's --model folder.")
    return
  if len(args.control_image) != n:
    raise ValueError(f"{len(args.control_image)} --control-image for {n} --controlnet: give one control image per "
                     "ControlNet, in the same order.")
  for flag, values in control_flags[1:4]:
    if values is not None and len(values) not in (1, n):
      raise ValueError(f"{flag} has {len(values)} values for {n} ControlNets: give one, or one per ControlNet.")
  for path in args.controlnet:
    if not os.path.isdir(path) and not hub.is_repo_id(path):  # a Hub id (owner/name) is the loader's to find
      raise FileNotFoundError(f"--controlnet {path}: no such folder; give a diffusers ControlNet folder "
                              "(config.json and weights).")


def _model_controlnets(model: str) -> int:
  """How many ControlNets a --model folder brings: a diffusers ControlNet pipeline's (model_index.json)."""
  from jaxsd import model_folder

  if not os.path.isdir(model) or model_folder.is_workdir(model):
    return 0
  return len(model_folder.controlnet_folders(model))


def main(argv=None) -> int:
  """Bad input exits 2 with a one-line message."""
  args = parse(argv)
  import jax

  from jaxsd import generate, pipeline_xl
  from jaxsd.compilation_cache import enable_compilation_cache

  try:
    if args.distributed:
      jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    elif (args.coordinator_address, args.num_processes, args.process_id) != (None, None, None):
      raise ValueError("--coordinator-address, --num-processes and --process-id need --distributed.")
    prompts = read_prompts(args.prompt, args.prompts_file)
    check_flags(args)
    loras = parse_loras(args.lora)
    embeddings = parse_embeddings(args.embedding)
    generate.check_out_dir(args.out, "--out")
    from jaxsd import conditioning

    init_image = conditioning.load_image(args.init_image, "--init-image") if args.init_image else None
    mask = conditioning.load_mask(args.mask, "--mask") if args.mask else None
    control_images = [conditioning.load_image(path, "--control-image") for path in args.control_image]
    adapter_images = [conditioning.load_image(path, "--adapter-image") for path in args.adapter_image]
    ip_images = [  # one per --ip-adapter, None where its --ip-adapter-embeds stands
        conditioning.load_image(path, "--ip-adapter-image") if flag == "ip_adapter_image" else None
        for flag, path in args.ip_adapter_prompts
    ]
    ip_masks = [  # None for `--ip-adapter-mask none`
        None if path == ip_adapter_flags.NO_MASK else conditioning.load_mask(path, "--ip-adapter-mask")
        for path in args.ip_adapter_mask
    ]
    enable_compilation_cache()
    load_kw = dict(single_file_config=args.single_file_config) if os.path.isfile(args.model) else {}
    pipe = pipeline_xl.load(args.model, dtype=DTYPES[args.dtype], variant=args.variant, allow_pickle=args.allow_pickle,
                            vae=args.vae, controlnets=args.controlnet or None, **load_kw)
    controlnets = getattr(pipe, "controlnets", ())
    if not args.controlnet:  # a ControlNet pipeline folder's (a Hub id's is known now)
      check_controlnet_flags(args, len(controlnets))
    if args.t2i_adapter:
      if controlnets:
        raise ValueError(f"--model {args.model} brings ControlNets; --t2i-adapter steers a plain model.")
      from jaxsd.pipeline_t2i_adapter import StableDiffusionAdapter

      pipe = StableDiffusionAdapter.from_pipeline(pipe, args.t2i_adapter, allow_pickle=args.allow_pickle)
    if args.unet is not None:
      pipe.swap_unet(args.unet, allow_pickle=args.allow_pickle)
    if args.timestep_spacing is not None:
      sampler = args.sampler or pipe.default_sampler
      if pipe.scheduler_config.edm or sampler in ("lcm", "tcd", "dpmpp_2s"):  # their classes place the steps
        raise ValueError(f"--timestep-spacing does not apply to the {'EDM' if pipe.scheduler_config.edm else sampler} "
                         "sampler (its timesteps are placed by its own schedule); drop it.")
      pipe.scheduler_config = pipe.scheduler_config.replace(timestep_spacing=args.timestep_spacing)
    for path, scale in loras:
      pipe.load_lora(path, scale=scale, strict=not args.lora_ignore_unmatched)
    ip = {}
    if args.ip_adapter:
      encoder = os.path.abspath(args.image_encoder) if args.image_encoder else "image_encoder"
      pipe.load_ip_adapter(args.ip_adapter, image_encoder_folder=encoder if args.ip_adapter_image else None,
                           allow_pickle=args.allow_pickle, scale=args.ip_adapter_scale or 1.0)
      ip = ip_adapter_flags.call(args, pipe, ip_images, ip_masks)
    if args.freeu is not None:
      pipe.enable_freeu(*args.freeu)
    if args.vae_tiling:
      pipe.enable_vae_tiling()
    if args.vae_slicing:
      pipe.enable_vae_slicing()
    if args.pag_scale is not None:  # (a layer name that matches none of this U-Net's is refused here)
      pipe.enable_pag(args.pag_layers or ["mid"])
    if embeddings:  # one call: all or none loaded, two with one token refused
      pipe.load_textual_inversion([p for p, _ in embeddings], [t for _, t in embeddings],
                                  allow_pickle=args.allow_pickle)
    control = {}
    if controlnets:
      control = dict(control_images=control_images, guess_mode=args.guess_mode)
      for name, values in (("controlnet_conditioning_scale", args.controlnet_scale),
                           ("control_guidance_start", args.control_guidance_start), ("control_guidance_end",
                                                                                     args.control_guidance_end)):
        if values is not None:
          control[name] = values[0] if len(values) == 1 else values
    if args.t2i_adapter:
      scale = args.adapter_scale
      control = dict(adapter_images=adapter_images, adapter_conditioning_factor=args.adapter_factor,
                     adapter_conditioning_scale=None if scale is None else scale[0] if len(scale) == 1 else scale)
    result = generate.generate(pipe, prompts, num_images=args.num_images, steps=args.steps, sampler=args.sampler,
                               guidance_scale=args.guidance, seed=args.seed, height=args.height, width=args.width,
                               negative_prompt=args.negative_prompt, batch_per_device=args.batch_per_device,
                               out_dir=args.out, progress=not args.no_progress, init_image=init_image, mask_image=mask,
                               strength=args.strength, long_prompts=args.long_prompts,
                               prompt_weighting=args.prompt_weighting, padding_mask_crop=args.padding_mask_crop,
                               eta=args.eta, image_guidance_scale=args.image_guidance_scale, **ip,
                               pag_scale=args.pag_scale, pag_adaptive_scale=args.pag_adaptive_scale or 0.0, **control)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  wrote = (f"wrote {len(result.files)} images and a grid to {os.path.join(args.out, '')}"
           if result.files else "wrote no images (the other hosts took every batch)")
  print(
      f"{wrote} on {result.devices} device(s): "
      f"compile {result.compile_seconds:.1f} s, sampling {result.sample_seconds:.1f} s "
      f"({result.seconds_per_step * 1000:.1f} ms/step)", file=sys.stderr)
  if args.benchmark:
    print(
        json.dumps({
            "seconds_per_step": round(result.seconds_per_step, 6),
            "images_per_second": round(result.images_per_second, 4),
            "compile_seconds": round(result.compile_seconds, 3),
            "sample_seconds": round(result.sample_seconds, 3),
            "images": int(len(result.images)),
            "devices": result.devices,
            "backend": jax.default_backend()
        }))
  return 0


def cli() -> None:
  """The `jaxsd-sample` console script."""
  sys.exit(main())


if __name__ == "__main__":
  cli()
