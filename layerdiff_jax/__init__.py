"""LayerDiff in JAX/Flax: layered image generation on Stable Diffusion 1.5 weights."""

__version__ = "0.1.0"

# What the PyTorch-backed parts (pickled .ckpt files, the data construction models) need installed.
TORCH_EXTRA = 'the "torch" extra (pip install -e ".[torch]" in the repository)'
