"""The paper's training setting on one GPU host: SD-1.5 weights, 256x256 images, up to 4 layers.

  python scripts/convert_weights.py --source stable-diffusion-v1-5 --output sd15_flax       # once
  python scripts/build_dataset.py folder --samples <layered sample folders> --out data/layered  # once
  python scripts/train.py --config configs/sd15_256.py --workdir runs/sd15_256 \
      --config.model.sd_path=sd15_flax --config.data.path=data/layered

Every training value of the paper: SD's scaled-linear schedule (1000 steps, epsilon), 50/50 shared/independent
layer timesteps, 10% global and 10% layer prompt dropout, AdamW lr 1e-5 with weight decay 1e-4, 500
warm-up steps then constant, 32 samples per update as 8 accumulated micro-batches of 4, frozen VAE and
text encoder, float32 compute (the reference setting; configs/gpu_h100.py is the fast one). The state is
FSDP-sharded over the host's GPUs. What to expect: 12.4 GiB of train state (parameters, Adam moments) plus
0.8 GiB of frozen VAE and text encoder on one GPU, 1.6 + 0.1 GiB per GPU on eight (docs/accelerators.md,
"What fits where"), before activations; a 12.4 GiB checkpoint every 1000 steps; the model folder in
<workdir>/model.
"""

from layerdiff_jax.training.config import base_config


def get_config():
    config = base_config()
    config.model.sd_path = "sd15_flax"  # a converted (or diffusers) SD-1.5 folder
    config.data.path = "data/layered"  # a dataset built by scripts/build_dataset.py
    config.data.resolution = 256
    config.data.worker_count = 8
    config.model.layerdiff.max_layers = 4
    config.model.remat = True  # 4 layers x 4 samples of the SD UNet per micro-batch
    config.train.num_steps = 100_000
    config.train.per_host_batch_size = 4
    config.train.grad_accum_steps = 8
    config.mesh.shape = (1, -1, 1)  # FSDP over the host's devices
    config.checkpoint.every_steps = 1000
    config.log.every_steps = 50
    return config
