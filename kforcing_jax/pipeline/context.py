"""What every pipeline stage shares: the validated config, the workdir, the mesh, the
tokenizer, the model configs and (built on first use) the data source."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

from kforcing_jax.pipeline import config_lib
from kforcing_jax.pipeline import run_dir
from kforcing_jax.data import datasets as data_lib
from kforcing_jax.models import arch as arch_lib
from kforcing_jax import sharding as sharding_lib


@dataclasses.dataclass
class StageContext:
  cfg: Any
  workdir: str
  mesh: Any
  tokenizer: Any
  arch: arch_lib.ArchConfig  # the AR teacher's; students add the noise encoder
  exe: arch_lib.ExecConfig  # training / evaluation execution settings (config.model)
  stage_names: list[str]  # the pipeline's stages, in order

  @functools.cached_property
  def source(self):
    """The data source, built when a stage first reads data (a rerun whose stages are all
    finished never loads or tokenizes the corpus)."""
    return data_lib.make_source(self.cfg)

  def load_teacher(self, ref: str):
    """A distillation teacher: a finished stage of this run or an export directory;
    (arch, params, {'k', 'tokenizer', 'name'}, shardings)."""
    return run_dir.load_teacher(self.workdir, ref, self.mesh)

  def teacher_ref(self, stage: str) -> str:
    """A distill stage's teacher: a stage name or an export directory."""
    return run_dir.teacher_stage_of(self.cfg, stage, self.stage_names)

  def ar_ref(self, stage: str) -> str:
    """The AR model at the root of a distill stage's chain of teachers."""
    return run_dir.ar_root(self.cfg, stage, self.stage_names)

  def compat(self, **extra) -> dict:
    """The fields that must agree between a checkpoint and the config that resumes it."""
    out = {'model.' + k: v for k, v in self.arch.backbone().items()}
    out.update({'tokenizer': self.tokenizer.identity(), 'data.source': self.cfg.data.source,
                'data.seq_len': self.cfg.data.seq_len})
    out.update(extra)
    return out


def build(cfg, workdir: str) -> StageContext:
  config_lib.validate(cfg)
  tok = data_lib.make_tokenizer(cfg)
  if cfg.model.vocab_size not in (-1, tok.vocab_size):
    raise config_lib.ConfigError(
        f'model.vocab_size={cfg.model.vocab_size} does not match the {tok.name} tokenizer '
        f'of data.source={cfg.data.source} ({tok.vocab_size} ids incl. the reserved one); '
        'set it to -1 or to that value')
  arch, exe = arch_lib.configs_from_run(cfg, tok.vocab_size, tok.never_emit_ids)
  if cfg.data.seq_len > arch.max_seq_len:
    raise config_lib.ConfigError(
        f'data.seq_len={cfg.data.seq_len} is longer than model.max_seq_len='
        f'{arch.max_seq_len}')
  mesh = sharding_lib.make_mesh(cfg.mesh)
  names = config_lib.stages(cfg)
  for name in names:
    if name in cfg.stages:
      s = cfg.stages[name]
      sharding_lib.check_batch(s.batch_size, mesh, f'stages.{name}.batch_size',
                               s.microbatches, f'stages.{name}.microbatches')
  sharding_lib.check_batch(cfg.data.eval_batch_size, mesh, 'data.eval_batch_size')
  return StageContext(cfg=cfg, workdir=workdir, mesh=mesh, tokenizer=tok, arch=arch, exe=exe,
                      stage_names=names)
