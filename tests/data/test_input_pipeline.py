"""Tests for the grain input pipeline on a tiny prepared `shapes` and a tiny image folder."""

from __future__ import annotations

import io
import json
import shutil

from etils import epath
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from jaxsd import tokenizer as tokenizer_lib
from jaxsd.data import input_pipeline, shapes
from jaxsd.data.image_folder import prepare_image_folder

NUM_TRAIN, NUM_TEST = 200, 40


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizer_lib.load_tokenizer()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
  data_dir = tmp_path_factory.mktemp("tfds")
  name, builder = shapes.prepare_shapes(str(data_dir), num_train=NUM_TRAIN, num_test=NUM_TEST)

  def make(**kwargs):
    kwargs = {"global_batch_size": 16, "data_dir": str(data_dir), "tokenizer": tokenizer, "num_threads": 2, **kwargs}
    return input_pipeline.make_dataset(kwargs.pop("dataset", name), **kwargs)

  return make, name, builder, data_dir


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _key(batch):  # identifies examples: a fingerprint of each image
  return [hash(img.tobytes()) for img in batch["image"]]


def test_batch_contents(tiny, tokenizer):
  make, *_ = tiny
  pipeline = make(label_keys=("shape", "color", "position"), return_captions=True)
  assert pipeline.batch_size == 16 and pipeline.num_examples == NUM_TRAIN
  batch = next(iter(pipeline))
  assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.float32
  assert -1.0 <= batch["image"].min() < -0.5 and 0.5 < batch["image"].max() <= 1.0
  assert batch["input_ids"].shape == (16, 77) and batch["input_ids"].dtype == np.int32
  np.testing.assert_array_equal(batch["input_ids"], tokenizer_lib.tokenize(tokenizer, list(batch["caption"])))
  for key in ("shape", "color", "position"):
    assert batch[key].shape == (16,) and batch[key].dtype == np.int32
  for caption, color, shape in zip(batch["caption"], batch["color"], batch["shape"]):
    assert shapes.COLORS[color] in caption and shapes.SHAPES[shape] in caption


def test_training_repeats_and_reshuffles(tiny):
  make, *_ = tiny
  steps_per_epoch = NUM_TRAIN // 16  # 12; the 8 left over start the next epoch
  batches = _take(iter(make(seed=3)), 2 * steps_per_epoch + 2)
  keys = [k for b in batches for k in _key(b)]
  first, second = keys[:NUM_TRAIN], keys[NUM_TRAIN:2 * NUM_TRAIN]
  assert len(set(first)) > 0.95 * NUM_TRAIN  # one epoch: each example once
  assert set(first) == set(second) and first != second  # same examples, new order
  again = _take(iter(make(seed=3)), 2)
  other = _take(iter(make(seed=4)), 2)
  assert _key(again[0]) == keys[:16] and _key(other[0]) != keys[:16]


def test_batch_of_one(tiny):
  """global_batch_size=1 (DreamBooth's default in diffusers; a one-image folder) trains: grain's length of an
  endless order batched by one overflowed unless the remainder is dropped (nothing is dropped from an endless
  order: the batches are those of a batch of two, one by one)."""
  make, *_ = tiny
  ones = _take(iter(make(global_batch_size=1, seed=5)), 4)
  twos = _take(iter(make(global_batch_size=2, seed=5)), 2)
  assert all(b["image"].shape == (1, 32, 32, 3) for b in ones)
  assert [k for b in ones for k in _key(b)] == [k for b in twos for k in _key(b)]


def test_prepared_fingerprint_changes_when_the_data_is_prepared_again(tmp_path, tokenizer):
  """What the latent cache keys on: the same for the same prepared files, another after the folder is prepared
  again with other captions (a stale cache trained on the old data)."""
  root = tmp_path / "imgs"
  root.mkdir()
  for i in range(3):
    Image.fromarray(np.full((8, 8, 3), 50 * i, np.uint8)).save(root / f"{i}.png")
    (root / f"{i}.txt").write_text(f"grey {i}")
  data_dir = str(tmp_path / "tfds")
  name, _ = prepare_image_folder(root, data_dir)
  info = lambda: input_pipeline.make_dataset(
      name,
      global_batch_size=1,
      data_dir=data_dir,
      image_size=8,  # noqa: E731
      tokenizer=tokenizer).info
  first = input_pipeline.prepared_fingerprint(info())
  assert input_pipeline.prepared_fingerprint(info()) == first
  (root / "0.txt").write_text("another caption")
  prepare_image_folder(root, data_dir, overwrite=True)
  assert input_pipeline.prepared_fingerprint(info()) != first
  assert input_pipeline.split_names(name, data_dir) == ["train"]


