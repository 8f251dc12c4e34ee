"""The package's layering: imports run one way, and no two packages import each other.

Read from the source (every import, at module level or inside a function), so nothing is run.
`python tests/test_layering.py` prints the package graph in dependency order.
"""
from __future__ import annotations

import ast
import pathlib
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'efficientnet_jax'
# The bottom of the layering: the model tables, the scaling rule, our names and the layers.
BOTTOM = {
    'models.variants': {'errors'},
    'models.scaling': {'models.variants'},
    'models.naming': {'models.variants', 'models.scaling'},
    'models.layers': set(),
}


def module_names() -> list[str]:
  return sorted('.'.join(p.relative_to(PACKAGE).with_suffix('').parts).removesuffix('.__init__')
                for p in PACKAGE.rglob('*.py'))


def imports_of(module: str) -> set[str]:
  """The package modules `module` imports: `from efficientnet_jax.x import y` is an import of
  x.y when that is a module, else of x."""
  path = PACKAGE / (module.replace('.', '/') + '.py')
  if not path.exists():
    path = PACKAGE / module.replace('.', '/') / '__init__.py'
  known = set(module_names())
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f'{node.module}.{alias.name}' for alias in node.names]
    else:
      continue
    for name in names:
      if not name.startswith('efficientnet_jax.'):
        continue
      name = name[len('efficientnet_jax.'):]
      while name and name not in known:
        name = name.rpartition('.')[0]
      if name and name != module:
        found.add(name)
  return found


def unit(module: str) -> str:
  """The package a module belongs to: 'models' for models.naming, the module itself at the top."""
  return module.split('.')[0]


def package_graph() -> dict[str, set[str]]:
  graph: dict[str, set[str]] = {}
  for module in module_names():
    if not module:
      continue
    graph.setdefault(unit(module), set()).update(
        unit(m) for m in imports_of(module) if unit(m) != unit(module))
  return graph


def topological_order(graph: dict[str, set[str]]) -> list[str]:
  """Dependencies first; raises ValueError naming a cycle."""
  order, state = [], {}

  def visit(node, stack):
    if state.get(node) == 'done':
      return
    if state.get(node) == 'active':
      cycle = stack[stack.index(node):] + [node]
      raise ValueError('import cycle: ' + ' -> '.join(cycle))
    state[node] = 'active'
    for dep in sorted(graph.get(node, ())):
      visit(dep, stack + [node])
    state[node] = 'done'
    order.append(node)

  for node in sorted(graph):
    visit(node, [])
  return order


def test_no_cycle_between_packages():
  topological_order(package_graph())


def test_no_cycle_between_modules():
  topological_order({m: imports_of(m) - {''} for m in module_names() if m})


@pytest.mark.parametrize('module', sorted(BOTTOM))
def test_bottom_modules_import_nothing_above_them(module):
  assert imports_of(module) <= BOTTOM[module], imports_of(module)


def test_pretrained_weights_do_not_depend_on_the_converters():
  """Training (transfer) and prediction read pretrained directories; converters write them."""
  for module in ('pretrained', 'transfer', 'predict', 'optim'):
    assert not any(unit(m) == 'convert' for m in imports_of(module)), (module, imports_of(module))


def test_models_import_nothing_outside_models_but_cpu_options_and_errors():
  outside = {m for module in module_names() if unit(module) == 'models'
             for m in imports_of(module) if unit(m) != 'models'}
  assert outside <= {'xla_cpu', 'errors'}, outside


if __name__ == '__main__':
  graph = package_graph()
  for name in topological_order(graph):
    print(f'{name:16s} <- {", ".join(sorted(graph.get(name, ()))) or "(nothing)"}')
  sys.exit(0)
