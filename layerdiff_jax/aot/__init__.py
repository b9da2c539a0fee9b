"""Ahead-of-time compiles of the project's programs for TPU slices and NVIDIA GPU nodes, on a machine without them
(libtpu, or jax's CUDA plugin told the GPU's figures, describes them).

- `slices`: the slices and their chips' figures; `slice_devices(name)`.
- `train`: the trainer's own train step; `sample`: the batch sampler's denoise and decode programs.
- `analysis`: per-chip memory against HBM, FLOPs, collectives (`hlo`), an ideal time (an estimate).
- `fit`: the largest per-chip batch that fits; `report`: the table and JSON of scripts/compile_aot.py.
"""
