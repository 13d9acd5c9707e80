"""The package's layers, read from its source: imports go one way, core -> train loop and
API -> jobs, with no cycle and no project import inside a function; model code never sees
ml_collections; only checkpoint.py touches orbax; nothing edits sys.path."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "blt_jax"
CORE = 0
# Every module above the core, by layer; the rest of blt_jax is core.
LAYERS = {"blt_jax.train": 1, "blt_jax.api": 1,
          "blt_jax.config_files": 2, "blt_jax.jobs": 3}
TOP = 4  # blt_jax/__init__.py: the public API it exports


def module_name(path: Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
  if module == "blt_jax":
    return TOP
  while module:
    if module in LAYERS:
      return LAYERS[module]
    module = module.rpartition(".")[0]
  return CORE


def resolve(module: str, name: str | None) -> str:
  """`from module import name`: the submodule when `name` is one, else `module`."""
  if name is not None:
    sub = ROOT.joinpath(*f"{module}.{name}".split("."))
    if sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file():
      return f"{module}.{name}"
  return module


def imports_of(tree: ast.AST):
  """(imported project module, whether inside a function, line) of every import."""
  def visit(node, nested):
    for child in ast.iter_child_nodes(node):
      inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, ast.Import):
        for alias in child.names:
          yield alias.name, inner, child.lineno
      elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
        for alias in child.names:
          yield resolve(child.module, alias.name), inner, child.lineno
      yield from visit(child, inner)
  yield from visit(tree, False)


def sources():
  return {module_name(p): (p, ast.parse(p.read_text())) for p in sorted(PACKAGE.rglob("*.py"))}


def project_graph():
  graph = {}
  for module, (path, tree) in sources().items():
    graph[module] = [(m, nested, line) for m, nested, line in imports_of(tree)
                     if m == "blt_jax" or m.startswith("blt_jax.")]
  return graph


def find_cycle(graph: dict) -> list[str] | None:
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for dep, _, _ in graph.get(node, ()):
      if state.get(dep) == "open":
        return stack[stack.index(dep):] + [dep]
      if dep not in state and (cycle := visit(dep)):
        return cycle
    stack.pop()
    state[node] = "done"
    return None

  for node in graph:
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def test_imports_go_one_way_without_cycles():
  graph = project_graph()
  assert len(graph) > 20
  upward = [f"{m}:{line} imports {dep} (layer {layer(dep)} > {layer(m)})"
            for m, deps in graph.items() for dep, _, line in deps if layer(dep) > layer(m)]
  assert not upward, upward
  inside = [f"{m}:{line} imports {dep} inside a function"
            for m, deps in graph.items() for dep, nested, line in deps if nested]
  assert not inside, inside
  assert find_cycle(graph) is None, find_cycle(graph)


def test_the_import_check_sees_cycles_and_upward_imports():
  """The checks above on small graphs that break each rule."""
  assert find_cycle({"a": [("b", False, 1)], "b": [("c", False, 1)], "c": [("a", False, 1)]}) \
      == ["a", "b", "c", "a"]
  assert find_cycle({"a": [("b", False, 1)], "b": []}) is None
  assert layer("blt_jax.jobs.train") > layer("blt_jax.train") > layer("blt_jax.patcher")
  tree = ast.parse("import os\ndef f():\n  from blt_jax import train\n")
  assert [(m, nested) for m, nested, _ in imports_of(tree)] == [("os", False),
                                                                ("blt_jax.train", True)]


@pytest.mark.parametrize("rule", ["models", "orbax", "sys.path"])
def test_what_may_import_what(rule):
  everything = {**sources(), **{p.name: (p, ast.parse(p.read_text())) for p in
                                [ROOT / "launch.py", *ROOT.glob("configs/**/*.py"),
                                 *ROOT.glob("benchmarks/*.py"), *ROOT.glob("scripts/*.py"),
                                 *ROOT.glob("tests/*.py")]}}
  for module, (path, tree) in everything.items():
    imported = {m for m, _, _ in imports_of(tree)}
    if rule == "models" and module.startswith("blt_jax.models"):
      assert not any(m.startswith("ml_collections") for m in imported), module
    if rule == "orbax" and module != "blt_jax.checkpoint":
      assert not any(m.startswith("orbax") for m in imported), module
    if rule == "sys.path" and path.name != "test_layout.py":
      assert "sys.path" not in path.read_text(), path
