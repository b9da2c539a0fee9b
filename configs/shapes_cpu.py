"""Tiny LayerDiff on the synthetic shapes dataset: trains on a 2-core CPU.

  python scripts/train.py --config configs/shapes_cpu.py --workdir runs/shapes_cpu

The toy SD (a 4x VAE, a 2-layer CLIP text encoder and a 2-level UNet, all random: `layerdiff_jax.toy`) is
written to <workdir>/toy_sd and the synthetic dataset (64x64, 2-4 layers) to <workdir>/data on the first
run. What to expect on a 2-core CPU: about 15 s of set-up and compilation, then roughly 2 steps/s; the
loss starts near 1 and falls well below it within a few hundred steps (MEASURED numbers: README).
Checkpoints every 100 steps; the model folder lands in <workdir>/model.
"""

from layerdiff_jax.training.config import base_config


def get_config():
    config = base_config()
    config.model.sd_path = "toy"
    config.model.layerdiff.enhancer_heads = 4  # the toy text encoder is 64 wide
    config.data.path = "synthetic"
    config.data.resolution = 64
    config.data.synthetic.num_train = 512
    config.train.num_steps = 300
    config.train.per_host_batch_size = 4
    config.train.grad_accum_steps = 1
    config.train.learning_rate = 3e-4  # a randomly initialised toy learns fast; SD fine-tuning uses 1e-5
    config.train.warmup_steps = 20
    config.mesh.shape = (-1, 1, 1)
    config.checkpoint.every_steps = 100
    config.log.every_steps = 10
    return config
