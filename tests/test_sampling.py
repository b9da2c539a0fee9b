"""The LayerDiff sampler: compiles once per shape, padding-independent, layer-aware guidance end to end,
clear errors; sharded sampling on 8 simulated devices equals single-device sampling (and inpainting runs there);
the size training recorded, settings checked by the library, model folders' config fields checked."""

import contextlib
import json
import logging
import shutil
import textwrap
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sampling_toy import SIZE, make_random_layerdiff
from script_support import run_on_cpu_devices

from layerdiff_jax.convert.model_folder import load_layerdiff
from layerdiff_jax.data.synthetic import generate_sample
from layerdiff_jax.diffusion.ddim import ddim_sample, ddim_timesteps
from layerdiff_jax.diffusion.guidance import classifier_free_guidance
from layerdiff_jax.diffusion.schedules import SchedulerConfig
from layerdiff_jax.diffusion.settings import check_sampling_settings
from layerdiff_jax.sampling.editing import inpaint_layer, restyle_layer
from layerdiff_jax.sampling.sampler import (
    CheckpointError,
    LayerDiffPipeline,
    LayerRequest,
    RequestError,
    read_request_file,
)
from layerdiff_jax.training.export import export_model

REQUESTS = [
    LayerRequest("a red circle on a blue background", ["a red circle"]),
    LayerRequest("a green square and a red circle", ["a green square", "a red circle"], background_prompt="a striped background"),
]
STEPS = 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_random_layerdiff(tmp_path_factory.mktemp("toy_layerdiff"))


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return LayerDiffPipeline.load(checkpoint)


@contextlib.contextmanager
def count_compilations():
    compiled = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiled
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def generate(pipe, requests, **kwargs):
    return pipe.generate(requests, steps=STEPS, size=(SIZE, SIZE), batch_size=2, progress=False, **kwargs)


def test_generate_compiles_once_per_shape(pipe, checkpoint):
    first = generate(pipe, REQUESTS)
    assert [s.num_layers for s in first] == [2, 3]
    assert [s.layer_prompts for s in first] == [["the background", "a red circle"], ["a striped background", "a green square", "a red circle"]]
    assert first[1].foregrounds.shape == (2, SIZE, SIZE, 3) and first[1].masks.shape == (2, SIZE, SIZE)
    assert first[1].metadata == {"seed": 1, "steps": STEPS, "guidance": 3.0, "eta": 0.0, "checkpoint": str(checkpoint)}
    assert first[0].background.std() > 0 and first[1].masks.std() > 0

    new_prompts = [
        LayerRequest("a blue triangle on a checked background", ["a blue triangle"]),
        LayerRequest("a yellow circle and a blue square", ["a yellow circle", "a blue square"]),
    ]
    with count_compilations() as compiled:
        second = generate(pipe, new_prompts, guidance=5.0)
        again = generate(pipe, REQUESTS)
    assert compiled == [], f"{len(compiled)} compilation(s) for new prompts / guidance of an already compiled shape"
    assert not np.array_equal(second[1].background, first[1].background)
    for a, b in zip(again, first):  # same seeds and prompts: the same samples
        np.testing.assert_array_equal(a.background, b.background)
        np.testing.assert_array_equal(a.foregrounds, b.foregrounds)
        np.testing.assert_array_equal(a.masks, b.masks)


def test_decode_is_the_vae_on_each_layers_image_and_mask_latents(pipe):
    """The decode program goes one layer at a time; each layer's image and mask come out as the VAE decodes them."""
    h = w = SIZE // pipe.vae_factor
    latents = jax.random.normal(jax.random.key(0), (2, 3, h, w, 8))
    images, masks = pipe.decode(latents)
    assert images.shape == (2, 3, SIZE, SIZE, 3) and masks.shape == (2, 3, SIZE, SIZE)
    for layer in range(3):
        image_lat, mask_lat = latents[:, layer, ..., :4], latents[:, layer, ..., 4:]
        image, mask = (pipe.vae.apply({"params": pipe.params["vae"]}, x, method=pipe.vae.decode_latents) for x in (image_lat, mask_lat))
        np.testing.assert_allclose(images[:, layer], np.clip((image + 1) / 2, 0, 1), atol=1e-5)
        np.testing.assert_allclose(masks[:, layer], np.clip((mask + 1) / 2, 0, 1).mean(-1), atol=1e-5)


