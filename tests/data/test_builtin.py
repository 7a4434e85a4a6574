"""What the built-in datasets offer the training driver: preparation on demand, sample and judged prompts."""

from __future__ import annotations

from jaxsd.data import builtin, shapes


def test_shapes_is_builtin_with_judged_prompts_that_say_what_they_label():
  found = builtin.lookup("shapes/32x32_n512_128_s0")
  assert found is not None and builtin.lookup("shapes/32x32") is not None
  judged = found.judged
  assert list(judged.attributes) == ["shape", "color", "size", "position"] and len(judged.prompts) == 180
  for i, prompt in enumerate(judged.prompts):  # the label of every attribute is the word in the prompt
    words = {a: judged.attributes[a][judged.labels[a][i]] for a in judged.attributes}
    assert prompt == shapes.caption_for(words["shape"], words["color"], words["size"], words["position"])
  assert len(judged.prompts) % judged.grid_columns == 0
  assert judged.clip_caption("red", "circle") == "a red circle"


def test_other_datasets_get_generic_or_configured_prompts():
  assert builtin.lookup("my_pets") is None and builtin.lookup("shapes/48x48") is None
  prompts, columns = builtin.sample_prompts("my_pets")
  assert prompts == list(builtin.GENERIC_SAMPLE_PROMPTS) and columns is None
  assert builtin.sample_prompts("shapes/32x32", ("a cat",)) == (["a cat"], None)
  prompts, columns = builtin.sample_prompts("shapes/32x32")
  assert len(prompts) == 18 and columns == 3 and prompts[0] == "a red circle"
