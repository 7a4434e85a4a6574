"""Text-to-image programs saved ahead of time (`jax.export`), so that a serving process skips tracing.

A pipeline's generation is one program per (sampler, steps, guidance on/off, batch, size, output). Tracing
and lowering it costs seconds in every new process (1.9-2.4 s for SD 1.5 on an H100, before the compile
that the persistent compilation cache can skip). `save_program` exports the program once, with the model's
parameters as arguments (the file holds the computation, not the weights: kilobytes to a few MB), as
StableHLO that later jax versions keep loading (`jax.export`'s compatibility guarantee);
`load_programs` puts every saved program of a folder in the pipeline, and `pipe(...)` calls one whenever
a call's settings and shapes are those it was saved for (else it traces as usual):

    pipe = StableDiffusion.from_pretrained(folder, jnp.bfloat16)
    aot.save_program(pipe, "programs", batch=8, height=512, width=512, steps=25, sampler="ddim")
    ...  # in the serving process:
    pipe = StableDiffusion.from_pretrained(folder, jnp.bfloat16)
    aot.load_programs(pipe, "programs")
    images = pipe(prompts, height=512, width=512, steps=25, sampler="ddim", guidance_scale=7.5)

Plain text-to-image only: prompts without weights or long-prompt windows, no SDXL, ControlNet, img2img,
inpainting or FreeU, and eta 0 (the calls' default; a call with eta > 0, ddim's noise or tcd's gamma, traces as
before). The program is
exported for the platform it is saved on unless `platforms` says more (e.g. ("cpu", "cuda")); the
attention path (cuDNN, Pallas or XLA) is chosen when it is saved, for the platform that saves it.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from jaxsd.files import written_whole
from jaxsd.pipeline import StableDiffusion, exported_key

_SUFFIX = ".jaxexport"


def _name(batch: int, height: int, width: int, steps: int, sampler: str, guided: bool, output: str) -> str:
  return f"text-b{batch}-{height}x{width}-{sampler}-{steps}-{'guided' if guided else 'unguided'}-{output}"


def save_program(pipe: StableDiffusion, folder: str, *, batch: int, height: int | None = None, width: int | None = None,
                 steps: int = 50, sampler: str | None = None, guidance_scale: float = 7.5, output: str = "np",
                 platforms: tuple[str, ...] | None = None) -> str:
  """Exports the text-to-image program `pipe(prompts, ...)` runs for these settings (any prompts, seed,
  guidance scale above 1 or not as given, guidance rescale) to `folder/<name>.jaxexport` with a JSON
  description beside it; returns the program file's path."""
  if pipe.ip_adapter is not None:
    raise ValueError("save_program: an IP-Adapter is loaded; only plain text-to-image programs can be saved "
                     "(unload_ip_adapter() first).")
  if pipe.freeu_inputs():  # its calls would not run the saved program (`StableDiffusion._run`)
    raise ValueError("save_program: FreeU is on; only plain text-to-image programs can be saved (disable_freeu() "
                     "first; calls with FreeU on trace as usual).")
  height, width = pipe.size_or_default(height, width)
  sampler = sampler or pipe.default_sampler
  prompts, _ = pipe.check_inputs([""] * batch, None, height, width, steps, sampler, output, guidance_scale)
  guided = pipe.guided(guidance_scale)
  kind = "latent" if output == "latent" else "np"
  ids, uncond_ids, text = pipe.text_inputs(prompts, None, height, width)
  if set(text) - {"guidance_rescale"}:
    raise ValueError(f"save_program: this pipeline's text inputs ({sorted(text)}) are not plain text-to-image's; "
                     "only plain text-to-image programs can be saved.")
  fn = pipe.generate_fn(sampler, steps, guided, kind)

  def program(params, ids, uncond_ids, noise, guidance_scale, key_data, guidance_rescale):
    extra = {"guidance_rescale": guidance_rescale} if guided else {}
    return fn(params, ids, uncond_ids, noise, guidance_scale, jax.random.wrap_key_data(key_data), **extra)

  noise = pipe.noise(0, batch, height, width)
  args = (pipe.params, ids, uncond_ids, noise, jnp.float32(guidance_scale),
          jax.random.key_data(pipe.sampler_keys(0, batch)), jnp.float32(0.0))
  exported = jax.export.export(jax.jit(program), platforms=platforms)(*args)
  os.makedirs(folder, exist_ok=True)
  name = _name(batch, height, width, steps, sampler, guided, kind)
  path = os.path.join(folder, name + _SUFFIX)
  with written_whole(path) as tmp, open(tmp, "wb") as f:
    f.write(exported.serialize())
  info = {
      "batch": batch,
      "height": height,
      "width": width,
      "steps": steps,
      "sampler": sampler,
      "guided": guided,
      "output": kind,
      "ids_shape": list(ids.shape),
      "uncond_ids_shape": list(uncond_ids.shape),
      "noise_shape": list(noise.shape),
      "platforms": list(exported.platforms),
      "jax": jax.__version__,
      "fingerprint": pipe.program_fingerprint(),
  }
  with open(os.path.join(folder, name + ".json"), "w") as f:
    json.dump(info, f, indent=2)
  return path


def _avals(tree) -> list[tuple[tuple[int, ...], str]]:
  return [(tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(tree)]


def load_programs(pipe: StableDiffusion, folder: str) -> list[str]:
  """Loads every program `save_program` wrote to `folder` into `pipe`; returns their names. A program
  saved from a model of other parameter shapes or dtypes, from a pipeline of another `program_fingerprint` (noise
  schedule, network configs, clip_skip), or for another platform, is an error; after a change to the pipeline's
  schedule or clip_skip its calls trace as usual."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"load_programs: {folder} is not a folder of saved programs (aot.save_program writes one).")
  names = sorted(f[:-len(_SUFFIX)] for f in os.listdir(folder) if f.endswith(_SUFFIX))
  if not names:
    raise FileNotFoundError(f"load_programs: no *{_SUFFIX} programs in {folder} (aot.save_program writes them).")
  platform = jax.default_backend()
  params = _avals(pipe.params)
  for name in names:
    with open(os.path.join(folder, name + ".json")) as f:
      info = json.load(f)
    with open(os.path.join(folder, name + _SUFFIX), "rb") as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    if platform not in exported.platforms and not (platform == "gpu" and {"cuda", "rocm"} & set(exported.platforms)):
      raise ValueError(f"load_programs: {name} was saved for {list(exported.platforms)}, not this {platform} backend: "
                       "save it again with platforms= naming this one.")
    if _avals(exported.in_avals[:len(params)]) != params:
      raise ValueError(f"load_programs: {name} was saved from a model with other parameter shapes or dtypes than "
                       "this pipeline's: save it again from this model (and dtype).")
    if info.get("fingerprint") != pipe.program_fingerprint():
      raise ValueError(f"load_programs: {name} was saved from a pipeline with another noise schedule, network configs, "
                       "dtypes or clip_skip than this one (its images would differ): save it again from this pipeline.")
    key = exported_key(info["sampler"], info["steps"], info["guided"], info["output"], tuple(info["ids_shape"]),
                       tuple(info["uncond_ids_shape"]), tuple(info["noise_shape"]), info["fingerprint"])
    pipe.exported_programs[key] = exported
  return names
