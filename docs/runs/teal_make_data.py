"""20 teal circles drawn as the shapes dataset draws its shapes (a colour it lacks), with captions
"a {size} teal circle {position}" in metadata.jsonl: python docs/runs/teal_make_data.py FOLDER."""
import json, math, os, random, sys
import numpy as np
from PIL import Image, ImageDraw
from jaxsd.data import shapes

TEAL = (0, 128, 128)
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
rng = random.Random(123)
rows = []
for i in range(20):
  size = rng.choice(shapes.SIZES)
  pos = rng.choice(shapes.POSITIONS)
  s = 32
  big = s * 4
  bg = shapes._background(rng, s, rng.choice(shapes.BACKGROUNDS))
  cx = (shapes.CENTERS[pos][0] + rng.uniform(-0.03, 0.03)) * big
  cy = (shapes.CENTERS[pos][1] + rng.uniform(-0.03, 0.03)) * big
  r = shapes._RADII[size] * rng.uniform(0.9, 1.05) * big
  m = Image.new("L", (big, big), 0)
  ImageDraw.Draw(m).ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
  a = np.asarray(m.reduce(4), np.float32)[..., None] / 255
  col = np.clip(np.array(TEAL, np.float32) + [rng.uniform(-12, 12) for _ in range(3)], 0, 255)
  img = np.round(bg * (1 - a) + col * a).astype(np.uint8)
  name = f"teal_{i:02d}.png"
  Image.fromarray(img).save(os.path.join(out, name))
  rows.append({"file_name": name, "text": shapes.caption_for("circle", "red", size, pos).replace("red", "teal")})
with open(os.path.join(out, "metadata.jsonl"), "w") as f:
  for r in rows:
    f.write(json.dumps(r) + "\n")
print(rows[:3])