def test_padding_layers_do_not_change_a_request(pipe):
    """A 2-layer request padded to 3 layers (next to a 3-layer one) samples as it does alone."""
    ts = ddim_timesteps(STEPS)
    seeds = np.array([5, 6], np.uint32)
    ids, valid = pipe.prompt_ids([r.prompt for r in REQUESTS], [r.all_layer_prompts for r in REQUESTS], 3)
    assert valid.tolist() == [[True, True, False], [True, True, True]]
    x_T = pipe.initial_noise(seeds, pipe.latent_shape(3, (SIZE, SIZE)))
    mixed = np.asarray(pipe.denoise(x_T, ~valid, valid, ids, ts, seeds))

    ids_alone, valid_alone = pipe.prompt_ids([REQUESTS[0].prompt], [REQUESTS[0].all_layer_prompts], 2)
    alone = np.asarray(pipe.denoise(x_T[:1, :2], ~valid_alone, valid_alone, ids_alone, ts, seeds[:1]))
    assert np.abs(alone[0] - np.asarray(x_T[0, :2])).max() > 0.1  # it did denoise
    np.testing.assert_allclose(mixed[0, :2], alone[0], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(mixed[0, 2], np.asarray(x_T[0, 2]))  # the padding layer stayed frozen


class StubUNet:
    """Stands in for the LayerDiff UNet: each layer's output depends on its latent, timestep, layer
    prompt embedding, the global prompt embedding and its validity."""

    def __init__(self, width, max_layers):
        self.unet_config = SimpleNamespace(cross_attention_dim=width, block_out_channels=(1, 1), sample_size=None)
        self.config = SimpleNamespace(max_layers=max_layers)

    @staticmethod
    def apply(variables, x, t, global_context, layer_context, layer_valid):
        del variables
        c = x.shape[-1]
        per_layer = layer_context.mean(axis=2)[:, :, None, None, :c]
        per_image = global_context.mean(axis=1)[:, None, None, None, :c]
        tt = (t / 1000.0)[..., None, None, None]
        return jnp.sin(x) * tt + per_layer + 0.5 * per_image + 0.1 * layer_valid[..., None, None, None]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sampler_guides_with_layer_aware_negatives(pipe, prediction_type):
    """End to end through the pipeline's jitted sampler (real tokenizer and text encoder, stub UNet):
    the result equals DDIM on uncond + s * (cond - uncond), with the negatives spelled out as the paper says,
    reading the model output as the pipeline's scheduler says (noise or velocity)."""
    stub = LayerDiffPipeline(
        StubUNet(pipe.text_encoder.config.hidden_size, 3), {}, pipe.vae, pipe.params["vae"],
        pipe.text_encoder, pipe.params["text"], pipe.tokenizer, scheduler=SchedulerConfig(prediction_type=prediction_type),
    )
    scale, ts, seeds = 2.5, ddim_timesteps(4), np.array([0, 1], np.uint32)
    ids, valid = stub.prompt_ids([r.prompt for r in REQUESTS], [r.all_layer_prompts for r in REQUESTS], 3)
    x_T = stub.initial_noise(seeds, stub.latent_shape(3, (16, 16)))
    got = np.asarray(stub.denoise(x_T, ~valid, valid, ids, ts, seeds, guidance=scale))

    def encode(texts):
        return pipe.text_encoder.apply({"params": pipe.params["text"]}, jnp.asarray(pipe.tokenizer(texts)))

    def contexts(global_prompts, layer_prompts):
        return encode(global_prompts), encode([p for layers in layer_prompts for p in layers]).reshape(2, 3, 77, -1)

    cond = contexts(
        ["a red circle on a blue background", "a green square and a red circle"],
        [["the background", "a red circle", ""], ["a striped background", "a green square", "a red circle"]],
    )
    negatives = contexts(
        ["a red circle", "a green square, a red circle"],
        [["a red circle", "the background", ""], ["a green square, a red circle", "the background", "the background"]],
    )
    empty = contexts(["", ""], [["", "", ""], ["", "", ""]])

    @jax.jit
    def reference(uncond, scale):
        def model_fn(x, t):
            eps_c = StubUNet.apply(None, x, t, *cond, jnp.asarray(valid))
            eps_u = StubUNet.apply(None, x, t, *uncond, jnp.asarray(valid))
            return classifier_free_guidance(eps_c, eps_u, scale)

        return ddim_sample(model_fn, x_T, ts, stub.schedule, frozen=jnp.asarray(~valid), prediction_type=prediction_type)

    np.testing.assert_allclose(got, np.asarray(reference(negatives, scale)), rtol=0, atol=1e-5)
    assert np.abs(got - np.asarray(reference(empty, scale))).max() > 1e-2  # the negatives matter: empty prompts differ
    # Guidance 1 runs the conditional branch alone: the same result as guiding at scale 1.
    unguided = np.asarray(stub.denoise(x_T, ~valid, valid, ids, ts, seeds, guidance=1.0))
    np.testing.assert_allclose(unguided, np.asarray(reference(negatives, 1.0)), rtol=0, atol=1e-5)


def test_model_folder_carries_its_scheduler(tmp_path):
    """A folder records the schedule and prediction type it was trained with; one without scheduler/ (an
    older export) samples as SD 1.5 (epsilon); a scheduler this project cannot build is refused by name."""
    v = SchedulerConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type="v_prediction")
    folder = make_random_layerdiff(tmp_path / "v", scheduler=v)
    loaded = LayerDiffPipeline.load(folder)
    assert loaded.scheduler == v
    np.testing.assert_allclose(np.asarray(loaded.schedule.betas), np.asarray(v.make_schedule().betas))
    shutil.rmtree(folder / "scheduler")
    assert LayerDiffPipeline.load(folder).scheduler == SchedulerConfig()
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"rescale_betas_zero_snr": True}))
    with pytest.raises(CheckpointError, match="rescale_betas_zero_snr"):
        LayerDiffPipeline.load(folder)


