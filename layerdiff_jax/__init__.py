"""LayerDiff in JAX/Flax: layered image generation on Stable Diffusion 1.5 weights."""

__version__ = "0.1.0"
