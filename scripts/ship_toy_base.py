#!/usr/bin/env python
"""Replaces the shipped toy base with a pretraining run's model, if it scores better, and records how it was made.

  ship_toy_base.py RUN_DIR --commit SHA [--command "python scripts/train.py ..."] [--count 48] [--force]

RUN_DIR is a workdir of `scripts/train.py --config configs/toy_sd_pretrain.py`. The run's model folder
(RUN_DIR/model) is scored with `evaluate_base` (held-out single-object and composite prompts, guidance
1, 3 and 5); it replaces layerdiff_jax/assets/toy_base only when its best single-object colour + shape beats the
shipped base's (or with --force), and its run is appended to the base's provenance.json: the command, the commit
it ran at, seeds, steps, samples seen, wall time, the machine, parameter counts and the scores, and the run's
VAE decoder fine-tune (RUN_DIR/vae_decoder.json, from `finetune_vae_decoder.py`) when it had one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
from pathlib import Path

PROVENANCE = "provenance.json"
DECODER_RECORD = "vae_decoder.json"  # finetune_vae_decoder.py's record
DEFAULT_COMMAND = "python scripts/train.py --config configs/toy_sd_pretrain.py --workdir runs/toy_base"
GUIDANCES = (1.0, 3.0, 5.0)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="the pretraining workdir (holds model/, config.json, metrics.jsonl)")
    p.add_argument("--commit", required=True, help="the commit the run trained at")
    p.add_argument("--command", default=DEFAULT_COMMAND, help="the command that ran it")
    p.add_argument("--count", type=int, default=48, help="held-out prompts per set")
    p.add_argument("--machine", help="where the run trained, when not on this machine (default: this machine)")
    p.add_argument("--force", action="store_true", help="ship even if it does not score better")
    return p


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        cpu = f"{names[0]} x{len(names)}" if names else cpu
    except OSError:
        pass
    import jax

    return f"{jax.devices()[0].device_kind} ({jax.default_backend()}); host {cpu}, {os.cpu_count()} cores"


def best(scores: dict) -> float:
    """The best colour + shape on single objects over the guidance scales."""
    return max(s["single object"]["colour"] + s["single object"]["shape"] for s in scores.values())


def _inherited_samples(started_from: str, history: list[dict], shipped: Path) -> int:
    """Samples the starting point had seen: a run continued from the shipped base carries on from its total."""
    if started_from == "toy" or not history or Path(started_from).resolve() != shipped.resolve():
        return 0
    return history[-1].get("samples_seen_total", history[-1]["samples_seen"])


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from layerdiff_jax.evaluation.text_to_image import evaluate_base, format_base_table
    from layerdiff_jax.sampling.text_to_image import TextToImagePipeline
    from layerdiff_jax.toy import TOY_BASE
    from layerdiff_jax.training.metric_writer import read_metrics

    model_dir = args.run / "model"
    if not (model_dir / "unet").is_dir():
        print(f"error: {model_dir} is not an SD folder written by a pretraining run", file=sys.stderr)
        return 2
    config = json.loads((args.run / "config.json").read_text())
    rows = read_metrics(args.run)
    steps = rows[-1]["step"] if rows else 0
    every = config["log"]["every_steps"]
    # Rows record the run's elapsed time; rows of a segment written before they did count their steps' own time.
    timed = [r for r in rows if "elapsed_s" in r]
    wall = (timed[-1]["elapsed_s"] if timed else 0.0) + sum(every / r["steps_per_sec"] for r in rows if "elapsed_s" not in r)

    scores, _ = evaluate_base(TextToImagePipeline.load(model_dir), count=args.count, guidances=GUIDANCES)
    print(format_base_table(scores))
    history = json.loads((TOY_BASE / PROVENANCE).read_text())["runs"] if (TOY_BASE / PROVENANCE).is_file() else []
    if history and best(scores) <= best(history[-1]["scores"]) and not args.force:
        print(f"not shipped: single-object colour + shape {best(scores):.3f} does not beat the shipped base's "
              f"{best(history[-1]['scores']):.3f} (--force to ship anyway)")
        return 1

    train = config["train"]
    batch = train["per_host_batch_size"] * train["grad_accum_steps"]
    record = json.loads((model_dir / "layerdiff_conversion.json").read_text())
    run = {
        "command": args.command,
        "commit": args.commit,
        "shipped_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "started_from": config["model"]["sd_path"],
        "seed": config["seed"],
        "data": {"seed": config["data"]["synthetic"]["seed"], "num_train": config["data"]["synthetic"]["num_train"],
                 "layer_mix": config["data"]["synthetic"]["layer_mix"], "flat_views": config["data"]["flat_views"]},
        "steps": steps,
        "batch_size": batch,
        "samples_seen": steps * batch,
        "samples_seen_total": steps * batch + _inherited_samples(config["model"]["sd_path"], history, TOY_BASE),
        "wall_time_s": round(wall),
        "machine": args.machine or machine(),
        "parameters": record["parameters"],
        "scores": scores,
        "evaluation": f"scripts/evaluate_base.py, {args.count} held-out prompts per set, 25 DDIM steps",
    }
    if (args.run / DECODER_RECORD).is_file():
        run["vae_decoder"] = json.loads((args.run / DECODER_RECORD).read_text())
    staging = TOY_BASE.with_name(TOY_BASE.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(model_dir, staging)
    record["source"] = "pretrained: see provenance.json"
    record["tokenizer"] = "toy WordLevel tokenizer (layerdiff_jax.data.tokenizer.build_toy_tokenizer)"
    (staging / "layerdiff_conversion.json").write_text(json.dumps(record, indent=2) + "\n")
    (staging / PROVENANCE).write_text(json.dumps({"runs": history + [run]}, indent=2) + "\n")
    shutil.rmtree(TOY_BASE, ignore_errors=True)
    staging.rename(TOY_BASE)
    print(f"shipped {model_dir} as {TOY_BASE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
