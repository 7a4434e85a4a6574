"""Does a trained workdir's U-Net read the shape word for small shapes? (docs/training.md, sixteenth round.)

Real small circles and small squares of the test split are noised to each `strength` and denoised by img2img with
their own caption's colour and place but the shape word set to circle, square or triangle; the judge reads the
shape back. A U-Net that reads the word turns a circle into a square when asked; one that ignores it gives the same
judged shares whatever is asked.

    TFDS_DATA_DIR=... python docs/runs/shape_swap.py WORKDIR [PER_CELL] [STRENGTH ...]
"""
import os
import sys

import numpy as np
import tensorflow_datasets as tfds

import jaxsd
from jaxsd.data import shapes
from jaxsd.training import judge as judge_lib


def main(workdir: str, n: int = 60, strengths=(0.5, 0.7)):
  judge = judge_lib.load_or_train(workdir + "/judge", "shapes/32x32", None, tuple(shapes.JUDGED), shapes.JUDGED)
  pipe = jaxsd.StableDiffusion.from_pretrained(workdir + "/model")
  source = tfds.builder("shapes/32x32", data_dir=os.environ.get("TFDS_DATA_DIR")).as_data_source(split="test")
  small, circle, square = shapes.SIZES.index("small"), shapes.SHAPES.index("circle"), shapes.SHAPES.index("square")
  cells = {circle: [], square: []}
  for i in range(len(source)):
    e = source[i]
    s = int(e["shape"])
    if int(e["size"]) == small and s in cells and len(cells[s]) < n:
      cells[s].append((np.asarray(e["image"]), int(e["color"]), int(e["position"])))
    if all(len(v) == n for v in cells.values()):
      break
  for strength in strengths:
    for real, items in cells.items():
      images = np.stack([im for im, _, _ in items])
      for ask, word in enumerate(shapes.SHAPES):
        prompts = [shapes.caption_for(word, shapes.COLORS[c], "small", shapes.POSITIONS[p]) for _, c, p in items]
        out = pipe.img2img(prompts, images, strength=strength, steps=10, guidance_scale=2.0, sampler="dpmpp_2m", seed=7)
        got = judge.predict(out.astype(np.float32) / 127.5 - 1.0)["shape"]
        shares = " ".join(f"{w} {np.mean(got == k):.2f}" for k, w in enumerate(shapes.SHAPES))
        print(f"strength {strength}: real small {shapes.SHAPES[real]}, asked {word}: {shares}", flush=True)


if __name__ == "__main__":
  main(sys.argv[1], *([int(sys.argv[2])] if len(sys.argv) > 2 else []),
       *([tuple(float(a) for a in sys.argv[3:])] if len(sys.argv) > 3 else []))
