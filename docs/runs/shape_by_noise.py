"""At which noise level a trained workdir's model decides a shape: real test images of each size x shape are
noised to `strength` and denoised by img2img with their own captions (SDEdit), and the judge reads the
shape back; strength 1.0 is text-to-image. Usage: python docs/runs/shape_by_noise.py WORKDIR [PER_CELL]"""
import os
import sys

import numpy as np
import tensorflow_datasets as tfds

import jaxsd
from jaxsd.data import shapes
from jaxsd.training import judge as judge_lib

STRENGTHS = (0.2, 0.4, 0.6, 0.8, 1.0)


def main(workdir: str, per_cell: int = 20, guidance: float = 2.0):
  judge = judge_lib.load_or_train(workdir + "/judge", "shapes/32x32", None, tuple(shapes.JUDGED), shapes.JUDGED)
  pipe = jaxsd.StableDiffusion.from_pretrained(workdir + "/model")
  source = tfds.builder("shapes/32x32", data_dir=os.environ.get("TFDS_DATA_DIR")).as_data_source(split="test")
  picked = {(z, s): [] for z in range(len(shapes.SIZES)) for s in range(len(shapes.SHAPES))}
  for i in range(len(source)):
    e = source[i]
    cell = picked[(int(e["size"]), int(e["shape"]))]
    if len(cell) < per_cell:
      cell.append((np.asarray(e["image"]), e["caption"].decode()))
    if all(len(v) == per_cell for v in picked.values()):
      break
  for strength in STRENGTHS:
    row = []
    for (z, s), items in sorted(picked.items()):
      images = np.stack([im for im, _ in items])
      out = pipe.img2img([c for _, c in items], images, strength=strength, steps=10, guidance_scale=guidance,
                         sampler="dpmpp_2m", seed=7)
      got = judge.predict(out.astype(np.float32) / 127.5 - 1.0)["shape"]
      row.append(f"{shapes.SIZES[z]} {shapes.SHAPES[s]} {np.mean(got == s):.2f}")
    print(f"strength {strength}: " + ", ".join(row), flush=True)


if __name__ == "__main__":
  main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
