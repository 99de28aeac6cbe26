"""kforcing_jax: K-Forcing (push-forward LMs by progressive self-forcing) in JAX/Flax."""
from kforcing_jax.export import load
from kforcing_jax.sampler import Sampler

__all__ = ['load', 'Sampler']
