"""Shared by the training tests: a micro SD folder, a tiny dataset, micro configs, running scripts/train.py.

The micro SD is smaller than the toy SD (a 1-level UNet with one transformer, a 2x VAE, a 1-layer CLIP) so
that the sharding, multi-process and resume tests compile in seconds; `configs/shapes_cpu.py` itself is
tested with the real toy SD.
"""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from layerdiff_jax.convert.sd_folder import save_converted
from layerdiff_jax.data.tfds_builders import build_synthetic
from layerdiff_jax.data.tokenizer import build_toy_tokenizer
from layerdiff_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer
from layerdiff_jax.models.init import FAST_COMPILE
from layerdiff_jax.models.unet import UNet2DConditionModel, UNetConfig
from layerdiff_jax.models.vae import AutoencoderKL, VAEConfig
from layerdiff_jax.training.config import base_config

REPO = Path(__file__).resolve().parents[1]
WIDTH, RESOLUTION = 32, 16


def config_module(name: str):
    """The module configs/<name>.py."""
    return importlib.import_module(f"configs.{name}")


def load_config(name: str):
    return config_module(name).get_config()


def random_params(module, example, rng) -> dict:
    """Fan-in-scaled random parameters for `module` (norm scales 1, biases 0), without running its init."""

    def leaf(path, x):
        name = path[-1].key
        if name == "scale":
            return np.ones(x.shape, np.float32)
        if name == "bias":
            return np.zeros(x.shape, np.float32)
        fan_in = int(np.prod(x.shape[:-1])) or 1
        return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(np.float32)

    shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *example)["params"])
    return jax.tree_util.tree_map_with_path(leaf, shapes)


def make_micro_sd(out_dir: Path) -> Path:
    tokenizer = build_toy_tokenizer()
    unet = UNet2DConditionModel(
        UNetConfig(
            block_out_channels=(WIDTH,),
            down_block_types=("DownBlock2D",),
            up_block_types=("UpBlock2D",),
            layers_per_block=1,
            num_attention_heads=2,
            cross_attention_dim=WIDTH,
            norm_num_groups=8,
        )
    )
    vae = AutoencoderKL(VAEConfig(block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=8))
    text = CLIPTextTransformer(
        CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=1, num_attention_heads=2)
    )
    examples = {
        "unet": (unet, (jnp.zeros((1, 4, 4, 4)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1, WIDTH)))),
        "vae": (vae, (jnp.zeros((1, 4, 4, 3)),)),
        "text_encoder": (text, (jnp.zeros((1, 77), jnp.int32),)),
    }
    rng = np.random.default_rng(0)
    components = {name: (module, random_params(module, example, rng)) for name, (module, example) in examples.items()}
    with tempfile.TemporaryDirectory() as staging:
        tokenizer.save(staging)
        save_converted(out_dir, components, source="micro", tokenizer_dir=staging)
    return out_dir


def make_micro_data(out_dir: Path, num_train: int = 32) -> Path:
    return build_synthetic(out_dir, num_train=num_train, num_test=0, resolution=RESOLUTION, seed=3)


def make_micro_sd_and_data(root: Path) -> tuple[Path, Path]:
    """The micro SD and its training data, made in root/sd and root/data."""
    return make_micro_sd(root / "sd"), make_micro_data(root / "data")


def micro_config(sd_path: Path, data_path: Path, **train):
    """A config for the micro SD: 1 step per log line, no warm-up, checkpoints every 2 steps."""
    config = base_config()
    config.model.sd_path = str(sd_path)
    config.model.layerdiff.enhancer_heads = 2
    config.data.path = str(data_path)
    config.data.resolution = RESOLUTION
    config.train.num_steps = 4
    config.train.per_host_batch_size = 4
    config.train.grad_accum_steps = 1
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 0
    config.checkpoint.every_steps = 2
    config.log.every_steps = 1
    for key, value in train.items():
        config.train[key] = value
    return config


def config_flags(config, prefix: str = "config") -> list[str]:
    """`--config.a.b=value` for every leaf of `config` (to hand a config to scripts/train.py)."""
    flags = []
    for key, value in config.items():
        if hasattr(value, "items"):
            flags += config_flags(value, f"{prefix}.{key}")
        else:
            flags.append(f"--{prefix}.{key}={value}")
    return flags


def train_command(config, workdir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "scripts" / "train.py"),
        f"--config={REPO / 'configs' / 'shapes_cpu.py'}",
        f"--workdir={workdir}",
        *config_flags(config),
        *extra,
    ]


# Without XLA's backend optimisations a micro training step compiles faster but runs 10x slower (5 s instead
# of 0.5 s): worth it for runs of a few steps on 8 devices (sharding: 143 s instead of 193 s for the test), not
# for 12 steps on one (resume: 254 s instead of 130 s).
FAST_COMPILE_FLAGS = " ".join(f"--{name}={str(value).lower()}" for name, value in FAST_COMPILE.items())


def subprocess_env(devices: int = 1, compilation_cache: Path | None = None, fast_compile: bool = False) -> dict[str, str]:
    """The environment of a training subprocess: `devices` CPU devices, optionally fast compilation and a
    persistent compilation cache shared by runs that compile the same programs."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" + (f" {FAST_COMPILE_FLAGS}" if fast_compile else "")
    env["JAX_PLATFORMS"] = "cpu"
    if compilation_cache is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(compilation_cache)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    return env


def run(cmd: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:3])} ... exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result


def restore_checkpoint(workdir: Path, config, step: int | None = None):
    """(step, TrainState as numpy) from `workdir/checkpoints`, restored onto this process's first device."""
    from layerdiff_jax.convert.core import read_config
    from layerdiff_jax.mesh import make_mesh
    from layerdiff_jax.models.layerdiff import LayerDiffConfig, LayerDiffUNet
    from layerdiff_jax.training.checkpoint import Checkpointer
    from layerdiff_jax.training.state import abstract_boxed_state, abstract_state, make_optimizer

    unet_config = UNetConfig.from_diffusers_config(read_config(Path(config.model.sd_path) / "unet"))
    model = LayerDiffUNet(unet_config, LayerDiffConfig(**config.model.layerdiff))
    boxed = abstract_boxed_state(model, make_optimizer(config.train), ema=config.train.ema)
    abstract, _ = abstract_state(boxed, make_mesh((1, 1, 1), jax.devices()[:1]))
    checkpointer = Checkpointer(Path(workdir) / "checkpoints", max_to_keep=1, async_save=False)
    try:
        step = checkpointer.latest_step() if step is None else step
        state = checkpointer.restore(step, abstract)
    finally:
        checkpointer.close()
    return step, jax.device_get(state)


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (for a jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def communicate_all(processes: list[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
    """Each process's (stdout, stderr) once all have exited; all are killed if one runs past `timeout` seconds."""
    try:
        return [p.communicate(timeout=timeout) for p in processes]
    finally:
        for p in processes:
            p.kill()


def wait_for(predicate, process: subprocess.Popen, timeout: float = 300, what: str = "condition"):
    """Polls `predicate()` until true; fails if `process` exits first or time runs out."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"training exited ({process.returncode}) before {what}:\n{process.stderr.read()[-4000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
