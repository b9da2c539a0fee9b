"""The collectives of a compiled, partitioned program, read from its HLO text (`compiled.as_text()`).

`collectives(hlo_text)` counts all-gather, reduce-scatter, all-reduce, all-to-all and collective-permute ops (their
async `-start` forms too; the `-done` halves move nothing) and the bytes each chip sends for them by the ring
algorithms' formulas, for a group of n chips and an operand of S bytes per chip:

    all-gather           (n - 1) * S        (S is the shard each chip contributes)
    reduce-scatter       (n - 1) / n * S    (S is the whole array each chip reduces)
    all-reduce           2 (n - 1) / n * S
    all-to-all           (n - 1) / n * S
    collective-permute   S

The group size n comes from `replica_groups` in any of its forms: explicit `{{0,1},{2,3}}`, iota `[2,4]<=[8]`,
or mesh-named `mesh['axis_0'=4,...], device_ids=(...) {'axis_0'}`; `{}` means every device. Ops inside a while
loop's body count once per trip when the HLO states the trip count (a `known_trip_count`, or a loop condition
`counter < constant`, the form JAX's scans and fori_loops compile to), else once with a note saying so.
Conditional branches count once each (an upper bound). TPU's fused "all-reduce-scatter" (an all-reduce whose
result each chip slices its shard from, in a computation named so) is counted as the reduce-scatter it is.
XLA:TPU also splits one collective into the fusions that overlap it with compute (a start, continuations, a done),
each of whose computations holds a copy of it with the collective's channel_id: a channel counts once.

Pure string processing, so it is unit-tested on small literal HLO (tests/test_aot.py).
"""

from __future__ import annotations

import dataclasses
import math
import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BITS = {"pred": 8, "token": 0}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\)\s*->\s*.*)?\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLEE = re.compile(r"\b(body|calls|to_apply|true_computation|false_computation|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class KindTotal:
    count: int  # ops executed per step (a loop's ops times its trips)
    bytes_per_chip: float  # sent by each chip, by the ring formulas above


@dataclasses.dataclass(frozen=True)
class Collectives:
    kinds: dict[str, KindTotal]  # every kind in KINDS, zero where absent
    loops: tuple[tuple[str, int | None], ...]  # (while op, trips per execution; None: not in the HLO)
    notes: tuple[str, ...]  # what was counted less exactly (unknown trip counts)

    @property
    def bytes_per_chip(self) -> float:
        return sum(k.bytes_per_chip for k in self.kinds.values())

    @property
    def count(self) -> int:
        return sum(k.count for k in self.kinds.values())


def dtype_bytes(dtype: str) -> float:
    """Bytes of one element of an HLO element type (bf16 2, f32 4, s4 0.5, pred 1, f8e4m3fn 1)."""
    if dtype in _DTYPE_BITS:
        return _DTYPE_BITS[dtype] / 8
    bits = re.match(r"[a-z]+(\d+)", dtype)
    return int(bits.group(1)) / 8 if bits else 0.0


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO shape: an array `bf16[128,512]{1,0:T(8,128)}` or a tuple of them (summed)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        total += dtype_bytes(dtype) * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _matching(text: str, start: int) -> int:
    """Index just past the bracket that closes the one at `start`."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    return len(text)


@dataclasses.dataclass(frozen=True)
class _Instruction:
    name: str
    shape: str
    opcode: str
    operands: tuple[str, ...]
    attributes: str


def _parse_instruction(line: str) -> _Instruction | None:
    match = _INSTRUCTION.match(line)
    if not match:
        return None
    name, rest = match.groups()
    end = _matching(rest, 0) if rest.startswith("(") else rest.find(" ")
    if end <= 0:
        return None
    shape, rest = rest[:end], rest[end:].lstrip()
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    close = _matching(rest, op.end() - 1)
    inside = rest[op.end() : close - 1]
    # Operands are `%name`, or `type %name` / bare names in other printers: the last word of each.
    operands = tuple(re.findall(r"%([\w.\-]+)", inside)) or tuple(p.split()[-1] for p in inside.split(",") if p.strip())
    return _Instruction(name, shape, op.group(1), operands, rest[close:])


def _group_size(attributes: str, num_devices: int) -> int | None:
    """Chips per replica group of a collective, from its replica_groups attribute."""
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attributes)
    if mesh:
        sizes = {name: int(size) for name, size in re.findall(r"'([^']+)'=(\d+)", mesh.group(1))}
        size = 1
        for name, sub in re.findall(r"'([^']+)'(?::\(\d+\)(\d+))?", mesh.group(2)):
            size *= int(sub) if sub else sizes.get(name, 1)
        return size
    iota = re.search(r"replica_groups=\[([\d,]+)\]<=", attributes)
    if iota:
        return int(iota.group(1).split(",")[-1])
    explicit = re.search(r"replica_groups=\{(\{[^}]*\})?", attributes)
    if explicit:
        first = explicit.group(1)
        return len(re.findall(r"\d+", first)) if first else num_devices
    return None


def _trip_count(attributes: str, condition: list[_Instruction]) -> int | None:
    """A while loop's trips: its known_trip_count, or N of a condition `counter < N` (JAX's loops count from 0)."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', attributes)
    if known:
        return int(known.group(1))
    constants = {
        i.name: int(i.operands[0]) for i in condition if i.opcode == "constant" and i.operands and i.operands[0].lstrip("-").isdigit()
    }
    for i in condition:
        if i.opcode != "compare" or len(i.operands) != 2:
            continue
        if "direction=LT" in i.attributes and i.operands[1] in constants:
            return constants[i.operands[1]]
        if "direction=GT" in i.attributes and i.operands[0] in constants:
            return constants[i.operands[0]]
    return None


