"""The package's layering: the core never reaches up into families, apps, benchmarks or launch.

  core         moe_jax/*.py (the layer, replicas, replication, predictors, collectives, ...)
  nn           moe_jax/nn: Flax modules over the core; the core never imports them
  sim          moe_jax/sim: traces -> costs; no model, no benchmark harness
  checkpoints  moe_jax/checkpoints: generic IO; a family's key table is passed in, never imported

Two checks per layer: each layer is imported in a fresh interpreter and `sys.modules` is searched
for what it must not have pulled in (what really happens at import time), and every `import`
statement of the layer's files, including function-level ones, is scanned (what could happen
later, when a lazily imported function runs).
"""

import ast
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "moe_jax"

CORE = ("moe_jax", "moe_jax.config", "moe_jax.routing", "moe_jax.placement", "moe_jax.permute",
        "moe_jax.experts", "moe_jax.experts_cpu", "moe_jax.gmm_vjp", "moe_jax.grouped_matmul",
        "moe_jax.collectives",
        "moe_jax.layer_body", "moe_jax.moe_layer", "moe_jax.replicas", "moe_jax.moe_fn",
        "moe_jax.predictor", "moe_jax.seed_predictor", "moe_jax.replication",
        "moe_jax.replication_state", "moe_jax.layer_records", "moe_jax.metrics", "moe_jax.mesh",
        "moe_jax.reference", "moe_jax.distributed", "moe_jax.host_memory", "moe_jax.eplb",
        "moe_jax.expert_counts")
CORE_FORBIDDEN = ("moe_jax.models", "moe_jax.app", "moe_jax.bench", "moe_jax.checkpoints",
                  "moe_jax.nn", "launch")
NN_FORBIDDEN = ("moe_jax.models", "moe_jax.app", "moe_jax.bench", "moe_jax.checkpoints", "launch")
SIM_FORBIDDEN = ("moe_jax.models", "moe_jax.bench")
CHECKPOINTS_FORBIDDEN = ("moe_jax.models",)

# (case, modules to import (a package name ending in ".*": it and all its submodules),
#  forbidden packages, the files whose import statements are scanned)
CASES = {
    "core": (CORE, CORE_FORBIDDEN, sorted(PACKAGE.glob("*.py"))),
    "sim": (("moe_jax.sim.*",), SIM_FORBIDDEN, sorted((PACKAGE / "sim").glob("*.py"))),
    "checkpoints": (("moe_jax.checkpoints.*",), CHECKPOINTS_FORBIDDEN,
                    sorted((PACKAGE / "checkpoints").glob("*.py"))),
    "nn": (("moe_jax.nn.*",), NN_FORBIDDEN, sorted((PACKAGE / "nn").glob("*.py"))),
}

_PROBE = textwrap.dedent("""
    import importlib, json, pkgutil, sys
    targets, forbidden = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    for name in targets:
      if name.endswith(".*"):
        package = importlib.import_module(name[:-2])
        for info in pkgutil.iter_modules(package.__path__):
          importlib.import_module(f"{package.__name__}.{info.name}")
      else:
        importlib.import_module(name)
    bad = sorted(m for m in sys.modules
                 if any(m == f or m.startswith(f + ".") for f in forbidden))
    print(json.dumps(bad))
""")


def _forbidden(name, forbidden):
  return any(name == f or name.startswith(f + ".") for f in forbidden)


@pytest.mark.parametrize("case", sorted(CASES))
def test_importing_a_layer_pulls_in_nothing_above_it(case):
  targets, forbidden, _ = CASES[case]
  proc = subprocess.run(
      [sys.executable, "-c", _PROBE, json.dumps(list(targets)), json.dumps(list(forbidden))],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"),
      capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  imported = json.loads(proc.stdout.strip().splitlines()[-1])
  assert not imported, f"importing {case} imported {imported}"


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
  parts = path.relative_to(root).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_names(path: pathlib.Path, root: pathlib.Path = ROOT):
  """(line, module name) for every import statement in the file, at any depth; `from a import b`
  yields both a and a.b (b may be a submodule); relative imports are resolved (`root` holds the
  top-level package)."""
  module = _module_name(path, root)
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
      yield node.lineno, base
      for alias in node.names:
        yield node.lineno, f"{base}.{alias.name}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_import_statement_reaches_above_the_layer(case):
  _, forbidden, files = CASES[case]
  assert files, f"no files found for {case}"
  violations = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                for path in files for line, name in _imported_names(path)
                if _forbidden(name, forbidden)]
  assert not violations, "\n".join(violations)


def test_the_scan_sees_function_level_and_relative_imports(tmp_path):
  """The static scan is only as strong as what it parses: a lazy import inside a function and a
  relative import both count."""
  path = tmp_path / "moe_jax" / "sim" / "probe.py"
  path.parent.mkdir(parents=True)
  path.write_text("def f():\n  from moe_jax.models import moe_stack\n\n"
                  "from .. import bench\nfrom .cost import layer_cost\n")
  names = set(_imported_names(path, tmp_path))
  assert {(2, "moe_jax.models"), (2, "moe_jax.models.moe_stack")} <= names
  assert {(4, "moe_jax"), (4, "moe_jax.bench"), (5, "moe_jax.sim.cost")} <= names
