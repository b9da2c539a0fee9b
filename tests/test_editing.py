"""Layer inpainting and layer style transfer on a sample imported from an exchange-format folder:
non-target layers stay bit-identical, only the target layer changes."""

import numpy as np
import pytest
from sampling_toy import SIZE, make_random_layerdiff

from layerdiff_jax.data.layers import LayeredSample, read_sample_folder, write_sample_folder
from layerdiff_jax.data.synthetic import generate_sample
from layerdiff_jax.sampling.editing import inpaint_layer, restyle_layer, sample_arrays
from layerdiff_jax.sampling.outputs import write_sample
from layerdiff_jax.sampling.sampler import LayerDiffPipeline, RequestError

STEPS = 2  # inpainting runs 2 DDIM steps; restyling 8 steps at strength 0.25 runs 2 too: one compiled program


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return LayerDiffPipeline.load(make_random_layerdiff(tmp_path_factory.mktemp("toy_layerdiff")))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A 3-layer synthetic sample, written to and read back from an exchange-format folder."""
    sample = generate_sample(seed=0, index=0, resolution=SIZE, layer_mix={3: 1.0})
    return read_sample_folder(write_sample_folder(sample, tmp_path_factory.mktemp("sample")))


def changed(a: np.ndarray, b: np.ndarray) -> bool:
    return not np.array_equal(a, b)


def assert_only_target_changed(before: LayeredSample, after: LayeredSample, target: int):
    layers = lambda s: [s.background] + list(s.foregrounds)  # noqa: E731
    for i, (a, b) in enumerate(zip(layers(before), layers(after))):
        assert changed(a, b) == (i == target), f"layer {i} {'changed' if i != target else 'did not change'}"
    for i, (a, b) in enumerate(zip(before.masks, after.masks), start=1):
        if i != target:
            np.testing.assert_array_equal(a, b)
    # The global prompt follows the target's new prompt: the old one replaced where it appears.
    old, new = before.layer_prompts[target], after.layer_prompts[target]
    assert old in before.global_prompt and after.global_prompt == before.global_prompt.replace(old, new)
    assert after.metadata["edits"][-1]["global_prompt_from"] == "replaced"
    assert after.metadata["edits"][-1]["previous_global_prompt"] == before.global_prompt
    assert [p for i, p in enumerate(after.layer_prompts) if i != target] == [p for i, p in enumerate(before.layer_prompts) if i != target]


def test_sample_arrays_background_mask_is_the_complement(imported):
    images, masks = sample_arrays(imported)
    assert images.shape == (3, SIZE, SIZE, 3) and masks.shape == (3, SIZE, SIZE)
    np.testing.assert_allclose(masks[0], 1.0 - masks[1] - masks[2])  # synthetic masks do not overlap
    np.testing.assert_allclose(images[1], imported.foregrounds[0] / 255.0, rtol=1e-6)


@pytest.mark.parametrize("target", [2, 0])
def test_inpainting_keeps_every_other_layer_bit_identical(pipe, imported, target, tmp_path):
    prompt = "a blue triangle" if target else "a yellow checked background"
    edited = inpaint_layer(pipe, imported, target, prompt, seed=3, steps=STEPS)
    assert_only_target_changed(imported, edited, target)
    assert edited.layer_prompts[target] == prompt
    if target:
        assert changed(edited.masks[target - 1], imported.masks[target - 1])  # a new object, a new mask
    (record,) = edited.metadata["edits"]
    assert record["edit"] == "inpaint" and record["target_layer"] == target and record["seed"] == 3
    assert record["previous_layer_prompt"] == imported.layer_prompts[target]
    assert edited.metadata["source"] == "synthetic"  # the sample's own metadata is kept

    # The target starts from the seed's noise: another seed, another layer; the rest still untouched.
    other = inpaint_layer(pipe, imported, target, prompt, seed=4, steps=STEPS)
    assert changed(other.background if target == 0 else other.foregrounds[target - 1],
                   edited.background if target == 0 else edited.foregrounds[target - 1])
    assert_only_target_changed(imported, other, target)

    # The edited sample re-imports exactly (exchange format).
    back = read_sample_folder(write_sample(edited, tmp_path / "edited", formats=()))
    np.testing.assert_array_equal(back.foregrounds, edited.foregrounds)
    np.testing.assert_array_equal(back.masks, edited.masks)
    assert back.layer_prompts == edited.layer_prompts and back.metadata == edited.metadata


def test_restyle_changes_only_the_target_layer(pipe, imported):
    edited = restyle_layer(pipe, imported, 1, "striped", steps=4 * STEPS, seed=1)
    assert_only_target_changed(imported, edited, 1)
    assert edited.layer_prompts[1] == f"{imported.layer_prompts[1]}, striped"
    (record,) = edited.metadata["edits"]
    assert record["edit"] == "restyle" and record["style"] == "striped" and record["strength"] == 0.25

    twice = restyle_layer(pipe, edited, 0, "checked", steps=4 * STEPS)
    assert_only_target_changed(edited, twice, 0)
    assert [e["target_layer"] for e in twice.metadata["edits"]] == [1, 0]


def test_bad_edits_raise_clear_errors(pipe, imported):
    with pytest.raises(RequestError, match=r"target layer 3 does not exist: .* 0 \(background\) to 2"):
        inpaint_layer(pipe, imported, 3, "a red circle")
    with pytest.raises(RequestError, match="steps must be"):
        inpaint_layer(pipe, imported, 1, "a red circle", steps=1001)
    with pytest.raises(RequestError, match="seed must be"):
        inpaint_layer(pipe, imported, 1, "a red circle", seed=-1)
    with pytest.raises(RequestError, match="non-empty layer prompt"):
        inpaint_layer(pipe, imported, 1, " ")
    with pytest.raises(RequestError, match="non-empty style"):
        restyle_layer(pipe, imported, 1, "")
    with pytest.raises(RequestError, match="strength"):
        restyle_layer(pipe, imported, 1, "striped", strength=0.0)
    with pytest.raises(RequestError, match="strength"):
        restyle_layer(pipe, imported, 1, "striped", strength=0.25, steps=3)  # 0.75 steps: nothing to denoise
    odd = generate_sample(seed=0, index=0, resolution=SIZE + 4, layer_mix={2: 1.0})
    with pytest.raises(RequestError, match=f"multiples of {pipe.size_multiple}"):
        inpaint_layer(pipe, odd, 1, "a red circle")
    four = generate_sample(seed=0, index=1, resolution=SIZE, layer_mix={4: 1.0})
    with pytest.raises(RequestError, match="at most 3"):
        inpaint_layer(pipe, four, 1, "a red circle")
