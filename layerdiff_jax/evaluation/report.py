"""Evaluates a folder of exchange-format sample folders: prompt following, mask quality, FID, CLIP score.

Everything is reported per layer count (2, 3, 4, ... layers, background included) and overall.
FID and CLIP score need local weights; without them they are reported as skipped, with the reason,
in both the printed table and the metrics dict. FID and CLIP score are measured on composites (the
layers composed back to front, `LayeredSample.composite`), CLIP score against the global prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from layerdiff_jax.data.layers import SAMPLE_JSON, DataError, list_sample_folders, read_image, read_sample_folder
from layerdiff_jax.evaluation import prompt_following as pf
from layerdiff_jax.evaluation import shapes
from layerdiff_jax.evaluation.fid import fid_from_features
from layerdiff_jax.fileio import partial_folders
from layerdiff_jax.sampling.outputs import check_layered_files

OVERALL = "overall"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
COLUMNS = (  # (metrics key, table header)
    ("num_samples", "n"),
    ("layer_colour_accuracy", "colour"),
    ("shape_accuracy", "shape"),
    ("background_colour_accuracy", "bg colour"),
    ("clean_mask_rate", "clean"),
    ("non_empty_mask_rate", "non-empty"),
    ("fid", "FID"),
    ("clip_score", "CLIP"),
)


def _read_samples(folders: list[Path], partial: list[Path], skip_bad: bool):
    """The readable samples, and why the others are not (raised unless `skip_bad`). A folder is unreadable
    when a file is missing or damaged, including a layered file cut short; `partial` are staging folders of
    writes that never finished."""
    samples, skipped = [], []
    for folder in partial:
        e = DataError(f"{folder}: an incomplete sample folder (its write did not finish); sample again, or delete it")
        if not skip_bad:
            raise e
        skipped.append(str(e))
    for folder in folders:
        try:
            sample = read_sample_folder(folder)
            check_layered_files(folder)
            samples.append((folder, sample))
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
    return samples, skipped


def read_reference_images(root: str | Path) -> tuple[list[np.ndarray], list[int | None]]:
    """Reference images for FID and their layer counts: the composites of the sample folders under
    `root`, or else every PNG/JPEG file directly in `root` (layer count unknown: None)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    folders = [p for p in list_sample_folders(root) if (p / SAMPLE_JSON).is_file()]
    if folders:
        samples = [read_sample_folder(p) for p in folders]
        return [s.composite() for s in samples], [s.num_layers for s in samples]
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{root}: holds neither sample folders nor PNG/JPEG images")
    images = [read_image(path, "RGB") for path in files]
    return images, [None] * len(images)


def _group_fid(features, counts, ref_features, ref_counts, group) -> float | None:
    """FID of one group; the reference is restricted to the same layer count when it has them."""
    mine = features if group == OVERALL else features[np.array(counts) == group]
    if group == OVERALL or ref_counts[0] is None:
        ref = ref_features
    else:
        ref = ref_features[np.array(ref_counts) == group]
    if len(mine) < 2 or len(ref) < 2:
        return None  # a covariance needs two images on each side
    return fid_from_features(mine, ref)


def _fid(composites, counts, groups, reference, inception, batch_size) -> dict[str, Any]:
    if inception is None:
        return {"status": "skipped", "reason": "no Inception weights given (--inception PATH)"}
    if reference is None:
        return {"status": "skipped", "reason": "no reference images given (--reference DIR)"}
    from layerdiff_jax.evaluation.inception import InceptionFeatures, load_inception

    extract = InceptionFeatures(load_inception(inception), batch_size=batch_size)
    ref_images, ref_counts = read_reference_images(reference)
    features, ref_features = extract(composites), extract(ref_images)
    by_group = {str(g): _group_fid(features, counts, ref_features, ref_counts, g) for g in groups}
    return {
        "status": "computed",
        "weights": str(inception),
        "reference": str(reference),
        "num_reference": len(ref_images),
        "reference_matched_by_layer_count": ref_counts[0] is not None,
        "by_group": by_group,
    }


