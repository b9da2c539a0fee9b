"""The model stages on transformers and diffusers (torch), loaded from local `save_pretrained` folders.

| stage      | class                       | models                                                          |
|------------|-----------------------------|-----------------------------------------------------------------|
| captioner  | `HFCaptioner`               | image-text-to-text: BLIP, BLIP-2, InstructBLIP (optional prompt) |
| detector   | `OwlDetector`               | zero-shot detection: OWL-ViT, OWLv2                             |
| segmenter  | `SamSegmenter`              | SAM (one box prompt per mask)                                   |
| saliency   | `SegmentationSaliency`      | semantic segmentation (SegFormer, DPT, BEiT, UperNet...)         |
| depth      | `HFDepthEstimator`          | depth estimation: DPT/MiDaS, Depth Anything, GLPN               |
| inpainter  | `DiffusersInpainter`        | diffusers inpainting pipelines (SD 1.5/2 inpainting, SDXL)       |

Saliency: ICON (the paper's) is not packaged, so saliency is the probability mass of chosen labels of
any transformers semantic-segmentation checkpoint: a binary salient-object model (label 1 =
salient), or a scene parser whose "thing" labels count as salient and whose "stuff" labels (wall,
floor, sky) do not, which is exactly what the paper's filter is for. Any other model fits the
`SaliencyModel` protocol.

Every stage runs its whole batch through the model at once, on CUDA when torch sees it (fp16 there
by default). `from_pretrained` is always called with `local_files_only=True`: nothing downloads.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
import transformers

from layerdiff_jax.construction.errors import ModelLoadError
from layerdiff_jax.construction.stages import Detection, Frame

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype


def resolve_runtime(device: str = "auto", dtype: str = "auto") -> Runtime:
    """'auto' device: CUDA when torch sees one, else CPU. 'auto' dtype: float16 on CUDA, else float32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dtype == "auto":
        return Runtime(dev, torch.float16 if dev.type == "cuda" else torch.float32)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected auto or one of {sorted(_DTYPES)}")
    return Runtime(dev, _DTYPES[dtype])


def _load(stage: str, loader, path: str | Path, **kwargs):
    """`loader.from_pretrained(path, local_files_only=True)` with errors that name the stage and folder."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{stage}: model folder {path} does not exist")
    try:
        return loader.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{stage}: cannot load {path} with {loader.__name__}: {e}") from None


def _to(inputs, runtime: Runtime) -> dict:
    """Moves processor outputs to the device; floating tensors also take the model dtype."""
    moved = {}
    for k, v in inputs.items():
        if torch.is_tensor(v):
            v = v.to(runtime.device, runtime.dtype) if v.is_floating_point() else v.to(runtime.device)
        moved[k] = v
    return moved


def _pil(frames: Sequence[Frame]) -> list[PIL.Image.Image]:
    return [PIL.Image.fromarray(f.image) for f in frames]


class _TorchStage:
    def _place(self, model, runtime: Runtime):
        self.runtime = runtime
        return model.to(runtime.device, runtime.dtype).eval()


class HFCaptioner(_TorchStage):
    """Captions with an image-text-to-text model. With `prompt`, InstructBLIP-style models take it as
    the instruction and BLIP takes it as the caption's start; a leading echo of the prompt is cut from
    the caption unless `keep_prompt`."""

    def __init__(
        self,
        path: str,
        runtime: Runtime,
        prompt: str | None = None,
        keep_prompt: bool = False,
        max_new_tokens: int = 40,
        num_beams: int = 1,
    ):
        self.processor = _load("captioner", transformers.AutoProcessor, path)
        self.model = self._place(_load("captioner", transformers.AutoModelForImageTextToText, path), runtime)
        self.prompt, self.keep_prompt = prompt, keep_prompt
        self.generate_kwargs = {"max_new_tokens": max_new_tokens, "num_beams": num_beams}

    @torch.inference_mode()
    def caption(self, frames: Sequence[Frame]) -> list[str]:
        kwargs = {"images": _pil(frames), "return_tensors": "pt"}
        if self.prompt:
            kwargs["text"] = [self.prompt] * len(frames)
        ids = self.model.generate(**_to(self.processor(**kwargs), self.runtime), **self.generate_kwargs)
        captions = [c.strip() for c in self.processor.batch_decode(ids, skip_special_tokens=True)]
        if self.prompt and not self.keep_prompt:
            p = self.prompt.strip().lower()
            captions = [c[len(p) :].strip() if c.lower().startswith(p) else c for c in captions]
        return captions


class OwlDetector(_TorchStage):
    """OWL-ViT / OWLv2 boxes for each frame's phrases with score above `threshold`."""

    MODEL_TYPES = ("owlvit", "owlv2")

    def __init__(self, path: str, runtime: Runtime, threshold: float = 0.1):
        self.processor = _load("detector", transformers.AutoProcessor, path)
        model = _load("detector", transformers.AutoModelForZeroShotObjectDetection, path)
        if model.config.model_type not in self.MODEL_TYPES:
            raise ModelLoadError(
                f"detector: {path} is a {model.config.model_type!r} model; supported: {', '.join(self.MODEL_TYPES)}"
            )
        self.model = self._place(model, runtime)
        self.threshold = threshold

    @torch.inference_mode()
    def detect(self, frames: Sequence[Frame], phrases: Sequence[Sequence[str]]) -> list[list[Detection]]:
        out: list[list[Detection]] = [[] for _ in frames]
        rows = [i for i, p in enumerate(phrases) if p]
        if not rows:
            return out
        texts = [list(phrases[i]) for i in rows]
        inputs = self.processor(
            text=texts,
            images=_pil([frames[i] for i in rows]),
            return_tensors="pt",
            padding="max_length",
            truncation=True,
        )
        outputs = self.model(**_to(inputs, self.runtime))
        # The processor pads every frame to the batch's largest phrase count with blank queries, which
        # the model scores like real ones: mask them out.
        logits = outputs.logits.float()
        for row, t in enumerate(texts):
            logits[row, :, len(t) :] = torch.finfo(logits.dtype).min
        outputs.logits = logits
        outputs.pred_boxes = outputs.pred_boxes.float()
        sizes = [frames[i].image.shape[:2] for i in rows]
        results = self.processor.post_process_grounded_object_detection(
            outputs, threshold=self.threshold, target_sizes=sizes, text_labels=texts
        )
        for i, (h, w), t, result in zip(rows, sizes, texts, results):
            boxes = result["boxes"].cpu().numpy().clip(0, [w, h, w, h])
            for box, label, score in zip(boxes, result["labels"].tolist(), result["scores"].tolist()):
                out[i].append(Detection(t[label], tuple(float(v) for v in box), float(score)))
        return out


