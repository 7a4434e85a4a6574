"""The judged report of a trained model (`write`): its samples scored per attribute by the dataset's independent
judge (`jaxsd.training.judge`, trained once per dataset and cached in the workdir) with the trained CLIP beside
it, the shapes-FID against its real-vs-real floor, each stage's ceiling on real images; `report.md`, the
prompt-match grid and the quality plot. `quality_eval` is the same judging at the U-Net stage's sample points."""

from __future__ import annotations

import os

import numpy as np

from jaxsd import pretrained
from jaxsd.data import builtin, input_pipeline
from jaxsd.image_grid import contact_sheet, save_png
from jaxsd.pipeline import load_workdir
from jaxsd.training import evaluate, export
from jaxsd.training import judge as judge_lib
from jaxsd.training import metrics as metrics_lib
from jaxsd.training import quality as quality_lib
from jaxsd.training.run_config import data_dir, text_length
from jaxsd.files import written_whole


def judged(cfg):
  """What the dataset's samples are judged on (`builtin.JudgedPrompts`), or None: no judged report."""
  found = builtin.lookup(cfg.data.name)
  return found.judged if cfg.eval.judge and found is not None else None


def quality_eval(cfg, workdir, tokenizer):
  """The dataset's independent judge (trained once, cached in DIR/judge) and what it scores samples on:
  every judged prompt, and `eval.fid_images` test captions for the FID on the judge's features."""
  spec = judged(cfg)
  attrs = tuple(spec.attributes)

  def load_split(split):
    arrays = labelled_arrays(cfg, tokenizer, split, attrs, cfg.eval.judge_train_examples if split == "train" else None)
    return arrays["image"], arrays

  judge = judge_lib.load_or_train(os.path.join(workdir, "judge"), cfg.data.name, load_split, attrs, spec.attributes,
                                  steps=cfg.eval.judge_steps, seed=cfg.seed,
                                  train_examples=cfg.eval.judge_train_examples)
  test = labelled_arrays(cfg, tokenizer, "test", attrs, None, captions=True)
  c = cfg.unet
  ev, floors = quality_lib.build(judge, spec.prompts, spec.labels, test["image"], [str(x) for x in test["caption"]],
                                 fid_images=cfg.eval.fid_images, sampler=c.sampler, steps=c.sample_steps,
                                 guidance_scale=c.guidance_scale, seed=cfg.seed + 1,
                                 images_per_prompt=cfg.eval.images_per_prompt,
                                 periodic_fid_images=cfg.eval.periodic_fid_images)
  return ev, floors, test


def labelled_arrays(cfg, tokenizer, split, attrs, max_examples, captions=False) -> dict:
  d = cfg.data
  pipeline = input_pipeline.make_dataset(cfg.data.name, global_batch_size=500, image_size=d.image_size,
                                         data_dir=data_dir(cfg),
                                         split=d.train_split if split == "train" else d.test_split, train=False,
                                         tokenizer=tokenizer, image_key=d.image_key, caption_key=d.caption_key,
                                         label_keys=attrs, return_captions=captions, num_threads=d.num_threads,
                                         drop_remainder=False, max_length=text_length(cfg), process_index=0,
                                         process_count=1)  # every process reads it all
  it = iter(pipeline)
  keys = ("image", *attrs) + (("caption",) if captions else ())
  arrays = evaluate.load_arrays(it, keys, max_examples)
  it.close()
  return arrays


