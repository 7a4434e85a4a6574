"""Evaluations of the stages: CLIP caption retrieval, VAE reconstruction, and whether samples follow prompts.

Samples are judged by an independent classifier (`judge.py`) per labelled attribute, with the trained
CLIP's zero-shot verdict as a second column; the same judge scores real test images and VAE
reconstructions, so each stage's ceiling stands beside the samples' score. A Fréchet distance of the
judge's features measures the distribution of samples against real images.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd import tokenizer as tok
from jaxsd.training import judge as judge_lib


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
  return {
      "clip_i2t_accuracy": i2t / max(n, 1),
      "clip_t2i_accuracy": t2i / max(n, 1),
      "clip_eval_examples": n,
      "clip_eval_group": int(len(caps)) if n else 0
  }


def _autoencode_fn(vae):
  """jit(params, images in [-1, 1]) -> decoded posterior mode."""
  return jax.jit(lambda p, x: vae.apply({"params": p},
                                        vae.apply({
                                            "params": p
                                        }, x, method=vae.encode).mode(), method=vae.decode))


def vae_reconstruction(vae, vae_params, batches: Iterable[dict], max_examples: int) -> dict:
  """Test reconstruction error of the posterior mode, in [-1, 1] pixel units, and PSNR on [0, 1]."""
  fn = _autoencode_fn(vae)
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
  text = jax.jit(lambda p, i: clip_model.apply({"params": p}, i, method=clip_model.get_text_features))(clip_params, ids)
  text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
  image_fn = jax.jit(lambda p, x: clip_model.apply({"params": p}, x, method=clip_model.get_image_features))

  def classify(images_m11: np.ndarray) -> np.ndarray:
    feats = image_fn(clip_params, jnp.asarray(images_m11))
    feats = feats / jnp.linalg.norm(feats, axis=-1, keepdims=True)
    return np.asarray(jnp.argmax(feats @ text.T, axis=-1))

  return classify


def load_arrays(batches: Iterable[dict], keys: Sequence[str], max_examples: int | None = None) -> dict:
  """Concatenates `keys` of a batch iterator (e.g. a test split's images, labels and captions)."""
  out = {k: [] for k in keys}
  n = 0
  for batch in batches:
    for k in keys:
      out[k].append(np.asarray(batch[k]))
    n += len(batch[keys[0]])
    if max_examples is not None and n >= max_examples:
      break
  return {k: np.concatenate(v)[:max_examples] for k, v in out.items()}


def clip_attribute_judge(clip_model, clip_params, tokenizer, attributes: dict, prompt_fn):
  """CLIP as a zero-shot judge: each image is given the caption (among every combination of
  `attributes`' classes, phrased by `prompt_fn(**names)`) it scores highest; returns
  `judge(images, labels) -> {attribute: bool per image}`."""
  names = list(attributes)
  combos = list(itertools.product(*(range(len(attributes[a])) for a in names)))
  captions = [prompt_fn(**{a: attributes[a][i] for a, i in zip(names, c)}) for c in combos]
  classify = _classifier(clip_model, clip_params, tokenizer, captions)
  combos = np.asarray(combos)

  def judge(images_m11: np.ndarray, labels: dict) -> dict:
    pred = np.concatenate([classify(images_m11[i:i + 500]) for i in range(0, len(images_m11), 500)])
    return {a: combos[pred, k] == np.asarray(labels[a]) for k, a in enumerate(names)}

  return judge


def sample_images(pipe, prompts: Sequence[str], *, sampler: str, steps: int, guidance_scale: float, seed: int,
                  batch_size: int = 250, hw: tuple[int, int] | None = None) -> np.ndarray:
  """uint8 images for `prompts`, `hw` (height, width; default the model's size) in batches of one size (one
  compiled program); batch i uses seed + i."""
  height, width = hw or (pipe.default_size, pipe.default_size)
  out = []
  for i in range(0, len(prompts), batch_size):
    chunk = list(prompts[i:i + batch_size])
    pad = batch_size - len(chunk) if len(prompts) > batch_size else 0
    images = pipe(chunk + chunk[:1] * pad, height=height, width=width, steps=steps, guidance_scale=guidance_scale,
                  sampler=sampler, seed=seed + i // batch_size, output="np")
    out.append(images[:len(chunk)])
  return np.concatenate(out)


def prompt_match(pipe, judge, prompts: Sequence[str], labels: dict, *, sampler: str, steps: int, guidance_scale: float,
                 seed: int, images_per_prompt: int = 1, clip_judge=None) -> dict:
  """Generates `images_per_prompt` images per prompt and asks the independent `judge` whether each shows
  the labelled class of every attribute (and `clip_judge`, the trained CLIP, as a second opinion).

  Returns per-prompt rows, per-attribute and all-correct accuracies, the images (prompt-major), and per
  image the classes asked for ("labels") and the classes the judge saw ("predicted").
  """
  prompts = [p for p in prompts for _ in range(images_per_prompt)]
  labels = {a: np.repeat(np.asarray(v), images_per_prompt) for a, v in labels.items()}
  # At the judge's size: a fine-tuned model's own (its init's) may differ from the dataset's the judge learnt.
  images = sample_images(pipe, prompts, sampler=sampler, steps=steps, guidance_scale=guidance_scale, seed=seed,
                         hw=getattr(judge, "image_hw", None))
  x = images.astype(np.float32) / 127.5 - 1.0
  predicted = judge.predict(x)  # class indices: what the judge saw (also for the confusion tables)
  ok = judge.compare(predicted, labels)
  clip_ok = {f"clip_{a}": v for a, v in clip_judge(x, labels).items()} if clip_judge is not None else {}
  cols = {**ok, **clip_ok}
  rows = []
  for i in range(0, len(prompts), images_per_prompt):
    sl = slice(i, i + images_per_prompt)
    rows.append({"prompt": prompts[i], **{k: float(v[sl].mean()) for k, v in cols.items()}})
  result = {
      "rows": rows,
      "images": images,
      "num_images": len(prompts),
      "labels": labels,
      "predicted": {
          a: np.asarray(v) for a, v in predicted.items()
      }
  }
  result.update({f"{k}_accuracy": float(v.mean()) for k, v in cols.items()})
  return result


def sample_fid(pipe, judge, captions: Sequence[str], real_features: np.ndarray, *, sampler: str, steps: int,
               guidance_scale: float, seed: int) -> float:
  """Fréchet distance between the judge's features of images generated for `captions` and of real images."""
  images = sample_images(pipe, captions, sampler=sampler, steps=steps, guidance_scale=guidance_scale, seed=seed,
                         hw=getattr(judge, "image_hw", None))
  return judge_lib.frechet_distance(judge.features(images.astype(np.float32) / 127.5 - 1.0), real_features)


def reconstruct(vae, vae_params, images: np.ndarray, batch: int = 500) -> np.ndarray:
  """VAE reconstructions (posterior mode) of images in [-1, 1], quantised to uint8 levels as samples are."""
  fn = _autoencode_fn(vae)
  rec = np.concatenate(
      [np.asarray(fn(vae_params, jnp.asarray(images[i:i + batch]))) for i in range(0, len(images), batch)])
  return np.round((np.clip(rec, -1, 1) + 1) * 127.5) / 127.5 - 1.0


def summary_table(result: dict, attributes: Sequence[str], group_by: Sequence[str], ceilings: dict) -> str:
  """Markdown: judged accuracies per group of prompts (e.g. per colour x shape), overall, and the
  ceilings (real test images, VAE reconstructions) and chance levels below."""
  cols = list(attributes) + ["all"] + [
      k[:-len("_accuracy")] for k in result if k.startswith("clip_") and k.endswith("_accuracy")
  ]
  head = ["| prompts | n | " + " | ".join(c.replace("_", " ") for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
  groups: dict = {}
  for r, lab in zip(result["rows"], result.get("row_labels", [{}] * len(result["rows"]))):
    key = " ".join(str(lab.get(g, "")) for g in group_by) or r["prompt"]
    groups.setdefault(key, []).append(r)
  lines = list(head)
  for key, rows in groups.items():
    vals = [np.mean([r[c] for r in rows]) for c in cols]
    lines.append(f"| {key} | {len(rows)} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
  lines.append(f"| **all generated** | {result['num_images']} | " +
               " | ".join(f"**{result[c + '_accuracy']:.3f}**" for c in cols) + " |")
  for name, acc in ceilings.items():
    lines.append(f"| {name} | {acc.get('n', '')} | " + " | ".join(f"{acc[c]:.3f}" if c in acc else "" for c in cols) +
                 " |")
  return "\n".join(lines)


def confusion(asked: dict, judged: dict, classes: dict, split: str | None = None) -> dict:
  """What the judge saw against what was asked for: attribute -> {row: {judged class: count}}.

  `asked` and `judged` hold class indices per image for each attribute of `classes` (attribute -> class
  names). A row is the asked class, prefixed by the asked class of `split` for every other attribute
  ("small circle": small shapes are drawn worse than large ones, and a table per attribute alone hides it).
  """
  out = {}
  for a, names in classes.items():
    rows: dict = {}
    by = split if split is not None and split != a else None
    prefixes = classes[by] if by else ("",)
    for prefix_i, prefix in enumerate(prefixes):
      for i, name in enumerate(names):
        mask = np.asarray(asked[a]) == i
        if by:
          mask &= np.asarray(asked[by]) == prefix_i
        counts = np.bincount(np.asarray(judged[a])[mask].astype(int), minlength=len(names))
        rows[f"{prefix} {name}".strip()] = {n: int(c) for n, c in zip(names, counts)}
    out[a] = rows
  return out


def confusion_table(rows: dict, ceiling: dict | None = None) -> str:
  """Markdown of one attribute's `confusion` rows: the fraction judged as each class (the asked one in
  bold), and, from `ceiling` (the same rows for images whose class is known, e.g. VAE reconstructions of
  test images), the fraction of those the judge gets right."""
  names = list(next(iter(rows.values())))
  extra = " | ceiling" if ceiling else ""
  lines = ["| asked | n | " + " | ".join(names) + f"{extra} |", "|---|---|" + "---|" * (len(names) + bool(ceiling))]
  for row, counts in rows.items():
    n = sum(counts.values())
    asked = max((k for k in counts if row == k or row.endswith(" " + k)), key=len, default=None)
    cells = [(f"**{c / n:.2f}**" if k == asked else f"{c / n:.2f}") if n else "-" for k, c in counts.items()]
    if ceiling:
      ref = ceiling.get(row, {})
      m = sum(ref.values())
      cells.append(f"{ref.get(asked, 0) / m:.2f}" if m else "-")
    lines.append(f"| {row} | {n} | " + " | ".join(cells) + " |")
  return "\n".join(lines)
