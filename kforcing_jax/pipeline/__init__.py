"""The pipeline: runs the stages of a config in a run directory; the configs and run
directories it reads and writes."""
import importlib.util
import os
import sys


def _configs_dir() -> str:
  """The shipped config files: the package kforcing_jax.configs (pyproject maps it to the
  top-level configs/ folder when installed); from a checkout that is not installed, the
  checkout's configs/ is registered as that package so the files' `from
  kforcing_jax.configs import base` works there too."""
  spec = importlib.util.find_spec('kforcing_jax.configs')
  if spec is not None:
    return list(spec.submodule_search_locations)[0]
  checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))), 'configs')
  init = os.path.join(checkout, '__init__.py')
  spec = importlib.util.spec_from_file_location('kforcing_jax.configs', init,
                                                submodule_search_locations=[checkout])
  module = importlib.util.module_from_spec(spec)
  sys.modules['kforcing_jax.configs'] = module
  spec.loader.exec_module(module)
  return checkout


CONFIG_DIR = _configs_dir()
