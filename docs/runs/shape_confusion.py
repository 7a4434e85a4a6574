"""Which shape the judge sees in a trained workdir's samples of the 180 canonical prompts, per asked size and
shape (docs/training.md, sixth round). Usage: python docs/runs/shape_confusion.py WORKDIR [SEEDS]"""
import collections
import sys

import numpy as np

import jaxsd
from jaxsd.data import shapes
from jaxsd.training import judge as judge_lib


def main(workdir: str, seeds: int = 2, guidance: float = 3.0):
  judge = judge_lib.load_or_train(workdir + "/judge", "shapes/32x32", None, tuple(shapes.JUDGED), shapes.JUDGED)
  pipe = jaxsd.StableDiffusion.from_pretrained(workdir + "/model")
  prompts = shapes.canonical_prompts()[0]
  counts = collections.Counter()
  for seed in range(seeds):
    images = np.concatenate([
        pipe(prompts[i:i + 60], steps=10, guidance_scale=guidance, sampler="dpmpp_2m", seed=100 + seed, output="np")
        for i in range(0, len(prompts), 60)
    ])
    predicted = judge.predict(images.astype(np.float32) / 127.5 - 1.0)["shape"]
    for prompt, k in zip(prompts, predicted):
      words = prompt.split()
      counts[(words[1], words[3], shapes.SHAPES[k])] += 1
  for size in shapes.SIZES:
    for shape in shapes.SHAPES:
      print(size, shape, "judged:", {k: counts[(size, shape, k)] for k in shapes.SHAPES})


if __name__ == "__main__":
  main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
