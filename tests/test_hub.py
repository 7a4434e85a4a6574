"""Hub model ids as folders (jaxsd.hub): the local Hugging Face cache offline, and which files a download fetches
(huggingface_hub's calls replaced by a fake Hub that serves a folder; nothing here reaches the network)."""

from __future__ import annotations

import fnmatch
import os
import shutil
import types

import huggingface_hub
import pytest
from huggingface_hub import constants

from jaxsd import hub
from tests import reference

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return reference.make_tiny_sd_folder(str(tmp_path_factory.mktemp("tiny") / "sd"))


def _cache_with(cache, repo_id: str, folder: str) -> str:
  """`folder` laid out as huggingface_hub caches a download of `repo_id` (refs/main -> snapshots/<commit>)."""
  storage = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
  os.makedirs(os.path.join(storage, "refs"))
  with open(os.path.join(storage, "refs", "main"), "w") as f:
    f.write(COMMIT)
  snapshot = os.path.join(storage, "snapshots", COMMIT)
  shutil.copytree(folder, snapshot)
  return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
  cache = str(tmp_path / "hf_cache")
  os.makedirs(cache)
  monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  return cache


def test_paths_and_non_ids_are_left_alone(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  os.makedirs("models/sd")
  assert hub.resolve("models/sd") == "models/sd"  # a relative path that exists wins over the Hub id of that form
  for name in ("/nonexistent/sd", "sd", "a/b/c", "../x/y", "~/sd", "model.safetensors", "loras/x.safetensors"):
    assert hub.resolve(name) == name and not hub.is_repo_id(name)
  assert hub.is_repo_id("stabilityai/stable-diffusion-2-1") and hub.is_repo_id("owner/name@v1.0")


def test_a_cached_model_is_found_offline(tiny, offline_cache):
  snapshot = _cache_with(offline_cache, "jaxsd-test/tiny-sd", tiny)
  assert hub.resolve("jaxsd-test/tiny-sd") == snapshot
  assert hub.resolve(f"jaxsd-test/tiny-sd@{COMMIT}") == snapshot
  with pytest.raises(FileNotFoundError) as e:
    hub.resolve("jaxsd-test/not-cached")
  message = str(e.value)
  assert "'jaxsd-test/not-cached' does not exist here and is not a model in the Hugging Face cache" in message
  assert offline_cache in message and "HF_HUB_OFFLINE" in message and "\n" not in message


class _FakeHub:
  """model_info and snapshot_download over a local folder standing for a Hub repository; records the patterns."""

  def __init__(self, remote: str, cache: str):
    self.remote, self.cache, self.fetched = remote, cache, set()

  def files(self) -> list[str]:
    return [os.path.relpath(os.path.join(d, f), self.remote) for d, _, fs in os.walk(self.remote) for f in fs]

  def model_info(self, repo_id, revision=None):
    return types.SimpleNamespace(sha=COMMIT, siblings=[types.SimpleNamespace(rfilename=f) for f in self.files()])

  def snapshot_download(self, repo_id, revision=None, allow_patterns=None, local_files_only=False):
    assert not local_files_only and revision == COMMIT
    snapshot = os.path.join(self.cache, COMMIT)
    for f in self.files():
      if any(fnmatch.fnmatch(f, p) for p in allow_patterns):
        os.makedirs(os.path.dirname(os.path.join(snapshot, f)), exist_ok=True)
        shutil.copy(os.path.join(self.remote, f), os.path.join(snapshot, f))
        self.fetched.add(f)
    return snapshot


@pytest.fixture
def fake_hub(tiny, tmp_path, monkeypatch):
  """A repository as runwayml/stable-diffusion-v1-5 lays it out: fp16 copies (not the VAE's here), a safety checker,
  the single-file checkpoint beside the folders, pickled copies."""
  remote = str(tmp_path / "remote")
  shutil.copytree(tiny, remote)
  for extra in ("unet/diffusion_pytorch_model.fp16.safetensors", "text_encoder/model.fp16.safetensors",
                "unet/diffusion_pytorch_model.bin", "safety_checker/model.safetensors", "safety_checker/config.json",
                "v1-5-pruned-emaonly.safetensors", "README.md"):
    os.makedirs(os.path.dirname(os.path.join(remote, extra)), exist_ok=True)
    with open(os.path.join(remote, extra), "w") as f:
      f.write("x")
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
  fake = _FakeHub(remote, str(tmp_path / "cache"))
  monkeypatch.setattr(huggingface_hub, "model_info", fake.model_info)
  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
  return fake


WEIGHTS = {
    "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors"
}


def test_a_download_fetches_only_what_is_read(fake_hub):
  folder = hub.resolve("owner/sd")
  weights = {f for f in fake_hub.fetched if not f.endswith((".json", ".txt"))}
  assert weights == WEIGHTS
  assert {"model_index.json", "unet/config.json", "scheduler/scheduler_config.json",
          "tokenizer/tokenizer_config.json"} <= fake_hub.fetched
  assert not any(f.startswith("safety_checker/") for f in fake_hub.fetched)
  assert os.path.isfile(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


def test_a_variant_is_fetched_where_a_network_has_it(fake_hub):
  hub.resolve("owner/sd", variant="fp16")
  weights = {f for f in fake_hub.fetched if not f.endswith((".json", ".txt"))}
  assert weights == {
      "unet/diffusion_pytorch_model.fp16.safetensors", "text_encoder/model.fp16.safetensors",
      "vae/diffusion_pytorch_model.safetensors"
  }


def test_pickled_weights_are_fetched_only_when_allowed(fake_hub):
  os.remove(os.path.join(fake_hub.remote, "vae", "diffusion_pytorch_model.safetensors"))
  with open(os.path.join(fake_hub.remote, "vae", "diffusion_pytorch_model.bin"), "w") as f:
    f.write("x")
  with pytest.raises(ValueError, match="owner/sd: vae has only pickled .bin weights.*allow_pickle=True"):
    hub.resolve("owner/sd")
  assert not any(f.endswith(".bin") for f in fake_hub.fetched)
  hub.resolve("owner/sd", allow_pickle=True)
  assert "vae/diffusion_pytorch_model.bin" in fake_hub.fetched
  assert "unet/diffusion_pytorch_model.bin" not in fake_hub.fetched  # its safetensors file is read instead


def test_a_single_network_repository(fake_hub, tmp_path):
  """No model_index.json (a ControlNet's repository): its top folder's config and weights."""
  remote = fake_hub.remote
  shutil.rmtree(remote)
  os.makedirs(remote)
  for f in ("config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.bin", "images/example.png"):
    os.makedirs(os.path.dirname(os.path.join(remote, f)), exist_ok=True)
    with open(os.path.join(remote, f), "w") as fh:
      fh.write("{}" if f.endswith(".json") else "x")
  hub.resolve("owner/controlnet")
  assert fake_hub.fetched == {"config.json", "diffusion_pytorch_model.safetensors"}


def test_a_controlnet_pipeline_repository_brings_its_controlnets(fake_hub):
  """A StableDiffusionControlNetPipeline's repository with a MultiControlNetModel: controlnet/ and controlnet_1/ are
  fetched with the pipeline's folders (their fp16 copies not)."""
  for f in ("controlnet/config.json", "controlnet/diffusion_pytorch_model.safetensors",
            "controlnet/diffusion_pytorch_model.fp16.safetensors", "controlnet_1/config.json",
            "controlnet_1/diffusion_pytorch_model.safetensors", "controlnet_images/edges.png"):
    os.makedirs(os.path.dirname(os.path.join(fake_hub.remote, f)), exist_ok=True)
    with open(os.path.join(fake_hub.remote, f), "w") as fh:
      fh.write("{}" if f.endswith(".json") else "x")
  hub.resolve("owner/sd-controlnet")
  weights = {f for f in fake_hub.fetched if not f.endswith((".json", ".txt"))}
  assert weights == WEIGHTS | {
      "controlnet/diffusion_pytorch_model.safetensors", "controlnet_1/diffusion_pytorch_model.safetensors"
  }
  assert {"controlnet/config.json", "controlnet_1/config.json"} <= fake_hub.fetched


def test_the_cache_is_used_when_the_hub_cannot_be_reached(tiny, offline_cache, monkeypatch):
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

  def unreachable(*a, **k):
    raise ConnectionError("[Errno -2] Name or service not known")

  monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
  snapshot = _cache_with(offline_cache, "jaxsd-test/tiny-sd", tiny)
  assert hub.resolve("jaxsd-test/tiny-sd") == snapshot
  with pytest.raises(FileNotFoundError, match=r"the Hub could not give it \(\[Errno -2\] Name or service not known\)"):
    hub.resolve("jaxsd-test/elsewhere")


def test_a_network_loads_by_its_hub_id(tiny, offline_cache):
  """pretrained's loaders (a ControlNet's, a VAE's, ...) take a cached Hub id as diffusers' from_pretrained does."""
  import jax
  import numpy as np

  from jaxsd import pretrained

  _cache_with(offline_cache, "owner/tiny-vae", os.path.join(tiny, "vae"))
  _, got = pretrained.load_vae("owner/tiny-vae")
  _, want = pretrained.load_vae(os.path.join(tiny, "vae"))
  assert jax.tree.all(jax.tree.map(np.array_equal, got, want))


def test_a_lora_repository(fake_hub):
  """lora.read takes a Hub id: its top folder's pytorch_lora_weights.safetensors, else its one .safetensors file (as
  diffusers' load_lora_weights); several candidates are refused naming them, before any download."""
  import numpy as np
  from safetensors.numpy import save_file

  from jaxsd import lora

  remote = fake_hub.remote
  shutil.rmtree(remote)
  os.makedirs(os.path.join(remote, "images"))
  tensors = {"unet.down.lora_A.weight": np.ones((2, 3), np.float32)}
  save_file(tensors, os.path.join(remote, "my_style.safetensors"))
  for f in ("README.md", "images/x.png"):
    with open(os.path.join(remote, f), "w") as fh:
      fh.write("x")
  got, _ = lora.read("owner/style-lora")
  assert fake_hub.fetched == {"my_style.safetensors"} and np.array_equal(got["unet.down.lora_A.weight"],
                                                                         tensors["unet.down.lora_A.weight"])
  save_file(tensors, os.path.join(remote, "my_style_epoch2.safetensors"))
  fake_hub.fetched.clear()
  with pytest.raises(ValueError, match=r"the repository holds 2 .safetensors files .* \(my_style.safetensors, "):
    lora.read("owner/style-lora")
  assert not fake_hub.fetched


def test_training_takes_a_hub_id_as_its_init(tiny, offline_cache, tmp_path, capsys):
  """config.init=owner/name is its cached folder (recorded as that folder); one neither here nor cached is one line,
  exit 2, before anything is written."""
  from jaxsd.training import run_config
  from train import __main__ as train_main
  from train.configs import finetune

  snapshot = _cache_with(offline_cache, "owner/tiny-sd", tiny)
  cfg = finetune.get_config()
  cfg.init = "owner/tiny-sd"
  run_config.resolve_init(cfg)
  assert cfg.init == snapshot
  workdir = tmp_path / "w"
  config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train", "configs", "finetune.py")
  assert train_main.main(["train", "--config", config, "--workdir", str(workdir), "--config.init=owner/missing"]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "error: config.init: 'owner/missing' does not exist here and is not a model" in err
  assert not workdir.exists()


def test_pipelines_load_by_hub_id(tiny, offline_cache, tmp_path, capsys):
  """StableDiffusion.from_pretrained, pipeline_xl.load (python -m sample --model) take a cached id; an id neither
  here nor cached is one line, exit 2, on the command line."""
  import jax
  import numpy as np

  from jaxsd import StableDiffusion, pipeline_xl
  from sample import __main__ as sample_main

  _cache_with(offline_cache, "owner/tiny-sd", tiny)
  want = StableDiffusion.from_pretrained(tiny).params
  for pipe in (StableDiffusion.from_pretrained("owner/tiny-sd"), pipeline_xl.load("owner/tiny-sd")):
    assert jax.tree.all(jax.tree.map(np.array_equal, pipe.params, want))
  out = tmp_path / "out"
  assert sample_main.main(["--model", "owner/missing", "--prompt", "a", "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "error: 'owner/missing' does not exist here and is not a model" in err
  assert not out.exists()
