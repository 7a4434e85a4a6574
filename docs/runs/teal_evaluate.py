"""Teach-teal LoRA demonstration (docs/training.md): the 180 canonical prompts judged with and without the
adapter, and "teal" measured by pixels on 60 teal prompts (a colour the shapes dataset lacks).

  python docs/runs/teal_make_data.py FOLDER                     # 20 teal circles + metadata.jsonl
  python -m train --config train/configs/lora.py:dreambooth ... (see docs/training.md)
  python docs/runs/teal_evaluate.py MODEL_DIR JUDGE_DIR [ADAPTER [SCALE [GUIDANCE]]]   # from the repository root
ADAPTER: a folder with pytorch_lora_weights.safetensors and/or learned_embeds.safetensors (textual inversion).
"""
import json, sys
import numpy as np
from jaxsd import StableDiffusion
from jaxsd.data import shapes
from jaxsd.training import judge as judge_lib, evaluate
from jaxsd.data import builtin

model, judge_dir, lora = sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else "")
scale = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
pipe = StableDiffusion.from_pretrained(model)
spec = builtin.lookup("shapes/32x32").judged
attrs = tuple(spec.attributes)
judge = judge_lib.load_or_train(judge_dir, "shapes/32x32", None, attrs, spec.attributes)
REF = dict(shapes.RGB, teal=(0, 128, 128))
names = list(REF)
refs = np.array([REF[n] for n in names], np.float32)


def pixel_colour(img):
  """Nearest reference colour to the mean of the 12 most saturated pixels (backgrounds are grey-ish)."""
  x = img.reshape(-1, 3).astype(np.float32)
  sat = x.max(1) - x.min(1)
  top = x[np.argsort(sat)[-12:]].mean(0)
  return names[int(np.argmin(((refs - top)**2).sum(1)))]


# The default config's sampling (guidance 2 since the sixth round; the fifth round's table used 3).
kw = dict(sampler="dpmpp_2m", steps=10, guidance_scale=float(sys.argv[5]) if len(sys.argv) > 5 else 2.0)
out = {}
for label, active in (("base", False), ("lora", True)):
  if active:
    if not lora:
      continue
    import os
    if os.path.exists(os.path.join(lora, "learned_embeds.safetensors")):  # textual inversion's "teal"
      pipe.load_token_embeddings(lora)
    if os.path.exists(os.path.join(lora, "pytorch_lora_weights.safetensors")):
      pipe.load_lora(lora, scale=scale)
  res = evaluate.prompt_match(pipe, judge, spec.prompts, spec.labels, seed=1, **kw)
  pix = [pixel_colour(im) for im in res["images"]]
  want = [shapes.COLORS[c] for c in spec.labels["color"]]
  pix_ok = float(np.mean([p == w for p, w in zip(pix, want)]))
  teal_prompts = [
      shapes.caption_for(s, "red", z, p).replace("red", "teal")
      for s in shapes.SHAPES
      for z in shapes.SIZES
      for p in shapes.POSITIONS
      for _ in range(2)
  ]
  timgs = evaluate.sample_images(pipe, teal_prompts, seed=7, **kw)
  tpix = [pixel_colour(im) for im in timgs]
  lab = {
      "shape": np.array([shapes.SHAPES.index(p.split()[3]) for p in teal_prompts]),
      "size": np.array([shapes.SIZES.index(p.split()[1]) for p in teal_prompts])
  }
  lab["position"] = np.array([
      shapes.POSITIONS.index(next(q
                                  for q in shapes.POSITIONS
                                  if p.endswith(shapes.POSITION_PHRASES[q])))
      for p in teal_prompts
  ])
  pred = judge.predict(timgs.astype(np.float32) / 127.5 - 1)
  tj = {a: pred[a] == lab[a] for a in lab}
  instance = [pixel_colour(im) for im in evaluate.sample_images(pipe, ["a teal circle"] * 20, seed=11, **kw)]
  circ = [i for i, p in enumerate(teal_prompts) if " circle " in p]
  other = [i for i, p in enumerate(teal_prompts) if " circle " not in p]
  out[label] = dict(judged={a: round(res[f"{a}_accuracy"], 3) for a in list(attrs) + ["all"]
                           }, pixel_colour_match=round(pix_ok, 3),
                    instance_prompt_teal=round(float(np.mean([c == "teal" for c in instance])), 3),
                    teal_circles_teal=round(float(np.mean([tpix[i] == "teal" for i in circ])), 3),
                    teal_other_shapes_teal=round(float(np.mean([tpix[i] == "teal" for i in other])),
                                                 3), teal_shape=round(float(tj["shape"].mean()),
                                                                      3), teal_size=round(float(tj["size"].mean()), 3),
                    teal_position=round(float(tj["position"].mean()),
                                        3), teal_colours={n: int(sum(t == n for t in tpix)) for n in names})
  from PIL import Image
  from jaxsd.image_grid import contact_sheet
  Image.fromarray(contact_sheet(timgs[:60], columns=10)).save(f"teal_{label}.png")
  Image.fromarray(contact_sheet(res["images"], columns=30)).save(f"canonical_{label}.png")
  print(label, json.dumps(out[label]), flush=True)
