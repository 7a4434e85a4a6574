"""The evaluation bookkeeping, on stand-in models whose right answers are known: retrieval counts, array
loading, judged prompt match (batches, seeds, per-prompt rows), reconstruction quantisation, the report table."""

from __future__ import annotations

import types

import numpy as np

from jaxsd.training import evaluate
from jaxsd.training import judge as judge_lib


class _CaptionMatcher:
  """A stand-in CLIP: image i matches caption j when their one-hot codes agree."""

  def apply(self, variables, ids, images):
    del variables
    return types.SimpleNamespace(logits_per_image=images @ ids.T)


def test_clip_retrieval_counts_duplicate_captions_as_right():
  eye = np.eye(4, dtype=np.float32)
  batches = [
      {
          "input_ids": eye,
          "image": eye,
          "caption": np.array(["a", "b", "c", "d"])
      },
      # image 0 picks caption 1, which reads the same as its own; image 2 picks caption 3 (wrong)
      {
          "input_ids": eye,
          "image": eye[[1, 1, 3, 3]],
          "caption": np.array(["x", "x", "y", "z"])
      },
      {
          "input_ids": eye,
          "image": eye,
          "caption": np.array(["never", "read", "past", "max"])
      }
  ]
  out = evaluate.clip_retrieval(_CaptionMatcher(), {}, iter(batches), max_examples=8)
  assert out["clip_eval_examples"] == 8 and out["clip_eval_group"] == 4
  assert out["clip_i2t_accuracy"] == 7 / 8
  # text -> image in the second batch: captions 0 and 1 ("x") pick image 0 (a tie, then the first), right;
  # caption 2 picks image 0 ("x" != "y") and caption 3 image 2 ("y" != "z"), wrong.
  assert out["clip_t2i_accuracy"] == 6 / 8


def test_load_arrays_concatenates_and_truncates():
  batches = ({"image": np.full((3, 2), i), "label": np.arange(3) + 3 * i} for i in range(5))
  out = evaluate.load_arrays(batches, ("image", "label"), max_examples=7)
  np.testing.assert_array_equal(out["label"], np.arange(7))
  assert out["image"].shape == (7, 2) and out["image"][6, 0] == 2


class _Pipe:
  """A stand-in pipeline that paints each prompt's "colour" (its length) into 4x4 images and logs calls."""

  unet = types.SimpleNamespace(config=types.SimpleNamespace(sample_size=2))
  vae = types.SimpleNamespace(config=types.SimpleNamespace(block_out_channels=(4, 4), downsampling_factor=2))
  default_size = 4  # as StableDiffusion.default_size: sample_size x downsampling_factor

  def __init__(self):
    self.calls = []

  def __call__(self, prompts, *, height, width, steps, guidance_scale, sampler, seed, output):
    self.calls.append((len(prompts), height, width, seed))
    return np.stack([np.full((height, width, 3), len(p), np.uint8) for p in prompts])


class _Judge:
  """Sees colour 1 when the prompt was long (value > 3), else colour 0; shape 0 always."""

  def predict(self, x):
    value = np.round((x[:, 0, 0, 0] + 1) * 127.5)
    return {"color": (value > 3).astype(int), "shape": np.zeros(len(x), int)}

  def compare(self, predicted, labels):
    return {a: p == np.asarray(labels[a]) for a, p in predicted.items()}


def test_prompt_match_rows_and_accuracies():
  pipe = _Pipe()
  prompts = ["ab", "abcd", "abcdef"]
  labels = {"color": [1, 1, 1], "shape": [0, 0, 0]}
  out = evaluate.prompt_match(pipe, _Judge(), prompts, labels, sampler="ddim", steps=2, guidance_scale=1.0, seed=5,
                              images_per_prompt=2)
  assert out["num_images"] == 6 and out["images"].shape == (6, 4, 4, 3)
  assert [r["prompt"] for r in out["rows"]] == prompts
  assert [r["color"] for r in out["rows"]] == [0.0, 1.0, 1.0]
  assert out["color_accuracy"] == 4 / 6 and out["shape_accuracy"] == 1.0
  np.testing.assert_array_equal(out["labels"]["color"], [1] * 6)  # per image, prompt-major
  np.testing.assert_array_equal(out["predicted"]["color"], [0, 0, 1, 1, 1, 1])
  assert pipe.calls == [(6, 4, 4, 5)]  # one batch at the model's native size


