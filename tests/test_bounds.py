"""Bounds before work: counts, batch sizes, resolutions and sizes are range-checked where they are parsed, with the
reason in the message, and a sampling batch that cannot fit in memory is refused before it runs."""

import json
import time

import jax
import pytest
from sampling_toy import SIZE, make_random_layerdiff
from script_support import load_script

from layerdiff_jax.diffusion.settings import MAX_SAMPLES
from layerdiff_jax.sampling import sampler
from layerdiff_jax.sampling.sampler import LayerDiffPipeline, LayerRequest, RequestError, read_request_file

ONE = [LayerRequest("a red circle on a blue background", ["a red circle"])]
# Batches of one 2-layer sample at 32x64 in 2 steps: a shape the other tests do not compile.
SHAPE = {"steps": 2, "size": (SIZE, 2 * SIZE), "progress": False}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return LayerDiffPipeline.load(make_random_layerdiff(tmp_path_factory.mktemp("toy_layerdiff")))


def test_a_bool_num_samples_is_refused(tmp_path):
    spec = tmp_path / "requests.json"
    spec.write_text(json.dumps([{"prompt": "a", "layer_prompts": ["b"], "num_samples": True}]))
    with pytest.raises(RequestError, match=r"request 0: num_samples must be an integer in \[1, 100000\] .*got True"):
        read_request_file(spec)


def test_a_billion_samples_are_refused_at_once(pipe, tmp_path, capsys):
    start = time.perf_counter()
    with pytest.raises(RequestError, match=r"num_samples must be an integer in \[1, 100000\] \(the samples of one run\), got 10+$"):
        LayerRequest("a", ["b"], num_samples=10**9)
    run = [LayerRequest("a", ["b"], num_samples=MAX_SAMPLES), LayerRequest("c", ["d"], num_samples=1)]
    with pytest.raises(RequestError, match=r"the 2 requests ask for 100001 samples, a run draws at most 100000: split it"):
        pipe.generate(run, **SHAPE)
    assert time.perf_counter() - start < 1.0

    sample_script = load_script("sample")
    with pytest.raises(SystemExit) as exit_:  # before loading: the checkpoint does not exist
        sample_script.main(["--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "out"), "--prompt", "a",
                            "--layer-prompt", "b", "--num-samples", str(10**9)])
    assert exit_.value.code == 2 and "--num-samples must be an integer in [1, 100000]" in capsys.readouterr().err


def test_a_side_over_8192_is_refused(pipe, tmp_path, capsys):
    with pytest.raises(RequestError, match=r"size must be two integers \(H, W\) in \[1, 8192\], got \(32, 16384\)"):
        pipe.generate(ONE, steps=2, size=(32, 16384), progress=False)
    with pytest.raises(SystemExit) as exit_:
        load_script("sample").main(["--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "out"), "--prompt", "a",
                                    "--layer-prompt", "b", "--size", "32", "16384"])
    assert exit_.value.code == 2 and "--size must be two integers (H, W) in [1, 8192], got (32, 16384)" in capsys.readouterr().err


def _compilations():
    compiled = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration" and kwargs.get("fun_name") == "jit(run)":
            compiled.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    return compiled, listener


def test_a_batch_larger_than_the_run_runs_as_the_run(pipe, monkeypatch):
    """A batch of 100,000 for one sample runs as a batch of one (the device count here), compiling the noise,
    denoise and decode programs once each: the memory check reuses the compilation."""
    noise = pipe.initial_noise

    def initial_noise(seeds, latent_shape):
        assert len(seeds) == pipe.pad_batch(1), f"a batch of {len(seeds)} for one sample"
        return noise(seeds, latent_shape)

    monkeypatch.setattr(pipe, "initial_noise", initial_noise)
    compiled, listener = _compilations()
    try:
        samples = pipe.generate(ONE, batch_size=100_000, **SHAPE)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(samples) == 1 and samples[0].background.shape == (SIZE, 2 * SIZE, 3)
    assert len(compiled) <= 3, f"{len(compiled)} compilations of 3 programs"


def test_a_batch_that_cannot_fit_is_refused_before_it_runs(pipe, monkeypatch):
    assert sampler.available_bytes(jax.devices()[0]) > 0  # MemAvailable, on this CPU
    # A pipeline of the same model: JAX's cache has the programs, this pipeline has not checked them.
    fresh = LayerDiffPipeline(
        pipe.unet, pipe.params["unet"], pipe.vae, pipe.params["vae"], pipe.text_encoder, pipe.params["text"], pipe.tokenizer
    )
    monkeypatch.setattr(sampler, "available_bytes", lambda device: 2**20)

    def never(*args, **kwargs):
        raise AssertionError("a batch that cannot fit ran")

    monkeypatch.setattr(fresh, "initial_noise", never)
    monkeypatch.setattr(fresh, "denoise", never)
    message = r"batch 1 at 32x64 with 2 layers needs ~[\d.]+ GiB, the device has 0.000977 GiB available; use a smaller --batch-size"
    with pytest.raises(RequestError, match=message):
        fresh.generate(ONE, batch_size=1, **SHAPE)


@pytest.mark.parametrize(
    "args, message",
    [
        (["export", "--num", "-1"], "argument --num: must be an integer in [1, 1000000] (sample folders to write), got '-1'"),
        (["synthetic", "--num-train", "0", "--num-test", "0"], "--num-train and --num-test are both 0: the dataset would be empty"),
        (["synthetic", "--num-train", "-5", "--num-test", "0"], "argument --num-train: must be an integer in [0, 1000000]"),
        (["export", "--num", "1", "--resolution", "8"], "argument --resolution: must be an integer in [16, 1024] (image side"),
        (["synthetic", "--num-train", "0", "--num-test", "0", "--resolution", "2048"], "--resolution: must be an integer in [16, 1024]"),
        (["export", "--num", "1", "--seed", "-1"], "argument --seed: must be an integer >= 0 (numpy's seeds are non-negative)"),
        (["grid", "--num", "0"], "argument --num: must be an integer in [1, 64] (rows of the sheet, one per sample)"),
    ],
)
def test_build_dataset_bounds(tmp_path, capsys, args, message):
    out = tmp_path / ("grid.png" if args[0] == "grid" else "out")
    with pytest.raises(SystemExit) as exit_:
        load_script("build_dataset").main([args[0], "--out", str(out), *args[1:]])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_evaluate_batch_size_bound(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        load_script("evaluate").main([str(tmp_path), "--batch-size", "0"])
    assert exit_.value.code == 2 and "argument --batch-size: must be an integer >= 1, got '0'" in capsys.readouterr().err
