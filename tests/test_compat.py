"""Checkpoints and exports of the first on-disk format (tests/data/format_v1, written by an
earlier kforcing_jax: one ModelConfig with execution fields, no architecture version) load
with today's code and decode the tokens that code decoded."""
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

import kforcing_jax
from kforcing_jax.models import arch as arch_lib
from kforcing_jax.pipeline import run as pipeline
from kforcing_jax.pipeline import run_dir
from tests.conftest import synthetic_config

V1 = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'format_v1')


def reference():
  with open(os.path.join(V1, 'reference_tokens.json'), encoding='utf-8') as f:
    return json.load(f)


@pytest.mark.parametrize('name,K', [('export_teacher', 1), ('export_k2', 2)])
def test_first_format_exports_decode_as_before(name, K):
  s = kforcing_jax.load(os.path.join(V1, name))
  assert s.arch.version == arch_lib.ARCH_VERSION and s.k == (0 if K == 1 else 2)
  assert not s.arch.pflm or s.arch.noise_encoder == 'scale_only_tanh'
  greedy = {'temperature': 0.0} if K == 1 else {}
  out = s.generate_ids([[0, 1, 2, 3], [0, 5]], 10, K=K, seed=4, stop_at_eos=False, **greedy)
  np.testing.assert_array_equal(out, reference()[name])


def test_first_format_run_loads_and_continues(tmp_path):
  """A run directory of the first format: its stages load (the teacher decodes as its
  export did) and a new stage distils from its distill_k2 with today's code."""
  run = tmp_path / 'run'
  shutil.copytree(os.path.join(V1, 'run'), run)
  teacher = run_dir.load_sampler(str(run), 'teacher')
  out = teacher.generate_ids([[0, 1, 2, 3], [0, 5]], 10, temperature=0.0, stop_at_eos=False)
  np.testing.assert_array_equal(out, reference()['export_teacher'])
  cfg = synthetic_config(steps=2, pipeline=('distill_k4',))
  cfg.model.d_model = 16
  summary = pipeline.run(cfg, str(run))['distill_k4']
  assert summary['teacher_stage'] == 'distill_k2' and summary['k'] == 4


def test_unknown_architecture_fields_are_named():
  with pytest.raises(arch_lib.ArchitectureError, match='fields this code does not know: '
                     'experts'):
    arch_lib.ArchConfig.from_dict({'vocab_size': 10, 'd_model': 16, 'n_heads': 2,
                                    'version': arch_lib.ARCH_VERSION, 'experts': 8})
  with pytest.raises(arch_lib.ArchitectureError, match='architecture version 99'):
    arch_lib.ArchConfig.from_dict({'vocab_size': 10, 'd_model': 16, 'n_heads': 2,
                                    'version': 99})


def test_architecture_round_trip_and_old_format():
  arch = arch_lib.ArchConfig(vocab_size=42, d_model=16, n_heads=2, never_emit_ids=(41,),
                              pflm=True)
  assert arch_lib.ArchConfig.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch
  # the first format and version 2 name no noise encoder: theirs is the scale-only/tanh one
  old_arch = dataclasses.replace(arch, noise_encoder='scale_only_tanh')
  v2 = {k: v for k, v in arch.to_dict().items() if k != 'noise_encoder'}
  v2['version'] = 2
  assert arch_lib.ArchConfig.from_dict(v2) == old_arch
  old = {**{k: v for k, v in v2.items() if k != 'version'}, 'dtype': 'bfloat16',
         'param_dtype': 'float32', 'dropout': 0.1, 'attention_impl': 'cudnn',
         'dot_dtype': '', 'decode_attention': 'xla'}
  assert arch_lib.ArchConfig.from_dict(old) == old_arch
  with pytest.raises(arch_lib.ArchitectureError, match='version 2 cannot name'):
    arch_lib.ArchConfig.from_dict({**v2, 'noise_encoder': 'released'})
  with pytest.raises(arch_lib.ArchitectureError, match="noise_encoder='gelu'.*released"):
    dataclasses.replace(arch, noise_encoder='gelu')
  meta = run_dir.read_summary(os.path.join(V1, 'run', 'distill_k2'))
  assert meta['k'] == 2