def test_samples_are_judged_at_the_judges_size():
  """A fine-tune of a model whose own size is not the judged dataset's (a 16 px init on shapes at 32 px) sampled
  at the model's size, and the judge (which takes one size) failed at the first periodic evaluation."""
  pipe, judge = _Pipe(), _Judge()
  judge.image_hw = (8, 6)
  out = evaluate.prompt_match(pipe, judge, ["ab"], {
      "color": [0],
      "shape": [0]
  }, sampler="ddim", steps=2, guidance_scale=1.0, seed=5)
  assert out["images"].shape == (1, 8, 6, 3) and pipe.calls == [(1, 8, 6, 5)]
  real = judge_lib.Judge(judge_lib.AttributeClassifier((2,)), {}, ("color",), {"color": ("a", "b")},
                         {"input_shape": [1, 32, 24, 3]})
  assert real.image_hw == (32, 24)


def test_sample_images_pads_to_one_batch_size_and_steps_the_seed():
  pipe = _Pipe()
  images = evaluate.sample_images(pipe, ["a"] * 5, sampler="ddim", steps=1, guidance_scale=1.0, seed=10, batch_size=2)
  assert images.shape == (5, 4, 4, 3)
  assert pipe.calls == [(2, 4, 4, 10), (2, 4, 4, 11), (2, 4, 4, 12)]  # the last batch padded to 2


def test_reconstruct_quantises_like_samples():

  class Identity:  # a stand-in VAE whose posterior mode is 1.5 x and whose decoder is the identity
    encode, decode = "encode", "decode"

    def apply(self, variables, x, method):
      del variables
      return types.SimpleNamespace(mode=lambda: x * 1.5) if method == "encode" else x

  images = np.linspace(-1, 1, 2 * 3 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 3)
  rec = evaluate.reconstruct(Identity(), {}, images, batch=1)
  levels = (rec + 1) * 127.5
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
  np.testing.assert_allclose(rec, np.round((np.clip(images * 1.5, -1, 1) + 1) * 127.5) / 127.5 - 1, atol=1e-6)


def test_summary_table():
  result = {
      "rows": [{
          "prompt": "p1",
          "color": 1.0,
          "all": 1.0
      }, {
          "prompt": "p2",
          "color": 0.0,
          "all": 0.0
      }],
      "row_labels": [{
          "shape": "circle"
      }, {
          "shape": "circle"
      }],
      "num_images": 2,
      "color_accuracy": 0.5,
      "all_accuracy": 0.5
  }
  table = evaluate.summary_table(result, ["color"], ["shape"], {"real test images": {"color": 0.9, "n": 10}})
  lines = table.splitlines()
  assert lines[0] == "| prompts | n | color | all |"
  assert lines[2] == "| circle | 2 | 0.50 | 0.50 |"
  assert lines[3] == "| **all generated** | 2 | **0.500** | **0.500** |"
  assert lines[4] == "| real test images | 10 | 0.900 |  |"


def _counts(rows):
  return {row: tuple(counts.values()) for row, counts in rows.items()}


def test_confusion_counts_per_asked_class_split_by_another_attribute():
  classes = {"shape": ("circle", "square"), "size": ("small", "large")}
  asked = {"shape": np.array([0, 0, 1, 1, 1, 0]), "size": np.array([0, 0, 0, 0, 1, 1])}
  judged = {"shape": np.array([0, 1, 0, 0, 1, 0]), "size": np.array([0, 1, 0, 0, 1, 1])}
  conf = evaluate.confusion(asked, judged, classes, split="size")
  assert list(conf["shape"]["small square"]) == ["circle", "square"]  # judged classes, in class order
  # (circle, square) counts per row; both small squares were seen as circles.
  assert _counts(conf["shape"]) == {
      "small circle": (1, 1),
      "small square": (2, 0),
      "large circle": (1, 0),
      "large square": (0, 1)
  }
  assert _counts(conf["size"]) == {"small": (3, 1), "large": (0, 2)}  # not split by itself
  assert _counts(evaluate.confusion(asked, judged, classes)["shape"]) == {"circle": (2, 1), "square": (2, 1)}


def test_confusion_table_bolds_the_asked_class_and_shows_the_ceiling():
  names = ("circle", "square")
  rows = {"small circle": (1, 1), "small square": (2, 0), "large blue circle": (0, 0)}
  rows = {k: dict(zip(names, v)) for k, v in rows.items()}
  ceiling = {k: dict(zip(names, v)) for k, v in {"small circle": (3, 1), "small square": (1, 1)}.items()}
  lines = evaluate.confusion_table(rows, ceiling).splitlines()
  assert lines[0] == "| asked | n | circle | square | ceiling |"
  assert lines[2] == "| small circle | 2 | **0.50** | 0.50 | 0.75 |"
  assert lines[3] == "| small square | 2 | 1.00 | **0.00** | 0.50 |"
  assert lines[4] == "| large blue circle | 0 | - | - | - |"  # no samples, no ceiling images
  assert evaluate.confusion_table(rows).splitlines()[0] == "| asked | n | circle | square |"