def _split(hlo_text: str) -> tuple[dict[str, list[_Instruction]], list[str], str | None, dict[str, str]]:
    """{computation: instructions}, computations in text order, the entry's name, {instruction: shape}."""
    computations: dict[str, list[_Instruction]] = {}
    order, entry, shapes, current = [], None, {}, None
    for line in hlo_text.splitlines():
        if current is None:
            header = _COMPUTATION.match(line)
            if header and not line.startswith("HloModule"):
                current = header.group(2)
                computations[current], entry = [], current if header.group(1) else entry
                order.append(current)
            continue
        if line.strip() == "}":
            current = None
            continue
        instruction = _parse_instruction(line)
        if instruction:
            computations[current].append(instruction)
            shapes[instruction.name] = instruction.shape
    return computations, order, entry, shapes


def collectives(hlo_text: str) -> Collectives:
    """Counts and per-chip bytes of the collectives in a partitioned HLO module's text (see the module docstring)."""
    computations, order, entry, shapes = _split(hlo_text)
    header = re.search(r"num_partitions=(\d+)", hlo_text)
    replicas = re.search(r"replica_count=(\d+)", hlo_text)
    num_devices = (int(header.group(1)) if header else 1) * (int(replicas.group(1)) if replicas else 1)
    # Callees are printed before their callers and the entry last, so one pass from the end gives every
    # computation's executions per step.
    runs = dict.fromkeys(order, 0)
    if entry is not None:
        runs[entry] = 1
    notes, loops = [], []
    for name in reversed(order):
        for i in computations[name]:
            for attribute, value in _CALLEE.findall(i.attributes):
                callees = re.findall(r"%?([\w.\-]+)", value)
                trips = 1
                if attribute == "body":
                    condition = re.search(r"condition=%?([\w.\-]+)", i.attributes)
                    trips = _trip_count(i.attributes, computations.get(condition.group(1), []) if condition else [])
                    loops.append((i.name, trips))
                    if trips is None:
                        notes.append(f"while loop {i.name}: trip count not in the HLO, its collectives counted once")
                        trips = 1
                if attribute == "to_apply" and i.opcode not in ("call", "async-start"):
                    continue  # reductions' and sorts' scalar computations hold no collectives
                for callee in callees:
                    if callee in runs:
                        runs[callee] += runs[name] * trips
    counts = dict.fromkeys(KINDS, 0)
    sent = dict.fromkeys(KINDS, 0.0)
    channels = set()
    for name in order:
        for i in computations[name]:
            kind = i.opcode.removesuffix("-start")
            if kind not in KINDS or not runs[name]:
                continue
            channel = re.search(r"\bchannel_id=(\d+)", i.attributes)
            if channel:
                if channel.group(1) in channels:
                    continue
                channels.add(channel.group(1))
            if kind == "all-reduce" and name.startswith("all-reduce-scatter"):
                kind = "reduce-scatter"
            operands = i.operands[:1] if kind == "collective-permute" else i.operands
            size = sum(shape_bytes(shapes.get(o, "")) for o in operands)
            n = _group_size(i.attributes, num_devices) or num_devices
            per_chip = {
                "all-gather": (n - 1) * size,
                "reduce-scatter": (n - 1) / n * size,
                "all-reduce": 2 * (n - 1) / n * size,
                "all-to-all": (n - 1) / n * size,
                "collective-permute": size,
            }[kind]
            counts[kind] += runs[name]
            sent[kind] += runs[name] * per_chip
    return Collectives({k: KindTotal(counts[k], sent[k]) for k in KINDS}, tuple(loops), tuple(notes))
