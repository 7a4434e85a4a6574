"""The command lines `python -m train` and `python -m sample`, in-process: bad input exits 2 with one line.

Each case is refused before anything is loaded or compiled, so these run in milliseconds; the
subprocess runs that write images are in test_generate.py and training/test_run.py.
"""

from __future__ import annotations

import codecs
import json
import os

import pytest

from sample import __main__ as sample_main
from train import __main__ as train_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "train", "configs", "smoke.py")


def _one_error_line(capsys) -> str:
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1, err
  assert lines[0].startswith("error: ") and "Traceback" not in err
  return lines[0]


def _sd_folder_without(path, missing: str) -> str:
  for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
    os.makedirs(os.path.join(path, sub), exist_ok=True)
  for f in ("unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json"):
    if f != missing:
      with open(os.path.join(path, f), "w") as fh:
        json.dump({"block_out_channels": [32, 64]}, fh)
  return str(path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--config.dtype=float8"], "config.dtype='float8': choose one of float32, bfloat16, float16"),
        (["--config.stages=clip,gan"], "subset of clip,vae,unet"),
        (["--config.clip.batch_size=12"], "not divisible by the 8 devices"),
        (["--config.data.image_size=20", "--config.clip.vision.image_size=20"], "multiple of 8"),
        (["--config.init=/nonexistent/sd"], "does not exist"),
        (["--config.mesh.fsdp=3"], "must divide the 8 devices"),
        (["--config.unet.cache_latents=True", "--config.data.random_flip=True"], "cannot be flipped"),
        (["--config.unet.timestep_uniform_fraction=1.5"], "timestep_uniform_fraction=1.5"),
        (["--config.unet.foreground_loss_weight=-2"], "foreground_loss_weight=-2.0 must be >= 0"),
        (["--config.vae.optimizer.warmup_steps=100"], "config.vae.optimizer: optimizer.total_steps=24 must exceed"),
        (["--config.unet.stepz=3"], "stepz"),
        (["--config.unet.steps=many"], "steps"),
        (["--config.data.name=not_prepared_dataset"], "is not prepared"),
        # Counts, weights and names that used to pass here and fail later: in the loop, mid-run or at the end.
        (["--config.checkpoint_every=0"], "config.checkpoint_every=0: use a whole number >= 1"),
        (["--config.max_to_keep=0"], "config.max_to_keep=0: use a whole number of checkpoints >= 1"),
        (["--config.benchmark_steps=-1"], "config.benchmark_steps=-1: use 0 (train)"),
        (["--config.clip.steps=0"], "config.clip.steps=0: use a whole number >= 1"),
        (["--config.unet.sampler=dpm"], "config.unet.sampler: Unknown sampler 'dpm'"),
        (["--config.unet.sample_steps=0"], "config.unet.sample_steps=0"),
        (["--config.unet.ema_decay=1.0"], "config.unet.ema_decay=1.0: use a number in [0, 1)"),
        (["--config.eval.fid_images=1"], "an FID needs two samples"),
        (["--config.vae.kl_weight=-0.1"], "config.vae.kl_weight=-0.1: use a number >= 0"),
        (["--config.vae.optimizer.b2=1.0"], "config.vae.optimizer: optimizer.b2=1.0 must be in [0, 1)"),
        (["--config.unet.optimizer.eps=0.0"], "optimizer.eps=0.0 must be > 0"),
    ])
def test_train_bad_config_exits_2_with_one_line(tmp_path, capsys, overrides, message):
  workdir = str(tmp_path / "w")
  argv = ["train", "--config", SMOKE, "--workdir", workdir, f"--config.data.data_dir={tmp_path / 'tfds'}", *overrides]
  assert train_main.main(argv) == 2
  assert message in _one_error_line(capsys)
  assert not os.path.exists(workdir)  # refused before any work


