"""Data construction end to end on tiny random transformers/diffusers models built here (no downloads):
the real stage classes, `construct_layers.py`, resume, and TFDS ingestion of the output."""

import json
import sys
from pathlib import Path

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
import transformers
import yaml
from script_support import load_script

from layerdiff_jax.construction import hf_models
from layerdiff_jax.construction.build import _STAGE_CLASSES, _stage_kwargs, build_stages
from layerdiff_jax.construction.config import load_config
from layerdiff_jax.construction.errors import ConstructionConfigError
from layerdiff_jax.construction.stages import Frame
from layerdiff_jax.data.layers import dilate_mask, list_sample_folders, read_sample_folder
from layerdiff_jax.data.synthetic import generate_sample
from layerdiff_jax.data.tfds_builders import build_from_folders, split_sizes

CAPTION_WORDS = ("a", "dog", "cat", "ball", "on", "and", "the", "grass", "red")
PROMPT = "a dog and a cat on"
IMAGE_H, IMAGE_W = 48, 64
# The tiny transformers' size, and their vision towers' (16 patches of a 32x32 image).
TINY_TRANSFORMER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
TINY_VISION = dict(TINY_TRANSFORMER, image_size=32, patch_size=8)


main = load_script("construct_layers").main


def _clip_tokenizer(folder):
    """A character-level CLIP tokenizer; ids 1/2 are BOS/EOS (OWL-ViT masks queries whose first id is 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=16, pad_token="<|endoftext|>")


def _word_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(special + list(CAPTION_WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token="[CLS]",
        eos_token="[SEP]",
    )


def _build_models(root):
    torch.manual_seed(0)
    T = transformers
    blip = T.BlipForConditionalGeneration(
        T.BlipConfig(
            text_config=dict(
                TINY_TRANSFORMER, vocab_size=5 + len(CAPTION_WORDS), max_position_embeddings=32, encoder_hidden_size=32,
                pad_token_id=0, bos_token_id=2, sep_token_id=3, eos_token_id=3,  # _word_tokenizer's [PAD], [CLS], [SEP]
            ),
            vision_config=TINY_VISION,
            projection_dim=32,
        )
    )
    blip.save_pretrained(root / "blip")
    T.BlipProcessor(
        image_processor=T.BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=_word_tokenizer()
    ).save_pretrained(root / "blip")

    clip_tok = _clip_tokenizer(root / "clip_tokenizer")
    text = dict(TINY_TRANSFORMER, vocab_size=55, max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    owl = T.OwlViTForObjectDetection(
        T.OwlViTConfig(
            text_config=text,
            vision_config=TINY_VISION,
            projection_dim=32,
        )
    )
    with torch.no_grad():  # boxes at the patch grid with the prior's size, instead of random degenerate ones
        owl.box_head.dense2.weight.zero_()
        owl.box_head.dense2.bias.zero_()
    owl.save_pretrained(root / "owl")
    owl_images = T.OwlViTImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False)
    T.OwlViTProcessor(image_processor=owl_images, tokenizer=clip_tok).save_pretrained(root / "owl")

    sam = T.SamModel(
        T.SamConfig(
            vision_config=dict(
                TINY_VISION,
                image_size=64,
                output_channels=16,
                window_size=4,
                global_attn_indexes=[1],
                mlp_dim=64,
                num_pos_feats=8,
            ),
            prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
            mask_decoder_config=dict(
                hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=16
            ),
        )
    )
    sam.save_pretrained(root / "sam")
    T.SamProcessor(
        image_processor=T.SamImageProcessor(
            size={"longest_edge": 64},
            pad_size={"height": 64, "width": 64},
            mask_size={"longest_edge": 16},
            mask_pad_size={"height": 16, "width": 16},
        )
    ).save_pretrained(root / "sam")

    seg = T.SegformerForSemanticSegmentation(
        T.SegformerConfig(
            num_encoder_blocks=2,
            depths=[1, 1],
            sr_ratios=[2, 1],
            hidden_sizes=[8, 16],
            patch_sizes=[7, 3],
            strides=[4, 2],
            num_attention_heads=[1, 2],
            mlp_ratios=[2, 2],
            decoder_hidden_size=16,
            num_labels=2,
            id2label={0: "background", 1: "salient"},
            label2id={"background": 0, "salient": 1},
        )
    )
    with torch.no_grad():  # an untrained saliency model that finds every pixel salient
        seg.decode_head.classifier.bias.copy_(torch.tensor([-20.0, 20.0]))
    seg.save_pretrained(root / "saliency")
    T.SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "saliency")

    dpt = T.DPTForDepthEstimation(
        T.DPTConfig(
            **dict(TINY_VISION, num_hidden_layers=4),
            backbone_out_indices=[0, 1, 2, 3],
            neck_hidden_sizes=[8, 16, 16, 16],
            fusion_hidden_size=16,
        )
    )
    with torch.no_grad():  # keep the output above the final ReLU, so depth varies over the image
        dpt.head.head[4].bias.fill_(1.0)
    dpt.save_pretrained(root / "dpt")
    T.DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(root / "dpt")

    D = diffusers
    unet = D.UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=9,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=8,
    )
    vae = D.AutoencoderKL(
        block_out_channels=(16,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=16,
    )
    clip = T.CLIPTextModel(
        T.CLIPTextConfig(
            **{**text, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
        )
    )
    D.StableDiffusionInpaintPipeline(
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tok,
        unet=unet,
        scheduler=D.DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(root / "inpaint")


MODELS_YAML = {
    "device": "cpu",
    "batch_size": 2,
    "max_side": IMAGE_W,
    "rules": {"max_salient_in_hole": 1.0},  # every pixel of the tiny saliency model is salient
    "captioner": {"path": "blip", "prompt": PROMPT, "keep_prompt": True, "max_new_tokens": 4},
    "detector": {"path": "owl", "threshold": 0.0},
    "segmenter": {"path": "sam"},
    "saliency": {"path": "saliency", "salient_labels": ["salient"]},
    "depth": {"path": "dpt"},
    "inpainter": {"path": "inpaint", "steps": 2, "resolution": 32},
}


@pytest.fixture(scope="module")
def models_yaml(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    _build_models(root)
    path = root / "models.yaml"
    path.write_text(yaml.safe_dump(MODELS_YAML))
    return path


@pytest.fixture(scope="module")
def stages(models_yaml):
    return build_stages(load_config(models_yaml))


def _images(folder, count):
    folder.mkdir(parents=True)
    for i in range(count):
        image = generate_sample(7, i, IMAGE_W).composite()[:IMAGE_H]
        PIL.Image.fromarray(image).save(folder / f"img_{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


def test_stage_classes_return_the_protocol_shapes(stages):
    frames = [Frame(f"k{i}", generate_sample(1, i, IMAGE_W).composite()[:IMAGE_H]) for i in range(2)]
    assert all(isinstance(c, str) and c.startswith(PROMPT) for c in stages.captioner.caption(frames))
    detections = stages.detector.detect(frames, [["a dog", "a cat"], ["a ball"]])
    assert {d.phrase for d in detections[0]} <= {"a dog", "a cat"} and {d.phrase for d in detections[1]} == {"a ball"}
    for d in detections[0] + detections[1]:
        x0, y0, x1, y1 = d.box
        assert 0 <= x0 <= x1 <= IMAGE_W and 0 <= y0 <= y1 <= IMAGE_H
    boxes = [np.array([[2, 3, 30, 40], [10, 10, 20, 20]], np.float32), np.zeros((0, 4), np.float32)]
    masks = stages.segmenter.segment(frames, boxes)
    assert (
        masks[0].shape == (2, IMAGE_H, IMAGE_W) and masks[0].dtype == bool and masks[1].shape == (0, IMAGE_H, IMAGE_W)
    )
    saliency = stages.saliency.saliency(frames)
    assert saliency[0].shape == (IMAGE_H, IMAGE_W) and saliency[0].min() > 0.99
    depth = stages.depth.depth(frames + [Frame("small", frames[0].image[:32, :40])])
    assert [d.shape for d in depth] == [(IMAGE_H, IMAGE_W)] * 2 + [(32, 40)]
    assert depth[0].max() < 0 and depth[0].std() > 0  # inverse depth, negated: larger = farther
    hole = np.zeros((IMAGE_H, IMAGE_W), bool)
    hole[10:30, 20:40] = True
    filled = stages.inpainter.inpaint(frames, [hole, hole], ["a dog", "a ball"])
    assert filled[0].shape == (IMAGE_H, IMAGE_W, 3) and filled[0].dtype == np.uint8
    again = stages.inpainter.inpaint(frames[:1], [hole], ["a dog"])  # seeded per image, not per batch
    np.testing.assert_array_equal(again[0], filled[0])


def test_construct_layers_end_to_end(models_yaml, tmp_path):
    images = _images(tmp_path / "images", 5)
    out = tmp_path / "out"
    assert main(["--images", str(images), "--out", str(out), "--models", str(models_yaml), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images_in"] == 6 and summary["pending"] == 0
    assert summary["samples_out"] >= 1
    assert summary["samples_out"] + summary["rejected"] == 6
    assert summary["rejections"].get("unreadable_image") == 1
    assert sum(summary["layers_per_sample"].values()) == summary["samples_out"]
    rejected = [json.loads(line) for line in (out / "rejections.jsonl").read_text().splitlines()]
    assert any(r["image"] == "broken.jpg" and r["reason"] == "unreadable_image" for r in rejected)

    folders = list_sample_folders(out)
    assert len(folders) == summary["samples_out"]
    for folder in folders:
        sample = read_sample_folder(folder)
        source = np.asarray(PIL.Image.open(images / sample.metadata["image"]).convert("RGB"))
        masks = sample.masks > 0
        assert sample.global_prompt.startswith(PROMPT)
        assert sample.layer_prompts[0] == "the background" and 2 <= sample.num_layers <= 4
        assert masks.sum(0).max() <= 1  # training masks never overlap
        hole = dilate_mask(masks.any(0).astype(np.uint8)) > 0
        np.testing.assert_array_equal(sample.background[~hole], source[~hole])  # only the hole is inpainted
        for fg, m in zip(sample.foregrounds, sample.masks):
            keep = dilate_mask(m) > 0  # cut with the 5x5-dilated mask
            np.testing.assert_array_equal(fg[keep], source[keep])
            assert not fg[~keep].any()

    dataset, skipped = build_from_folders(out, tmp_path / "tfds")
    assert skipped == [] and split_sizes(dataset) == {"train": summary["samples_out"]}

    # Resume: a second run finds everything done and redoes nothing.
    assert main(["--images", str(images), "--out", str(out), "--models", str(models_yaml), "--no-progress"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["this_run"]["processed"] == 0 and again["this_run"]["already_done"] == 6
    assert {k: v for k, v in again.items() if k != "this_run"} == {k: v for k, v in summary.items() if k != "this_run"}


def test_model_errors_name_the_stage_and_folder(models_yaml, tmp_path):
    bad = dict(MODELS_YAML, detector={"path": str(models_yaml.parent / "sam")})
    path = models_yaml.parent / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConstructionConfigError, match="detector: .*sam"):
        build_stages(load_config(path))
    path.write_text(yaml.safe_dump(dict(MODELS_YAML, depth={"path": "nowhere"})))
    with pytest.raises(ConstructionConfigError, match="depth: model folder .*nowhere does not exist"):
        build_stages(load_config(path))
    path.write_text(yaml.safe_dump(dict(MODELS_YAML, detector={"path": "owl", "treshold": 0.1})))
    with pytest.raises(ConstructionConfigError, match=r"detector.\['treshold'\]"):
        build_stages(load_config(path))
    assert main(["--images", str(tmp_path), "--out", str(tmp_path / "o"), "--models", str(path)]) == 2


def test_runtime_picks_cuda_only_when_torch_sees_it():
    runtime = hf_models.resolve_runtime()
    assert runtime.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert runtime.dtype == (torch.float16 if torch.cuda.is_available() else torch.float32)
    assert hf_models.resolve_runtime("cpu", "bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype 'half'"):
        hf_models.resolve_runtime("cpu", "half")


def test_example_config_matches_the_stage_classes():
    path = Path(__file__).resolve().parents[1] / "configs" / "construction_models.yaml"
    config = load_config(path)
    assert sorted(config.models) == sorted(_STAGE_CLASSES)
    for stage, class_name in _STAGE_CLASSES.items():
        _stage_kwargs(config.source, stage, config.models[stage], getattr(hf_models, class_name))


def test_classical_inpainter_from_the_yaml(models_yaml):
    from layerdiff_jax.construction.classical import ShiftFillInpainter

    path = models_yaml.parent / "classical.yaml"
    path.write_text(yaml.safe_dump(dict(MODELS_YAML, inpainter={"kind": "classical", "max_shift": 8})))
    inpainter = build_stages(load_config(path)).inpainter
    assert isinstance(inpainter, ShiftFillInpainter) and inpainter.max_shift == 8


def test_without_torch_the_error_names_the_extra_to_install(tmp_path, monkeypatch, capsys):
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(MODELS_YAML))
    import layerdiff_jax.construction as construction

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails, as where it is not installed
    monkeypatch.delitem(sys.modules, "layerdiff_jax.construction.hf_models")
    monkeypatch.delattr(construction, "hf_models")
    with pytest.raises(ConstructionConfigError, match=r'need PyTorch and diffusers .*the "torch" extra \(pip install -e ".\[torch\]"'):
        build_stages(load_config(path))
    assert main(["--images", str(tmp_path), "--out", str(tmp_path / "o"), "--models", str(path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
