"""Logical axis names and the one table that maps them onto the device mesh.

Every parameter is created with logical axis names (see `models/layers.py`) and large activations are
constrained with them; this table is the only place that decides which mesh axis ("data", "fsdp",
"tensor") each logical axis lands on. A logical axis not listed here is replicated.
"""

from __future__ import annotations

MESH_AXES = ("data", "fsdp", "tensor")

# (logical axis, mesh axis or axes). Parameters are sharded FSDP-style over their input/"embed" width
# and Megatron-style over their output/"mlp" and head widths; batches over data x fsdp.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", None),
    ("conv_height", None),
    ("conv_width", None),
    ("norm", None),
    ("layers", None),
    ("length", None),
    ("height", None),
    ("width", None),
)