def test_train_unknown_config_variant_exits_2_with_the_reason(tmp_path, capsys):
  """A config file whose get_config raises (an unknown variant): its reason, not ml_collections' traceback of it
  squeezed onto the line."""
  config = os.path.join(ROOT, "train", "configs", "lora.py") + ":sd14"
  argv = ["train", "--config", config, "--workdir", str(tmp_path / "w")]
  assert train_main.main(argv) == 2
  line = _one_error_line(capsys)
  assert "finetune variant 'sd14': use one of sd15" in line and "File " not in line and "get_config" not in line


@pytest.mark.parametrize("missing", ["vae/config.json", "unet/config.json", "scheduler/scheduler_config.json"])
def test_train_init_folder_without_a_config_exits_2(tmp_path, capsys, missing):
  init = _sd_folder_without(tmp_path / "sd", missing)
  argv = ["train", "--config", SMOKE, "--workdir", str(tmp_path / "w"), f"--config.init={init}"]
  assert train_main.main(argv) == 2
  line = _one_error_line(capsys)
  assert "config.init" in line and missing in line


def _sample(tmp_path, *args) -> list[str]:
  return ["--model", str(tmp_path / "no_model"), "--out", str(tmp_path / "out"), "--no-progress", *args]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "a cat", "--guidance", "nan"], "--guidance nan: the guidance scale must be a finite number"),
        (["--prompt", "a cat", "--guidance", "inf"], "--guidance inf"),
        (["--prompt", "a cat", "--guidance=-inf"], "--guidance -inf"),
        (["--prompt", "a cat", "--steps", "-3"], "--steps -3: need at least 1"),
        (["--prompt", "a cat", "--steps", "0"], "need at least 1"),
        (["--prompt", "a cat", "--lora", "/nonexistent/x.safetensors"
         ], "--lora /nonexistent/x.safetensors: no such file"),
        (["--prompt", "a cat", "--lora", "x.safetensors:strong"], "--lora x.safetensors:strong: the weight after ':'"),
        (["--prompt", "a cat", "--lora", "x.safetensors:nan"], "must be a finite number"),
        # Finite in Python, inf in the programs' float32: they made black images with exit 0.
        (["--prompt", "a cat", "--guidance", "1e39"], "--guidance 1e+39"),
        (["--prompt", "a cat", "--lora", "x.safetensors:1e39"], "must be a finite number"),
        # A seed collided with seed mod 2**32 (-1 drew 4294967295's images) or crashed (2**63).
        (["--prompt", "a cat", "--seed", "-1"], "--seed -1: use a whole number in [0, 2**64)"),
        (["--prompt", "a cat", "--seed", str(2**64)], f"--seed {2**64}"),
        # Bytes that are not UTF-8 arrive as surrogates, which the tokenizer met with a traceback.
        (["--prompt", "caf\udce9"], "is not UTF-8 text"),
        (["--prompt", "a cat", "--negative-prompt", "\udce9"], "--negative-prompt"),
        (["--prompt", "a cat", "--out", ""], "--out is empty"),
    ])
def test_sample_bad_flags_exit_2_with_one_line(tmp_path, capsys, args, message):
  assert sample_main.main(_sample(tmp_path, *args)) == 2
  assert message in _one_error_line(capsys)
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("args, message", [
    (["--adapter-image", "x.png"], "--adapter-image needs --t2i-adapter FOLDER"),
    (["--t2i-adapter", "/nonexistent/a", "--adapter-image", "x.png", "--adapter-image", "y.png"
     ], "2 --adapter-image for 1 --t2i-adapter"),
    (["--t2i-adapter", "/nonexistent/a", "--adapter-image", "x.png", "--adapter-scale", "1", "2"
     ], "--adapter-scale has 2 values for 1 T2I-Adapters"),
    (["--t2i-adapter", "/nonexistent/a", "--adapter-image", "x.png", "--adapter-factor", "1.5"
     ], "--adapter-factor 1.5: the fraction of the steps, in [0, 1]"),
    (["--t2i-adapter", "/nonexistent/a", "--adapter-image", "x.png", "--init-image", "x.png"], "text-to-image only"),
    (["--t2i-adapter", "/nonexistent/a", "--adapter-image", "x.png"], "--t2i-adapter /nonexistent/a: no such folder"),
])
def test_sample_t2i_adapter_flags_exit_2_with_one_line(tmp_path, capsys, args, message):
  assert sample_main.main(_sample(tmp_path, "--prompt", "a cat", *args)) == 2
  assert message in _one_error_line(capsys)


