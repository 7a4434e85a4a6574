"""How far apart the text encoder's hidden states of two captions that differ in one word are (relative
difference of the flattened states; docs/training.md), at the last layer (what the U-Net attends to) and,
with --layers, after every layer with the final LayerNorm applied (what SD 2's "clip skip" would take),
read with transformers' CLIPTextModel from the exported folder.
Usage: python docs/runs/text_separation.py WORKDIR [--layers]"""
import sys

import numpy as np

import jaxsd

CAPTIONS = [
    f"a {size} red {shape} on the left" for size in ("small", "large") for shape in ("circle", "square", "triangle")
] + ["a small red circle on the right", "a small blue circle on the left"]


def _print(name, states):
  states = states.reshape(len(CAPTIONS), -1)
  rel = lambda a, b: float(np.linalg.norm(states[a] - states[b]) / np.linalg.norm(states[a]))  # noqa: E731
  print(f"{name}: circle-square {rel(0, 1):.3f} circle-triangle {rel(0, 2):.3f} square-triangle {rel(1, 2):.3f} "
        f"(large: {rel(3, 4):.3f} {rel(3, 5):.3f} {rel(4, 5):.3f}) small-large {rel(0, 3):.3f} "
        f"left-right {rel(0, 6):.3f} red-blue {rel(0, 7):.3f}")


def main(workdir: str, layers: bool):
  pipe = jaxsd.StableDiffusion.from_pretrained(workdir + "/model")
  _print("last layer", np.asarray(pipe.encode_text(pipe.params["text_encoder"], pipe.tokenize(CAPTIONS))))
  if layers:
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer
    model = CLIPTextModel.from_pretrained(workdir + "/model/text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(workdir + "/model/tokenizer")
    ids = tokenizer(CAPTIONS, padding="max_length", max_length=model.config.max_position_embeddings, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
      hidden = model(ids, output_hidden_states=True).hidden_states
      for i, h in enumerate(hidden[1:], 1):
        _print(f"layer {i} + final LayerNorm", model.final_layer_norm(h).numpy())


if __name__ == "__main__":
  main(sys.argv[1], "--layers" in sys.argv[2:])
