"""jaxsd.config's JSON files: read with the file named in every error, written whole or not at all."""

from __future__ import annotations

import json

import pytest

from jaxsd.config import read_json_object, write_json_object
from jaxsd.models.clip import CLIPConfig, CLIPTextConfig
from jaxsd.models.controlnet import ControlNetConfig
from jaxsd.models.unet import UNet2DConditionConfig
from jaxsd.models.vae import AutoencoderKLConfig


def test_read_names_the_file_of_bad_json(tmp_path):
  path = tmp_path / "config.json"
  for text, message in (("{\n", "is not valid JSON"), ("[1, 2]", "holds a JSON list, not an object"),
                        ("", "is not valid JSON"), (b"\xff\xfe{}", "is not valid JSON")):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=message) as e:
      read_json_object(str(path))
    assert str(path) in str(e.value)
  path.write_text('{"a": [1, 2]}')
  assert read_json_object(str(path)) == {"a": [1, 2]}


def test_write_leaves_the_old_file_when_it_fails(tmp_path):
  """A write that stops part-way (here an object json cannot encode, in a kill a signal) leaves the file as it
  was, where writing in place left a truncated file that the resumed run could not read (a stage's
  result.json, an exported network's jaxsd_step.json, the latent cache's done.json)."""
  path = tmp_path / "result.json"
  write_json_object(str(path), {"steps": 10}, indent=2)
  assert json.loads(path.read_text()) == {"steps": 10}
  with pytest.raises(TypeError):
    write_json_object(str(path), {"steps": 20, "bad": object()})
  assert json.loads(path.read_text()) == {"steps": 10}
  write_json_object(str(path), {"steps": 20})
  assert read_json_object(str(path)) == {"steps": 20}


@pytest.mark.parametrize("cls, updates, message", [
    (UNet2DConditionConfig, {
        "block_out_channels": [32, 0]
    }, r"block_out_channels=\[32, 0\] must be whole numbers"),
    (UNet2DConditionConfig, {
        "norm_num_groups": 0
    }, "norm_num_groups=0 must be a whole number >= 1"),
    (UNet2DConditionConfig, {
        "attention_head_dim": [8, 0, 8, 8]
    }, "attention_head_dim"),
    (UNet2DConditionConfig, {
        "layers_per_block": -1
    }, "layers_per_block=-1"),
    (UNet2DConditionConfig, {
        "cross_attention_dim": 0
    }, "cross_attention_dim=0"),
    (AutoencoderKLConfig, {
        "block_out_channels": []
    }, r"block_out_channels=\[\] must be whole numbers"),
    (AutoencoderKLConfig, {
        "latent_channels": 0
    }, "latent_channels=0"),
    (CLIPTextConfig, {
        "num_attention_heads": 0
    }, "num_attention_heads=0"),
    (CLIPTextConfig, {
        "hidden_size": 512.0
    }, "hidden_size=512.0"),
    (CLIPConfig, {
        "projection_dim": 0
    }, "projection_dim=0"),
    (ControlNetConfig, {
        "conditioning_embedding_out_channels": []
    }, "conditioning_embedding_out_channels"),
])
def test_network_configs_refuse_sizes_below_one(cls, updates, message):
  """A zero or negative width, head or group count in a config.json is one error naming the field (a zero group
  or head count was a ZeroDivisionError in validate, a zero width an empty network); real configs still load."""
  assert cls.from_dict({}) == cls()
  with pytest.raises(ValueError, match=f"{cls.__name__}: {message}"):
    cls.from_dict(updates)
