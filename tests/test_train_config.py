"""Training configs: every shipped config validates; bad fields and values fail early, naming the field."""

import subprocess
import sys

import pytest
from train_support import REPO, config_module, load_config, subprocess_env

from layerdiff_jax.mesh import resolve_mesh_shape
from layerdiff_jax.training.config import ConfigError, base_config, validate_config

CONFIGS = ("shapes_cpu", "sd15_256", "tpu_v4", "gpu_h100", "toy_sd_pretrain")


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_validate(name):
    assert f"configs/{name}.py" in config_module(name).__doc__, "the docstring gives the command"
    validate_config(load_config(name))


def test_demo_config_validates_and_names_a_bad_field():
    from layerdiff_jax.demo import validate_demo_config

    assert "scripts/demo.py" in config_module("demo").__doc__
    validate_demo_config(load_config("demo"))
    config = load_config("demo")
    with config.unlocked():
        config.sample.guidence = 2.0
    with pytest.raises(ConfigError, match=r"unknown config field\(s\): sample.guidence"):
        validate_demo_config(config)
    config = load_config("demo")
    config.base = "/no/such/sd_folder"
    with pytest.raises(ConfigError, match="config.base='/no/such/sd_folder' is neither"):
        validate_demo_config(config)
    config = load_config("demo")
    config.finetune.train.learning_rate = 0.0
    with pytest.raises(ConfigError, match=r"config\.finetune\.train\.learning_rate must be > 0"):
        validate_demo_config(config)
    config = load_config("demo")
    config.data.foreground_fill = "grey"
    with pytest.raises(ConfigError, match="config.data.foreground_fill='grey': expected one of black, contrast"):
        validate_demo_config(config)
    config = load_config("demo")
    config.data.similar_colours = 1.5
    with pytest.raises(ConfigError, match=r"config\.data\.similar_colours=1\.5: expected a fraction in \[0, 1\]"):
        validate_demo_config(config)


def test_base_config_needs_model_and_data():
    with pytest.raises(ConfigError, match=r"config\.model\.sd_path must be set"):
        validate_config(base_config())


def _valid():
    return load_config("shapes_cpu")  # synthetic data, 512 samples at 64 px, the toy SD


def _set(config, field: str, value) -> None:
    """config.<field> = value, past the type check (as a bad --config override would arrive)."""
    group, _, leaf = field.rpartition(".")
    target = config
    for part in group.split("."):
        target = target[part]
    with target.ignore_type():
        target[leaf] = value


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("train.learning_rate", -1.0, r"config\.train\.learning_rate must be > 0, got -1\.0"),
        ("train.global_prompt_dropout", 1.5, r"config\.train\.global_prompt_dropout must be in \[0, 1\]"),
        ("model.compute_dtype", "float16", r"config\.model\.compute_dtype must be one of \('float32', 'bfloat16'\)"),
        ("model.layerdiff.prompt_enhancer", "x", r"config\.model\.layerdiff\.prompt_enhancer must be one of"),
        ("mesh.shape", (-1, -1, 1), r"config\.mesh\.shape must be 3 positive ints"),
        ("mesh.shape", (2, 2), r"config\.mesh\.shape must be 3 positive ints"),
        ("data.synthetic.layer_mix", "two", r"config\.data\.synthetic\.layer_mix must be"),
        ("train.per_host_batch_size", 0, r"config\.train\.per_host_batch_size must be > 0"),
        ("diffusion.timestep_bias_portion", 1.0, r"config\.diffusion\.timestep_bias_portion must be in \(0, 1\)"),
    ],
)
def test_bad_values_name_the_field(field, value, message):
    config = _valid()
    _set(config, field, value)
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_wrong_type_unknown_and_missing_fields_are_named():
    config = _valid()
    with config.train.ignore_type():
        config.train.num_steps = "many"
    with pytest.raises(ConfigError, match=r"config\.train\.num_steps must be of type int, got 'many'"):
        validate_config(config)

    config = _valid()
    config.train.learning_rat = 1e-4
    with pytest.raises(ConfigError, match=r"unknown config field\(s\): train\.learning_rat"):
        validate_config(config)

    config = _valid()
    del config.checkpoint["every_steps"]
    with pytest.raises(ConfigError, match=r"missing config field\(s\): checkpoint\.every_steps"):
        validate_config(config)


