"""kforcing_jax: K-Forcing (push-forward LMs by progressive self-forcing) in JAX/Flax."""


def load(path: str, mesh=None):
  """Restores a model written by `python -m kforcing_jax.export` (see export.load)."""
  from kforcing_jax import export  # pylint: disable=g-import-not-at-top
  return export.load(path, mesh)
