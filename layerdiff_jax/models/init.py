"""Parameters of a module: their shapes, or random initial values compiled cheaply.

`abstract_params` traces `module.init` without running it. A jitted `module.init` draws every parameter with
its own threefry program, which XLA:CPU is slow to compile at full optimisation. Initialisation runs once, so
its program is compiled without backend optimisation, and parameters the caller will overwrite (`keep`) are
dropped before compilation so XLA never sees their initialisers.
"""

from __future__ import annotations

from typing import Callable

import flax
import flax.linen as nn
import jax

# DebugOptions are XLA's, not a backend's, but only CPU compilation is slow enough to matter: elsewhere the
# defaults stay.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def abstract_params(module: nn.Module, *example_args, **example_kwargs) -> dict:
    """The module's parameter tree as ShapeDtypeStructs (nothing allocated), logical-axis boxes removed."""
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *example_args, **example_kwargs))
    return nn.meta.unbox(variables["params"])


def init_params(module: nn.Module, rng: jax.Array, *example, keep: Callable[[tuple[str, ...]], bool] | None = None) -> dict:
    """`module`'s initial parameters as numpy arrays (logical-axis boxes removed); with `keep`, only the
    parameters whose path (a tuple of names) it accepts, as a flat {path: array} dict."""

    def init(rng):
        params = nn.meta.unbox(module.init(rng, *example)["params"])
        if keep is None:
            return params
        return {path: value for path, value in flax.traverse_util.flatten_dict(params).items() if keep(path)}

    options = FAST_COMPILE if jax.default_backend() == "cpu" else None
    return jax.device_get(jax.jit(init).lower(rng).compile(compiler_options=options)(rng))
