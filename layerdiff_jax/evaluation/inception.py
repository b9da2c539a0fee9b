"""The FID Inception-v3 (TensorFlow's 2015-12-05 graph, as torch-fidelity and pytorch-fid port it) in Flax.

torch-fidelity cannot be used directly here: it imports torchvision, and no torchvision wheel on PyPI
works beside the CPU torch this project pins. So this is a port of torch-fidelity's
`FeatureExtractorInceptionV3` (tested against it at float32), reading the same weights file,
`weights-inception-2015-12-05-6726825d.pth` (pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` has
the same keys), from a local path; nothing is downloaded. Features are the 2048-wide pool3 output
that FID uses. Images are NHWC uint8-valued; any size is resized to 299x299 with TensorFlow 1.x's
bilinear rule, as the original graph does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from layerdiff_jax.convert.core import convert_state_dict, load_torch_file
from layerdiff_jax.models.init import abstract_params

INPUT_SIZE = 299
FEATURE_DIM = 2048


def resize_bilinear_tf1(images: jnp.ndarray, size: int) -> jnp.ndarray:
    """TensorFlow 1.x bilinear resize (align_corners=False, no half-pixel offset) of NHWC `images`:
    output pixel i samples input coordinate i * in/out, as torch-fidelity's `interpolate_bilinear_2d_
    like_tensorflow1x` does, with its float32 index arithmetic."""

    def axis_weights(n_in: int):
        src = np.arange(size, dtype=np.float32) * np.float32(n_in / size)
        lo = src.astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (src - lo.astype(np.float32)).astype(np.float32)

    y_lo, y_hi, dy = axis_weights(images.shape[1])
    x_lo, x_hi, dx = axis_weights(images.shape[2])
    dx = dx[None, None, :, None]
    rows_lo, rows_hi = images[:, y_lo], images[:, y_hi]
    top = rows_lo[:, :, x_lo] + (rows_lo[:, :, x_hi] - rows_lo[:, :, x_lo]) * dx
    bottom = rows_hi[:, :, x_lo] + (rows_hi[:, :, x_hi] - rows_hi[:, :, x_lo]) * dx
    return top + (bottom - top) * dy[None, :, None, None]


class FrozenBatchNorm(nn.Module):
    """Inference-only batch norm; its running statistics are parameters of a frozen network."""

    epsilon: float = 1e-3

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("running_mean", nn.initializers.zeros, (c,))
        var = self.param("running_var", nn.initializers.ones, (c,))
        return (x - mean) * (scale / jnp.sqrt(var + self.epsilon)) + bias


class BasicConv2d(nn.Module):
    """Conv (no bias) -> batch norm -> ReLU; `padding` is torch's (pad_h, pad_w)."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        conv = nn.Conv(self.features, self.kernel, self.stride, ((ph, ph), (pw, pw)), use_bias=False, name="conv")
        x = conv(x)
        return nn.relu(FrozenBatchNorm(name="bn")(x))


def _avg_pool_3x3(x):
    # TensorFlow's average pool leaves the zero padding out of the average.
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride2(x):
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv2d(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
    """`max_pool`: the graph's last block pools its pool branch with max instead of average."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3FID(nn.Module):
    """(N, H, W, 3) pixel values in [0, 255] -> (N, 2048) pool3 features."""

    @nn.compact
    def __call__(self, images):
        x = resize_bilinear_tf1(images.astype(jnp.float32), INPUT_SIZE)
        x = (x - 128.0) / 128.0
        x = BasicConv2d(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


def _rename(key: str) -> str | None:
    """Torch keys we do not use: batch counters, the classifier head and (pytorch-fid) aux logits."""
    if key.endswith("num_batches_tracked") or key.startswith(("fc.", "AuxLogits.")):
        return None
    return key


def load_inception(path: str | Path) -> dict:
    """Flax params of `InceptionV3FID` from a local torch state dict (`.pth`/`.pt`, read weights-only,
    or `.safetensors`); a mismatching file raises `ConversionError` naming the keys."""
    target = abstract_params(InceptionV3FID(), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))
    return convert_state_dict(load_torch_file(path), target, _rename, source=str(path))


_forward = jax.jit(InceptionV3FID().apply)  # shared, so compilations are reused across extractors


class InceptionFeatures:
    """Extracts FID features with a jitted forward; images are grouped by size and each group's
    batches padded to one length, so that a set of same-size images compiles once."""

    def __init__(self, params: dict, batch_size: int = 32):
        self.params = params
        self.batch_size = batch_size

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """images: (H, W, 3) uint8 arrays (sizes may differ) -> (N, 2048) float32."""
        out = np.zeros((len(images), FEATURE_DIM), np.float32)
        by_shape: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            if image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"image {i}: expected (H, W, 3), got shape {image.shape}")
            by_shape.setdefault(image.shape, []).append(i)
        for indices in by_shape.values():
            length = min(self.batch_size, len(indices))
            for start in range(0, len(indices), length):
                chunk = indices[start : start + length]
                batch = np.zeros((length, *images[chunk[0]].shape), np.float32)
                batch[: len(chunk)] = np.stack([images[i] for i in chunk])
                out[chunk] = np.asarray(_forward({"params": self.params}, batch))[: len(chunk)]
        return out
