"""A seconds-long run of every stage, for tests: tiny models, a few steps, a small shapes dataset."""

from train.configs import default


def get_config():
  c = default.get_config()
  c.data.name = "shapes/32x32_n512_128_s0"  # prepared on demand with 512 train / 128 test examples
  c.log_every = 2
  c.checkpoint_every = 4
  c.progress = False
  for stage, steps in (("clip", 6), ("vae", 6), ("unet", 6)):
    s = c[stage]
    s.steps = steps
    s.batch_size = 16
    s.optimizer.total_steps = steps
    s.optimizer.warmup_steps = 2
  c.clip.text.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
  c.clip.vision.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
  c.clip.projection_dim = 32
  c.clip.eval_examples = 100
  c.vae.block_out_channels = (16, 32, 32)
  c.vae.norm_num_groups = 8
  c.vae.eval_examples = 64
  c.unet.block_out_channels = (32, 32)
  c.unet.norm_num_groups = 8
  c.unet.attention_head_dim = 2
  c.unet.sample_every = 0
  c.unet.sample_steps = 3
  c.unet.eval_images_per_prompt = 1
  return c
