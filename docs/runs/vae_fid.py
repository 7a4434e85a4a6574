"""shapes-FID of a workdir's VAE reconstructions (docs/training.md, tenth round): the VAE's decode of
test[:1000] against real test[1000:2000], as the samples' FID is measured; and a 1-pixel blur of the real images.

    TFDS_DATA_DIR=... python docs/runs/vae_fid.py WORKDIR
"""
import os, sys, json
import numpy as np
from jaxsd.training import run, export, evaluate, judge as judge_lib
from jaxsd import pretrained
import importlib

cfg = importlib.import_module("train.configs.default").get_config()
wd = sys.argv[1]
from jaxsd.data import builtin

spec = builtin.lookup(cfg.data.name).judged
attrs = tuple(spec.attributes)
from jaxsd import tokenizer as _tk

tok = _tk.load_tokenizer(None)
test = run._labelled_arrays(cfg, tok, "test", attrs, None)
judge = judge_lib.load_or_train(os.path.join(wd, "judge"), cfg.data.name, None, attrs, spec.attributes)
vae, vp = pretrained.load_vae(os.path.join(export.model_dir(wd), "vae"))
n = 1000
real = judge.features(test["image"][:2 * n])
rec = evaluate.reconstruct(vae, vp, test["image"][:n])
fr = judge.features(rec)
out = {
    "floor_real_vs_real": judge_lib.frechet_distance(real[:n], real[n:2 * n]),
    "vae_recon_vs_real": judge_lib.frechet_distance(fr, real[n:2 * n])
}
blur = np.asarray(judge_lib._blur(np.asarray(test["image"][:n], np.float32)))
out["blurred_real_vs_real"] = judge_lib.frechet_distance(judge.features(blur), real[n:2 * n])
print(json.dumps(out))
