"""The SD-1.5-size train states of configs/sd15_256.py and configs/tpu_v4.py, built abstractly on CPU.

`jax.eval_shape` runs the trainer's own state initialiser (jitted with the shardings derived from logical
axes) on an abstract mesh of the config's target device count: shapes, dtypes and placement of the
full 1.1B-parameter state without allocating it. The per-device bytes are what docs/accelerators.md reports
("What fits where").
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_support import load_config

from layerdiff_jax.mesh import resolve_mesh_shape
from layerdiff_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer
from layerdiff_jax.models.init import abstract_params
from layerdiff_jax.models.layerdiff import LayerDiffConfig, LayerDiffUNet
from layerdiff_jax.models.unet import UNetConfig
from layerdiff_jax.models.vae import AutoencoderKL, VAEConfig
from layerdiff_jax.sharding import MESH_AXES
from layerdiff_jax.training.state import (
    abstract_boxed_state,
    abstract_state,
    bytes_per_device,
    frozen_param_shardings,
    make_optimizer,
    state_initializer,
)

GiB = 2**30
# (config, devices it is laid out for): one GPU; a v4-32 slice (16 chips).
TARGETS = [("sd15_256", 1), ("sd15_256", 8), ("tpu_v4", 16)]


@functools.cache
def _boxed_state(layerdiff: tuple, ema: bool):
    config = load_config("sd15_256")
    model = LayerDiffUNet(UNetConfig.sd15(), LayerDiffConfig(**dict(layerdiff)))
    return abstract_boxed_state(model, make_optimizer(config.train), ema=ema)


def build_abstract_state(name: str, num_devices: int):
    config = load_config(name)
    tx = make_optimizer(config.train)
    boxed = _boxed_state(tuple(sorted(config.model.layerdiff.items())), config.train.ema)
    mesh = jax.sharding.AbstractMesh(resolve_mesh_shape(config.mesh.shape, num_devices), MESH_AXES)
    abstract, shardings = abstract_state(boxed, mesh)
    state = jax.eval_shape(state_initializer(shardings, jax.random.key(0), tx=tx, ema=config.train.ema), abstract.params)
    return config, mesh, state


def _frozen_bytes_per_device(mesh):
    modules = {
        "vae": (AutoencoderKL(VAEConfig.sd15()), (jnp.zeros((1, 8, 8, 3)),)),
        "text_encoder": (CLIPTextTransformer(CLIPTextConfig.sd15()), (jnp.zeros((1, 77), jnp.int32),)),
    }
    shardings = frozen_param_shardings(modules, mesh)
    shapes = {name: abstract_params(module, *example) for name, (module, example) in modules.items()}
    return bytes_per_device(jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings))


@pytest.mark.parametrize("name, num_devices", TARGETS)
def test_full_size_state_is_sharded(name, num_devices):
    config, mesh, state = build_abstract_state(name, num_devices)
    leaves = jax.tree.leaves(state)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves), "nothing allocated"
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    assert num_params > 1_100_000_000  # SD-1.5's 859.5M UNet + LayerDiff's new blocks
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params)), "float32 master weights"

    copies = 3 + int(config.train.ema)  # params, Adam mu and nu, EMA
    full = 4 * copies * num_params
    per_device = bytes_per_device(state)
    fsdp = mesh.shape["fsdp"] * mesh.shape["tensor"]
    assert full / fsdp <= per_device <= 1.01 * full / fsdp + 2**20, (per_device / GiB, full / GiB)

    kernel = state.params["unet"]["down_blocks_2"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]
    assert kernel.shape == (1280, 1280)
    expected = (1280 // mesh.shape["fsdp"], 1280 // mesh.shape["tensor"])
    assert kernel.sharding.shard_shape(kernel.shape) == expected
    adam = state.opt_state[1][0]  # chain(clip_by_global_norm, adamw = (scale_by_adam, ...))
    assert adam.mu["unet"]["down_blocks_2"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"].sharding == kernel.sharding
    print(
        f"\n{name} on {num_devices} device(s), mesh {dict(mesh.shape)}: train state {per_device / GiB:.2f} GiB per device "
        f"({full / GiB:.2f} GiB in all); frozen VAE + text encoder {_frozen_bytes_per_device(mesh) / GiB:.2f} GiB per device"
    )
