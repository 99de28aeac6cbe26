"""The package's structure: imports go only downward through the layers, no module imports
the package's own modules inside a function, and modules stay small."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, 'kforcing_jax')
# Lower layers never import higher ones; modules of one layer may import each other only
# where listed in PEER_OK (training and decoding read data; the pipeline reads the configs).
CORE = ('kforcing_jax.errors', 'kforcing_jax.runtime', 'kforcing_jax.sharding')
LAYERS = {
    'core': 0,
    'kforcing_jax.kernels': 1,
    'kforcing_jax.models': 2,
    'kforcing_jax.data': 3, 'kforcing_jax.training': 3, 'kforcing_jax.decoding': 3,
    'kforcing_jax.serving': 4, 'kforcing_jax.evaluation': 4, 'kforcing_jax.interop': 4,
    'kforcing_jax.configs': 5, 'kforcing_jax.pipeline': 5,
    'kforcing_jax': 6,  # the package's __init__ and its command-line tools
}
PEER_OK = {('kforcing_jax.training', 'kforcing_jax.data'),
           ('kforcing_jax.decoding', 'kforcing_jax.data'),
           ('kforcing_jax.pipeline', 'kforcing_jax.configs')}
MAX_LINES = 500


def _modules():
  for dirpath, _, files in os.walk(PKG):
    for f in files:
      if f.endswith('.py'):
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
        yield rel.removesuffix('.__init__'), path
  for f in os.listdir(os.path.join(ROOT, 'configs')):
    if f.endswith('.py'):
      yield 'kforcing_jax.configs.' + f[:-3].removesuffix('__init__').rstrip('.'), os.path.join(
          ROOT, 'configs', f)


def _group(module: str) -> str:
  parts = module.split('.')
  if '.'.join(parts[:2]) in CORE:
    return 'core'
  if len(parts) >= 2 and '.'.join(parts[:2]) in LAYERS:
    return '.'.join(parts[:2])
  return 'kforcing_jax'


def _imports(tree: ast.AST):
  """(imported kforcing_jax module, line, at module level?) of every import."""
  top = set(id(n) for n in tree.body)
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('kforcing_jax'):
      names = [f'{node.module}.{a.name}' for a in node.names]
    elif isinstance(node, ast.Import):
      names = [a.name for a in node.names if a.name.startswith('kforcing_jax')]
    for name in names:
      yield name, node.lineno, id(node) in top


MODULES = sorted(_modules())


@pytest.mark.parametrize('module,path', MODULES, ids=[m for m, _ in MODULES])
def test_imports_go_down_the_layers(module, path):
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read())
  mine = _group(module)
  for name, line, at_top in _imports(tree):
    where = f'{os.path.relpath(path, ROOT)}:{line} imports {name}'
    assert at_top, f'{where} inside a function (only optional dependencies may be)'
    theirs = _group(name)
    if theirs == mine or mine == 'kforcing_jax':
      continue
    assert LAYERS[theirs] < LAYERS[mine] or (mine, theirs) in PEER_OK, (
        f'{where}: {mine} (layer {LAYERS[mine]}) may not import {theirs} '
        f'(layer {LAYERS[theirs]})')


@pytest.mark.parametrize('module,path', MODULES, ids=[m for m, _ in MODULES])
def test_modules_stay_small(module, path):
  with open(path, encoding='utf-8') as f:
    n = sum(1 for _ in f)
  assert n <= MAX_LINES, f'{module} has {n} lines (split it by concept)'


def test_the_layer_check_catches_an_upward_import():
  tree = ast.parse('from kforcing_jax.pipeline import run_dir\n')
  (name, _, at_top), = list(_imports(tree))
  assert at_top and LAYERS[_group(name)] > LAYERS[_group('kforcing_jax.training.distill')]
  tree = ast.parse('def f():\n  from kforcing_jax.models import arch\n')
  assert [t for _, _, t in _imports(tree)] == [False]