def test_sample_prompts_file_with_only_blank_lines(tmp_path, capsys):
  path = tmp_path / "prompts.txt"
  path.write_text("\n   \n\t\n")
  assert sample_main.main(_sample(tmp_path, "--prompts-file", str(path))) == 2
  assert "has only blank lines" in _one_error_line(capsys)


def test_sample_prompts_file_not_utf8(tmp_path, capsys):
  path = tmp_path / "prompts.txt"
  path.write_bytes("a café\n".encode("latin-1"))
  assert sample_main.main(_sample(tmp_path, "--prompts-file", str(path))) == 2
  line = _one_error_line(capsys)
  assert "is not UTF-8 text" in line and str(path) in line


def test_sample_incomplete_model_folder(tmp_path, capsys):
  model = _sd_folder_without(tmp_path / "sd", "vae/config.json")
  assert sample_main.main(["--model", model, "--prompt", "a cat", "--no-progress", "--out", str(tmp_path / "o")]) == 2
  assert "vae/config.json" in _one_error_line(capsys)


def test_sample_variant_reaches_the_loader(tmp_path, capsys, monkeypatch):
  from jaxsd import pipeline

  seen = {}

  def fake_load(path, **kw):
    seen.update(kw, path=path)
    raise FileNotFoundError("stop here")

  monkeypatch.setattr(pipeline, "load", fake_load)
  assert sample_main.main(_sample(tmp_path, "--prompt", "a cat", "--variant", "fp16")) == 2
  assert seen["variant"] == "fp16" and seen["path"] == str(tmp_path / "no_model")
  assert "stop here" in _one_error_line(capsys)


def test_sample_loras_reach_the_pipeline(tmp_path, capsys, monkeypatch):
  """--lora FILE[:SCALE] (repeatable) loads each adapter at its weight; the loader's error exits 2."""
  from jaxsd import pipeline

  a, b = tmp_path / "a.safetensors", tmp_path / "b:c.safetensors"  # a ':' in a file name that exists stays
  a.write_bytes(b"")
  b.write_bytes(b"")
  seen = []

  class FakePipe:

    def load_lora(self, path, scale, strict):
      seen.append((path, scale, strict))
      if len(seen) % 2 == 0:
        raise ValueError("stop here")

  monkeypatch.setattr(pipeline, "load", lambda path, **kw: FakePipe())
  assert sample_main.main(_sample(tmp_path, "--prompt", "a cat", "--lora", f"{a}:0.5", "--lora", str(b))) == 2
  assert seen == [(str(a), 0.5, True), (str(b), 1.0, True)]
  assert "stop here" in _one_error_line(capsys)
  assert sample_main.main(
      _sample(tmp_path, "--prompt", "a cat", "--lora", str(a), "--lora", str(b), "--lora-ignore-unmatched")) == 2
  assert seen[2:] == [(str(a), 1.0, False), (str(b), 1.0, False)]


