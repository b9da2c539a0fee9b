"""The paper's training setting on a TPU v4 pod slice (v4-32: 16 chips on 4 hosts), bfloat16 compute.

  # on every host of the slice (jax.distributed finds the other hosts by itself):
  python scripts/train.py --config configs/tpu_v4.py --workdir gs://<bucket>/runs/tpu_v4 \
      --config.model.sd_path=/mnt/sd15_flax --config.data.path=/mnt/data/layered

Mesh (data, fsdp, tensor) = (1, -1, 1): parameters, optimizer state and EMA are sharded over every chip of the
slice (FSDP), which compiled for a v4-32 holds 5.2 GiB per chip where 4-way FSDP with data-parallel groups held 8.6
(docs/accelerators.md, "Ahead-of-time compiles for TPU slices"). 8 samples per host per update (2 per chip on v4),
so 32 on a v4-32 as the paper trains, without accumulation. bfloat16 activations, float32 master weights and an
EMA of them; UNet blocks rematerialised. What to expect, compiled ahead of time (`python scripts/compile_aot.py
train --config configs/tpu_v4.py --slice v4-32`): 5.2 GiB per chip of a v4 chip's 32 GiB on a v4-32 (1.1 GiB of
arguments: the sharded train state and frozen encoders, 4.1 GiB of temporaries), 8.2 on a v4-8, 5.3 on a v4-128; on
a v5e-256 with `--config.mesh.shape=(-1,64,1)` (256-way FSDP would not divide SD's kernels) 4.9 of a v5e chip's 16.
With remat on a v4-32 chip fits at least 30 samples per micro-batch (29.6 GiB compiled), for larger batches;
with `--config.model.remat=False` at least 18 (28.7 GiB), for 9% fewer FLOPs per sample.
The workdir must be shared by all hosts (a GCS bucket); the model folder is written to <workdir>/model by process 0.
"""

from configs import sd15_256


def get_config():
    config = sd15_256.get_config()
    config.model.sd_path = "/mnt/sd15_flax"
    config.data.path = "/mnt/data/layered"
    config.model.compute_dtype = "bfloat16"
    config.train.per_host_batch_size = 8
    config.train.grad_accum_steps = 1
    config.train.ema = True
    config.mesh.shape = (1, -1, 1)
    return config
