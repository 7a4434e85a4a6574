"""How good the trained model's samples are, measured the same way during and after the U-Net stage.

`QualityEval` holds the independent judge (`judge.py`), the prompts with their attribute labels, and
the judge's features of real test images. Called with a pipeline it samples the prompts and
`fid_images` test captions and returns the judged accuracies per attribute and the shapes-FID; the
U-Net stage calls it at every sample point (metrics.jsonl, TensorBoard) and the report at the end,
where `plot` draws the history next to the sample grids.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Sequence

import numpy as np

from jaxsd.training import evaluate
from jaxsd.training import judge as judge_lib
from jaxsd.files import written_whole

log = logging.getLogger(__name__)


@dataclasses.dataclass
class QualityEval:
  judge: judge_lib.Judge
  prompts: list[str]  # the prompt-match prompts
  prompt_labels: dict  # attribute -> class index per prompt
  fid_captions: list[str]  # test captions; their samples are compared with real_features[1]
  # Judge features of the test images of fid_captions and of as many other real test images: the floor is
  # the distance between the two, the samples are compared with the second.
  real_features: tuple[np.ndarray, np.ndarray]
  sampler: str
  steps: int
  guidance_scale: float
  seed: int
  images_per_prompt: int = 1
  periodic_fid_images: int = 0  # during training: the FID of this many samples (0: all of fid_captions)

  @property
  def fid_seed(self) -> int:
    """The seed of the FID samples (another draw than the prompt-match samples')."""
    return self.seed + 7919

  def __call__(self, pipe, clip_judge=None, final: bool = True) -> dict:
    """{"judge_<attr>_accuracy", "judge_all_accuracy", "fid", "fid_floor", "fid_images", ...} and
    "prompt_match" (rows, images). `final=False` (a point during training) samples `periodic_fid_images`
    captions for the FID, and compares them with as many real images, against that size's floor."""
    t0 = time.time()
    match = evaluate.prompt_match(pipe, self.judge, self.prompts, self.prompt_labels, sampler=self.sampler,
                                  steps=self.steps, guidance_scale=self.guidance_scale, seed=self.seed,
                                  images_per_prompt=self.images_per_prompt, clip_judge=clip_judge)
    out = {f"judge_{a}_accuracy": match[f"{a}_accuracy"] for a in (*self.judge.attributes, "all")}
    n = len(self.fid_captions) if final or not self.periodic_fid_images else min(self.periodic_fid_images,
                                                                                 len(self.fid_captions))
    if n >= 2:
      out["fid"] = evaluate.sample_fid(pipe, self.judge, self.fid_captions[:n], self.real_features[1][:n],
                                       sampler=self.sampler, steps=self.steps, guidance_scale=self.guidance_scale,
                                       seed=self.fid_seed)
      out["fid_floor"] = fid_floor(self.real_features, n)
      out["fid_images"] = n
    out["eval_seconds"] = round(time.time() - t0, 1)
    out["prompt_match"] = match
    return out


def fid_floor(real_features: tuple[np.ndarray, np.ndarray], n: int) -> float | None:
  """Real vs real Fréchet distance at sample size n (FID's floor there)."""
  return judge_lib.frechet_distance(real_features[0][:n], real_features[1][:n]) if n >= 2 else None


def build(judge: judge_lib.Judge, prompts: Sequence[str], prompt_labels: dict, test_images: np.ndarray,
          test_captions: Sequence[str], *, fid_images: int, **sampling) -> tuple[QualityEval, dict]:
  """A QualityEval, and the floors measured on real data: the judge's real-vs-real Fréchet distance
  between the two halves of the test images (FID's floor at this sample size) and its accuracy there.

  The samples' FID uses the captions of the first `fid_images` test images against the features of
  the remaining ones, so it compares like with like against the floor.
  """
  n = min(fid_images, len(test_images) // 2)
  if fid_images and n < fid_images:
    log.warning("the test split has %d images: the FID uses %d samples, not %d.", len(test_images), n, fid_images)
  feats = judge.features(test_images)
  real = (feats[:n], feats[n:2 * n])
  ev = QualityEval(judge=judge, prompts=list(prompts), prompt_labels=prompt_labels,
                   fid_captions=list(test_captions[:n]), real_features=real, **sampling)
  return ev, {"fid_real_vs_real": fid_floor(real, n), "fid_images": n}


def plot(history: Sequence[dict], path: str, *, floor: float | None = None) -> None:
  """Judge accuracies and FID against training steps, as a PNG (for report.md)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  history = sorted(history, key=lambda h: h["step"])
  steps = [h["step"] for h in history]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
  for key in sorted(k for k in history[0] if k.startswith("judge_") and k.endswith("_accuracy")):
    ax1.plot(steps, [h.get(key) for h in history], marker="o", label=key[len("judge_"):-len("_accuracy")])
  ax1.set(xlabel="U-Net step", ylabel="judged correct", ylim=(0, 1.02), title="Prompt match (independent judge)")
  ax1.grid(alpha=0.3)
  ax1.legend(fontsize=8)
  if any(h.get("fid") is not None for h in history):
    ax2.plot(steps, [h.get("fid") for h in history], marker="o", color="black", label="samples vs real")
    ax2.plot(steps, [h.get("fid_floor", floor) for h in history], marker="_", ls="--", color="grey",
             label="real vs real (floor, same sample size)")
    for st, h in zip(steps, history):
      if h.get("fid_images"):
        ax2.annotate(f"n={int(h['fid_images'])}", (st, h["fid"]), fontsize=7, textcoords="offset points", xytext=(0, 5),
                     ha="center")
    ax2.set_yscale("log")
    ax2.legend(fontsize=8)
  ax2.set(xlabel="U-Net step", ylabel="Fréchet distance (judge features)", title="shapes-FID")
  ax2.grid(alpha=0.3)
  fig.tight_layout()
  with written_whole(path) as tmp:  # a kill leaves the old plot or the new
    fig.savefig(tmp, dpi=90, format="png")
  plt.close(fig)
