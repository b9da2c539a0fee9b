"""Documents: a layered image and its history of edits.

A document holds the versions of one `LayeredSample` (version 0 as generated or opened, then one per edit) and
which one is current; undo and redo move between them, and an edit made after an undo drops the versions it
replaces, as editors do. Every version is written, when it is made, as an exchange-format folder
`<session>/<document>/v<NNN>/`, so that nothing made in the studio is lost with the server.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import threading
from pathlib import Path

import numpy as np
import PIL.Image

from layerdiff_jax.data.layers import LayeredSample, layer_file, mask_file, write_sample_folder
from layerdiff_jax.sampling.outputs import layer_pixels


class DocumentError(KeyError):
    """An unknown document, version or layer; the message says which."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclasses.dataclass
class Document:
    id: str
    folder: Path
    versions: list[LayeredSample] = dataclasses.field(default_factory=list)
    current: int = -1
    origin: str = ""  # "generated" or the name of the opened file

    @property
    def sample(self) -> LayeredSample:
        return self.versions[self.current]

    def push(self, sample: LayeredSample) -> None:
        """A new current version; versions after the current one (undone edits) are dropped."""
        del self.versions[self.current + 1 :]
        self.versions.append(sample)
        self.current = len(self.versions) - 1
        write_sample_folder(sample, self.folder / f"v{self.current:03d}")

    def move(self, step: int) -> None:
        """Undo (-1) or redo (+1)."""
        target = self.current + step
        if not 0 <= target < len(self.versions):
            raise DocumentError(f"nothing to {'undo' if step < 0 else 'redo'} in {self.id}")
        self.current = target

    def describe(self) -> dict:
        """What the page shows of the current version: prompts, layer image addresses, undo/redo."""
        sample, base = self.sample, f"/api/documents/{self.id}/v/{self.current}"
        layers = [{"index": 0, "prompt": sample.layer_prompts[0], "image": f"{base}/layer_00.png", "mask": None}]
        layers += [
            {"index": i, "prompt": p, "image": f"{base}/{layer_file(i)}", "mask": f"{base}/{mask_file(i)}"}
            for i, p in enumerate(sample.layer_prompts[1:], start=1)
        ]
        return {
            "id": self.id,
            "origin": self.origin,
            "global_prompt": sample.global_prompt,
            "size": list(sample.size),
            "version": self.current,
            "versions": len(self.versions),
            "can_undo": self.current > 0,
            "can_redo": self.current < len(self.versions) - 1,
            "composite": f"{base}/composite.png",
            "layers": layers,
            "edits": sample.metadata.get("edits", []),
        }


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def version_image(sample: LayeredSample, name: str) -> bytes:
    """A PNG of a version: composite.png, layer_NN.png (RGBA; layer_00 is the opaque background) or mask_NN.png."""
    pixels = layer_pixels(sample)
    if name == "composite.png":
        return _png(sample.composite())
    for i in range(sample.num_layers):
        if name == layer_file(i):
            return _png(pixels[i])
        if i and name == mask_file(i):
            return _png(sample.masks[i - 1])
    raise DocumentError(f"no image {name!r} in a sample of {sample.num_layers} layers")


class DocumentStore:
    """The session's documents, by id; safe to use from the server's threads."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._documents: dict[str, Document] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def create(self, sample: LayeredSample, origin: str) -> Document:
        with self._lock:
            doc_id = f"doc{next(self._ids):04d}"
            document = Document(doc_id, self.folder / doc_id, origin=origin)
            self._documents[doc_id] = document
        document.push(sample)
        return document

    def get(self, doc_id: str) -> Document:
        with self._lock:
            if doc_id not in self._documents:
                raise DocumentError(f"no document {doc_id!r}")
            return self._documents[doc_id]

    def version(self, doc_id: str, version: int) -> LayeredSample:
        document = self.get(doc_id)
        if not 0 <= version < len(document.versions):
            raise DocumentError(f"{doc_id} has no version {version}")
        return document.versions[version]
