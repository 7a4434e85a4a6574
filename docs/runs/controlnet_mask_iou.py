"""python docs/runs/controlnet_mask_iou.py MODEL_DIR CONTROLNET_DIR (from the repository root).

Shapes ControlNet: IoU of the generated shape's silhouette with the conditioning mask, with and without it.

Conditions: the masks of 200 real test images; prompts: their shape and colour only ("a red circle"), so
where and how large the shape is comes from the mask alone. Silhouettes by controlnet_training.shape_mask.
"""
import json, sys
import numpy as np
import jax.numpy as jnp
from jaxsd import StableDiffusion
from jaxsd.data import shapes
from jaxsd.training import controlnet_training, report
from jaxsd import tokenizer as _tk
from train.configs import default

model, cn = sys.argv[1], sys.argv[2]
cfg = default.get_config()
tok = _tk.load_tokenizer(None)
test = report.labelled_arrays(cfg, tok, "test", ("shape", "color", "size", "position"), 200)
masks = np.asarray(controlnet_training.shape_mask(jnp.asarray(test["image"])))
prompts = [f"a {shapes.COLORS[c]} {shapes.SHAPES[s]}" for s, c in zip(test["shape"], test["color"])]
pipe = StableDiffusion.from_pretrained(model)
kw = dict(steps=10, guidance_scale=3.0, sampler="dpmpp_2m", seed=3)


def iou(images):
  gen = np.asarray(controlnet_training.shape_mask(jnp.asarray(images.astype(np.float32) / 127.5 - 1)))[..., 0] > 0.5
  m = masks[..., 0] > 0.5
  inter = (gen & m).sum((1, 2))
  union = (gen | m).sum((1, 2))
  return float(np.mean(inter / np.maximum(union, 1)))


out = {}
plain = np.concatenate([pipe(prompts[i:i + 100], **kw) for i in range(0, 200, 100)])
out["without_controlnet_iou"] = iou(plain)
cpipe = pipe.with_controlnet(cn)
for scale in (1.0,):
  imgs = np.concatenate([
      cpipe(prompts[i:i + 100], control_images=masks[i:i + 100], controlnet_conditioning_scale=scale, **kw)
      for i in range(0, 200, 100)
  ])
  out[f"controlnet_{scale}_iou"] = iou(imgs)
real_iou = iou(((test["image"] + 1) * 127.5).round().astype(np.uint8))
out["real_images_iou"] = real_iou
print(json.dumps(out))
from PIL import Image
from jaxsd.image_grid import contact_sheet

Image.fromarray(contact_sheet(np.concatenate([(masks[:10] * 255).astype(np.uint8), plain[:10], imgs[:10]]),
                              columns=10)).save("controlnet_grid.png")
