"""Evaluations of the stages: CLIP caption retrieval, VAE reconstruction, and whether samples follow prompts.

The prompt-match check is a CLIP-score style test: the trained CLIP classifies each generated image
zero-shot among every "a <colour> <shape>" caption; its accuracy on real test images of the same
captions is the ceiling, 1/len(choices) the chance level.
"""

from __future__ import annotations

import itertools
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd import tokenizer as tok


def clip_retrieval(clip_model, clip_params, batches: Iterable[dict], max_examples: int) -> dict:
  """Top-1 zero-shot caption retrieval within groups of a test batch (captions compared as text,
  so a duplicate caption of the right one counts as right)."""
  fn = jax.jit(lambda p, ids, im: clip_model.apply({"params": p}, ids, im).logits_per_image)
  i2t = t2i = n = 0
  for batch in batches:
    logits = np.asarray(fn(clip_params, batch["input_ids"], batch["image"]))
    caps = np.asarray(batch["caption"])
    i2t += int((caps[logits.argmax(1)] == caps).sum())
    t2i += int((caps[logits.argmax(0)] == caps).sum())
    n += len(caps)
    if n >= max_examples:
      break
  return {"clip_i2t_accuracy": i2t / max(n, 1), "clip_t2i_accuracy": t2i / max(n, 1), "clip_eval_examples": n,
          "clip_eval_group": int(len(caps)) if n else 0}


def vae_reconstruction(vae, vae_params, batches: Iterable[dict], max_examples: int) -> dict:
  """Test reconstruction error of the posterior mode, in [-1, 1] pixel units, and PSNR on [0, 1]."""
  fn = jax.jit(lambda p, x: vae.apply({"params": p}, vae.apply({"params": p}, x, method=vae.encode).mode(),
                                      method=vae.decode))
  se = n = 0.0
  for batch in batches:
    rec = np.asarray(fn(vae_params, batch["image"]), np.float32)
    se += float(np.square(rec - batch["image"]).mean()) * len(rec)
    n += len(rec)
    if n >= max_examples:
      break
  mse = se / max(n, 1)
  return {"vae_test_mse": mse, "vae_test_psnr": float(10 * np.log10(4.0 / max(mse, 1e-12))), "vae_eval_examples": n}


def _classifier(clip_model, clip_params, tokenizer, choices: list[str]):
  ids = tok.tokenize(tokenizer, choices, max_length=clip_model.config.text_config.max_position_embeddings)
  text = jax.jit(lambda p, i: clip_model.apply({"params": p}, i, method=clip_model.get_text_features))(
      clip_params, ids)
  text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
  image_fn = jax.jit(lambda p, x: clip_model.apply({"params": p}, x, method=clip_model.get_image_features))

  def classify(images_m11: np.ndarray) -> np.ndarray:
    feats = image_fn(clip_params, jnp.asarray(images_m11))
    feats = feats / jnp.linalg.norm(feats, axis=-1, keepdims=True)
    return np.asarray(jnp.argmax(feats @ text.T, axis=-1))

  return classify


def prompt_match(pipe, clip_model, clip_params, tokenizer, colors: list[str], shapes: list[str], *,
                 images_per_prompt: int, sampler: str, steps: int, guidance_scale: float, seed: int,
                 real_batches: Iterable[dict] | None = None, real_examples: int = 1000,
                 prompt_fn=lambda color, shape: f"a {color} {shape}") -> dict:
  """Generates `images_per_prompt` images for every "a <colour> <shape>" prompt and judges them with CLIP.

  Returns rows per prompt, overall colour/shape/both accuracies, the judge's accuracy on real test
  images (its ceiling), chance levels, and the generated images (uint8, prompt-major) for a grid.
  """
  pairs = list(itertools.product(colors, shapes))
  choices = [prompt_fn(c, s) for c, s in pairs]
  classify = _classifier(clip_model, clip_params, tokenizer, choices)
  size = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
  prompts = [p for p in choices for _ in range(images_per_prompt)]
  images = pipe(prompts, height=size, width=size, steps=steps, guidance_scale=guidance_scale, sampler=sampler,
                seed=seed, output="np")
  pred = classify(images.astype(np.float32) / 127.5 - 1.0)
  truth = np.repeat(np.arange(len(pairs)), images_per_prompt)
  color_ok = np.array([pairs[p][0] == pairs[t][0] for p, t in zip(pred, truth)])
  shape_ok = np.array([pairs[p][1] == pairs[t][1] for p, t in zip(pred, truth)])
  rows = []
  for i, prompt in enumerate(choices):
    sl = slice(i * images_per_prompt, (i + 1) * images_per_prompt)
    rows.append({"prompt": prompt, "color": float(color_ok[sl].mean()), "shape": float(shape_ok[sl].mean()),
                 "both": float((color_ok[sl] & shape_ok[sl]).mean())})
  result = {"rows": rows, "color_accuracy": float(color_ok.mean()), "shape_accuracy": float(shape_ok.mean()),
            "both_accuracy": float((color_ok & shape_ok).mean()), "chance_color": 1 / len(colors),
            "chance_shape": 1 / len(shapes), "chance_both": 1 / len(pairs), "images": images}
  if real_batches is not None:
    result.update(_judge_on_real(classify, pairs, colors, shapes, real_batches, real_examples))
  return result


def _judge_on_real(classify, pairs, colors, shapes, batches, max_examples) -> dict:
  c_ok = s_ok = b_ok = n = 0
  for batch in batches:
    pred = classify(batch["image"])
    for p, ci, si in zip(pred, batch["color"], batch["shape"]):
      pc, ps = pairs[p]
      c_ok += pc == colors[ci]
      s_ok += ps == shapes[si]
      b_ok += pc == colors[ci] and ps == shapes[si]
      n += 1
    if n >= max_examples:
      break
  return {"real_color_accuracy": c_ok / max(n, 1), "real_shape_accuracy": s_ok / max(n, 1),
          "real_both_accuracy": b_ok / max(n, 1)}


def prompt_match_table(result: dict) -> str:
  """A markdown table of the prompt-match result."""
  lines = ["| prompt | colour match | shape match | both |", "|---|---|---|---|"]
  for r in result["rows"]:
    lines.append(f"| {r['prompt']} | {r['color']:.2f} | {r['shape']:.2f} | {r['both']:.2f} |")
  lines.append(f"| **all generated** | **{result['color_accuracy']:.3f}** | **{result['shape_accuracy']:.3f}** | "
               f"**{result['both_accuracy']:.3f}** |")
  if "real_color_accuracy" in result:
    lines.append(f"| real test images (judge's ceiling) | {result['real_color_accuracy']:.3f} | "
                 f"{result['real_shape_accuracy']:.3f} | {result['real_both_accuracy']:.3f} |")
  lines.append(f"| chance | {result['chance_color']:.3f} | {result['chance_shape']:.3f} | "
               f"{result['chance_both']:.3f} |")
  return "\n".join(lines)
