"""Parity of jaxsd.models.clip with transformers' PyTorch CLIP on tiny random models."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxsd import weights  # noqa: E402
from jaxsd.models import clip  # noqa: E402

TOL = 1e-4  # fp32, max abs difference

TEXT = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=16,
    pad_token_id=1,
    bos_token_id=97,
)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=12,
              patch_size=4)


def _np(t) -> np.ndarray:
  return t.detach().numpy()


def _state_dict(torch_model, prefix: str = "") -> dict[str, np.ndarray]:
  # transformers 5 drops the `text_model.` / `vision_model.` prefix of a standalone tower (its
  # files from save_pretrained lack it too); checkpoints written by transformers 4 carry it.
  return {prefix + k: _np(v) for k, v in torch_model.state_dict().items()}


def _load(model, torch_model, *inputs, prefix: str = ""):
  abstract = jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"]
  return {"params": weights.state_dict_to_params(_state_dict(torch_model, prefix), abstract)}


def _maxdiff(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


def _token_ids(eos: int, lengths=(16, 9, 5), seed=0) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded rows `bos tokens... eos pad...`, padded with eos as SD's tokenizer does."""
  rng = np.random.default_rng(seed)
  t = max(lengths)
  ids = rng.integers(3, 90, size=(len(lengths), t))
  ids[ids == eos] = eos + 1
  mask = np.zeros_like(ids)
  for i, n in enumerate(lengths):
    ids[i, 0] = TEXT["bos_token_id"]
    ids[i, n - 1:] = eos
    mask[i, :n] = 1
  return ids, mask


def _torch_text(**overrides):
  torch.manual_seed(0)
  cfg = transformers.CLIPTextConfig(**{**TEXT, **overrides})
  return transformers.CLIPTextModel(cfg).eval()


@pytest.mark.parametrize(
    "hidden_act, eos_token_id, eot",
    [
        # SD 1.x / 2.x configs say eos_token_id=2: legacy pooling at argmax(input_ids), which finds
        # the end-of-text token because it is the highest id of the vocabulary (98 here).
        ("quick_gelu", 2, 98),
        # Pooling at the first eos_token_id; 60 is not the highest id, so argmax would pick wrong.
        ("gelu", 60, 60),
        ("gelu_new", 60, 60),
    ],
)
def test_text_model_matches_transformers(hidden_act, eos_token_id, eot):
  tm = _torch_text(hidden_act=hidden_act, eos_token_id=eos_token_id)
  cfg = clip.CLIPTextConfig.from_dict(tm.config.to_dict())
  model = clip.CLIPTextModel(cfg)
  ids, mask = _token_ids(eos=eot)
  first_eot = np.argmax(ids == eot, axis=-1)
  assert (np.argmax(ids, axis=-1) == first_eot).all() == (eot == 98)  # the two rules differ here
  variables = _load(model, tm, ids, prefix="text_model.")

  for attention_mask in (None, mask):
    tmask = None if attention_mask is None else torch.from_numpy(attention_mask)
    with torch.no_grad():
      ref = tm(torch.from_numpy(ids), attention_mask=tmask, output_hidden_states=True)
      ref_skip1 = tm.final_layer_norm(ref.hidden_states[-2])
    out = model.apply(variables, ids, attention_mask)
    assert len(out.hidden_states) == len(ref.hidden_states) == cfg.num_hidden_layers + 1
    diffs = {
        "last_hidden_state":
            _maxdiff(out.last_hidden_state, _np(ref.last_hidden_state)),
        "pooler_output":
            _maxdiff(out.pooler_output, _np(ref.pooler_output)),
        "hidden_states":
            max(_maxdiff(a, _np(b)) for a, b in zip(out.hidden_states, ref.hidden_states)),
        "clip_skip=1":
            _maxdiff(model.apply(variables, ids, attention_mask, clip_skip=1, method="encode_prompt"), _np(ref_skip1)),
        "clip_skip=0":
            _maxdiff(
                model.apply(variables, ids, attention_mask, clip_skip=0, method="encode_prompt"),
                _np(ref.last_hidden_state),
            ),
    }
    print(hidden_act, eos_token_id, "mask" if attention_mask is not None else "no mask", diffs)
    assert max(diffs.values()) <= TOL, diffs