def write(cfg, workdir: str, tokenizer, step: int) -> dict:
  """The U-Net's samples judged: every canonical prompt scored per attribute by the independent judge
  (the trained CLIP beside it), the shapes-FID, each stage's ceiling on real data; report.md, a plot."""
  pipe = load_workdir(workdir)
  quality, floors, test = quality_eval(cfg, workdir, tokenizer)
  judge = quality.judge
  clip_model, clip_params = pretrained.load_clip(os.path.join(export.model_dir(workdir), "clip"))
  spec = judged(cfg)
  clip_judge = evaluate.clip_attribute_judge(clip_model, clip_params, tokenizer, spec.clip_attributes,
                                             spec.clip_caption)
  labels = {a: test[a] for a in judge.attributes}
  recon = evaluate.reconstruct(pipe.vae, pipe.vae_params, test["image"])
  recon_predicted = judge.predict(recon)  # one pass serves the confusion rows and the ceiling
  recon_confusion = evaluate.confusion(labels, recon_predicted, spec.attributes, spec.confusion_split)
  ceilings = {}
  for name, images, predicted in (("real test images (ceiling)", test["image"], judge.predict(test["image"])),
                                  ("VAE reconstructions of them", recon, recon_predicted)):
    acc = {k: float(v.mean()) for k, v in judge.compare(predicted, labels).items()}
    acc.update({f"clip_{a}": float(v.mean()) for a, v in clip_judge(images, labels).items()})
    ceilings[name] = dict(acc, n=len(images))
  chance = {a: 1 / len(spec.attributes[a]) for a in judge.attributes}
  chance["all"] = float(np.prod(list(chance.values())))
  ceilings["chance"] = dict(chance, clip_color=chance["color"], clip_shape=chance["shape"])

  scores = quality(pipe, clip_judge)
  match = scores.pop("prompt_match")
  writer = metrics_lib.MetricWriter(os.path.join(workdir, "unet"))
  writer.write_scalars(step, scores)
  writer.close()
  history = {}
  for row in metrics_lib.read_jsonl(os.path.join(workdir, "unet", "metrics.jsonl")):
    if "judge_all_accuracy" in row:
      history[row["step"]] = row  # a later line for the same step (a resumed run) wins
  samples_dir = os.path.join(workdir, "samples")
  os.makedirs(samples_dir, exist_ok=True)
  quality_lib.plot(list(history.values()), os.path.join(samples_dir, "quality.png"), floor=floors["fid_real_vs_real"])
  images = match.pop("images")
  per_row = spec.grid_columns * cfg.eval.images_per_prompt
  save_png(contact_sheet(images, columns=per_row), os.path.join(samples_dir, "prompt_match_grid.png"))

  match["row_labels"] = [{
      a: spec.attributes[a][spec.labels[a][i]] for a in spec.attributes
  } for i in range(len(spec.prompts))]
  grouped = tuple(spec.clip_attributes)  # the main table: one row per combination of these
  table = evaluate.summary_table(match, judge.attributes, grouped, ceilings)
  by_attr = {a: evaluate.summary_table(match, judge.attributes, (a,), {}) for a in spec.attributes if a not in grouped}
  match.pop("row_labels")
  by_sections = "".join(f"## By {a}\n\n{t}\n\n" for a, t in by_attr.items())
  confusion = evaluate.confusion(match.pop("labels"), match.pop("predicted"), spec.attributes, spec.confusion_split)
  split = f" (rows split by the {spec.confusion_split} asked for)" if spec.confusion_split else ""
  confusion_sections = (
      f"## What the judge saw\n\nPer attribute, for the samples of each class asked for{split}: the fraction the "
      "judge put in each class (the asked one in bold). `ceiling`: the fraction of the VAE's reconstructions of "
      "real test images of that row the judge gets right (the autoencoder's ceiling for the row).\n\n" +
      "".join(f"### {a}\n\n{evaluate.confusion_table(confusion[a], recon_confusion[a])}\n\n" for a in confusion))
  fid_name = cfg.data.name.split("/")[0] + "-FID"
  fid_line = (f"{fid_name} (judge features, {floors['fid_images']} samples of test captions vs "
              f"{floors['fid_images']} other real test images): **{scores['fid']:.2f}**; real vs real "
              f"(the two halves of the test split, the floor): {floors['fid_real_vs_real']:.2f}; "
              f"ratio {scores['fid'] / floors['fid_real_vs_real']:.2f}.") if "fid" in scores else ""
  with written_whole(os.path.join(workdir, "report.md")) as tmp, open(tmp, "w") as f:  # whole, as the PNGs
    f.write(f"# How well the model draws what it is asked for (U-Net step {step})\n\n"
            f"Every judged prompt ({' x '.join(spec.attributes)}, {cfg.eval.images_per_prompt} image(s) each), "
            f"sampled with the EMA U-Net ({cfg.unet.sampler}, {cfg.unet.sample_steps} steps, guidance "
            f"{cfg.unet.guidance_scale}), judged by an independent classifier trained on the dataset's labels "
            f"(`judge/`; it shares nothing with the model). The `clip` columns are the trained CLIP's zero-shot "
            f"verdict among every {' x '.join(grouped)} caption (a second opinion; it is part of the model).\n\n"
            f"{table}\n\n{fid_line}\n\n![quality against steps](samples/quality.png)\n\n"
            f"{by_sections}{confusion_sections}## Samples\n\n{spec.grid_caption}\n\n"
            "![prompt match](samples/prompt_match_grid.png)\n")
  print(table)
  print(fid_line)
  return dict(scores, rows=match["rows"], ceilings=ceilings, confusion=confusion, vae_confusion=recon_confusion,
              **floors, judge=judge.meta)
