"""Data construction (paper §3.3, Appendix A.2): real images -> layered exchange-format samples.

image -> caption -> noun phrases (background stop-list) -> open-vocabulary boxes -> masks -> saliency
filter -> depth order -> 5x5-dilated foreground cuts -> inpainted background -> rejection check.

- `stages`: one small Protocol per model stage, and the `Frame` they all take.
- `hf_models`: the stages on transformers/diffusers (torch, imported only when built).
- `phrases`, `rules`, `classical`: the parts that are ours (phrase filtering, saliency overlap,
  depth ordering, overlap resolution, rejection; a weight-free inpainter).
- `config`: the models YAML and the rule settings, as dataclasses; `build`: the configured model stages,
  loaded; `errors`: what `config`, `build` and `hf_models` raise; `oracle`: ground-truth stages for
  synthetic data.
- `run`: the construction run: batching, resume, per-image outcomes and the summary.
"""