def test_text_model_with_projection_matches_transformers(tmp_path):
  """CLIPTextModelWithProjection (SDXL's text_encoder_2): text_embeds = text_projection(pooled), no bias,
  and the hidden states SDXL reads (the penultimate layer, no final layer norm); then its folder loads as
  that class by its config's "architectures" and saves back to what transformers loads unchanged."""
  from jaxsd import pretrained

  torch.manual_seed(0)
  tm = transformers.CLIPTextModelWithProjection(
      transformers.CLIPTextConfig(**TEXT, hidden_act="gelu", eos_token_id=60, projection_dim=24)).eval()
  ids, mask = _token_ids(eos=60)
  with torch.no_grad():
    ref = tm(torch.from_numpy(ids), output_hidden_states=True)
  tm.save_pretrained(tmp_path / "te2")
  model, params = pretrained.load_text_encoder(tmp_path / "te2")
  assert isinstance(model, clip.CLIPTextModelWithProjection) and "bias" not in params["text_projection"]
  out = model.apply({"params": params}, ids)
  diffs = {
      "text_embeds": _maxdiff(out.text_embeds, _np(ref.text_embeds)),
      "last_hidden_state": _maxdiff(out.last_hidden_state, _np(ref.last_hidden_state)),
      "penultimate": _maxdiff(out.hidden_states[-2], _np(ref.hidden_states[-2])),
  }
  print("with projection", diffs)
  assert out.text_embeds.shape == (3, 24) and max(diffs.values()) <= TOL, diffs
  pretrained.save_pretrained(model, params, tmp_path / "back")
  back = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path / "back").eval()
  with torch.no_grad():
    np.testing.assert_array_equal(_np(back(torch.from_numpy(ids)).text_embeds), _np(ref.text_embeds))
  with pytest.raises(weights.WeightLoadError, match="text_projection.weight"):  # the class is not guessed
    pretrained.load_text_encoder(tmp_path / "te2", projection=False)


def test_attention_mask_changes_the_output():
  """Guards the masked parity check above against a mask that is silently ignored."""
  tm = _torch_text(eos_token_id=98)
  model = clip.CLIPTextModel(clip.CLIPTextConfig.from_dict(tm.config.to_dict()))
  ids, mask = _token_ids(eos=98)
  variables = _load(model, tm, ids, prefix="text_model.")
  with_mask = model.apply(variables, ids, mask).last_hidden_state
  without = model.apply(variables, ids).last_hidden_state
  # Rows 1 and 2 are padded: their padded positions see fewer keys with the mask.
  assert _maxdiff(with_mask[1:], without[1:]) > 1e-2
  assert _maxdiff(with_mask[0], without[0]) == 0.0


def _pixels(n=2, seed=1) -> np.ndarray:
  size = VISION["image_size"]
  return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)  # NHWC


def test_vision_model_matches_transformers():
  torch.manual_seed(0)
  tm = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION, hidden_act="gelu")).eval()
  model = clip.CLIPVisionModel(clip.CLIPVisionConfig.from_dict(tm.config.to_dict()))
  px = _pixels()
  variables = _load(model, tm, px, prefix="vision_model.")
  with torch.no_grad():
    ref = tm(torch.from_numpy(px.transpose(0, 3, 1, 2)), output_hidden_states=True)
  out = model.apply(variables, px)
  assert len(out.hidden_states) == len(ref.hidden_states) == VISION["num_hidden_layers"] + 1
  diffs = {
      "last_hidden_state": _maxdiff(out.last_hidden_state, _np(ref.last_hidden_state)),
      "pooler_output": _maxdiff(out.pooler_output, _np(ref.pooler_output)),
      "hidden_states": max(_maxdiff(a, _np(b)) for a, b in zip(out.hidden_states, ref.hidden_states)),
  }
  print("vision", diffs)
  assert max(diffs.values()) <= TOL, diffs