def test_sample_vae_tiling_and_slicing_reach_the_pipeline(tmp_path, capsys, monkeypatch):
  """--vae-tiling / --vae-slicing call enable_vae_tiling / enable_vae_slicing (neither without its flag); the images
  are tests/test_vae_tiling_pipeline.py's."""
  from jaxsd import pipeline

  seen = []

  class FakePipe:

    def enable_vae_tiling(self):
      seen.append("tiling")

    def enable_vae_slicing(self):
      seen.append("slicing")
      raise ValueError("stop here")

  monkeypatch.setattr(pipeline, "load", lambda path, **kw: FakePipe())
  assert sample_main.main(_sample(tmp_path, "--prompt", "a cat", "--vae-tiling", "--vae-slicing")) == 2
  assert seen == ["tiling", "slicing"] and "stop here" in _one_error_line(capsys)
  assert sample_main.main(_sample(tmp_path, "--prompt", "a cat", "--vae-slicing")) == 2
  assert seen[2:] == ["slicing"]


def test_sample_hub_ids_of_loras_and_controlnets_reach_the_loaders(tmp_path, capsys, monkeypatch):
  """lora.read and the ControlNet loader take Hub ids (owner/name), but the command refused them first as a missing
  file / folder; a path that is no Hub id still is. The ControlNets are attached as the model loads, then the LoRA."""
  from jaxsd import pipeline

  seen = []

  class FakePipe:

    def load_lora(self, path, scale, strict):
      seen.append((path, scale))
      raise FileNotFoundError("stop here")

    def with_controlnet(self, controlnets, allow_pickle):
      seen.append(tuple(controlnets))
      return self

  monkeypatch.setattr(pipeline, "load", lambda path, **kw: FakePipe())
  image = tmp_path / "edges.png"
  from PIL import Image

  Image.new("RGB", (8, 8)).save(image)
  argv = _sample(tmp_path, "--prompt", "x", "--lora", "owner/style-lora:0.7", "--controlnet", "owner/controlnet@v1",
                 "--control-image", str(image))
  assert sample_main.main(argv) == 2
  assert seen == [("owner/controlnet@v1",), ("owner/style-lora", 0.7)]
  assert "stop here" in _one_error_line(capsys)
  for flag, path in (("--lora", "missing/x.safetensors"), ("--controlnet", "./missing/cn")):
    extra = ["--control-image", str(image)] if flag == "--controlnet" else []
    assert sample_main.main(_sample(tmp_path, "--prompt", "x", flag, path, *extra)) == 2
    assert f"{flag} {path}: no such" in _one_error_line(capsys)


def test_sample_out_that_cannot_hold_images_exits_2_before_loading(tmp_path, capsys):
  """--out a file (or under one) used to fail after sampling, with a traceback; the file is left as it was."""
  afile = tmp_path / "afile"
  afile.write_text("keep")
  for out in (afile, afile / "sub"):
    assert sample_main.main(
        ["--model", str(tmp_path / "no_model"), "--prompt", "x", "--no-progress", "--out",
         str(out)]) == 2
    assert "is a file" in _one_error_line(capsys)
  assert afile.read_text() == "keep"


def test_sample_out_that_is_a_broken_link_exits_2_before_loading(tmp_path, capsys):
  """A link to a folder that is gone (or to itself): makedirs failed after every image was sampled."""
  for target in (tmp_path / "gone" / "images", tmp_path / "loop"):
    link = tmp_path / target.name
    os.symlink(target, link)
    assert sample_main.main(_sample(tmp_path, "--prompt", "x", "--out", str(link))) == 2
    assert f"--out {link} is a link to {target}, which does not exist" in _one_error_line(capsys)


def test_sample_prompts_file_that_cannot_be_read(tmp_path, capsys, monkeypatch):
  """A file this user may not read ended in a traceback (PermissionError). Root reads every file, so the open is
  made to fail."""
  path = tmp_path / "prompts.txt"
  path.write_text("a cat\n")

  def unreadable(*args, **kwargs):
    raise PermissionError(13, "Permission denied", str(path))

  monkeypatch.setattr(sample_main, "open", unreadable, raising=False)  # the module's own `open`, not builtins'
  assert sample_main.main(_sample(tmp_path, "--prompts-file", str(path))) == 2
  assert f"--prompts-file {path} cannot be read (Permission denied)" in _one_error_line(capsys)


