"""Self-describing export of one model stage, and loading it back onto any mesh.

  python -m kforcing_jax.export --workdir=DIR --stage=distill_k4 --out=OUT

OUT is an Orbax checkpoint holding the parameters and a JSON description (model config,
window k, tokenizer identity, source stage). `kforcing_jax.load(OUT)` restores it onto a
mesh (default: one device) and returns a `LoadedModel` whose `engine()` decodes.
"""
from __future__ import annotations

import dataclasses
import os

from absl import app
from absl import flags
import orbax.checkpoint as ocp

from kforcing_jax import decode
from kforcing_jax import model as model_lib
from kforcing_jax import sharding as sharding_lib
from kforcing_jax import stages as stages_lib

FORMAT = 'kforcing_jax.export/1'


@dataclasses.dataclass
class LoadedModel:
  model_cfg: model_lib.ModelConfig
  params: dict
  k: int  # 0 = AR teacher
  tokenizer: dict  # {'name', 'vocab_size', 'fingerprint'}
  description: dict

  def engine(self) -> decode.Engine:
    return decode.Engine(self.model_cfg, self.params)

  def spec(self, K: int | None = None, **kw) -> decode.DecodeSpec:
    K = (self.k or 1) if K is None else K
    return decode.DecodeSpec(K=K, pflm=self.k > 0, **kw)


def export(workdir: str, stage: str, out: str) -> dict:
  mesh = sharding_lib.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1})
  mcfg, params, meta, _ = stages_lib.load_model_stage(workdir, stage, mesh)
  desc = {'format': FORMAT, 'stage': stage, 'k': int(meta['k']),
          'model': dataclasses.asdict(mcfg), 'tokenizer': meta['compat']['tokenizer'],
          'teacher_stage': meta.get('teacher_stage'), 'source_workdir': os.path.abspath(workdir)}
  out = os.path.abspath(out)
  if os.path.exists(out):
    raise stages_lib.StageError(f'--out={out} already exists; choose a new path')
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(out, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                            description=ocp.args.JsonSave(desc)))
  return desc


def load(path: str, mesh=None) -> LoadedModel:
  """Restores an export onto `mesh` (parameters sharded by their logical axes)."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path} is not an exported kforcing_jax model')
  mesh = mesh or sharding_lib.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1})
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    desc = ckptr.restore(path, args=ocp.args.Composite(
        description=ocp.args.JsonRestore()))['description']
    if desc.get('format') != FORMAT:
      raise stages_lib.StageError(f'{path}: unknown export format {desc.get("format")!r}')
    mcfg = stages_lib.model_config_from_meta(desc)
    abstract, _ = stages_lib.abstract_params(mcfg, mesh)
    params = ckptr.restore(path, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract)))['params']
  return LoadedModel(model_cfg=mcfg, params=params, k=int(desc['k']),
                     tokenizer=desc['tokenizer'], description=desc)


def main(argv):
  del argv
  from kforcing_jax import errors  # pylint: disable=g-import-not-at-top
  try:
    desc = export(FLAGS.workdir, FLAGS.stage, FLAGS.out)
  except (errors.UserError, FileNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None
  print(f'exported {desc["stage"]} (k={desc["k"]}, {desc["tokenizer"]["name"]}) to {FLAGS.out}')


FLAGS = flags.FLAGS

if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'a kforcing_jax run directory')
  flags.DEFINE_string('stage', None, 'teacher | distill_k<K>')
  flags.DEFINE_string('out', None, 'output directory (must not exist)')
  flags.mark_flags_as_required(['workdir', 'stage', 'out'])
  app.run(main)