def test_vision_model_with_projection_matches_transformers(tmp_path):
  """CLIPVisionModelWithProjection (an IP-Adapter's image encoder): image_embeds = visual_projection(pooled), no
  bias, and the penultimate hidden states (IP-Adapter Plus reads them); its transformers folder loads with
  `pretrained.load_image_encoder` and saves back to what transformers loads unchanged."""
  from jaxsd import pretrained

  torch.manual_seed(0)
  tm = transformers.CLIPVisionModelWithProjection(
      transformers.CLIPVisionConfig(**VISION, hidden_act="gelu", projection_dim=24)).eval()
  px = _pixels()
  with torch.no_grad():
    ref = tm(torch.from_numpy(px.transpose(0, 3, 1, 2)), output_hidden_states=True)
  tm.save_pretrained(tmp_path / "encoder")
  model, params = pretrained.load_image_encoder(tmp_path / "encoder")
  assert isinstance(model, clip.CLIPVisionModelWithProjection) and "bias" not in params["visual_projection"]
  out = model.apply({"params": params}, px)
  diffs = {
      "image_embeds": _maxdiff(out.image_embeds, _np(ref.image_embeds)),
      "last_hidden_state": _maxdiff(out.last_hidden_state, _np(ref.last_hidden_state)),
      "penultimate": _maxdiff(out.hidden_states[-2], _np(ref.hidden_states[-2])),
  }
  print("vision with projection", diffs)
  assert out.image_embeds.shape == (2, 24) and max(diffs.values()) <= TOL, diffs
  pretrained.save_pretrained(model, params, tmp_path / "back")
  back = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path / "back").eval()
  with torch.no_grad():
    np.testing.assert_array_equal(_np(back(torch.from_numpy(px.transpose(0, 3, 1, 2))).image_embeds),
                                  _np(ref.image_embeds))


def _torch_clip():
  torch.manual_seed(0)
  cfg = transformers.CLIPConfig(text_config={
      **TEXT, "eos_token_id": 98
  }, vision_config=VISION, projection_dim=16, logit_scale_init_value=2.0)
  return transformers.CLIPModel(cfg).eval()


def test_clip_model_matches_transformers():
  tm = _torch_clip()
  model = clip.CLIPModel(clip.CLIPConfig.from_dict(tm.config.to_dict()))
  ids, mask = _token_ids(eos=98)
  px = _pixels(n=2)
  variables = _load(model, tm, ids, px)
  t_ids, t_mask, t_px = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(px.transpose(0, 3, 1, 2))
  with torch.no_grad():
    ref = tm(input_ids=t_ids, pixel_values=t_px, attention_mask=t_mask)
    ref_text = tm.get_text_features(input_ids=t_ids, attention_mask=t_mask).pooler_output
    ref_image = tm.get_image_features(pixel_values=t_px).pooler_output
    ref_text_tower = tm.text_model(input_ids=t_ids, attention_mask=t_mask)
  out = model.apply(variables, ids, px, mask)
  diffs = {
      "logits_per_image": _maxdiff(out.logits_per_image, _np(ref.logits_per_image)),
      "logits_per_text": _maxdiff(out.logits_per_text, _np(ref.logits_per_text)),
      "text_embeds": _maxdiff(out.text_embeds, _np(ref.text_embeds)),
      "image_embeds": _maxdiff(out.image_embeds, _np(ref.image_embeds)),
      "text_tower": _maxdiff(out.text_model_output.last_hidden_state, _np(ref_text_tower.last_hidden_state)),
      "get_text_features": _maxdiff(model.apply(variables, ids, mask, method="get_text_features"), _np(ref_text)),
      "get_image_features": _maxdiff(model.apply(variables, px, method="get_image_features"), _np(ref_image)),
  }
  print("clip", diffs)
  assert max(diffs.values()) <= TOL, diffs
  assert out.logits_per_image.shape == (2, 3)


def test_clip_model_from_scratch_init_loads_into_transformers():
  """Fresh init: finite, reference-like scales, and it converts back into the torch model strictly."""
  tm = _torch_clip()
  model = clip.CLIPModel(clip.CLIPConfig.from_dict(tm.config.to_dict()))
  ids, mask = _token_ids(eos=98)
  px = _pixels(n=2)
  variables = jax.jit(model.init)(jax.random.key(42), ids, px, mask)
  p = variables["params"]
  assert float(p["logit_scale"]) == pytest.approx(2.0)
  # transformers' init: q_proj std = d**-0.5 * (2 * layers)**-0.5.
  q = np.asarray(p["text_model"]["encoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"])
  assert np.std(q) == pytest.approx(32**-0.5 * 6**-0.5, rel=0.25)
  out = model.apply(variables, ids, px, mask)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))

  missing, unexpected = tm.load_state_dict(
      {
          k: torch.from_numpy(v.copy()) for k, v in weights.params_to_state_dict(p).items()
      }, strict=True)
  assert not missing and not unexpected
  with torch.no_grad():
    ref = tm(
        input_ids=torch.from_numpy(ids),
        pixel_values=torch.from_numpy(px.transpose(0, 3, 1, 2)),
        attention_mask=torch.from_numpy(mask),
    )
  assert _maxdiff(out.logits_per_text, _np(ref.logits_per_text)) <= TOL


