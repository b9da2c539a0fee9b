"""Ahead-of-time compiles for TPU slices on this CPU machine (layerdiff_jax/aot, scripts/compile_aot.py).

libtpu is a test dependency: without it these tests fail (SliceError names the install command), they do not skip.
Programs are the micro SD's (tests/train_support.py sizes): each TPU compile takes seconds, not SD 1.5's minutes.

  pytest tests/test_aot.py
"""

import subprocess
import sys

import pytest
from train_support import REPO, WIDTH, subprocess_env

from layerdiff_jax.aot import compile_profile, slices
from layerdiff_jax.aot.analysis import DoesNotFit
from layerdiff_jax.aot.fit import largest_batch
from layerdiff_jax.aot.hlo import collectives
from layerdiff_jax.aot.sample import SampleCompiler, SampleSettings
from layerdiff_jax.aot.train import TrainCompiler
from layerdiff_jax.diffusion.schedules import SchedulerConfig
from layerdiff_jax.models.clip_text import CLIPTextConfig
from layerdiff_jax.models.layerdiff import LayerDiffConfig
from layerdiff_jax.models.unet import UNetConfig
from layerdiff_jax.models.vae import VAEConfig
from layerdiff_jax.training.config import base_config
from layerdiff_jax.training.program import ModelConfigs

MICRO = ModelConfigs(
    UNetConfig(
        block_out_channels=(WIDTH,), down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), layers_per_block=1,
        num_attention_heads=2, cross_attention_dim=WIDTH, norm_num_groups=8,
    ),
    VAEConfig(block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=8),
    CLIPTextConfig(vocab_size=64, hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=1, num_attention_heads=2),
)


def micro_config(fsdp: int = 1, attention: str = "xla"):
    config = base_config()
    config.model.attention_impl = attention
    config.model.sd_path, config.data.path = "micro", "synthetic"  # not read: the architectures are MICRO
    config.model.layerdiff.enhancer_heads = 2
    config.model.layerdiff.max_layers = 2
    config.data.resolution = 16
    config.train.grad_accum_steps = 1
    config.mesh.shape = (-1, fsdp, 1)
    return config


def compile_train(slice_name: str, fsdp: int, batch_per_chip: int = 1, attention: str = "xla"):
    s = slices.get_slice(slice_name)
    return TrainCompiler.create(micro_config(fsdp, attention), s, MICRO).compile(batch_per_chip)


@pytest.fixture(scope="module")
def fsdp_steps():
    """The micro train step on 8 v4 chips with fsdp 2, 4 and 8 (data parallel over the rest)."""
    return {fsdp: compile_train("v4-16", fsdp) for fsdp in (2, 4, 8)}


def test_memory_statistics_are_positive_and_arguments_fall_with_fsdp(fsdp_steps):
    for step in fsdp_steps.values():
        m = step.memory
        assert m.argument > 0 and m.output > 0 and m.temp >= 0 and m.alias > 0  # the state is donated
        assert 0 < m.total < slices.get_slice("v4-16").hbm_bytes
        assert step.jaxpr_flops > 0 and step.xla_flops > 0
    arguments = [fsdp_steps[f].memory.argument for f in (2, 4, 8)]
    assert arguments[0] > arguments[1] > arguments[2], arguments


def test_collectives_some_with_fsdp(fsdp_steps):  # none on one chip: the next test
    for step in fsdp_steps.values():
        assert step.collectives.kinds["all-gather"].count > 0  # the parameters, gathered for use
        assert step.collectives.bytes_per_chip > 0
        # Kernels gathered at use and text tokens kept batch-sharded: no activation is re-split across chips.
        assert step.collectives.kinds["all-to-all"].count == 0
    s = slices.get_slice("v4-16")
    estimate = fsdp_steps[8].estimate(s)
    assert estimate.communication_s > 0 and estimate.ideal_s == max(estimate.compute_s, estimate.communication_s, estimate.hbm_s)


def test_splash_attention_compiles_on_a_sharded_batch():
    # A Pallas kernel is not partitioned by XLA: it runs per batch shard (shard_map), or the compile fails.
    step = compile_train("v4-8", 4, attention="splash")
    assert step.memory.total > 0 and step.collectives.kinds["all-gather"].count > 0


