"""Strict state-dict conversion, on a small module with every kind of layer the networks use."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxsd import model_folder, weights


class TorchBlock(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.norm = torch.nn.GroupNorm(2, 4)
    self.conv1 = torch.nn.Conv2d(4, 6, 3, padding=1)
    self.proj = torch.nn.Linear(6, 5)


class TorchNet(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.token_embedding = torch.nn.Embedding(11, 4)
    self.blocks = torch.nn.ModuleList([TorchBlock(), TorchBlock()])
    self.linear_1 = torch.nn.Linear(5, 3)
    self.to_out = torch.nn.ModuleList([torch.nn.Linear(3, 3, bias=False), torch.nn.Dropout(0.0)])
    self.final_layer_norm = torch.nn.LayerNorm(3)
    self.logit_scale = torch.nn.Parameter(torch.tensor(2.5))

  def forward(self, ids):  # ids: (B, H*W) ints, H=W=2
    x = self.token_embedding(ids)  # B, 4 (HW), 4 (C)
    b = x.shape[0]
    x = x.transpose(1, 2).reshape(b, 4, 2, 2)
    for blk in self.blocks:
      h = blk.conv1(blk.norm(x))  # B,6,2,2
      h = blk.proj(h.mean((2, 3)))  # B,5
      x = x + h[:, :4, None, None]
    y = self.linear_1(h)
    y = self.to_out[0](y)
    return self.final_layer_norm(y) * self.logit_scale.exp()


class Block(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = nn.GroupNorm(num_groups=2, epsilon=1e-5, name="norm")(x)
    h = nn.Conv(6, (3, 3), padding=1, name="conv1")(h)
    return nn.Dense(5, name="proj")(h.mean((1, 2)))


class FlaxNet(nn.Module):

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(11, 4, name="token_embedding")(ids)  # B, 4, 4
    b = x.shape[0]
    x = x.reshape(b, 2, 2, 4)  # NHWC, same element order as torch's (B, C, H, W) view
    for i in range(2):
      h = Block(name=f"blocks_{i}")(x)
      x = x + h[:, None, None, :4]
    y = nn.Dense(3, name="linear_1")(h)
    y = nn.Dense(3, use_bias=False, name="to_out_0")(y)
    y = nn.LayerNorm(epsilon=1e-5, name="final_layer_norm")(y)
    return y * jnp.exp(self.param("logit_scale", nn.initializers.zeros, ()))


def _torch_state(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def nets():
  torch.manual_seed(0)
  tnet = TorchNet()
  with torch.no_grad():
    for p in tnet.parameters():
      p.add_(0.1 * torch.randn_like(p))
  fnet = FlaxNet()
  ids = np.array([[1, 5, 7, 10], [0, 2, 3, 4]])
  abstract = jax.eval_shape(fnet.init, jax.random.key(0), ids)["params"]
  return tnet, fnet, ids, abstract


def test_key_renames_round_trip():
  for key in [
      "down_blocks.0.resnets.1.conv1.weight", "time_embedding.linear_1.bias",
      "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.weight", "text_model.encoder.layers.11.mlp.fc2.bias",
      "logit_scale"
  ]:
    path = weights.torch_key_to_path(key)
    leaf = "kernel" if path[-1] == "weight" else path[-1]
    assert weights.path_to_torch_key(path[:-1] + (leaf,)) == key
  assert weights.torch_key_to_path("down_blocks.0.resnets.1.conv1.weight") == ("down_blocks_0", "resnets_1", "conv1",
                                                                               "weight")


def test_converted_model_matches_torch(nets):
  tnet, fnet, ids, abstract = nets
  params = weights.state_dict_to_params(_torch_state(tnet), abstract)
  ours = np.asarray(fnet.apply({"params": params}, ids))
  ref = tnet(torch.from_numpy(ids)).detach().numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)
  # And back: the exact same tensors, in torch layout.
  back = weights.params_to_state_dict(params)
  ref_sd = _torch_state(tnet)
  assert set(back) == set(ref_sd)
  for k in ref_sd:
    assert back[k].shape == ref_sd[k].shape, k  # 0-d parameters (logit_scale) stay 0-d
    np.testing.assert_array_equal(back[k], ref_sd[k])


def test_dtype_cast(nets):
  tnet, _, _, abstract = nets
  params = weights.state_dict_to_params(_torch_state(tnet), abstract, dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def test_strict_errors_name_every_key(nets):
  tnet, _, _, abstract = nets
  sd = _torch_state(tnet)
  del sd["blocks.1.conv1.bias"]
  sd["blocks.0.extra.weight"] = np.zeros(3, np.float32)
  sd["linear_1.weight"] = np.zeros((4, 5), np.float32)
  with pytest.raises(weights.WeightLoadError) as e:
    weights.state_dict_to_params(sd, abstract)
  msg = str(e.value)
  assert "missing keys (1)" in msg and "blocks.1.conv1.bias" in msg
  assert "unexpected keys (1)" in msg and "blocks.0.extra.weight" in msg
  assert "shape mismatches (1)" in msg and "linear_1.weight: checkpoint (5, 4) (flax layout), model (5, 3)" in msg
  # A mismatched key is reported once, as a mismatch, not also as missing.
  assert msg.count("linear_1.weight") == 1


def test_buffers_are_ignored(nets):
  tnet, _, _, abstract = nets
  sd = _torch_state(tnet)
  sd["token_embedding.position_ids"] = np.arange(4)[None]
  weights.state_dict_to_params(sd, abstract)


def test_safetensors_files_and_pickle_refusal(nets, tmp_path):
  tnet, fnet, ids, abstract = nets
  sd = _torch_state(tnet)
  model_folder.write_safetensors(sd, str(tmp_path / "model.safetensors"))
  lazy = model_folder.read_state_dict(str(tmp_path))
  params = weights.state_dict_to_params(lazy, abstract)
  np.testing.assert_array_equal(np.asarray(params["linear_1"]["kernel"]), sd["linear_1.weight"].T)

  pickled = tmp_path / "pickled"
  pickled.mkdir()
  torch.save(tnet.state_dict(), pickled / "pytorch_model.bin")
  (pickled / "pytorch_model.bin").rename(pickled / "model.bin")
  with pytest.raises(ValueError, match="allow_pickle=True"):
    model_folder.read_state_dict(str(pickled))
  sd_bin = model_folder.read_state_dict(str(pickled), allow_pickle=True)
  params_bin = weights.state_dict_to_params(sd_bin, abstract)
  np.testing.assert_array_equal(np.asarray(params_bin["logit_scale"]), sd["logit_scale"])


def test_missing_folder_and_weights(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    model_folder.find_weight_files(str(tmp_path / "nope"))
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="no weights found.*config.json"):
    model_folder.find_weight_files(str(tmp_path))


def test_long_key_lists_are_cut_at_twenty(nets):
  """A wrong config mismatches every key of a network: the message (one line on the command line) used to list
  them all, 86 of them in 8,000 characters."""
  tnet, _, _, abstract = nets
  sd = _torch_state(tnet)
  sd.update({f"extra.{i:02d}.weight": np.zeros(3, np.float32) for i in range(25)})
  with pytest.raises(weights.WeightLoadError) as e:
    weights.state_dict_to_params(sd, abstract)
  msg = str(e.value)
  assert "unexpected keys (25)" in msg and "extra.19.weight" in msg and "extra.20.weight" not in msg
  assert "... (25 in all)" in msg
