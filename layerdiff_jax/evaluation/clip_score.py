"""CLIP score of images against prompts, from a local transformers CLIP checkpoint.

Per pair, score = 100 * max(cos(E_image, E_text), 0) with E the projected CLIP embeddings (the
definition torchmetrics documents); the reported CLIP score is the mean over pairs. Images go through
the checkpoint's own image processor (resize, centre crop, normalise) and prompts are truncated to
the text model's context length. The checkpoint folder must hold the model, tokenizer and
`preprocessor_config.json` (any `openai/clip-vit-*` snapshot does); nothing is downloaded.
The paper used OpenAI's CLIP RN50, which transformers' `CLIPModel` cannot load, so scores from a ViT
checkpoint are comparable across runs of this tool but not to the paper's numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


class ClipScorer:
    def __init__(self, model_dir: str | Path, batch_size: int = 32):
        import torch
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"{model_dir}: no such CLIP checkpoint folder")
        try:
            self.model = CLIPModel.from_pretrained(model_dir, local_files_only=True).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            self.image_processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"{model_dir}: cannot load a transformers CLIP checkpoint with its tokenizer and "
                f"preprocessor_config.json ({e})"
            ) from None
        self.torch = torch
        self.batch_size = batch_size
        self.max_length = self.model.config.text_config.max_position_embeddings

    def _embed(self, images: Sequence[np.ndarray], prompts: Sequence[str]):
        torch = self.torch
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        text = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        with torch.no_grad():
            image = self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)
            words = self.model.text_model(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
            words = self.model.text_projection(words.pooler_output)
        return image, words

    def scores(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> np.ndarray:
        """Per-pair CLIP scores of (H, W, 3) uint8 `images` against `prompts`, shape (N,)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        out = []
        for start in range(0, len(images), self.batch_size):
            end = start + self.batch_size
            image, words = self._embed(images[start:end], prompts[start:end])
            cos = self.torch.nn.functional.cosine_similarity(image, words, dim=-1)
            out.append((100.0 * cos.clamp(min=0)).double().numpy())
        return np.concatenate(out) if out else np.zeros((0,))
