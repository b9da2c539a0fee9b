"""Tiny LayerDiff on the synthetic shapes dataset: trains on a 2-core CPU.

  python scripts/train.py --config configs/shapes_cpu.py --workdir runs/shapes_cpu

On the first run the toy SD (a 4x VAE, a 2-layer CLIP text encoder, a 2-level UNet, all random:
`layerdiff_jax.toy`) is written to <workdir>/toy_sd and the synthetic dataset (64x64, 2 to 4 layers) to
<workdir>/data. What to expect on a 2-core CPU: about a minute of set-up and compilation, then a few steps per
second, a few minutes and ~2.5 GiB in all; the loss falls by half within 100 steps (the image-noise part learns
first) and much further by step 300, once the zero-initialised mask gate has opened and the mask-noise part
learns too (tests/test_train_cpu.py checks a shortened run; docs/experiments.md has measured runs). Checkpoints
every 100 steps; the model folder lands in <workdir>/model.
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
    # A random toy learns fast (SD fine-tuning uses 1e-5); Adam moves the mask gate by at most lr a step.
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 20
    config.mesh.shape = (-1, 1, 1)
    config.checkpoint.every_steps = 100
    config.log.every_steps = 10
    return config