class SamSegmenter(_TorchStage):
    """SAM masks, one per box prompt (single-mask output)."""

    def __init__(self, path: str, runtime: Runtime):
        self.processor = _load("segmenter", transformers.SamProcessor, path)
        self.model = self._place(_load("segmenter", transformers.SamModel, path), runtime)

    @torch.inference_mode()
    def segment(self, frames: Sequence[Frame], boxes: Sequence[np.ndarray]) -> list[np.ndarray]:
        out = [np.zeros((len(b), *f.image.shape[:2]), bool) for f, b in zip(frames, boxes)]
        rows = [i for i, b in enumerate(boxes) if len(b)]
        if not rows:
            return out
        n = max(len(boxes[i]) for i in rows)
        # SAM batches need the same box count per image: repeat the last box, drop its masks after.
        padded = [
            [list(map(float, b)) for b in boxes[i]] + [list(map(float, boxes[i][-1]))] * (n - len(boxes[i]))
            for i in rows
        ]
        inputs = self.processor(images=_pil([frames[i] for i in rows]), input_boxes=padded, return_tensors="pt")
        outputs = self.model(
            pixel_values=inputs["pixel_values"].to(self.runtime.device, self.runtime.dtype),
            input_boxes=inputs["input_boxes"].to(self.runtime.device, self.runtime.dtype),
            multimask_output=False,
        )
        masks = self.processor.post_process_masks(
            outputs.pred_masks.float().cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"]
        )
        for i, m in zip(rows, masks):
            out[i] = m[: len(boxes[i]), 0].numpy().astype(bool)
        return out


class SegmentationSaliency(_TorchStage):
    """Saliency = summed softmax probability of `salient_labels` (names or ids) of a semantic-
    segmentation model, resized to each frame. Default: every label but 0 (binary checkpoints use
    0 = background)."""

    def __init__(self, path: str, runtime: Runtime, salient_labels: Sequence[int | str] | None = None):
        self.processor = _load("saliency", transformers.AutoImageProcessor, path)
        self.model = self._place(_load("saliency", transformers.AutoModelForSemanticSegmentation, path), runtime)
        id2label = {int(k): v for k, v in self.model.config.id2label.items()}
        if salient_labels is None:
            self.label_ids = sorted(i for i in id2label if i != 0)
        else:
            by_name = {v: k for k, v in id2label.items()}
            unknown = [label for label in salient_labels if label not in by_name and label not in id2label]
            if unknown:
                raise ModelLoadError(f"saliency: labels {unknown} not in {path} (has {id2label})")
            self.label_ids = sorted({by_name.get(label, label) for label in salient_labels})

    @torch.inference_mode()
    def saliency(self, frames: Sequence[Frame]) -> list[np.ndarray]:
        inputs = self.processor(images=_pil(frames), return_tensors="pt")
        logits = self.model(**_to(inputs, self.runtime)).logits.float()
        prob = logits.softmax(1)[:, self.label_ids].sum(1, keepdim=True)
        return [
            F.interpolate(prob[i : i + 1], size=f.image.shape[:2], mode="bilinear", align_corners=False)[0, 0]
            .clamp(0, 1)
            .cpu()
            .numpy()
            for i, f in enumerate(frames)
        ]


