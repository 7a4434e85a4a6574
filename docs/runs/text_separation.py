"""How far apart the text encoder's hidden states of two captions that differ in one word are (relative
difference of the flattened states; docs/training.md). Usage: python docs/runs/text_separation.py WORKDIR"""
import sys

import numpy as np

import jaxsd


def main(workdir: str):
  pipe = jaxsd.StableDiffusion.from_pretrained(workdir + "/model")
  caps = [
      f"a {size} red {shape} on the left" for size in ("small", "large") for shape in ("circle", "square", "triangle")
  ]
  caps += ["a small red circle on the right", "a small blue circle on the left"]
  states = np.asarray(pipe.encode_text(pipe.params["text_encoder"], pipe.tokenize(caps))).reshape(len(caps), -1)
  rel = lambda a, b: float(np.linalg.norm(states[a] - states[b]) / np.linalg.norm(states[a]))  # noqa: E731
  for size, o in (("small", 0), ("large", 3)):
    print(f"{size}: circle-square {rel(o, o + 1):.3f} circle-triangle {rel(o, o + 2):.3f} "
          f"square-triangle {rel(o + 1, o + 2):.3f}")
  print(f"small-large {rel(0, 3):.3f} left-right {rel(0, 6):.3f} red-blue {rel(0, 7):.3f}")


if __name__ == "__main__":
  main(sys.argv[1])