def test_one_chip_compile_profiled_no_collectives(tmp_path):
    compiler = TrainCompiler.create(micro_config(), slices.get_slice("v5e-1"), MICRO)  # libtpu set up before tracing
    with compile_profile.traced(tmp_path):
        step = compiler.compile(1)
    assert step.collectives.count == 0 and step.collectives.bytes_per_chip == 0
    found = compile_profile.summary(tmp_path, step.op_names, count=5)
    assert set(found.phases_s) == set(compile_profile.PHASES.values()) and all(s > 0 for s in found.phases_s.values())
    assert found.instructions_emitted > 10 and len(found.slowest) == 5
    seconds = [s for _, s, _ in found.slowest]
    assert seconds == sorted(seconds, reverse=True) and seconds[0] > 0
    # Which instructions are slowest depends on the machine's load; that the model's own are traced does not.
    everything = compile_profile.summary(tmp_path, step.op_names, count=found.instructions_emitted).slowest
    assert len(everything) == found.instructions_emitted
    assert any("LayerDiffUNet" in source for _, _, source in everything), everything[:5]
    assert found.lines()[0].startswith("compile phases: HLO passes ")


def test_an_oversized_batch_does_not_fit_in_one_line():
    with pytest.raises(DoesNotFit) as error:
        compile_train("v5e-1", 1, batch_per_chip=16384)
    message = str(error.value)
    assert "does not fit a chip's HBM" in message and "GiB over" in message and "\n" not in message
    assert error.value.over_bytes > 0


def test_the_sampler_programs_compile_for_a_slice():
    s = slices.get_slice("v4-8")
    settings = SampleSettings(size=16, layers=2, steps=3, dtype="bfloat16")
    compiler = SampleCompiler.create(s, MICRO, LayerDiffConfig(max_layers=2, enhancer_heads=2), SchedulerConfig(), settings)
    denoise, decode = compiler.compile(batch_per_chip=2)
    for program in (denoise, decode):
        assert program.memory.total > 0 and program.jaxpr_flops > 0
        # Parameters are replicated and each sample's rows stay on its chip (guidance pairs a sample's conditional and
        # unconditional rows, decode its image and mask latents): a data-parallel program moves nothing between chips.
        assert {kind: total.count for kind, total in program.collectives.kinds.items() if total.count} == {}
    assert (denoise.name, decode.name) == ("denoise", "decode")
    assert [trips for _, trips in denoise.collectives.loops] == [3]  # the DDIM scan, read from the HLO


