"""The device mesh (data, fsdp, tensor) and the logical-axis rules that map parameters
and activations onto it. One model file serves one device and many."""
from __future__ import annotations

from kforcing_jax import errors

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ('data', 'fsdp', 'tensor')
# logical axis -> mesh axes. Batch is split over data and fsdp; parameters are sharded
# over fsdp along their embedding dim and over tensor along heads / KV heads / MLP / vocab.
RULES = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('embed', 'fsdp'),
    ('vocab', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),  # grouped-query attention's key/value heads
    ('mlp', 'tensor'),
    ('kv', None),
)


class MeshConfigError(errors.UserError):
  pass


def mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, int, int]:
  dims = [int(mesh_cfg[a]) for a in AXES]
  bad = [f'mesh.{a}={d}' for a, d in zip(AXES, dims) if d == 0 or d < -1]
  if bad:
    raise MeshConfigError(f'{", ".join(bad)}: each mesh axis must be a positive size or -1')
  if dims.count(-1) > 1:
    raise MeshConfigError('at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1')
  known = math.prod(d for d in dims if d != -1)
  if -1 in dims:
    if n_devices % known:
      raise MeshConfigError(f'{n_devices} devices do not divide by the fixed mesh axes '
                            f'(product {known})')
    dims[dims.index(-1)] = n_devices // known
  if math.prod(dims) > n_devices:
    raise MeshConfigError(f'mesh data*fsdp*tensor = {math.prod(dims)} but only {n_devices} '
                          'devices are available')
  return tuple(dims)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_cfg, len(devices))
  n = math.prod(shape)
  try:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    arr = mesh_utils.create_device_mesh(shape, devices=devices[:n],
                                        allow_split_physical_axes=True)
  except Exception:  # pylint: disable=broad-except
    arr = np.asarray(devices[:n]).reshape(shape)
  return Mesh(arr, AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(('data', 'fsdp')))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch(batch: int, mesh: Mesh, field: str, microbatches: int = 1,
                micro_field: str = '') -> None:
  n = mesh.shape['data'] * mesh.shape['fsdp']
  if batch % n:
    raise MeshConfigError(f'{field}={batch} must divide by mesh data*fsdp = {n}')
  if microbatches < 1 or batch % (n * microbatches):
    raise MeshConfigError(f'{micro_field}={microbatches}: {field}={batch} must divide by '
                          f'mesh data*fsdp ({n}) x {micro_field}, so that every microbatch '
                          'has the same rows on every device')


def logical_shardings(boxed_tree, mesh: Mesh):
  """NamedShardings for a tree whose leaves may be nn.LogicallyPartitioned boxes."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, RULES)


class mesh_context:  # pylint: disable=invalid-name
  """`with mesh_context(mesh):` activates the mesh and the logical-axis rules, so the
  activation constraints inside the model resolve to mesh axes."""

  def __init__(self, mesh: Mesh):
    self._mesh_cm = jax.set_mesh(mesh)
    self._rules_cm = nn.logical_axis_rules(RULES)

  def __enter__(self):
    self._mesh_cm.__enter__()
    self._rules_cm.__enter__()
    return self

  def __exit__(self, *exc):
    self._rules_cm.__exit__(*exc)
    return self._mesh_cm.__exit__(*exc)
