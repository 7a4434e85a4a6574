"""What a workdir's shapes-FID is made of (docs/training.md, eighteenth round): the report's 1,000 samples of test
captions drawn again (same sampler, guidance and seed as `report.md`), and
- their distance to the real test images split into the mean term |mu_g - mu_r|^2 and the rest;
- per attribute, the judge's accuracy on the samples whose caption names it (test captions often leave size or
  position out), and where the caption leaves it out, the judged classes' shares in the samples against the shares
  in the real images of those captions (and their total variation distance): what the model draws when not told;
- the distance of the samples whose named attributes are all drawn right;
- per asked size x shape, the distance of those samples to the real images of that class (against two halves of
  the real class, its floor: ~80 images a side, so both are mostly small-sample bias).

    TFDS_DATA_DIR=... python docs/runs/fid_parts.py WORKDIR
"""
import importlib
import json
import sys

import numpy as np

from jaxsd import tokenizer as _tk
from jaxsd.pipeline import load_workdir
from jaxsd.training import evaluate, report
from jaxsd.training import judge as judge_lib

cfg = importlib.import_module("train.configs.default").get_config()
wd = sys.argv[1]
tok = _tk.load_tokenizer(None)
ev, floors, test = report.quality_eval(cfg, wd, tok)
judge, n = ev.judge, len(ev.fid_captions)
pipe = load_workdir(wd)
images = evaluate.sample_images(pipe, ev.fid_captions, sampler=ev.sampler, steps=ev.steps,
                                guidance_scale=ev.guidance_scale, seed=ev.fid_seed)
x = images.astype(np.float32) / 127.5 - 1.0
gen = judge.features(x)
real = ev.real_features[1][:n]
asked = {a: np.asarray(test[a][:n]) for a in judge.attributes}  # the labels of the captions' own images
other = {a: np.asarray(test[a][n:2 * n]) for a in judge.attributes}
pred = judge.predict(x)
captions = [c.lower() for c in ev.fid_captions]
named = {a: np.array([any(nm.lower() in c for nm in judge.class_names[a]) for c in captions]) for a in judge.attributes}
right = np.logical_and.reduce([(pred[a] == asked[a]) | ~named[a] for a in judge.attributes])


def parts(a, b):
  mu = float(np.square(a.mean(0) - b.mean(0)).sum())
  return {"fid": judge_lib.frechet_distance(a, b), "mean_term": mu}


out = {"samples_vs_real": parts(gen, real), "floor": floors["fid_real_vs_real"], "captions": captions[:5]}
for a in judge.attributes:
  m, k = named[a], len(judge.class_names[a])
  share = lambda v: np.bincount(v, minlength=k) / max(len(v), 1)
  drawn, real_share = share(pred[a][~m]), share(asked[a][~m])
  out[a] = {
      "named": int(m.sum()),
      "right_when_named": float((pred[a][m] == asked[a][m]).mean()) if m.any() else None,
      "unnamed": int((~m).sum()),
      "drawn_when_unnamed": dict(zip(judge.class_names[a],
                                     np.round(drawn, 3).tolist())),
      "real_when_unnamed": dict(zip(judge.class_names[a],
                                    np.round(real_share, 3).tolist())),
      "total_variation": float(0.5 * np.abs(drawn - real_share).sum()),
  }
out["named_all_right"] = float(right.mean())
out["right_samples_vs_real"] = parts(gen[right], real)
cls = lambda lab, i: f"{judge.class_names['size'][lab['size'][i]]} {judge.class_names['shape'][lab['shape'][i]]}"
by = {}
for name in sorted({cls(asked, i) for i in range(n)}):
  g = gen[[cls(asked, i) == name for i in range(n)]]
  r = real[[cls(other, i) == name for i in range(n)]]
  h = len(r) // 2
  by[name] = {
      "n": int(len(g)),
      "fid": judge_lib.frechet_distance(g, r),
      "floor": judge_lib.frechet_distance(r[:h], r[h:])
  }
out["by_size_shape"] = by
print(json.dumps(out, indent=1))
