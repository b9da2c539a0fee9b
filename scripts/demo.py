"""The main job: build the synthetic layered dataset, train a tiny LayerDiff on CPU, sample, evaluate.

Not built yet: the end-to-end demo lands with its own issue (data, model, training, sampling first).
Until then this command checks the installation and says so.
"""

import sys


def main() -> int:
    import jax

    import layerdiff_jax

    print(f"layerdiff_jax {layerdiff_jax.__version__} on jax {jax.__version__} ({jax.devices()[0].platform})")
    print("The end-to-end demo (train a toy LayerDiff on CPU, then sample) is not implemented yet.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