HLO = """HloModule jit_step, is_scheduled=true, num_partitions=8

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%body (p: (s32[], bf16[64,128])) -> (s32[], bf16[64,128]) {
  %p = (s32[], bf16[64,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %w = bf16[64,128]{1,0:T(8,128)(2,1)} get-tuple-element(%p), index=1
  %ag = bf16[256,128]{1,0} all-gather(%w), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}, use_global_device_ids=true
  ROOT %t = (s32[], bf16[64,128]) tuple(%i, %w)
}

%cond (q: (s32[], bf16[64,128])) -> pred[] {
  %three = s32[]{:T(128)} constant(3)
  %q = (s32[], bf16[64,128]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  ROOT %lt = pred[] compare(%j, %three), direction=LT
}

%body2 (r: (s32[], f32[16])) -> (s32[], f32[16]) {
  %r = (s32[], f32[16]{0}) parameter(0)
  %v = f32[16]{0} get-tuple-element(%r), index=1
  %cp = f32[16]{0} collective-permute(%v), channel_id=5, source_target_pairs={{0,1},{1,0}}
  %k = s32[] get-tuple-element(%r), index=0
  ROOT %t2 = (s32[], f32[16]) tuple(%k, %cp)
}

%cond2 (u: (s32[], f32[16])) -> pred[] {
  %u = (s32[], f32[16]{0}) parameter(0)
  %flag = pred[] parameter(1)
  ROOT %and = pred[] and(%flag, %flag)
}

%all-reduce-scatter.1 (input: f32[1024]) -> f32[256] {
  %input = f32[1024]{0} parameter(0)
  %ar = f32[1024]{0} all-reduce(%input), channel_id=6, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
  ROOT %slice = f32[256]{0} dynamic-slice(%ar), dynamic_slice_sizes={256}
}

%async_collective_fusion.1 (s: f32[250]) -> f32[1000] {
  %s = f32[250]{0} parameter(0)
  ROOT %agc = f32[1000]{0} all-gather(%s), channel_id=8, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
}

%async_collective_fusion.2 (s2: f32[250]) -> f32[1000] {
  %s2 = f32[250]{0} parameter(0)
  ROOT %agc2 = f32[1000]{0} all-gather(%s2), channel_id=8, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
}

ENTRY %main (a: f32[1000], b: bf16[64,128], c: f32[16], d: f32[1024], e: f32[250]) -> f32[1000] {
  %a = f32[1000]{0} parameter(0)
  %b = bf16[64,128]{1,0} parameter(1)
  %c = f32[16]{0} parameter(2)
  %d = f32[1024]{0} parameter(3)
  %all-reduce.1 = f32[1000]{0} all-reduce(%a), channel_id=2, replica_groups={{0,1},{2,3},{4,5},{6,7}}, use_global_device_ids=true, to_apply=%add
  %rs = f32[500]{0} reduce-scatter(%all-reduce.1), channel_id=3, replica_groups={{0,1},{2,3},{4,5},{6,7}}, dimensions={0}, to_apply=%add
  %ags = (f32[500]{0}, f32[2000]{0}) all-gather-start(%rs), channel_id=4, replica_groups=mesh['axis_0'=2,'axis_1'=4], device_ids=([8]) {'axis_1'}, dimensions={0}
  %agd = f32[2000]{0} all-gather-done(%ags)
  %a2a = f32[1000]{0} all-to-all(%a), channel_id=7, replica_groups={}, dimensions={0}
  %init = (s32[], bf16[64,128]) tuple(%i0, %b)
  %loop = (s32[], bf16[64,128]) while(%init), condition=%cond, body=%body
  %init2 = (s32[], f32[16]) tuple(%i0, %c)
  %loop2 = (s32[], f32[16]) while(%init2), condition=%cond2, body=%body2
  %fusion = f32[256]{0} fusion(%d), kind=kCustom, calls=%all-reduce-scatter.1
  %e = f32[250]{0} parameter(4)
  %start = f32[1000]{0} fusion(%e), kind=kOutput, calls=%async_collective_fusion.1
  %continued = f32[1000]{0} fusion(%e), kind=kOutput, calls=%async_collective_fusion.2
  ROOT %out = f32[1000]{0} add(%all-reduce.1, %a2a)
}
"""


def test_hlo_collectives_counts_bytes_and_group_sizes():
    found = collectives(HLO)
    k = found.kinds
    # all-reduce of 4000 B in pairs: 2 (n-1)/n S = 4000 B per chip.
    assert (k["all-reduce"].count, k["all-reduce"].bytes_per_chip) == (1, 4000)
    # reduce-scatter of 4000 B in pairs: 2000 B; and the fused all-reduce-scatter of 4096 B in fours: 3072 B.
    assert (k["reduce-scatter"].count, k["reduce-scatter"].bytes_per_chip) == (2, 2000 + 3072)
    # all-gather-start of a 2000 B shard over axis_1 (4 chips): 3 x 2000; the loop's all-gather (iota [2,4]: groups
    # of 4) of a 16 KiB shard, 3 trips: 3 x 3 x 16384; one all-gather of a 1000 B shard in fours that XLA:TPU split
    # into a start and a continuation fusion (one channel): 3 x 1000.
    assert (k["all-gather"].count, k["all-gather"].bytes_per_chip) == (1 + 3 + 1, 3 * 2000 + 3 * 3 * 16384 + 3 * 1000)
    # all-to-all over every device (replica_groups={}, 8 partitions): 7/8 of 4000 B.
    assert (k["all-to-all"].count, k["all-to-all"].bytes_per_chip) == (1, 3500)
    # The second loop's trip count is not in the HLO: counted once, and said so.
    assert (k["collective-permute"].count, k["collective-permute"].bytes_per_chip) == (1, 64)
    assert found.loops == (("loop", 3), ("loop2", None))
    assert len(found.notes) == 1 and "loop2" in found.notes[0]


