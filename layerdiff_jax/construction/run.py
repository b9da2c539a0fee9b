"""The construction run: per-image flow, batching, resume and the summary.

Output layout under `out/`:

    <key>/                     one exchange-format sample folder per accepted image
    summary.json               images in, samples out, rejections by reason, layers per sample
    rejections.jsonl           one line per rejected image: {"image", "key", "reason", "detail"}
    .construction/status/<key>.json   the per-image done marker (hidden: the TFDS builder skips it)

An image is done once its marker exists; the sample folder is moved into place before the marker is
written, so an interrupted run resumes with the images that have no marker and never redoes one.

Rejection reasons: `unreadable_image`, `no_phrases` (nothing but background words in the caption),
`no_detections`, `no_salient_masks` (every mask failed the saliency overlap or vanished),
`inpainting_keeps_object` (the rejection rule), `stage_error` (a model stage raised on this image,
also when retried alone; the detail says which and why).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
from tqdm import tqdm

from layerdiff_jax.construction.config import ConstructionConfig, Rules
from layerdiff_jax.construction.oracle import GroundTruth
from layerdiff_jax.construction.rules import (
    dedupe_detections,
    depth_order,
    filter_phrases,
    inpainting_keeps_object,
    keep_salient,
    mean_depths,
    resolve_overlaps,
    saliency_overlap,
    salient_fraction,
)
from layerdiff_jax.construction.stages import Detection, Frame, Stages
from layerdiff_jax.data.layers import (
    DataError,
    LayeredSample,
    cut_foreground,
    dilate_mask,
    image_array,
    list_sample_folders,
    write_sample_folder,
)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
STATE_DIR = ".construction"
SUMMARY_FILE = "summary.json"
REJECTIONS_FILE = "rejections.jsonl"


class ImageLoadError(Exception):
    """An input image that cannot be decoded; the message names the file."""


# ----------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class Source:
    """The images of a run: `names[key]` is the image's path relative to the input folder."""

    names: dict[str, str]
    load: Callable[[str], np.ndarray]  # key -> (H, W, 3) uint8; raises ImageLoadError


def image_key(relpath: str) -> str:
    """A folder name for an image: its relative path with every run of other characters as '_'
    ('photos/cat 1.jpg' -> 'photos_cat_1_jpg'; the extension stays so 'a.jpg' and 'a.png' differ)."""
    return re.sub(r"[^A-Za-z0-9-]+", "_", relpath).strip("_") or "image"


def _unique_keys(relpaths: Sequence[str]) -> dict[str, str]:
    keys = [image_key(p) for p in relpaths]
    counts = collections.Counter(keys)
    return {(k if counts[k] == 1 else f"{k}_{zlib.crc32(p.encode()):08x}"): p for k, p in zip(keys, relpaths)}


def load_image(path: Path, max_side: int | None) -> np.ndarray:
    """RGB uint8, EXIF orientation applied, downscaled so the long side is at most `max_side`."""
    try:
        with PIL.Image.open(path) as img:
            img = PIL.Image.fromarray(image_array(PIL.ImageOps.exif_transpose(img), "RGB", path))
    except DataError as e:  # a mode that is not read (float images)
        raise ImageLoadError(str(e)) from None
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
        raise ImageLoadError(f"{path}: not a readable image ({e})") from None
    if max_side is not None and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), PIL.Image.LANCZOS)
    return np.asarray(img)


def image_source(images_dir: str | os.PathLike, max_side: int | None) -> Source:
    """Every file with an image suffix below `images_dir` (recursively, hidden ones skipped)."""
    root = Path(images_dir)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    relpaths = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    names = _unique_keys(relpaths)
    return Source(names, lambda key: load_image(root / names[key], max_side))


def oracle_source(samples_dir: str | os.PathLike) -> tuple[Source, GroundTruth]:
    """Exchange-format sample folders: images are their composites, the folders their ground truth."""
    folders = list_sample_folders(samples_dir)
    names = _unique_keys([f.name for f in folders])
    truth = GroundTruth({key: Path(samples_dir) / name for key, name in names.items()})

    def load(key: str) -> np.ndarray:
        try:
            return truth.sample(key).composite()
        except DataError as e:
            raise ImageLoadError(str(e)) from None

    return Source(names, load), truth


# ----------------------------------------------------------------------------- one batch


