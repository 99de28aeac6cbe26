"""Checkpoints and exports of the first on-disk format (tests/data/format_v1, written by an
earlier kforcing_jax: one ModelConfig with execution fields, no architecture version) load
with today's code and decode the tokens that code decoded; architectures of version 3
(tests/data/format_v3) compute the logits that code computed; version 4 round-trips."""
import dataclasses
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kforcing_jax
from kforcing_jax import errors
from kforcing_jax.models import arch as arch_lib
from kforcing_jax.models import transformer as model_lib
from kforcing_jax.pipeline import run as pipeline
from kforcing_jax.pipeline import run_dir
from tests.conftest import synthetic_config
from tests.helpers import causal_logits, jit_window

V1 = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'format_v1')
V3 = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'format_v3')
# the fields of an architecture of version 3 (its to_dict's keys)
V3_FIELDS = ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'mlp_ratio', 'max_seq_len',
             'rope_base', 'never_emit_ids', 'pflm', 'noise_freq_scale', 'noise_encoder',
             'version')


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
  v2 = {k: v for k, v in arch.to_dict().items() if k in V3_FIELDS and k != 'noise_encoder'}
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
  # the readout came later within version 4: files without it read out by argmax
  icdf = dataclasses.replace(arch, readout='inverse_cdf')
  assert arch_lib.ArchConfig.from_dict(json.loads(json.dumps(icdf.to_dict()))) == icdf
  no_readout = {k: v for k, v in arch.to_dict().items() if k != 'readout'}
  assert arch_lib.ArchConfig.from_dict(no_readout).readout == 'argmax'
  with pytest.raises(arch_lib.ArchitectureError, match="readout='sample'.*argmax, inverse_cdf"):
    dataclasses.replace(arch, readout='sample')
  meta = run_dir.read_summary(os.path.join(V1, 'run', 'distill_k2'))
  assert meta['k'] == 2


def _unflatten(flat: dict) -> dict:
  tree = {}
  for path, value in flat.items():
    *parents, leaf = path.split('/')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


@pytest.mark.parametrize('name', ['ar', 'pflm'])
def test_version_3_architecture_computes_as_before(name):
  """A version-3 description reads as the paper's backbone: the same parameter tree
  (paths and shapes) and the logits the version-3 code computed, forward and window."""
  with open(os.path.join(V3, f'arch_{name}.json'), encoding='utf-8') as f:
    saved = json.load(f)
  assert saved['version'] == 3 and set(saved) == set(V3_FIELDS)
  arch = arch_lib.ArchConfig.from_dict(saved)
  assert arch.version == arch_lib.ARCH_VERSION
  assert (arch.n_kv_heads, arch.head_dim, arch.mlp_dim, arch.norm, arch.mlp_activations,
          arch.tie_embeddings, arch.head_bias, arch.rope_scaling) == (
              2, 8, 64, 'layernorm', ('gelu_tanh',), False, True, ())
  model = model_lib.build(arch)
  with np.load(os.path.join(V3, f'params_{name}.npz')) as z:
    flat = dict(z)
  fresh = jax.eval_shape(model_lib.init_fn(model), jax.random.key(0))
  want = {'/'.join(k.key for k in path): tuple(v.shape) for path, v in
          jax.tree_util.tree_flatten_with_path(nn.unbox(fresh))[0]}
  assert {k: v.shape for k, v in flat.items()} == want
  params = _unflatten(flat)
  with np.load(os.path.join(V3, f'logits_{name}.npz')) as ref:
    np.testing.assert_allclose(causal_logits(model, params, jnp.asarray(ref['ctx'])),
                               ref['forward'], rtol=1e-5, atol=1e-5)
    if arch.pflm:
      np.testing.assert_allclose(
          jit_window(model)(params, jnp.asarray(ref['ctx']), None, jnp.asarray(ref['u'])),
          ref['window'], rtol=1e-5, atol=1e-5)
  assert arch_lib.ArchConfig.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch
  with pytest.raises(arch_lib.ArchitectureError,
                     match='version 3 cannot name n_kv_heads, tie_embeddings'):
    arch_lib.ArchConfig.from_dict({**saved, 'n_kv_heads': 1, 'tie_embeddings': True})


def test_version_4_round_trip_with_every_field():
  arch = arch_lib.ArchConfig(
      vocab_size=40, d_model=24, n_layers=3, n_heads=6, n_kv_heads=3, head_dim=10,
      mlp_dim=50, mlp_activations=('silu', 'linear'), mlp_bias=False, norm='rmsnorm',
      norm_eps=1e-6, qkv_bias=True, out_bias=True, qk_norm=True, tie_embeddings=True,
      head_bias=False, rope_scaling=('llama3', 8.0, 1.0, 4.0, 8192), rope_base=5e5,
      max_seq_len=128, never_emit_ids=(3,), pflm=True)
  defaults = arch_lib.ArchConfig(vocab_size=40, d_model=24, n_layers=3, n_heads=6)
  assert all(getattr(arch, f) != getattr(defaults, f) for f in arch_lib.V4_FIELDS)
  d = json.loads(json.dumps(arch.to_dict()))
  assert set(d) == {f.name for f in dataclasses.fields(arch_lib.ArchConfig)}
  assert d['mlp_activations'] == ['silu', 'linear']
  assert d['rope_scaling'] == ['llama3', 8.0, 1.0, 4.0, 8192] and d['version'] == 4
  back = arch_lib.ArchConfig.from_dict(d)
  assert back == arch and back.rope_scaling == ('llama3', 8.0, 1.0, 4.0, 8192)
  assert isinstance(back.mlp_activations, tuple) and isinstance(back.rope_scaling, tuple)
  # the derived sizes are saved resolved
  assert {k: defaults.to_dict()[k] for k in ('n_kv_heads', 'head_dim', 'mlp_dim')} == {
      'n_kv_heads': 6, 'head_dim': 4, 'mlp_dim': 96}


def test_a_stage_checkpointed_by_version_3_resumes(tmp_path):
  """A teacher stage stopped mid-way under architecture version 3 (its checkpoint's compat
  and arch name none of version 4's fields) resumes with today's code instead of being
  refused; a real difference in the backbone is still refused."""
  cfg = synthetic_config(steps=2, pipeline=('teacher',))
  pipeline.run(cfg, str(tmp_path))
  os.remove(tmp_path / 'teacher' / 'summary.json')
  meta_file, = (tmp_path / 'teacher' / 'checkpoints').glob('*/meta/metadata')
  meta = json.loads(meta_file.read_text())
  for field in arch_lib.V4_FIELDS:
    meta['compat'].pop(f'model.{field}')
    meta['arch'].pop(field)
  meta['arch']['version'] = 3
  meta_file.write_text(json.dumps(meta))
  summary = pipeline.run(synthetic_config(steps=3, pipeline=('teacher',)), str(tmp_path))
  assert summary['teacher']['steps'] == 3
  os.remove(tmp_path / 'teacher' / 'summary.json')
  cfg = synthetic_config(steps=4, pipeline=('teacher',))
  cfg.model.mlp_dim = 2 * cfg.model.d_model
  with pytest.raises(errors.UserError, match='model.mlp_dim'):
    pipeline.run(cfg, str(tmp_path))
