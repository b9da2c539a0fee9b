"""The base's text-to-image scores: right on the synthetic world's own images, wrong where an image is."""

import numpy as np

from layerdiff_jax.data.loader import single_object_view
from layerdiff_jax.data.synthetic import PALETTE, generate_sample
from layerdiff_jax.evaluation.text_to_image import (
    BASE_EVAL_SEED,
    composite_requests,
    score_flat,
    score_requests,
    single_object_requests,
)


def _truth(requests):
    return np.stack([single_object_view(generate_sample(BASE_EVAL_SEED, i, layer_mix={2: 1.0}), 1, r.background)[0] for i, r in enumerate(requests)])


def test_single_objects_of_the_dataset_score_full_marks():
    requests = single_object_requests(24)
    assert len({r.prompt for r in requests}) > 12
    assert score_requests(_truth(requests), requests) == {"n": 24, "background": 1.0, "colour": 1.0, "shape": 1.0}


def test_wrong_images_lose_the_scores_they_get_wrong():
    requests = single_object_requests(8)
    truth = _truth(requests)
    for image, request in zip(truth, requests):
        (colour, _), bg = request.objects[0], request.background
        blank = np.empty_like(image)
        blank[:] = PALETTE[bg]
        assert score_flat(blank, request) == {"background": 1.0, "colour": 0.0, "shape": 0.0}
        recoloured = image.copy()
        other = next(c for c in PALETTE if c not in (colour, bg))
        recoloured[(image != PALETTE[bg]).any(-1)] = PALETTE[other]
        assert score_flat(recoloured, request) == {"background": 1.0, "colour": 0.0, "shape": 1.0}
        wrong_shape = blank.copy()
        wrong_shape[20:30, 10:50] = PALETTE[colour]  # a long bar is no circle, square or triangle
        assert score_flat(wrong_shape, request)["shape"] == 0.0


def test_composites_of_the_dataset_score_near_full_marks():
    requests = composite_requests(16)
    images = np.stack([generate_sample(BASE_EVAL_SEED + 1, i, layer_mix={3: 0.5, 4: 0.5}).composite() for i in range(16)])
    scores = score_requests(images, requests)
    # Two objects of one colour merge into one silhouette, so shape can miss on the data itself.
    assert scores["background"] == 1.0 and scores["colour"] == 1.0 and scores["shape"] >= 0.9
    assert all(len(r.objects) in (2, 3) for r in requests)
