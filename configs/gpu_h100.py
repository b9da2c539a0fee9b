"""LayerDiff training on a single H100/H200 node (1 to 8 GPUs), bfloat16 compute.

  python scripts/train.py --config configs/gpu_h100.py --workdir runs/h100 \
      --config.model.sd_path=sd15_flax --config.data.path=data/layered

The paper's optimizer and losses at 256x256, 32 samples per update in one micro-batch (no accumulation),
the state FSDP-sharded over the node's GPUs (mesh (1, -1, 1)), UNet blocks rematerialised, an EMA of the
parameters (exported as the model). What to expect, compiled for one H100 without one (docs/accelerators.md,
"Ahead-of-time compiles for NVIDIA GPUs"): 55.9 GiB per GPU at 32 samples, of which 17.2 GiB are the train state
(parameters, Adam moments, EMA), the frozen VAE and text encoder and the batch; that fits JAX's default 75% of the
GPU. With XLA_PYTHON_CLIENT_MEM_FRACTION=.95, which gives XLA the whole GPU, up to 69 samples fit one H100.
"""

from configs import sd15_256


def get_config():
    config = sd15_256.get_config()
    config.model.compute_dtype = "bfloat16"
    # XLA attention until the accelerator check's train step (row d; docs/accelerators.md) has run with cuDNN: cuDNN
    # is faster in the UNet forward on Hopper, but its backward needs the padding of odd prompt lengths, and on
    # Ampere it does not take SD-1.5's deepest head dim (160 > 128).
    config.model.attention_impl = "xla"
    config.train.per_host_batch_size = 32
    config.train.grad_accum_steps = 1
    config.train.ema = True
    return config