@dataclasses.dataclass(eq=False)
class Outcome:
    key: str
    sample: LayeredSample | None = None
    reason: str | None = None
    detail: str = ""


@dataclasses.dataclass(eq=False)
class _Work:
    """One image's state between stages."""

    frame: Frame
    caption: str = ""
    phrases: list[str] = dataclasses.field(default_factory=list)
    detections: list[Detection] = dataclasses.field(default_factory=list)
    masks: np.ndarray | None = None  # (N, H, W) bool, aligned with detections
    overlaps: np.ndarray | None = None
    depths: np.ndarray | None = None
    hole: np.ndarray | None = None
    background: np.ndarray | None = None
    hole_salient: float = 0.0
    reason: str | None = None
    detail: str = ""

    def reject(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail

    def keep(self, selection: np.ndarray) -> None:
        """Keeps the detections (and their per-layer arrays) picked by an index or bool array."""
        idx = np.arange(len(self.detections))[selection]
        self.detections = [self.detections[i] for i in idx]
        for name in ("masks", "overlaps", "depths"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[idx])


def _check_count(name: str, results: Sequence[Any], n: int) -> Sequence[Any]:
    if len(results) != n:
        raise ValueError(f"{name} returned {len(results)} results for {n} images")
    return results


def _run(name: str, works: Sequence[_Work], call: Callable[[list[_Work]], Sequence[Any]]) -> list[tuple[_Work, Any]]:
    """`call` on the still-active works as one batch -> (work, result) pairs. If the batch raises,
    each image is retried alone and the ones that still raise are rejected as `stage_error`."""
    active = [w for w in works if w.reason is None]
    if not active:
        return []
    try:
        return list(zip(active, _check_count(name, call(active), len(active))))
    except Exception as e:  # noqa: BLE001 - a model failing on one image must not stop the run
        if len(active) == 1:
            active[0].reject("stage_error", f"{name}: {type(e).__name__}: {e}")
            return []
        log.warning("%s failed on a batch of %d images (%s); retrying one by one", name, len(active), e)
    pairs = []
    for w in active:
        try:
            pairs.append((w, _check_count(name, call([w]), 1)[0]))
        except Exception as e:  # noqa: BLE001
            w.reject("stage_error", f"{name}: {type(e).__name__}: {e}")
    return pairs


def _frames(works: Sequence[_Work]) -> list[Frame]:
    return [w.frame for w in works]


def _shaped(name: str, results: Sequence[np.ndarray], works: Sequence[_Work], shape: Callable[[_Work], tuple]):
    """Checks each result against `shape(work)` (sizes come from the work's frame)."""
    for w, r in zip(works, results):
        if np.shape(r) != shape(w):
            raise ValueError(f"{name} returned shape {np.shape(r)} for {w.frame.key}, expected {shape(w)}")
    return results


def _size(w: _Work) -> tuple[int, int]:
    return w.frame.image.shape[:2]


def construct_batch(frames: Sequence[Frame], stages: Stages, rules: Rules) -> list[Outcome]:
    """Runs every stage over a batch of decoded images; one outcome per frame, in order."""
    works = [_Work(f) for f in frames]

    # Each stage call takes the works still active and returns one result per work.
    def phrases(ws):
        return [filter_phrases(stages.phrases.extract(x.caption), rules.stop_words) for x in ws]

    def detect(ws):
        return stages.detector.detect(_frames(ws), [x.phrases for x in ws])

    def segment(ws):
        boxes = [np.array([d.box for d in x.detections], np.float32).reshape(-1, 4) for x in ws]
        return _shaped(
            "segmenter", stages.segmenter.segment(_frames(ws), boxes), ws, lambda x: (len(x.detections), *_size(x))
        )

    def saliency(ws):
        return _shaped("saliency", stages.saliency.saliency(_frames(ws)), ws, _size)

    def depth(ws):
        return _shaped("depth", stages.depth.depth(_frames(ws)), ws, _size)

    def inpaint(ws):
        negatives = [", ".join(d.phrase for d in x.detections) for x in ws]
        filled = stages.inpainter.inpaint(_frames(ws), [x.hole for x in ws], negatives)
        return _shaped("inpainter", filled, ws, lambda x: (*_size(x), 3))

    def background_saliency(ws):
        backgrounds = [Frame(x.frame.key, x.background) for x in ws]
        return _shaped("saliency", stages.saliency.saliency(backgrounds), ws, _size)

    for w, caption in _run("captioner", works, lambda ws: stages.captioner.caption(_frames(ws))):
        w.caption = caption

    for w, found in _run("phrases", works, phrases):
        w.phrases = found
        if not found:
            w.reject("no_phrases", f"no object phrase in caption {w.caption!r}")

    for w, detections in _run("detector", works, detect):
        w.detections = dedupe_detections(detections, rules.nms_iou)
        if not w.detections:
            w.reject("no_detections", f"nothing found for {w.phrases}")

    for w, masks in _run("segmenter", works, segment):
        w.masks = np.asarray(masks, bool)

    for w, smap in _run("saliency", works, saliency):
        salient = np.asarray(smap) > rules.saliency_threshold
        w.overlaps = saliency_overlap(w.masks, salient)  # for the metadata and the rejection detail
        overlaps = np.round(w.overlaps, 3).tolist()
        w.keep(keep_salient(w.masks, salient, rules.min_saliency_overlap))
        w.keep(slice(rules.max_foregrounds))  # detections are sorted by score: the most confident stay
        if not w.detections:
            w.reject("no_salient_masks", f"saliency overlaps {overlaps} <= {rules.min_saliency_overlap}")

    for w, dmap in _run("depth", works, depth):
        dmap = np.asarray(dmap, np.float64)
        w.depths = mean_depths(w.masks, dmap)  # kept for the metadata
        w.keep(depth_order(w.masks, dmap))
        w.masks = resolve_overlaps(w.masks)
        h, wd = _size(w)
        w.keep(w.masks.sum(axis=(1, 2)) >= max(1, rules.min_mask_fraction * h * wd))
        if not w.detections:
            w.reject("no_salient_masks", f"every mask is under {rules.min_mask_fraction} of the image after occlusion")
        else:
            w.hole = dilate_mask(w.masks.any(axis=0).astype(np.uint8)) > 0

    for w, filled in _run("inpainter", works, inpaint):
        w.background = np.where(w.hole[..., None], np.asarray(filled), w.frame.image).astype(np.uint8)

    for w, smap in _run("saliency", works, background_saliency):
        salient = np.asarray(smap) > rules.saliency_threshold
        w.hole_salient = salient_fraction(salient, w.hole)  # for the metadata and the rejection detail
        if inpainting_keeps_object(salient, w.hole, rules.max_salient_in_hole):
            w.reject(
                "inpainting_keeps_object",
                f"{w.hole_salient:.3f} of the inpainted region is salient (max {rules.max_salient_in_hole})",
            )

    return [_outcome(w, rules) for w in works]


def _outcome(w: _Work, rules: Rules) -> Outcome:
    if w.reason is not None:
        return Outcome(w.frame.key, reason=w.reason, detail=w.detail)
    image = w.frame.image
    masks = w.masks.astype(np.uint8) * 255
    sample = LayeredSample(
        background=w.background,
        foregrounds=np.stack([cut_foreground(image, m) for m in masks]),
        masks=masks,
        global_prompt=w.caption,
        layer_prompts=[rules.background_prompt, *(d.phrase for d in w.detections)],
        metadata={
            "source": "construction",
            "phrases": w.phrases,
            "layers": [
                {
                    "box": [round(v, 2) for v in d.box],
                    "score": round(d.score, 4),
                    "saliency_overlap": round(float(o), 4),
                    "mean_depth": round(float(z), 4),
                }
                for d, o, z in zip(w.detections, w.overlaps, w.depths)
            ],
            "hole_salient_fraction": round(w.hole_salient, 4),
        },
    )
    return Outcome(w.frame.key, sample=sample)


# ----------------------------------------------------------------------------- run state and summary


class RunState:
    """The output folder: sample folders, per-image done markers, summary."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out = Path(out_dir)
        self.status_dir = self.out / STATE_DIR / "status"
        self.tmp_dir = self.out / STATE_DIR / "tmp"
        self.status_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def status(self, key: str) -> dict[str, Any] | None:
        """The image's done marker, or None when it is still to do (a damaged marker counts as none)."""
        try:
            return json.loads((self.status_dir / f"{key}.json").read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def record(self, outcome: Outcome, image: str) -> None:
        """Moves the sample folder into place (or removes a stale one), then writes the marker."""
        final = self.out / outcome.key
        if outcome.sample is not None:
            tmp = self.tmp_dir / outcome.key
            shutil.rmtree(tmp, ignore_errors=True)
            outcome.sample.metadata["image"] = image
            write_sample_folder(outcome.sample, tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        else:
            shutil.rmtree(final, ignore_errors=True)
        status = {
            "key": outcome.key,
            "image": image,
            "status": "sample" if outcome.sample is not None else "rejected",
            "reason": outcome.reason,
            "detail": outcome.detail,
            "num_layers": outcome.sample.num_layers if outcome.sample is not None else 0,
        }
        marker = self.status_dir / f"{outcome.key}.json"
        tmp_marker = self.tmp_dir / f"{outcome.key}.json"
        tmp_marker.write_text(json.dumps(status) + "\n")
        os.replace(tmp_marker, marker)

    def summarize(self, names: dict[str, str], this_run: dict[str, Any]) -> dict[str, Any]:
        """Writes summary.json and rejections.jsonl over every image of `names`, done in any run."""
        statuses = [s for s in (self.status(k) for k in sorted(names)) if s is not None]
        samples = [s for s in statuses if s["status"] == "sample"]
        rejected = [s for s in statuses if s["status"] == "rejected"]
        summary = {
            "images_in": len(names),
            "samples_out": len(samples),
            "rejected": len(rejected),
            "pending": len(names) - len(statuses),
            "rejections": dict(sorted(collections.Counter(s["reason"] for s in rejected).items())),
            "layers_per_sample": {
                str(n): c for n, c in sorted(collections.Counter(s["num_layers"] for s in samples).items())
            },
            "this_run": this_run,
        }
        (self.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        lines = [json.dumps({k: s[k] for k in ("image", "key", "reason", "detail")}) + "\n" for s in rejected]
        (self.out / REJECTIONS_FILE).write_text("".join(lines))
        return summary


# ----------------------------------------------------------------------------- the run


def _load(source: Source, key: str) -> np.ndarray | ImageLoadError:
    try:
        return source.load(key)
    except ImageLoadError as e:
        return e


def construct(
    source: Source,
    out_dir: str | os.PathLike,
    stages: Stages,
    config: ConstructionConfig,
    *,
    workers: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Constructs a sample (or a rejection) for every image of `source` not done yet; returns the summary.

    Model stages run a batch of `config.batch_size` images at a time; `workers` threads decode the
    next batch and write finished samples meanwhile.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    start = time.perf_counter()
    state = RunState(out_dir)
    todo = [k for k in source.names if state.status(k) is None]
    batches = [todo[i : i + config.batch_size] for i in range(0, len(todo), config.batch_size)]
    counts = collections.Counter()
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(todo), unit="img", disable=not progress) as bar:
        loads = [pool.submit(_load, source, k) for k in batches[0]] if batches else []
        writes: list[Future] = []
        for b, batch in enumerate(batches):
            images = [f.result() for f in loads]
            if b + 1 < len(batches):  # decode the next batch while the models run
                loads = [pool.submit(_load, source, k) for k in batches[b + 1]]
            outcomes = {
                k: Outcome(k, reason="unreadable_image", detail=str(img))
                for k, img in zip(batch, images)
                if isinstance(img, ImageLoadError)
            }
            frames = [Frame(k, img) for k, img in zip(batch, images) if not isinstance(img, ImageLoadError)]
            if frames:
                outcomes.update((o.key, o) for o in construct_batch(frames, stages, config.rules))
            for f in writes:  # the previous batch's writes
                f.result()
            writes = [pool.submit(state.record, outcomes[k], source.names[k]) for k in batch]
            counts.update("sample" if outcomes[k].sample is not None else outcomes[k].reason for k in batch)
            bar.update(len(batch))
            bar.set_postfix(samples=counts["sample"], rejected=sum(counts.values()) - counts["sample"])
        for f in writes:
            f.result()
    seconds = time.perf_counter() - start
    this_run = {
        "processed": len(todo),
        "already_done": len(source.names) - len(todo),
        "seconds": round(seconds, 2),
        "images_per_second": round(len(todo) / seconds, 3) if todo else 0.0,
    }
    return state.summarize(source.names, this_run)