def test_bf16_compute_stays_close_to_fp32():
  tm = _torch_clip()
  cfg = clip.CLIPConfig.from_dict(tm.config.to_dict())
  ids, mask = _token_ids(eos=98)
  px = _pixels(n=2)
  variables = _load(clip.CLIPModel(cfg), tm, ids, px)
  f32 = clip.CLIPModel(cfg).apply(variables, ids, px, mask)
  b16 = clip.CLIPModel(cfg, dtype=jnp.bfloat16).apply(variables, ids, px, mask)
  assert b16.text_model_output.last_hidden_state.dtype == jnp.bfloat16
  assert b16.text_embeds.dtype == jnp.float32  # normalisation and logits stay fp32
  diffs = {
      "text last_hidden_state":
          _maxdiff(b16.text_model_output.last_hidden_state, f32.text_model_output.last_hidden_state),
      "vision pooler_output":
          _maxdiff(b16.vision_model_output.pooler_output, f32.vision_model_output.pooler_output),
      "text_embeds":
          _maxdiff(b16.text_embeds, f32.text_embeds),
      "logits_per_image":
          _maxdiff(b16.logits_per_image, f32.logits_per_image),
  }
  print("bf16 vs fp32", diffs)
  # The hidden states are LayerNorm outputs of unit scale; bf16 keeps ~3 significant digits.
  assert diffs["text last_hidden_state"] < 0.1 and diffs["vision pooler_output"] < 0.1, diffs
  assert diffs["text_embeds"] < 0.02 and diffs["logits_per_image"] < 0.1, diffs


def _fields_equal(ours, hf) -> None:
  for name, value in ours.to_dict().items():
    if name in ("model_type", "text_config", "vision_config"):
      continue
    hv = getattr(hf, name)
    assert (list(value) if isinstance(value, tuple) else value) == hv, (name, value, hv)


def test_config_round_trip_with_transformers(tmp_path):
  hf = _torch_clip().config
  ours = clip.CLIPConfig.from_dict(hf.to_dict())
  assert ours.text_config.eos_token_id == 98 and ours.vision_config.patch_size == 4
  assert ours.projection_dim == 16 and ours.logit_scale_init_value == 2.0

  d = json.loads(json.dumps(ours.to_dict()))  # must survive config.json
  back = transformers.CLIPConfig.from_dict(d)
  _fields_equal(ours, back)
  _fields_equal(ours.text_config, back.text_config)
  _fields_equal(ours.vision_config, back.vision_config)
  assert clip.CLIPConfig.from_dict(d) == ours

  # A standalone text encoder's config.json (the SD `text_encoder/` folder).
  hf.text_config.save_pretrained(tmp_path / "text_encoder")
  text = clip.CLIPTextConfig.from_json(tmp_path / "text_encoder")
  assert text == ours.text_config
  assert transformers.CLIPTextConfig.from_dict(text.to_dict()).to_dict() == hf.text_config.to_dict()
  # The text tower's settings read from a full CLIPModel config.json.
  assert clip.CLIPTextConfig.from_dict(hf.to_dict()) == ours.text_config
  assert clip.CLIPVisionConfig.from_dict(hf.to_dict()) == ours.vision_config


def test_bad_input_raises_clear_errors():
  with pytest.raises(ValueError, match="hidden_act"):
    clip.CLIPTextConfig(hidden_act="relu6").validate()
  with pytest.raises(ValueError, match="multiple of num_attention_heads"):
    clip.CLIPTextConfig.from_dict({**TEXT, "num_attention_heads": 5})
  with pytest.raises(ValueError, match="multiple of patch_size"):
    clip.CLIPVisionConfig.from_dict({**VISION, "image_size": 10})

  cfg = clip.CLIPTextConfig(**TEXT, eos_token_id=98)
  model = clip.CLIPTextModel(cfg)
  ids, _ = _token_ids(eos=98)
  variables = jax.eval_shape(model.init, jax.random.key(0), ids)
  with pytest.raises(ValueError, match="clip_skip"):
    jax.eval_shape(functools.partial(model.apply, clip_skip=4, method="encode_prompt"), variables, ids)
  with pytest.raises(ValueError, match="truncation"):
    jax.eval_shape(model.apply, variables, np.ones((1, 17), np.int32))

  vmodel = clip.CLIPVisionModel(clip.CLIPVisionConfig(**VISION))
  with pytest.raises(ValueError, match="NHWC"):
    jax.eval_shape(vmodel.init, jax.random.key(0), jnp.zeros((1, 3, 12, 12)))