def test_eval_is_one_ordered_pass(tiny):
  make, _, builder, _ = tiny
  full = list(make(split="test", train=False, drop_remainder=False, label_keys=("color",)))
  assert [len(b["color"]) for b in full] == [16, 16, 8]
  colors = np.concatenate([b["color"] for b in full])
  source = builder.as_data_source(split="test")
  np.testing.assert_array_equal(colors, [source[i]["color"] for i in range(NUM_TEST)])
  assert len(list(make(split="test", train=False))) == NUM_TEST // 16


def test_hosts_read_disjoint_shards(tiny):
  make, *_ = tiny
  keys = []
  for index in range(2):
    pipeline = make(split="test", train=False, global_batch_size=8, process_index=index, process_count=2)
    assert pipeline.batch_size == 4 and pipeline.num_examples == NUM_TEST // 2
    keys.append({k for b in pipeline for k in _key(b)})
  assert len(keys[0]) == len(keys[1]) == NUM_TEST // 2 and not keys[0] & keys[1]


def test_training_batches_do_not_depend_on_the_host_count(tiny):
  """Two hosts' training batches, side by side, are one host's batches of the same global size (crops,
  flips and caption choices included): multi-host training sees the data single-host training sees."""
  make, *_ = tiny
  kw = dict(global_batch_size=16, seed=5, random_flip=True, random_crop=True, image_size=24, label_keys=("color",))
  one = _take(iter(make(**kw)), NUM_TRAIN // 16 + 2)  # into the second epoch
  hosts = [_take(iter(make(process_index=i, process_count=2, **kw)), NUM_TRAIN // 16 + 2) for i in range(2)]
  for b, (h0, h1) in enumerate(zip(*hosts)):
    assert len(h0["color"]) == len(h1["color"]) == 8
    for key in ("image", "input_ids", "color"):
      np.testing.assert_array_equal(np.concatenate([h0[key], h1[key]]), one[b][key], err_msg=f"batch {b} {key}")


def test_resume_from_iterator_state(tiny):
  make, *_ = tiny
  pipeline = make(random_flip=True, random_crop=True, image_size=24, seed=7)
  iterator = iter(pipeline)
  _take(iterator, 5)
  state = iterator.get_state()
  expected = _take(iterator, 3)
  restored = iter(make(random_flip=True, random_crop=True, image_size=24, seed=7))
  restored.set_state(json.loads(json.dumps(state)))  # survives a JSON round trip
  for want, got in zip(expected, _take(restored, 3)):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  iterator.close()
  restored.close()


def test_flip_swaps_left_and_right(tiny):
  make, *_ = tiny
  args = dict(split="test", label_keys=("position", "color"), return_captions=True, seed=1)
  plain = _take(iter(make(**args)), 2)
  flipped = _take(iter(make(random_flip=True, **args)), 2)
  left, right = shapes.POSITIONS.index("left"), shapes.POSITIONS.index("right")
  n_flipped = 0
  for a, b in zip(plain, flipped):
    for i in range(16):
      if np.array_equal(a["image"][i], b["image"][i]):
        assert a["caption"][i] == b["caption"][i]
        continue
      n_flipped += 1
      np.testing.assert_array_equal(b["image"][i], a["image"][i][:, ::-1])
      swap = {"left": "right", "right": "left"}
      assert b["caption"][i] == " ".join(swap.get(w, w) for w in a["caption"][i].split())
      want = {left: right, right: left}.get(a["position"][i], a["position"][i])
      assert b["position"][i] == want
      # The labelled position still shows the labelled colour.
      cx, cy = shapes.CENTERS[shapes.POSITIONS[b["position"][i]]]
      rgb = (b["image"][i][round(cy * 32 - 0.5), round(cx * 32 - 0.5)] + 1) * 127.5
      assert np.abs(rgb - shapes.RGB[shapes.COLORS[b["color"][i]]]).max() < 25
  assert 4 <= n_flipped <= 28


def test_image_folder_resize_and_crop(tmp_path, tokenizer):
  root = tmp_path / "imgs"
  root.mkdir()
  wide = np.zeros((20, 40, 3), np.uint8)
  wide[:, :6] = 255  # white at the left edge, cropped away by a centre crop
  for i in range(4):
    Image.fromarray(wide).save(root / f"w{i}.png")
    (root / f"w{i}.txt").write_text(f"wide {i}")
  name, _ = prepare_image_folder(root, tmp_path / "tfds")
  common = dict(data_dir=str(tmp_path / "tfds"), global_batch_size=4, tokenizer=tokenizer)
  with pytest.raises(ValueError, match="no single square size.*pass image_size"):
    input_pipeline.make_dataset(name, **common)
  centre = next(iter(input_pipeline.make_dataset(name, image_size=10, train=False, **common)))
  assert centre["image"].shape == (4, 10, 10, 3)
  np.testing.assert_allclose(centre["image"], -1.0, atol=0.05)
  crops = _take(iter(input_pipeline.make_dataset(name, image_size=10, random_crop=True, **common)), 5)
  assert crops[0]["image"].shape == (4, 10, 10, 3)
  has_white = [img.max() > 0.5 for b in crops for img in b["image"]]
  assert any(has_white) and not all(has_white)  # crops at several offsets


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path, tokenizer):
  root = tmp_path / "photos"
  root.mkdir()
  pixels = np.zeros((300, 400, 3), np.uint8)
  pixels[:, :200] = (200, 30, 30)  # left half red, right half blue
  pixels[:, 200:] = (30, 30, 200)
  Image.fromarray(pixels).save(root / "photo.jpg", quality=95)
  (root / "photo.txt").write_text("red and blue")
  name, _ = prepare_image_folder(root, tmp_path / "tfds")
  batch = next(
      iter(
          input_pipeline.make_dataset(name, data_dir=str(tmp_path / "tfds"), global_batch_size=1, image_size=16,
                                      train=False, tokenizer=tokenizer)))
  rgb = (batch["image"][0] + 1) * 127.5
  assert rgb.shape == (16, 16, 3)
  np.testing.assert_allclose(rgb[:, :6], np.broadcast_to([200, 30, 30], (16, 6, 3)), atol=12)
  np.testing.assert_allclose(rgb[:, 10:], np.broadcast_to([30, 30, 200], (16, 6, 3)), atol=12)


class CorruptImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Six images, two of them unreadable bytes."""
  VERSION = tfds.core.Version("1.0.0")
  code_path = epath.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 3)),
            "caption": tfds.features.Text()
        }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(6):
      buffer = io.BytesIO()
      Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(buffer, format="PNG")
      data = buffer.getvalue()
      yield i, {"image": data[:50] if i in (1, 4) else data, "caption": f"grey {i}"}


def test_corrupt_images_are_skipped_and_counted(tmp_path, tokenizer):
  builder = CorruptImages(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  for dataset in (builder, "corrupt_images"):  # a builder, or by name from the files
    pipeline = input_pipeline.make_dataset(dataset, data_dir=str(tmp_path), global_batch_size=2, train=False,
                                           return_captions=True, tokenizer=tokenizer, num_threads=1)
    captions = [c for b in pipeline for c in b["caption"]]
    assert sorted(captions) == ["grey 0", "grey 2", "grey 3", "grey 5"]
    assert pipeline.stats.skipped_images == 2


def test_errors_before_any_work(tiny, tmp_path):
  make, name, _, data_dir = tiny
  with pytest.raises(FileNotFoundError, match=r"not prepared.*prepare_image_folder.*"
                     rf"Prepared there: {name}:1\.1\.0"):
    make(dataset="my_photos")
  with pytest.raises(FileNotFoundError, match="prepare_shapes"):
    make(dataset="shapes/64x64")
  with pytest.raises(FileNotFoundError, match="Prepared there: nothing"):
    make(data_dir=str(tmp_path / "empty"))
  with pytest.raises(KeyError, match=r"caption_key='text'.*'caption', 'color', 'image'"):
    make(caption_key="text")
  with pytest.raises(KeyError, match="label_keys='hue'"):
    make(label_keys=("hue",))
  with pytest.raises(ValueError, match="multiple of the number of processes"):
    make(global_batch_size=9, process_count=2, process_index=0)
  with pytest.raises(ValueError, match="no split 'validation'.*'test', 'train'"):
    make(split="validation")
  with pytest.raises(ValueError, match="fewer than a batch"):
    make(split="test", global_batch_size=64)

  # A dataset prepared as tfrecord (what TFDS writes by default with TensorFlow).
  src = epath.Path(data_dir) / name
  dst = tmp_path / "tf" / name
  shutil.copytree(src, dst)
  info_path = next(dst.glob("*/dataset_info.json"))
  info_path.write_text(info_path.read_text().replace('"array_record"', '"tfrecord"'))
  with pytest.raises(ValueError, match=r"stored as tfrecord.*pip install 'jaxsd\[tensorflow\]'"):
    make(data_dir=str(tmp_path / "tf"))


class MaskedImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Eight 24x40 images, each a white rectangle at a different place on black, with the rectangle as its
  "mask"; the last one's mask has the wrong size."""
  VERSION = tfds.core.Version("1.0.0")
  code_path = epath.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "mask": tfds.features.Image(shape=(None, None, 1)),
            "caption": tfds.features.Text()
        }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(8):
      mask = np.zeros((24, 40), np.uint8)
      mask[3 + i:12 + i, 4 * i:4 * i + 9] = 255
      image = np.repeat(mask[..., None], 3, axis=-1)
      if i == 7:
        mask = mask[:, :30]
      yield i, {"image": _png(image), "mask": _png(mask[..., None]), "caption": f"box {i}"}


def _png(pixels):
  buffer = io.BytesIO()
  Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(buffer, format="PNG")
  return buffer.getvalue()


def test_mask_follows_its_image_through_resize_crop_and_flip(tmp_path, tokenizer):
  """`mask_key`: the mask is resized, cropped (at the image's random place) and flipped with its image, so the
  white box and the mask's box coincide; a mask of another size than its image skips the example."""
  builder = MaskedImages(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  pipeline = input_pipeline.make_dataset(builder, data_dir=str(tmp_path), global_batch_size=7, image_size=16,
                                         mask_key="mask", random_crop=True, random_flip=True, tokenizer=tokenizer,
                                         num_threads=1)
  batches = _take(iter(pipeline), 6)
  assert pipeline.stats.skipped_images >= 1  # the ill-sized mask
  n = 0
  for b in batches:
    assert b["loss_mask"].shape == (7, 16, 16, 1) and b["loss_mask"].dtype == np.float32
    assert 0 <= b["loss_mask"].min() and b["loss_mask"].max() <= 1
    for image, mask in zip(b["image"], b["loss_mask"]):
      white = (image.mean(-1, keepdims=True) + 1) / 2
      assert np.abs(white - mask).max() < 0.2, np.abs(white - mask).max()
      n += (mask > 0.5).any()
  assert n > 10  # boxes inside the crops, not only empty masks
  with pytest.raises(KeyError, match="mask_key='alpha' is not a feature"):
    input_pipeline.make_dataset(builder, data_dir=str(tmp_path), global_batch_size=2, image_size=16, mask_key="alpha",
                                tokenizer=tokenizer)


def test_shapes_mask_marks_the_shape(tiny):
  """shapes' "mask" (1.1.0) is the shape's coverage: where it is 1 the pixel has the labelled colour, where it is
  0 the grey background's low saturation, also when flipped."""
  make, *_ = tiny
  b = next(iter(make(split="test", mask_key="mask", label_keys=("color",), random_flip=True, seed=3)))
  rgb = (b["image"] + 1) * 127.5
  saturation = rgb.max(-1) - rgb.min(-1)
  mask = b["loss_mask"][..., 0]
  for i in range(16):
    inside, outside = mask[i] == 1.0, mask[i] == 0.0
    assert inside.sum() >= 8 and outside.sum() >= 600
    colour = np.asarray(shapes.RGB[shapes.COLORS[b["color"][i]]], np.float32)
    assert np.abs(rgb[i][inside] - colour).max() <= 13  # the colour's jitter is +-12
    assert saturation[i][outside].max() <= 37  # the background's tint is +-18 per channel
