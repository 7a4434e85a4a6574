"""A workdir's VAE as the judge sees it (docs/training.md, tenth and fourteenth rounds): the shapes-FID of its
reconstructions (the decode of test[:1000] against real test[1000:2000], as the samples' FID is measured) and of a
1-pixel blur of the real images; and the judge's accuracy on the reconstructions of all 2,000 test images, per
attribute and per size x shape (the VAE's ceiling for each), with the PSNR.

    TFDS_DATA_DIR=... python docs/runs/vae_fid.py WORKDIR [JUDGE_WORKDIR]

JUDGE_WORKDIR (default WORKDIR) lends its judge/, so that a VAE-only run (--config.stages=vae) is judged by the
same classifier as the full run it is compared with.
"""
import os, sys, json
import numpy as np
from jaxsd.training import evaluate, export, report
from jaxsd.training import judge as judge_lib
from jaxsd import pretrained
import importlib

cfg = importlib.import_module("train.configs.default").get_config()
wd = sys.argv[1]
jd = sys.argv[2] if len(sys.argv) > 2 else wd
from jaxsd.data import builtin

spec = builtin.lookup(cfg.data.name).judged
attrs = tuple(spec.attributes)
from jaxsd import tokenizer as _tk

tok = _tk.load_tokenizer(None)
test = report.labelled_arrays(cfg, tok, "test", attrs, None)
judge = judge_lib.load_or_train(os.path.join(jd, "judge"), cfg.data.name, None, attrs, spec.attributes)
vae, vp = pretrained.load_vae(os.path.join(export.model_dir(wd), "vae"))
n = 1000
real = judge.features(test["image"][:2 * n])
rec = evaluate.reconstruct(vae, vp, test["image"])
fr = judge.features(rec[:n])
out = {
    "floor_real_vs_real": judge_lib.frechet_distance(real[:n], real[n:2 * n]),
    "vae_recon_vs_real": judge_lib.frechet_distance(fr, real[n:2 * n])
}
blur = np.asarray(judge_lib._blur(np.asarray(test["image"][:n], np.float32)))
out["blurred_real_vs_real"] = judge_lib.frechet_distance(judge.features(blur), real[n:2 * n])
labels = {a: test[a] for a in judge.attributes}
out["ceiling"] = {a: float(np.mean(v)) for a, v in judge.correct(rec, labels).items()}
rows = evaluate.confusion(labels, judge.predict(rec), spec.attributes, spec.confusion_split)["shape"]
out["shape_ceiling_by_row"] = {r: c[r.split(" ")[-1]] / max(sum(c.values()), 1) for r, c in rows.items()}
x, y = (np.asarray(test["image"], np.float32) + 1) / 2, (np.asarray(rec, np.float32) + 1) / 2
out["psnr"] = float(10 * np.log10(1 / np.mean((x - y)**2)))
print(json.dumps(out))
