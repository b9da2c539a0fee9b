"""Pretraining the toy base: the toy SD as a plain text-to-image model on flat images of the synthetic world.

  python scripts/train.py --config configs/toy_sd_pretrain.py --workdir runs/toy_base
  python scripts/evaluate_base.py runs/toy_base/model          # its text-to-image scores

What LayerDiff starts from is a pretrained text-to-image model (SD 1.5); the toy world's is made here, the way
SD is made: fit the VAE (`model.toy_vae`), then train the UNet and the text encoder together with SD's
objective on flat images only (composites with their global prompts, backgrounds alone, single objects on a
plain background), never masks or layers. The result, <workdir>/model, is an SD folder in the layout
`convert_weights.py` writes; `layerdiff_jax/assets/toy_base/` is one such run, shipped (see its
provenance.json). Training resumes from <workdir>/checkpoints; `--config.model.sd_path=<an SD folder>`
continues from an earlier base instead of a random one. Its data (seed 0) never holds the demo's held-out
requests (seed 1,000,000) or the base's evaluation prompts (seed 2,000,000). Expect on a 2-core CPU: a few
minutes of data and VAE fitting, then a few steps per second; docs/experiments.md has the runs.
"""

from layerdiff_jax.training.config import base_config


def get_config():
    config = base_config()
    config.model.kind = "text_to_image"
    config.model.sd_path = "toy"
    config.model.toy_vae.steps = 1000

    config.data.path = "synthetic"
    config.data.resolution = 64
    config.data.synthetic.num_train = 20_000
    config.data.synthetic.layer_mix = "2:0.5,3:0.25,4:0.25"
    # Single objects carry the shape vocabulary most plainly; composites teach several objects and patterns.
    config.data.flat_views = "composite:0.4,background:0.1,object:0.5"

    # As the demo trains LayerDiff (configs/demo.py explains why): velocity targets and offset noise.
    config.diffusion.prediction_type = "v_prediction"
    config.diffusion.noise_offset = 0.3

    config.train.num_steps = 3_700
    config.train.per_host_batch_size = 32
    config.train.grad_accum_steps = 1
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 200
    config.train.cooldown_steps = 1_000  # the learning rate falls linearly to 0 over the last 1,000 steps
    config.train.weight_decay = 0.0
    config.train.global_prompt_dropout = 0.1  # the unconditional branch classifier-free guidance needs
    config.train.sample_posterior = False  # the toy VAE's variance is untrained (training/autoencoder.py)
    config.train.ema = True
    config.train.ema_decay = 0.999

    config.checkpoint.every_steps = 500
    config.log.every_steps = 50
    return config
