"""Judges a trained default workdir again with other sampling settings (docs/training.md, eighteenth round): the
report's prompt-match table and shapes-FID for each `--set key=value[,key=value]` of `unet.sampler`,
`unet.sample_steps`, `unet.guidance_scale`, in a scratch copy of the workdir (the original is not written).

    TFDS_DATA_DIR=... python docs/runs/rejudge.py WORKDIR --set unet.sample_steps=20 --set unet.guidance_scale=1.5
"""
import argparse
import importlib
import json
import os
import shutil
import tempfile

from jaxsd import tokenizer as _tk
from jaxsd.training import report

p = argparse.ArgumentParser()
p.add_argument("workdir")
p.add_argument("--set", action="append", default=[], help="comma-separated config overrides, one judged run each")
args = p.parse_args()
tok = _tk.load_tokenizer(None)
step = json.load(open(os.path.join(args.workdir, "unet", "result.json")))["steps"]
out = {}
for setting in args.set or [""]:
  cfg = importlib.import_module("train.configs.default").get_config()
  for kv in filter(None, setting.split(",")):
    key, value = kv.split("=")
    section, name = key.split(".")
    cfg[section][name] = type(cfg[section][name])(value)
  with tempfile.TemporaryDirectory() as scratch:
    for part in ("model", "judge", "unet/metrics.jsonl", "unet/result.json"):
      src, dst = os.path.join(args.workdir, part), os.path.join(scratch, part)
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)
    r = report.write(cfg, scratch, tok, step=int(step))
  out[setting or "default"] = {
      k: r[k] for k in ("judge_shape_accuracy", "judge_color_accuracy", "judge_size_accuracy", "judge_position_accuracy",
                       "judge_all_accuracy", "fid", "fid_real_vs_real")
  }
  out[setting or "default"]["fid_ratio"] = r["fid"] / r["fid_real_vs_real"]
  print(json.dumps({setting or "default": out[setting or "default"]}), flush=True)
print(json.dumps(out, indent=1))
