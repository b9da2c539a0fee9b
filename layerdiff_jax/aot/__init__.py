"""Ahead-of-time compiles of the project's programs for TPU slices, on a machine without TPUs (libtpu describes them).

- `slices`: the slices and their chips' figures; `slice_devices(name)`.
- `train`: the trainer's own train step; `sample`: the batch sampler's denoise and decode programs.
- `analysis`: per-chip memory against HBM, FLOPs, collectives (`hlo`), an ideal time (an estimate).
- `fit`: the largest per-chip batch that fits; `report`: the table and JSON of scripts/compile_aot.py.
"""
