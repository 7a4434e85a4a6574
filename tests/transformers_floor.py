"""jaxsd/tokenizer.py (without jax) under whatever transformers this interpreter has: `.ci/transformers-floor`
runs it with the oldest transformers pyproject.toml allows. Not a pytest module (it needs its own venv).

  python tests/transformers_floor.py REPO_ROOT
"""
import importlib.util
import json
import os
import sys
import tempfile

import numpy as np
import transformers

spec = importlib.util.spec_from_file_location("jaxsd_tokenizer", os.path.join(sys.argv[1], "jaxsd", "tokenizer.py"))
tok = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tok)
t = tok.load_tokenizer()
ids = tok.tokenize(t, ["a photo of a cat"])
assert list(ids[0, :7]) == [49406, 320, 1125, 539, 320, 2368, 49407] and ids[0, 7] == 49407, ids[0, :9]
d = tempfile.mkdtemp()
tok.save_tokenizer(t, d)
t2 = tok.load_tokenizer(d)
assert (tok.tokenize(t2, ["a photo of a cat"]) == ids).all()
# SD 2.x folder: pad "!"
sd2 = os.path.join(d, "sd2", "tokenizer")
os.makedirs(sd2)
t.backend_tokenizer.model.save(sd2)
json.dump(
    {
        "pad_token": "!",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>"
    }, open(os.path.join(sd2, "tokenizer_config.json"), "w"))
t3 = tok.load_tokenizer(os.path.dirname(sd2))
want = transformers.CLIPTokenizer.from_pretrained(sd2)(["a cat"], padding="max_length", max_length=77,
                                                       truncation=True)["input_ids"]
assert (tok.tokenize(t3, ["a cat"]) == np.asarray(want)).all() and want[0][4] == 0
print("jaxsd tokenizer OK with transformers", transformers.__version__)
