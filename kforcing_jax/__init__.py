"""kforcing_jax: K-Forcing (push-forward LMs by progressive self-forcing) in JAX/Flax."""
from kforcing_jax.decoding.sampler import Sampler
from kforcing_jax.interop.export import load
from kforcing_jax.pipeline.run_dir import load_sampler as load_stage

__all__ = ['load', 'load_stage', 'Sampler']
