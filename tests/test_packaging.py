"""pyproject.toml against the code: every third-party import declared, console scripts that resolve, and a
missing test dependency that fails the run instead of skipping the parity tests."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import os
import re
import subprocess
import sys

try:
  import tomllib
except ImportError:  # Python 3.10
  import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_PARTY = {"jaxsd", "train", "sample", "tests"}
# Imported by the package only where an optional feature needs it (and said there): reading pickled .bin
# checkpoints (torch, in the test extra); TFDS's tfrecord format (tensorflow, the `tensorflow` extra).
OPTIONAL = {"torch", "tensorflow"}


def _pyproject() -> dict:
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def _canonical(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(reqs: list[str]) -> set[str]:
  return {_canonical(re.match(r"[A-Za-z0-9_.\-]+", r).group(0)) for r in reqs}


def _imports(*folders: str) -> dict[str, str]:
  """Top-level module -> a file that imports it, over every .py file under `folders`."""
  out = {}
  for folder in folders:
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
      for name in files:
        if name.endswith(".py"):
          path = os.path.join(dirpath, name)
          with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
          for node in ast.walk(tree):
            if isinstance(node, ast.Import):
              mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
              mods = [node.module]
            else:
              continue
            for m in mods:
              out.setdefault(m.split(".")[0], os.path.relpath(path, ROOT))
  return out


def _undeclared(modules: dict[str, str], declared: set[str]) -> list[str]:
  dists = importlib.metadata.packages_distributions()
  bad = []
  for module, where in sorted(modules.items()):
    if module in sys.stdlib_module_names or module in FIRST_PARTY or module == "__future__":
      continue
    names = {_canonical(d) for d in dists.get(module, [module])}
    if not names & declared:
      bad.append(f"{module} (imported in {where}; distribution {sorted(names)})")
  return bad


def test_every_third_party_import_of_the_package_is_a_dependency():
  project = _pyproject()["project"]
  declared = _requirement_names(project["dependencies"])
  modules = {m: w for m, w in _imports("jaxsd", "train", "sample").items() if m not in OPTIONAL}
  assert not _undeclared(modules, declared)


def test_every_third_party_import_of_the_tests_is_a_test_dependency():
  project = _pyproject()["project"]
  declared = _requirement_names(project["dependencies"] + project["optional-dependencies"]["test"])
  assert not _undeclared(_imports("tests"), declared)


def test_console_scripts_resolve_to_the_entry_points():
  pyproject = _pyproject()
  scripts = pyproject["project"]["scripts"]
  assert scripts == {"jaxsd-train": "train.__main__:cli", "jaxsd-sample": "sample.__main__:cli"}
  include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
  for target in scripts.values():
    module, func = target.split(":")
    assert any(re.fullmatch(p.replace("*", ".*"), module.split(".")[0]) for p in include), (module, include)
    assert callable(getattr(importlib.import_module(module), func))


def test_transformers_floor_is_what_the_tokenizer_needs():
  # CLIPTokenizer(vocab=..., merges=...) and tokenizer.backend_tokenizer exist from transformers 5.0
  # (in 4.x CLIPTokenizer is the slow class, whose constructor takes vocab_file / merges_file).
  # .ci/transformers-floor runs the tokenizer under exactly the floor (5.0.0 passed; 4.57.6 fails).
  floor = [r for r in _pyproject()["project"]["dependencies"] if _canonical(r).startswith("transformers")]
  assert floor == ["transformers>=5.0"]


def test_a_missing_reference_module_fails_the_run(tmp_path):
  # A test that importorskips a module that is not there: with the project's conftest the run fails.
  (tmp_path / "test_x.py").write_text("import pytest\n\ndef test_x():\n  pytest.importorskip('no_such_module_xyz')\n")
  env = dict(os.environ, PYTHONPATH=ROOT)
  r = subprocess.run([
      sys.executable, "-m", "pytest", "-q", "-c",
      os.path.join(ROOT, "pyproject.toml"), "-p", "tests.conftest", "-p", "no:cacheprovider",
      str(tmp_path / "test_x.py")
  ], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1, r.stdout + r.stderr
  assert "skipped because a module could not be imported" in r.stdout
  assert "SKIPPED" in r.stdout  # -rs names it