@pytest.mark.parametrize("flag", ["--init-image", "--mask", "--control-image"])
def test_sample_image_past_pils_pixel_limit_exits_2(tmp_path, capsys, monkeypatch, flag):
  """PIL refuses images of over twice MAX_IMAGE_PIXELS (a 180-megapixel panorama) with DecompressionBombError,
  which is no OSError: a traceback. The limit is lowered here so that a small file passes it."""
  from PIL import Image

  small, big = tmp_path / "small.png", tmp_path / "big.png"
  Image.new("RGB", (8, 8)).save(small)
  Image.new("RGB", (16, 16)).save(big)
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 8 x 8 image is within it, the 16 x 16 one over twice it
  needs = {
      "--init-image": [],
      "--mask": ["--init-image", str(small)],
      "--control-image": ["--controlnet", str(tmp_path)]
  }
  assert sample_main.main(_sample(tmp_path, "--prompt", "x", *needs[flag], flag, str(big))) == 2
  assert f"{flag} {big}: too large to read" in _one_error_line(capsys)


def test_sample_single_file_config_with_a_model_folder_exits_2(tmp_path, capsys):
  """It applies to single files only: with a folder it was ignored, the folder's own configs read silently."""
  model = _sd_folder_without(tmp_path / "sd", "")
  argv = [
      "--model", model, "--single-file-config", "v2", "--prompt", "x", "--no-progress", "--out",
      str(tmp_path / "o")
  ]
  assert sample_main.main(argv) == 2
  assert f"--single-file-config applies to a single-file --model (.safetensors); {model} is a folder" in \
      _one_error_line(capsys)


def test_sample_prompts_file_folder_and_byte_order_mark(tmp_path, capsys):
  assert sample_main.main(_sample(tmp_path, "--prompts-file", str(tmp_path))) == 2
  assert "is a folder" in _one_error_line(capsys)
  bom = tmp_path / "bom.txt"
  bom.write_bytes(b"\xef\xbb\xbfa cat\r\na dog\r\n")  # as Windows' Notepad saves UTF-8
  assert sample_main.read_prompts([], str(bom)) == ["a cat", "a dog"]


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-be", "utf-32"])
def test_sample_prompts_file_in_utf16_or_32_with_a_byte_order_mark(tmp_path, codec):
  """PowerShell 5's `"a cat" > prompts.txt` writes UTF-16 with a mark: refused as not UTF-8 (training reads captions
  so); the mark says the encoding. Without one, UTF-16 is valid UTF-8 with NULs: refused, no longer sampled."""
  path = tmp_path / "prompts.txt"
  data = "a café\r\n\r\n猫\r\n".encode(codec)
  path.write_bytes(data if codec != "utf-16-be" else codecs.BOM_UTF16_BE + data)
  assert sample_main.read_prompts([], str(path)) == ["a café", "猫"]
  path.write_bytes("a cat\n".encode("utf-16-le"))
  with pytest.raises(ValueError, match="holds NUL characters .UTF-16 text without a byte-order mark"):
    sample_main.read_prompts([], str(path))


@pytest.mark.parametrize("content, message", [("{\n", "is not valid JSON"), ("[]", "holds a JSON list")])
def test_sample_broken_config_json_names_the_file(tmp_path, capsys, content, message):
  model = _sd_folder_without(tmp_path / "sd", "")
  with open(os.path.join(model, "unet", "config.json"), "w") as f:
    f.write(content)
  assert sample_main.main(["--model", model, "--prompt", "a cat", "--no-progress", "--out", str(tmp_path / "o")]) == 2
  line = _one_error_line(capsys)
  assert message in line and os.path.join("unet", "config.json") in line