def test_mesh_shape_resolution():
    assert resolve_mesh_shape((-1, 4, 1), 16) == (4, 4, 1)
    assert resolve_mesh_shape((1, -1, 1), 8) == (1, 8, 1)
    with pytest.raises(ValueError, match="needs 4 devices, there are 8"):
        resolve_mesh_shape((2, 2, 1), 8)
    with pytest.raises(ValueError, match="not divisible by 3"):
        resolve_mesh_shape((-1, 3, 1), 8)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.learning_rate=-1", "config.train.learning_rate must be > 0"),
        ("--config.train.learnin_rate=1", "learnin_rate"),
    ],
)
def test_script_rejects_bad_config_before_compiling(tmp_path, override, message):
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), f"--config={REPO / 'configs' / 'shapes_cpu.py'}", f"--workdir={tmp_path}", override]
    result = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "toy_sd").exists(), "nothing was built or loaded"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--config.no_such_field=1"], "train.py: bad config: no config field 'no_such_field'"),
        (["--config.train.learnin_rate=1"],
         """train.py: bad config: no config field 'learnin_rate' (Did you mean "learning_rate" instead of "learnin_rate"?)"""),
        (["--config.train.learning_rate=abc"], "train.py: flag --config.train.learning_rate=abc: could not convert string to float"),
        (["--config=configs/no_such_config.py"],
         "bad config: the --config file does not load: [Errno 2] No such file or directory: 'configs/no_such_config.py'"),
        (["--config=configs/no_such_config.py", "--config.train.num_steps=3"],
         "bad config: the --config file does not load: [Errno 2] No such file or directory: 'configs/no_such_config.py'"),
    ],
)
def test_script_names_a_bad_config_flag_in_one_line(tmp_path, flags, message):
    """Exit status 2, as the script's docstring says, and one line instead of ml_collections' traceback."""
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), "--config=configs/shapes_cpu.py", f"--workdir={tmp_path}", *flags]
    result = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model.layerdiff.max_layers": 1000}, r"config\.model\.layerdiff\.max_layers must be in \[2, 64\] .*got 1000"),
        ({"data.resolution": 100_000}, r"config\.data\.resolution must be in \[1, 8192\] \(pixels\), got 100000"),
        ({"train.time_limit_s": float("inf")}, r"config\.train\.time_limit_s must be a finite number, got inf"),
        ({"train.learning_rate": float("inf")}, r"config\.train\.learning_rate must be a finite number, got inf"),
        ({"mesh.shape": (True, 1, 1)}, r"config\.mesh\.shape must be 3 positive ints"),
        ({"log.sample_count": 1000}, r"config\.log\.sample_count must be in \[1, 64\] \(a grid, sampled as one batch\)"),
        ({"log.sample_steps": 5000}, r"config\.log\.sample_steps=5000 exceeds config\.diffusion\.num_train_timesteps=1000"),
        ({"train.per_host_batch_size": 1024}, r"per_host_batch_size=1024 exceeds config\.data\.synthetic\.num_train=512"),
        ({"model.layerdiff.max_layers": 3}, r"layer_mix draws samples of 4 layers, more than config\.model\.layerdiff\.max_layers=3"),
        ({"model.toy_vae.steps": 10, "model.toy_vae.crop": 128}, r"toy_vae\.crop=128 exceeds config\.data\.resolution=64"),
    ],
)
def test_training_config_bounds(changes, message):
    config = _valid()
    for field, value in changes.items():
        _set(config, field, value)
    with pytest.raises(ConfigError, match=message):
        validate_config(config)
