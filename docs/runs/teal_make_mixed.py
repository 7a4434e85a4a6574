"""The teal data with regularisation images (docs/training.md, textual inversion and pivotal tuning): the 20 teal
circles of teal_make_data.py, each REPEAT times, and the first 180 `shapes` training images with their captions.

  python docs/runs/teal_make_mixed.py TEAL_FOLDER OUT [REPEAT]     # then jaxsd.data.prepare_image_folder(OUT, ...)
"""
import json, os, shutil, sys
from jaxsd.data import shapes

teal, out = sys.argv[1], sys.argv[2]
repeat = int(sys.argv[3]) if len(sys.argv) > 3 else 4
os.makedirs(out, exist_ok=True)
rows = []
for r in (json.loads(line) for line in open(os.path.join(teal, "metadata.jsonl"))):
  for k in range(repeat):
    name = r["file_name"].replace(".png", f"_{k}.png")
    shutil.copy(os.path.join(teal, r["file_name"]), os.path.join(out, name))
    rows.append({"file_name": name, "text": r["text"]})
for i in range(180):
  ex = shapes.example(0, "train", i, 32)  # the training split's first 180 examples (seed 0, as the dataset's)
  name = f"real_{i:03d}.png"
  with open(os.path.join(out, name), "wb") as f:
    f.write(ex["image"])
  rows.append({"file_name": name, "text": ex["caption"]})
with open(os.path.join(out, "metadata.jsonl"), "w") as f:
  for r in rows:
    f.write(json.dumps(r) + "\n")
print(len(rows), "images")