def test_largest_batch_aims_where_memory_meets_the_hbm():
    """Memory 3 + 2 x batch; XLA can use `available` bytes of an HBM of 100."""

    def compiler(available):
        def compile_at(batch):
            need = 3 + 2 * batch
            if need > available:
                raise DoesNotFit("step", need - available, "test")
            return f"program {batch}", need

        return compile_at

    search = largest_batch(compiler(100), 100, start=1)
    # From one point the line through zero (5 per sample) aims short, at 20; from two, at 48.
    assert (search.batch, search.result, search.failed_batch, search.tries) == (48, "program 48", 49, (1, 20, 48, 49))
    # XLA uses less than the whole HBM: its bytes over at 48 aim the next candidate.
    assert largest_batch(compiler(96), 100, start=1).tries == (1, 20, 48, 46, 47)
    # A start that does not fit (131 at 64, 31 over): from 1 (5) up again, aimed by the line through both points.
    assert largest_batch(compiler(100), 100, start=64).tries == (64, 1, 48, 49)
    assert largest_batch(compiler(2), 100).batch is None


def test_libtpu_missing_names_the_install_command(monkeypatch):
    monkeypatch.setattr(slices.importlib.util, "find_spec", lambda name: None)
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    with pytest.raises(slices.SliceError, match=r'pip install -e "\.\[tpu\]"'):
        slices.check_compiler(slices.get_slice("v4-8"))


def test_gpu_target_configs_describe_the_slices_figures(monkeypatch):
    h100, v4 = slices.get_slice("h100-1"), slices.get_slice("v4-8")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert slices.usable_memory(h100)[0] == int(0.75 * h100.hbm_bytes) and slices.usable_memory(v4)[0] == v4.hbm_bytes
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", ".95")  # what a GPU run gives JAX, a TPU chip ignores
    assert slices.usable_memory(h100)[0] == int(0.95 * h100.hbm_bytes) and slices.usable_memory(v4)[0] == v4.hbm_bytes
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "95%")
    with pytest.raises(slices.SliceError, match="XLA_PYTHON_CLIENT_MEM_FRACTION='95%' is not a number"):
        slices.usable_memory(h100)
    for s in (s for s in slices.SLICES.values() if s.platform == "gpu"):
        gpu = slices.CUDA_DEVICES[s.name.split("-")[0]]
        text = gpu.target_config()
        assert f"device_memory_size: {s.hbm_bytes} " in text and f"memory_bandwidth: {int(s.hbm_bytes_per_s)} " in text
        assert f'device_description_str: "{gpu.description}"' in text and "major: 9 minor: 0" in text
        assert (s.hosts, s.topology_name, s.interconnect) == (1, f"1x1x{s.chips}", "NVLink")
        assert text.count("{") == text.count("}")


def _cli(*args):
    command = [sys.executable, str(REPO / "scripts" / "compile_aot.py"), *args]
    return subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--config=configs/shapes_cpu.py", "--slice=v9-8"], "compile_aot.py: unknown slice 'v9-8'; known slices: v4-8, v4-16,"),
        (["train", "--config=configs/shapes_cpu.py", "--slice=v4-8", "--config.mesh.shape=(3,1,1)"],
         "compile_aot.py: config.mesh.shape=(3, 1, 1) does not divide the 4 chips of v4-8"),
        (["train", "--slice=v4-8"], "compile_aot.py: train needs --config"),
        (["train", "--config=configs/shapes_cpu.py", "--slice=v4-8", "--profile-compile=README.md"],
         "compile_aot.py: --profile-compile README.md: not a folder"),
        (["deploy", "--slice=v4-8"], "compile_aot.py: give one command, train or sample"),
        # The suite's environment has libtpu but not jax's CUDA plugin (gpu-aot, ~480 MB).
        (["train", "--config=configs/shapes_cpu.py", "--slice=h100-8"],
         'compile_aot.py: compiling for NVIDIA GPUs needs jax\'s CUDA plugin, which is not installed: pip install -e ".[gpu-aot]"'),
    ],
)
def test_cli_refuses_bad_input_in_one_line_before_compiling(args, message):
    result = _cli(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
