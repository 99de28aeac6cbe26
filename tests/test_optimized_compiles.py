"""The decoding equivalences under XLA's optimisations, as users compile them: the suite turns
most of them off (conftest: compile time), and a fused or reordered program could break an
exact equality that holds unoptimised. The flag is read when a program compiles and is not
part of jit's cache key, so the tests run again in a fresh process with it off."""
import os
import subprocess
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = 'KFORCING_OPTIMIZED_CHILD'
EQUIVALENCES = [
    # the engine's cached PFLM steps emit the training layout's readout
    'tests/test_decode.py::test_pflm_tokens_equal_training_layout_readout[float32-argmax]',
    # a slot among others serves its request's offline tokens
    'tests/test_decode.py::test_slot_engine_rows_equal_offline_rows[True]',
]


@pytest.mark.skipif(not os.environ.get(CHILD), reason='runs in the optimised child process')
def test_the_child_compiles_with_xla_optimisations():
  assert not jax.config.read('jax_disable_most_optimizations')


def test_decoding_equivalences_hold_with_xla_optimisations_on():
  env = {k: v for k, v in os.environ.items() if not k.startswith(('PYTEST_', 'XDIST_'))}
  env.update({'JAX_DISABLE_MOST_OPTIMIZATIONS': '0', CHILD: '1'})
  r = subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-p', 'no:xdist',
       f'{__file__}::test_the_child_compiles_with_xla_optimisations', *EQUIVALENCES],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
  assert f'{1 + len(EQUIVALENCES)} passed' in r.stdout, r.stdout[-2000:]
