"""jaxsd.config's JSON files: read with the file named in every error, written whole or not at all."""

from __future__ import annotations

import json

import pytest

from jaxsd.config import read_json_object, write_json_object


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
