"""Sampling and layer editing: the jitted, sharded DDIM sampler (`sampler`), layer inpainting and style
transfer (`editing`), and the layered outputs (`outputs`: exchange folders, .ora/.psd, contact sheets)."""

from layerdiff_jax.sampling.editing import inpaint_layer, restyle_layer
from layerdiff_jax.sampling.outputs import write_contact_sheet, write_ora, write_psd, write_sample
from layerdiff_jax.sampling.sampler import (
    CheckpointError,
    LayerDiffPipeline,
    LayerRequest,
    RequestError,
    read_request_file,
)

__all__ = [
    "CheckpointError",
    "LayerDiffPipeline",
    "LayerRequest",
    "RequestError",
    "inpaint_layer",
    "read_request_file",
    "restyle_layer",
    "write_contact_sheet",
    "write_ora",
    "write_psd",
    "write_sample",
]