def test_bad_requests_raise_clear_errors(pipe, tmp_path, caplog):
    with pytest.raises(RequestError, match="no layer prompt"):
        LayerRequest("a red circle", [])
    with pytest.raises(RequestError, match="4 layers .* max_layers=3"):
        generate(pipe, [LayerRequest("three shapes", ["a red circle", "a blue square", "a green triangle"])])
    with pytest.raises(RequestError, match=f"multiples of {pipe.size_multiple}"):
        pipe.generate(REQUESTS, steps=STEPS, size=(SIZE, SIZE + 4), progress=False)
    with pytest.raises(RequestError, match=r"steps must be an integer in \[1, 1000\], got 0"):
        pipe.generate(REQUESTS, steps=0, size=(SIZE, SIZE), progress=False)

    spec = tmp_path / "spec.json"
    for content, message in [
        ("[{]", "not valid JSON"),
        ("{}", "non-empty JSON list"),
        ('[{"prompt": "a"}]', r"request 0: missing field\(s\) \['layer_prompts'\]"),
        ('[{"prompt": "a", "layer_prompts": ["b"], "colour": "red"}]', r"unknown field\(s\) \['colour'\]"),
        ('[{"prompt": "a", "layer_prompts": "b"}]', "must be a list"),
        ('[{"prompt": "a", "layer_prompts": []}]', "no layer prompt"),
    ]:
        spec.write_text(content)
        with pytest.raises(RequestError, match=message):
            read_request_file(spec)
    spec.write_text(json.dumps({"requests": [{"prompt": "a", "layer_prompts": ["b", "c"], "num_samples": 2, "seed": 4}]}))
    assert read_request_file(spec) == [LayerRequest("a", ("b", "c"), num_samples=2, seed=4)]

    # A prompt over the tokenizer's 77 tokens is truncated (keeping the closing EOS) with a warning.
    long_prompt = " ".join(["red"] * 100)
    with caplog.at_level(logging.WARNING, logger="layerdiff_jax"):
        ids, _ = pipe.prompt_ids([long_prompt], [["the background", "a red circle"]], 2)
    assert any("truncated" in r.getMessage() and "red red" in r.getMessage() for r in caplog.records)
    assert ids[0, 0, -1] == pipe.tokenizer.hf_tokenizer.eos_token_id