def _clip(composites, prompts, counts, groups, clip, batch_size) -> dict[str, Any]:
    if clip is None:
        return {"status": "skipped", "reason": "no CLIP checkpoint given (--clip DIR)"}
    from layerdiff_jax.evaluation.clip_score import ClipScorer

    scores = ClipScorer(clip, batch_size=batch_size).scores(composites, prompts)
    counts = np.array(counts)
    by_group = {str(g): float(scores[counts == g].mean()) if g != OVERALL else float(scores.mean()) for g in groups}
    return {"status": "computed", "checkpoint": str(clip), "by_group": by_group}


def evaluate_samples(
    samples_dir: str | Path,
    reference: str | Path | None = None,
    inception: str | Path | None = None,
    clip: str | Path | None = None,
    batch_size: int = 32,
    skip_bad: bool = False,
) -> dict[str, Any]:
    """All metrics of the sample folders under `samples_dir`, as a JSON-ready dict."""
    folders, partial = list_sample_folders(samples_dir), partial_folders(samples_dir)
    if not folders and not partial:
        raise DataError(f"{samples_dir}: no sample folders in it")
    loaded, bad = _read_samples(folders, partial, skip_bad)
    if not loaded:
        raise DataError(f"{samples_dir}: none of its {len(folders) + len(partial)} sample folders could be read")
    scores = [pf.score_sample(sample, folder.name) for folder, sample in loaded]
    counts = [s.num_layers for s in scores]
    groups: list[int | str] = [*sorted(set(counts)), OVERALL]
    rows = {
        str(g): pf.summarise([s for s in scores if g == OVERALL or s.num_layers == g]) for g in groups
    }

    composites = [sample.composite() for _, sample in loaded]
    prompts = [sample.global_prompt for _, sample in loaded]
    fid = _fid(composites, counts, groups, reference, inception, batch_size)
    clip_score = _clip(composites, prompts, counts, groups, clip, batch_size)
    for name, result in (("fid", fid), ("clip_score", clip_score)):
        for g in rows:
            rows[g][name] = result["by_group"][g] if result["status"] == "computed" else None

    named = (("FID", fid), ("CLIP score", clip_score))
    skipped = [f"{name}: {r['reason']}" for name, r in named if r["status"] == "skipped"]
    return {
        "samples_dir": str(samples_dir),
        "groups": rows,
        "fid": fid,
        "clip_score": clip_score,
        "skipped_metrics": skipped,
        "unreadable_samples": bad,
        "definitions": {
            "mask_binary_threshold": shapes.BINARY_THRESHOLD,
            "soft_band": list(pf.SOFT_BAND),
            "clean_max_soft_edge_width_px": pf.CLEAN_MAX_EDGE_WIDTH,
            "non_empty_min_area_fraction": pf.MIN_AREA_FRACTION,
            "shape": "best IoU of the largest component with area-matched rotated templates",
            "shape_min_iou": shapes.MIN_IOU,
            "background_colour": "per-pixel vote over the whole background layer, pattern tones count for their colour",
            "layer_colour": "nearest palette colour to the mean foreground RGB inside the binarised mask",
        },
        "samples": [s.to_json() for s in scores],
    }


def _cell(key: str, value, skipped: set[str]) -> str:
    if value is None:
        return "skipped" if key in skipped else "-"
    if key == "num_samples":
        return str(value)
    if key in ("fid", "clip_score"):
        return f"{value:.2f}"
    return f"{value:.3f}"


def format_table(metrics: dict[str, Any]) -> str:
    """The metrics as a text table, one row per layer count and one overall, then what was skipped."""
    skipped = {name for name in ("fid", "clip_score") if metrics[name]["status"] == "skipped"}
    header = ["layers", *(title for _, title in COLUMNS)]
    rows = [[group, *(_cell(key, row[key], skipped) for key, _ in COLUMNS)] for group, row in metrics["groups"].items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"skipped {line}" for line in metrics["skipped_metrics"]]
    if metrics["unreadable_samples"]:
        lines.append(f"unreadable sample folders skipped: {len(metrics['unreadable_samples'])}")
        lines += [f"  {reason}" for reason in metrics["unreadable_samples"]]
    return "\n".join(lines)