def test_sample_workdir_without_an_exported_model(tmp_path, capsys):
  """A workdir stopped in its CLIP or VAE stage has checkpoints but no model/ yet; the message said that
  vae/, text_encoder/ and scheduler/ were missing from a Stable Diffusion folder."""
  os.makedirs(tmp_path / "wd" / "clip" / "checkpoints" / "100")
  assert sample_main.main(
      ["--model", str(tmp_path / "wd"), "--prompt", "a cat", "--no-progress", "--out",
       str(tmp_path / "o")]) == 2
  assert "is a training workdir with no exported model yet" in _one_error_line(capsys)


def test_train_workdir_or_data_dir_that_is_a_file_exits_2(tmp_path, capsys):
  """These ended in a traceback (FileExistsError, NotADirectoryError) after the config was read."""
  afile = tmp_path / "afile"
  afile.write_text("keep")
  base = ["train", "--config", SMOKE, f"--config.data.data_dir={tmp_path / 'tfds'}"]
  for argv, message in ((base + ["--workdir", str(afile)], "is a file, not a folder"),
                        (base + ["--workdir", str(afile / "sub")], "is a file, so the folder cannot be made there"), ([
                            "train", "--config", SMOKE, "--workdir",
                            str(tmp_path / "w"), f"--config.data.data_dir={afile}"
                        ], "config.data.data_dir")):
    assert train_main.main(argv) == 2
    assert message in _one_error_line(capsys)
  assert afile.read_text() == "keep" and not os.path.exists(tmp_path / "w")


def _ip_adapter_files(tmp_path) -> dict[str, str]:
  """An (empty) adapter file, and --ip-adapter-embeds files good and bad, for the IP-Adapter flag cases."""
  import numpy as np

  (tmp_path / "ip.safetensors").write_bytes(b"")
  arrays = dict(face=np.ones((1, 24)), two=np.ones((2, 2, 24)), wide=np.ones((2, 1, 32)), rows=np.ones((3, 1, 24)),
                flat=np.ones(24), nan=np.full((1, 24), np.nan), words=np.array(["a", "b"]))
  files = {name: str(tmp_path / f"{name}.npy") for name in arrays}
  for name, x in arrays.items():
    np.save(files[name], x)
  np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
  np.savez(tmp_path / "face.npz", np.ones((1, 24)))
  (tmp_path / "mask.png").write_bytes(b"")
  return dict(files, adapter=str(tmp_path / "ip.safetensors"), pickled=str(tmp_path / "pickled.npy"),
              npz=str(tmp_path / "face.npz"), tmp=str(tmp_path))