def test_unreadable_checkpoint_raises_checkpoint_error(checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        LayerDiffPipeline.load(tmp_path / "missing")
    partial = shutil.copytree(checkpoint, tmp_path / "partial", ignore=shutil.ignore_patterns("layerdiff"))
    with pytest.raises(CheckpointError, match=r"missing layerdiff/"):
        LayerDiffPipeline.load(partial)
    corrupt = shutil.copytree(checkpoint, tmp_path / "corrupt")
    (corrupt / "layerdiff" / "flax_params.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"corrupt: cannot be loaded: .*flax_params.safetensors"):
        LayerDiffPipeline.load(corrupt)


SHARDED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from jax.sharding import Mesh
    from layerdiff_jax.diffusion.ddim import ddim_timesteps
    from layerdiff_jax.sampling.editing import inpaint_layer
    from layerdiff_jax.sampling.sampler import LayerDiffPipeline, LayerRequest

    assert jax.device_count() == 8
    mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2, 1), ("data", "fsdp", "tensor"))
    sharded, single = LayerDiffPipeline.load(sys.argv[1], mesh=mesh), LayerDiffPipeline.load(sys.argv[1])
    requests = [LayerRequest("a red circle on a blue background", ["a red circle"], num_samples=3),
                LayerRequest("a green square and a red circle", ["a green square", "a red circle"], num_samples=5)]
    seeds = np.arange(8, dtype=np.uint32)
    ids, valid = single.prompt_ids([r.prompt for r in requests], [r.all_layer_prompts for r in requests], 3)
    rows = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    latents = {}
    for name, pipe in [("sharded", sharded), ("single", single)]:
        x_T = pipe.initial_noise(seeds, pipe.latent_shape(3, (16, 16)))
        out = pipe.denoise(x_T, ~valid[rows], valid[rows], ids[rows], ddim_timesteps(2), seeds, guidance=3.0, eta=0.5)
        latents[name] = (np.asarray(pipe.to_host(out)), out)
    out = latents["sharded"][1]
    samples = {name: pipe.generate(requests, steps=2, eta=0.5, size=(16, 16), batch_size=8, progress=False)
               for name, pipe in [("sharded", sharded), ("single", single)]}
    source = samples["single"][3]
    edited = inpaint_layer(sharded, source, 2, "a blue triangle", steps=2, eta=0.5, seed=1)  # reuses the program above
    print(json.dumps({
        "devices": len(out.sharding.device_set),
        "shard_batch": [s.data.shape[0] for s in out.addressable_shards],
        "params_replicated": all(x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded.params)),
        "latent_diff": float(np.abs(latents["sharded"][0] - latents["single"][0]).max()),
        "latent_scale": float(np.abs(latents["single"][0]).max()),
        "image_diff": max(int(np.abs(a.background.astype(int) - b.background).max()) for a, b in zip(*samples.values())),
        "mask_diff": max(int(np.abs(a.masks.astype(int) - b.masks).max()) for a, b in zip(*samples.values())),
        "layers": [s.num_layers for s in samples["sharded"]],
        "edit_kept": all(np.array_equal(getattr(edited, k)[:1], getattr(source, k)[:1]) for k in ("foregrounds", "masks"))
                     and np.array_equal(edited.background, source.background),
        "edit_changed": not np.array_equal(edited.foregrounds[1], source.foregrounds[1]),
    }))
    """
)


def test_sharded_sampling_matches_single_device(checkpoint):
    result = run_on_cpu_devices(SHARDED_SCRIPT, str(checkpoint), timeout=600)
    assert result["devices"] == 8 and result["shard_batch"] == [1] * 8 and result["params_replicated"]
    assert result["latent_scale"] > 0.1 and result["latent_diff"] <= 1e-4, result
    assert result["image_diff"] <= 1 and result["mask_diff"] <= 1, result  # uint8 rounding at most
    assert result["layers"] == [2] * 3 + [3] * 5
    assert result["edit_kept"] and result["edit_changed"], result  # inpainting on the mesh too


def test_sampling_defaults_to_the_size_training_recorded(checkpoint, tmp_path, caplog):
    """Training's export records its resolution; sampling and editing default to it and warn at another size."""
    unrecorded = LayerDiffPipeline.load(checkpoint)
    with caplog.at_level(logging.WARNING, logger="layerdiff_jax"):
        assert unrecorded.trained_size is None and unrecorded.image_size() == (256, 256)
    assert "does not record its training resolution: sampling at 256x256" in caplog.text

    model, params = load_layerdiff(checkpoint)
    exported = LayerDiffPipeline.load(export_model(tmp_path / "model", checkpoint, model, params, SchedulerConfig(), sample_size=SIZE // 4))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="layerdiff_jax"):
        assert exported.trained_size == (SIZE, SIZE) and exported.image_size() == (SIZE, SIZE)
        assert exported.image_size((SIZE, SIZE)) == (SIZE, SIZE)
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="layerdiff_jax"):
        assert exported.image_size((2 * SIZE, SIZE)) == (2 * SIZE, SIZE)
    assert f"sampling at {2 * SIZE}x{SIZE}, but {tmp_path / 'model'} was trained at {SIZE}x{SIZE}" in caplog.text
    caplog.clear()

    class Stop(Exception):
        pass

    def stop(*args):  # the edit's first step after its checks
        raise Stop

    exported.encode = stop
    sample = generate_sample(0, 0, resolution=2 * SIZE, layer_mix={2: 1.0})
    with caplog.at_level(logging.WARNING, logger="layerdiff_jax"), pytest.raises(Stop):
        inpaint_layer(exported, sample, 1, "a red circle")
    assert f"sampling at {2 * SIZE}x{2 * SIZE}, but {tmp_path / 'model'} was trained at {SIZE}x{SIZE}" in caplog.text


def test_settings_are_checked_by_the_library(pipe, checkpoint):
    for settings, message in [
        ({"guidance": float("nan")}, "guidance must be a finite number"),
        ({"guidance": float("inf")}, "guidance must be a finite number"),
        ({"eta": float("nan")}, r"eta must be a number in \[0, 1\]"),
        ({"eta": -2.0}, r"eta must be a number in \[0, 1\]"),
        ({"seed": -1}, "seed must be an integer"),
        ({"steps": 2.5}, "steps must be an integer"),
    ]:
        with pytest.raises(RequestError, match=message):
            pipe.generate(REQUESTS, size=(SIZE, SIZE), progress=False, **settings)
        with pytest.raises(RequestError, match=message):
            check_sampling_settings(**settings)
    sample = generate_sample(0, 0, resolution=SIZE, layer_mix={2: 1.0})
    with pytest.raises(RequestError, match="guidance must be a finite number"):
        inpaint_layer(pipe, sample, 1, "a blue square", guidance=float("nan"))
    with pytest.raises(RequestError, match=r"eta must be a number in \[0, 1\]"):
        restyle_layer(pipe, sample, 1, "striped", eta=-2.0)
    with pytest.raises(RequestError, match="strength 0.001 leaves none of the 100 steps"):
        restyle_layer(pipe, sample, 1, "striped", strength=0.001)
    check_sampling_settings(steps=1, guidance=0.0, eta=1.0, seed=2**32 - 1, strength=1.0, num_train_timesteps=1000)


def test_a_wrong_typed_config_field_is_named_with_its_file(checkpoint, tmp_path):
    for component, section, field, value, message in [
        ("layerdiff", "layerdiff", "max_layers", "4", "max_layers must be int, got '4'"),
        ("layerdiff", "unet", "block_out_channels", 32, r"block_out_channels must be tuple\[int, ...\], got 32"),
        ("vae", None, "scaling_factor", "0.2", "scaling_factor must be float, got '0.2'"),
        ("text_encoder", None, "hidden_size", [64], r"hidden_size must be int, got \[64\]"),
    ]:
        folder = shutil.copytree(checkpoint, tmp_path / f"{component}_{field}")
        path = folder / component / "config.json"
        config = json.loads(path.read_text())
        (config[section] if section else config)[field] = value
        path.write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=f"{path}: {message}"):
            LayerDiffPipeline.load(folder)


def test_max_layers_raised_above_training_warns(checkpoint, tmp_path, caplog):
    folder = shutil.copytree(checkpoint, tmp_path / "raised")
    path = folder / "layerdiff" / "config.json"
    config = json.loads(path.read_text())
    config["layerdiff"]["max_layers"] = 6
    path.write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="layerdiff_jax"):
        assert LayerDiffPipeline.load(checkpoint).max_layers == 3
        assert caplog.text == ""
        assert LayerDiffPipeline.load(folder).max_layers == 6
    assert f"{path}: max_layers=6, but the weights were trained with max_layers=3" in caplog.text