class HFDepthEstimator(_TorchStage):
    """Depth maps at each frame's size. MiDaS-family models (DPT, Depth Anything) predict relative
    inverse depth (larger = nearer), so with `output: inverse_depth` the map is negated."""

    OUTPUTS = ("inverse_depth", "depth")

    def __init__(self, path: str, runtime: Runtime, output: str = "inverse_depth"):
        if output not in self.OUTPUTS:
            raise ModelLoadError(f"depth: output {output!r}; expected one of {self.OUTPUTS}")
        self.processor = _load("depth", transformers.AutoImageProcessor, path)
        self.model = self._place(_load("depth", transformers.AutoModelForDepthEstimation, path), runtime)
        self.sign = -1.0 if output == "inverse_depth" else 1.0

    @torch.inference_mode()
    def depth(self, frames: Sequence[Frame]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(frames)
        # Aspect-keeping processors give differently shaped inputs per image size: batch by size.
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, f in enumerate(frames):
            groups[f.image.shape[:2]].append(i)
        for size, rows in groups.items():
            inputs = self.processor(images=_pil([frames[i] for i in rows]), return_tensors="pt")
            outputs = self.model(**_to(inputs, self.runtime))
            outputs.predicted_depth = outputs.predicted_depth.float()
            results = self.processor.post_process_depth_estimation(outputs, target_sizes=[size] * len(rows))
            for i, r in zip(rows, results):
                out[i] = self.sign * r["predicted_depth"].cpu().numpy().astype(np.float32)
        return out


class DiffusersInpainter:
    """A diffusers inpainting pipeline with `prompt` (empty, as in the paper) and the object words as
    negative prompt. Frames are resized so the long side is `resolution` (both sides a multiple of
    the UNet's stride), inpainted in same-size groups, and resized back. Each image's noise is seeded
    from `seed` and its key, so results do not depend on batching or resuming."""

    def __init__(
        self,
        path: str,
        runtime: Runtime,
        prompt: str = "",
        steps: int = 50,
        guidance_scale: float = 7.5,
        resolution: int = 512,
        seed: int = 0,
    ):
        import diffusers

        self.runtime = runtime
        self.pipe = _load("inpainter", diffusers.AutoPipelineForInpainting, path, dtype=runtime.dtype)
        self.pipe.to(runtime.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.prompt, self.steps, self.guidance_scale = prompt, steps, guidance_scale
        self.resolution, self.seed = resolution, seed
        self.multiple = 8 * self.pipe.vae_scale_factor

    def _working_size(self, h: int, w: int) -> tuple[int, int]:
        scale = self.resolution / max(h, w)
        m = self.multiple
        return max(m, round(h * scale / m) * m), max(m, round(w * scale / m) * m)

    @torch.inference_mode()
    def inpaint(
        self, frames: Sequence[Frame], holes: Sequence[np.ndarray], negative_prompts: Sequence[str]
    ) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(frames)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, f in enumerate(frames):
            groups[self._working_size(*f.image.shape[:2])].append(i)
        for (h, w), rows in groups.items():
            images = [PIL.Image.fromarray(frames[i].image).resize((w, h), PIL.Image.BICUBIC) for i in rows]
            masks = [
                PIL.Image.fromarray(holes[i].astype(np.uint8) * 255).resize((w, h), PIL.Image.NEAREST) for i in rows
            ]
            generators = [
                torch.Generator(self.runtime.device).manual_seed(self.seed + zlib.crc32(frames[i].key.encode()))
                for i in rows
            ]
            result = self.pipe(
                prompt=[self.prompt] * len(rows),
                negative_prompt=[negative_prompts[i] for i in rows],
                image=images,
                mask_image=masks,
                height=h,
                width=w,
                num_inference_steps=self.steps,
                guidance_scale=self.guidance_scale,
                generator=generators,
                output_type="np",
            ).images
            for i, image in zip(rows, result):
                fh, fw = frames[i].image.shape[:2]
                filled = PIL.Image.fromarray(np.clip(np.round(image * 255), 0, 255).astype(np.uint8))
                out[i] = np.asarray(filled.resize((fw, fh), PIL.Image.BICUBIC))
        return out