@pytest.mark.parametrize("args, message", [
    (["--ip-adapter-embeds", "{face}"], "--ip-adapter-embeds needs --ip-adapter FILE"),
    (["--ip-adapter-mask", "m.png"], "--ip-adapter-mask needs --ip-adapter FILE"),
    (["--ip-adapter", "{adapter}", "--ip-adapter-embeds", "/nonexistent/face.npy"
     ], "--ip-adapter-embeds /nonexistent/face.npy: no such file"),
    (["--ip-adapter", "{adapter}", "--ip-adapter-embeds", "{npz}"], "give a NumPy .npy file"),
    (["--ip-adapter", "{adapter}", "--ip-adapter-embeds", "{pickled}"], "np.load can read without pickle"),
    (["--ip-adapter", "{adapter}", "--ip-adapter-embeds", "{words}"], "give the embeddings as floats"),
    (["--ip-adapter", "{adapter}", "--ip-adapter-embeds", "{flat}"], "has shape (24,): give (2, n, D)"),
    (["--ip-adapter", "{adapter}", "--ip-adapter-embeds", "{rows}"], "has shape (3, 1, 24)"),
    (["--ip-adapter", "{adapter}", "--ip-adapter-embeds", "{nan}"], "not all finite"),
    (["--ip-adapter", "{adapter}", "--ip-adapter-embeds", "{face}", "--ip-adapter-embeds", "{face}"
     ], "0 --ip-adapter-image and 2 --ip-adapter-embeds for 1 --ip-adapter"),
    (["--ip-adapter", "{adapter}", "--ip-adapter-image", "x.png", "--ip-adapter-embeds", "{face}"
     ], "1 --ip-adapter-image and 1 --ip-adapter-embeds for 1 --ip-adapter"),
    (["--ip-adapter", "{adapter}", "--ip-adapter-embeds", "{two}", "--ip-adapter-mask", "{tmp}/mask.png"
     ], "1 --ip-adapter-mask for 2 image prompts (per --ip-adapter: 2)"),
    ([
        "--ip-adapter", "{adapter}", "--ip-adapter-embeds", "{two}", "--ip-adapter-mask", "{tmp}/mask.png",
        "--ip-adapter-mask", "none"
    ], "--ip-adapter-mask none for 1 of --ip-adapter {adapter}'s 2 image prompts: an "
     "adapter's images are masked together"),
    (["--ip-adapter", "{adapter}", "--ip-adapter-embeds", "{face}", "--image-encoder", "{tmp}"
     ], "the embeddings need no image encoder"),
    (["--ip-adapter", "{adapter}", "--ip-adapter-embeds", "{face}", "--ip-adapter-mask", "/nonexistent/m.png"
     ], "--ip-adapter-mask /nonexistent/m.png: no such file"),
    (["--ip-adapter", "{adapter}", "--ip-adapter-embeds", "{face}", "--ip-adapter-mask", "{tmp}/mask.png"
     ], "--ip-adapter-mask {tmp}/mask.png: not an image"),
])
def test_sample_ip_adapter_embeds_and_mask_flags_exit_2_before_loading(tmp_path, capsys, monkeypatch, args, message):
  from jaxsd import pipeline_xl

  names = _ip_adapter_files(tmp_path)
  monkeypatch.setattr(pipeline_xl, "load", lambda *a, **k: pytest.fail("loaded a model"))
  assert sample_main.main(_sample(tmp_path, "--prompt", "a cat", *(a.format(**names) for a in args))) == 2
  assert message.format(**names) in _one_error_line(capsys)
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("kind, dim, args, message", [
    ("faceid", 24, ["--ip-adapter-embeds", "{wide}"], "--ip-adapter-embeds {wide} (for --ip-adapter {adapter}) is 32 "
     "wide; the adapter takes 24-wide embeddings"),
    ("plus", 24, ["--ip-adapter-embeds", "{face}"], "this plus adapter takes the image encoder's hidden states"),
    ("faceid", 24, ["--ip-adapter-embeds", "{two}", "--guidance", "1"], "without guidance (a scale <= 1) it takes 1"),
])
def test_sample_ip_adapter_embeds_that_do_not_fit_the_adapter_exit_2_before_compiling(
    tmp_path, capsys, monkeypatch, kind, dim, args, message):
  """The embeddings' kind and width against the adapter, and their rows against the guidance, once the adapter is
  loaded (a stand-in pipeline here): one line, nothing generated or written."""
  import types

  from jaxsd import generate, pipeline_xl

  class FakePipe:
    guidance_embedded = False
    ip_adapters = ()

    def load_ip_adapter(self, files, image_encoder_folder, allow_pickle, scale):
      assert image_encoder_folder is None  # embeddings alone: no image encoder
      self.ip_adapters = (types.SimpleNamespace(kind=kind, embed_dim=dim),)

    def guided(self, guidance_scale):
      return guidance_scale > 1

  names = _ip_adapter_files(tmp_path)
  monkeypatch.setattr(pipeline_xl, "load", lambda *a, **k: FakePipe())
  monkeypatch.setattr(generate, "generate", lambda *a, **k: pytest.fail("generated"))
  argv = _sample(tmp_path, "--prompt", "a cat", "--ip-adapter", names["adapter"], *(a.format(**names) for a in args))
  assert sample_main.main(argv) == 2
  assert message.format(**names) in _one_error_line(capsys)
  assert not os.path.exists(tmp_path / "out")
