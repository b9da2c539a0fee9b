"""The main job: LayerDiff fine-tuned on CPU from the shipped toy base, then sampled and scored.

  python scripts/demo.py                      # this config; writes everything under outputs/demo/
  python scripts/demo.py --config.time_budget_s=300 --config.sample.per_layer_count=4   # a quick look
  python scripts/demo.py --config.base=scratch   # from a random toy SD instead (VAE fitted first), to compare

Stages (layerdiff_jax/demo.py): build the synthetic dataset (64x64, 2-4 layers) -> take the base (the toy SD
pretrained as plain text-to-image, layerdiff_jax/assets/toy_base, as a user takes converted SD-1.5) -> score
LayerDiff initialised from it before any fine-tuning (step 0) -> fine-tune with the real trainer
(configs/shapes_cpu.py with the fields below) -> sample fixed requests with 2, 3 and 4 layers (prompts of
held-out synthetic samples) -> evaluate prompt following. The job keeps to a time budget: fine-tuning stops
(with a checkpoint) when what is left is what sampling needs, so the number of steps depends on the machine (a
rerun resumes for another budget). What to expect on a 2-core CPU: README, "Demo: what the main job does and
prints".
"""

from configs import shapes_cpu
from layerdiff_jax.demo import demo_config


def get_config():
    c = demo_config()
    c.finetune = shapes_cpu.get_config()  # model.sd_path, data.path and log.sample_* are filled in by the demo
    c.finetune.model.toy_vae.steps = 1000  # base "scratch" only: fit the toy VAE first
    c.finetune.train.num_steps = 5000  # at most: on a 2-core CPU the time budget stops fine-tuning before
    # Most of the layer counts' errors are in 3 and 4 layers: draw those more often than the even mix.
    c.data.layer_mix = "2:0.2,3:0.4,4:0.4"
    # Black objects go on white: on black, a black object's image latent is a small step from an empty layer's,
    # and the fine-tuned model overshot it into green (docs/experiments.md, issue 30).
    c.data.foreground_fill = "contrast"
    # Batch 4 rather than 8: the same samples per second on this CPU, so twice the updates in the budget, and
    # masks come out clean (docs/experiments.md, "2026-12-06 — issue 31: passages moved here from the README").
    c.finetune.train.per_host_batch_size = 4
    # Each layer's intra-layer attention reads its own prompt only. With the paper's enhancer (S+C) the layer prompts
    # also read the global prompt, which names every object's colour, and the toy model drew neighbours' colours
    # (docs/experiments.md, issue 30: the prompt enhancer's variants).
    c.finetune.model.layerdiff.prompt_enhancer = "none"
    # An object is a small part of its layer: the image latents' error inside each foreground's mask counts 4x the
    # surround's (mean weight 1), so colour and shape get more of the loss than the surround the mask hides
    # (docs/experiments.md, issue 30: the loss weighted inside objects).
    c.finetune.diffusion.object_loss_weight = 3.0
    c.finetune.train.learning_rate = 1e-3
    c.finetune.train.warmup_steps = 50
    # Prompt dropout as the paper trains: the unconditional branch that layer-aware guidance needs.
    c.finetune.train.global_prompt_dropout = 0.1
    c.finetune.train.layer_prompt_dropout = 0.1
    # The toy VAE is fitted on posterior means (training/autoencoder.py), its variance is untrained.
    c.finetune.train.sample_posterior = False
    # So each record's latents can be encoded once (training/latent_cache.py): the toy VAE's pass over 64x64 layers
    # and masks is a large share of the toy step, and every epoch after the first skips it.
    c.finetune.train.cache_latents = True
    # Sampling from an average of the last ~100 steps' weights: a short run's raw weights are noisy.
    c.finetune.train.ema = True
    c.finetune.train.ema_decay = 0.99
    # As the toy base was pretrained (configs/toy_sd_pretrain.py): velocity targets weight the high-noise
    # estimates where colours and shapes are decided, and offset noise hides each layer's mean colour in x_t
    # (SD's schedule leaves it readable even at t = 999), so the prompt is where it is learned from.
    c.finetune.diffusion.prediction_type = "v_prediction"
    c.finetune.diffusion.noise_offset = 0.3
    c.finetune.train.cpu_ynn_convolutions = False  # the toy UNet's small convolutions train faster in XLA's kernels
    c.finetune.checkpoint.every_steps = 250
    c.finetune.log.every_steps = 25

    # 32 held-out requests per layer count, so that one miss among the 2-layer foregrounds is 3%, not 6%;
    # step 0 (where fine-tuning starts) needs fewer, and its sampling time goes to fine-tuning.
    c.sample.per_layer_count = 32
    c.sample.step0_per_layer_count = 8
    c.sample.steps = 25  # DDIM steps (the paper samples 100): the demo spends its budget on fine-tuning
    # Of guidance 1, 2 and 3 on the demo's fine-tuned model, 1 scored best: guiding against the layer-aware
    # negatives cost background colour (docs/benchmarks.md, "The main job's table", **Guidance.**). The model
    # folders record sample.steps and sample.guidance (sampling.json): sample.py and edit.py default to them.
    c.sample.guidance = 1.0
    return c
