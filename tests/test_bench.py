"""scripts/bench.py: the accelerator check's CPU path and the standard suite at toy sizes (smoke tests: they run
and write their files; no timing assertions), the load marking, the check's time box and batch search."""

import json
import os
import threading
from pathlib import Path

import jax
import pytest
from script_support import load_script

from layerdiff_jax.bench import check, measure, report, requirements, suite

ROOT = Path(__file__).resolve().parents[1]




def test_check_quick_runs_every_step_and_writes_json_and_markdown(tmp_path, capsys):
    """The accelerator check's CPU path (toy sizes; cuDNN refuses and XLA runs): every step, in order, each row on
    disk. The deadline is far off so that the watchdog (os._exit) cannot end the test session."""
    out = tmp_path / "check"
    assert load_script("bench").main(["--device", "cpu", "--suite", "check", "--quick", "--out", str(out), "--deadline-min", "30"]) == 0
    result = json.loads((out / "check.json").read_text())
    assert [(s["id"], s["status"]) for s in result["steps"]] == [
        ("a1", "done"), ("a2", "done"), ("b", "done"), ("c", "done"), ("d", "done"), ("b'", "done")
    ]
    assert result["stopped"] is None and result["elapsed_s"] < result["deadline_s"]
    rows = result["rows"]
    assert all(r["status"] == "ok" and "load_before" in r and "load_after" in r for r in rows)
    assert [r["row"] for r in rows] == sorted((r["row"] for r in rows), key=["a1", "a2", "b", "c", "d", "b'"].index)
    by = lambda row_id, impl: next(r for r in rows if r["row"] == row_id and r["impl"] == impl)  # noqa: E731

    # a1: the same weights on both sides agree; bfloat16 ours is as close to float32 as torch's bfloat16.
    assert by("a1", "ours xla")["rel_err"] < 1e-5 and by("a1", "ours xla")["met"] is True
    ours_bf16, torch_bf16 = by("a1", "ours cudnn"), by("a1", "torch")
    assert ours_bf16["rel_err"] < 2 * torch_bf16["rel_err"] < 0.05
    assert any("cuDNN needs an NVIDIA GPU" in f for f in ours_bf16["attention_fallbacks"])
    # a2: every case ran XLA and the "kernel", which refused (the reason is in the row) and fell back.
    attention_rows = [r for r in rows if r["row"] == "a2"]
    assert len(attention_rows) == 2 * len(result["settings"]["attention_cases"])
    for r in attention_rows:
        assert r["ran"] == "xla" and r["rel_err"] < 1e-2 and r["grad_rel_err"] < 1e-2
        assert (r["refusal"] is None) == (r["impl"] == "xla") and "load_before" in r and "load_after" in r
    assert "cuDNN needs an NVIDIA GPU" in next(r for r in attention_rows if r["impl"] == "cudnn -> xla")["refusal"]
    # b: both impls and torch eager, with the speed-up, MFU and compile targets (MFU n/a on a CPU).
    for impl in ("ours xla", "ours cudnn"):
        r = by("b", impl)
        assert r["images_per_s"] > 0 and r["compile_s"] > 0 and r["flops"] > 0
        assert [t["what"] for t in r["targets"]] == ["speed-up vs torch eager (SDPA)", "MFU", "compile"]
    assert by("b", "torch eager (SDPA)")["images_per_s"] > 0
    # c: DDIM, ours vs diffusers on the same weights (bfloat16 on both sides).
    ddim = next(r for r in rows if r["row"] == "c" and r["impl"].startswith("ours"))
    assert ddim["images_per_s"] > 0 and ddim["rel_err"] < 0.1 and by("c", "diffusers")["images_per_s"] > 0
    # d: the train step at the quick batch (no memory limit to search against on a CPU).
    (train,) = [r for r in rows if r["row"] == "d"]
    assert train["samples_per_s"] > 0 and train["batch"] == 1 and train["remat"] is False and train["flops"] > 0
    assert by("b'", "torch.compile")["images_per_s"] > 0

    table = (out / "check.md").read_text()
    assert table.count("\n| a2 |") == len(attention_rows) and "| d | LayerDiff train step, L=4" in table
    assert "steps: a1 done, a2 done, b done, c done, d done, b' done" in table
    assert table in capsys.readouterr().out


def test_standard_suite_quick_unet_row_writes_json(tmp_path, capsys):
    """The standard suite's UNet row at toy size (its DDIM and train-step code runs in the check above)."""
    out = tmp_path / "bench.json"
    assert load_script("bench").main(["--quick", "--rows", "unet", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["row"], r["impl"]) for r in rows] == [("1a", "ours"), ("1a", "torch"), ("1b", "ours"), ("1b", "torch")]
    for r in rows:
        assert r["median_s"] > 0 and len(r["times_s"]) == result["settings"]["repeats"]
        assert {"load_before", "load_after", "reliable"} <= set(r)
    # Same weights on both sides: the float32 outputs agree.
    assert rows[0]["max_abs_err"] < 1e-4 and rows[0]["targets"][0]["what"] == "ours/torch time"
    env = result["environment"]
    assert env["versions"]["jax"] == jax.__version__ and env["torch_threads"] >= 1 and env["cpu_count"] >= 1
    assert env["torch_cpu_capability"] in {"DEFAULT", "AVX2", "AVX512", "ZVECTOR", "VSX", "SVE256", "SVE128"}
    assert env["cpu_kernels_march"] == os.environ.get("LAYERDIFF_CPU_KERNELS_MARCH", "native")
    assert capsys.readouterr().out.count("\n| 1a |") == 2


def test_bench_rejects_unknown_rows(tmp_path, capsys):
    assert load_script("bench").main(["--quick", "--rows", "unet,nope", "--json", str(tmp_path / "x.json")]) == 2
    assert "unknown benchmark row(s) ['nope']" in capsys.readouterr().err


def test_check_at_full_size_on_a_cpu_is_refused(tmp_path, capsys):
    assert load_script("bench").main(["--suite", "check", "--out", str(tmp_path)]) == 2
    assert "on a CPU pass --quick" in capsys.readouterr().err


# ------------------------------------------------------------ load: a busy machine's rows are never "met"


def test_rows_measured_above_the_core_count_are_unreliable_and_never_met(monkeypatch):
    assert measure.load_fields(1.5, 2.0, cores=2)["reliable"] is True
    busy = measure.load_fields(1.0, 2.5, cores=2)
    assert busy["reliable"] is False and busy["unreliable"] == "load average 2.50 > 2 cores"

    fast = {"row": "x", "name": "n", "impl": "ours", "median_s": 1.0, **measure.load_fields(0.5, 0.5, cores=2)}
    slow = {"row": "x", "name": "n", "impl": "torch", "median_s": 3.0, **measure.load_fields(0.5, 0.5, cores=2)}
    assert suite._compare(dict(fast), slow, higher_is_better=True, target=1.5, name="speed-up")["met"] is True
    # The same numbers with the reference measured on a busy machine: not met, and the table says why.
    row = suite._compare(dict(fast), {**slow, **busy}, higher_is_better=True, target=1.5, name="speed-up")
    assert row["met"] is None and row["reliable"] is False and "torch side" in row["unreliable"]
    assert report._met(row).startswith("unreliable: torch side: load average 2.50")
    assert suite.add_target(row, "MFU", 0.9, 0.5, at_least=True)["met"] is None

    # timed() records the load before and after every measurement.
    loads = iter([(9.0, 0, 0), (1.0, 0, 0)])
    monkeypatch.setattr(measure, "load_average", lambda: next(loads))
    timing, fields = measure.timed(lambda: None, 1, compile_s=2.0)
    assert (fields["load_before"], fields["load_after"], fields["reliable"]) == (9.0, 1.0, False)
    assert len(timing.times) == 1 and timing.compile_s == 2.0


def test_merged_measurements_are_unreliable_if_any_was():
    """Row 1 merges its one-call memory measurement with its timings' load: a busy memory call is not hidden."""
    quiet, busy, busier = (measure.load_fields(load, load, cores=2) for load in (0.5, 2.5, 3.0))
    for parts in ((busy, quiet), (quiet, busy), (busy, busier), ({"rss_peak_bytes": 1}, quiet)):
        merged = measure.merged_fields(*parts)
        assert merged["reliable"] is ("unreliable" not in merged)
        assert merged["reliable"] is all(p.get("reliable", True) for p in parts)
    assert measure.merged_fields(busy, quiet)["load_after"] == 0.5  # the later measurement's load is the row's
    assert measure.merged_fields(busy, busier)["unreliable"] == "load average 2.50 > 2 cores; load average 3.00 > 2 cores"


def test_a_failing_row_family_becomes_a_failed_row_and_the_others_still_run(monkeypatch, tmp_path, capsys):
    def boom(settings, sd):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(suite, "build_sd", lambda settings: "sd")
    monkeypatch.setattr(suite, "bench_unet", lambda settings: [{"row": "1a", "impl": "ours"}])
    monkeypatch.setattr(suite, "bench_ddim", boom)
    monkeypatch.setattr(suite, "bench_layers", lambda settings, sd: [{"row": "3", "impl": "ours", "sd": sd}])
    result = suite.run_suite(suite.BenchSettings.for_device("cpu", quick=True))
    assert [(r["row"], r.get("status", "ok")) for r in result["rows"]] == [("1a", "ok"), ("2", "failed"), ("3", "ok")]
    failed = result["rows"][1]
    assert failed["error"] == "RuntimeError: out of memory" and "boom" in failed["traceback"]
    assert result["rows"][2]["sd"] == "sd" and "end" in result["load_average"]
    # The CLI still writes the other rows, and exits as the check does when a step failed.
    out = tmp_path / "bench.json"
    assert load_script("bench").main(["--quick", "--rows", "ddim", "--json", str(out)]) == check.EXIT_STEP_FAILED
    assert json.loads(out.read_text())["rows"][0]["status"] == "failed"
    assert "| 2 | DDIM text-to-image, ours vs diffusers; RuntimeError: out of memory |" in capsys.readouterr().out


# ------------------------------------------------------------------- the check's time box and batch search


def test_check_run_writes_every_row_at_once_and_stops_at_the_deadline(tmp_path):
    exits, stopped = [], threading.Event()

    def fake_exit(status):  # the real one is os._exit: what is on disk then is what the run leaves
        exits.append((status, json.loads((tmp_path / "check.json").read_text())))
        stopped.set()

    env = {"date": "d", "host": "h", "cpu": "c", "cpu_count": 2, "jax_backend": "cpu", "device": "cpu", "device_count": 1,
           "versions": {"jax": "0"}, "python": "3", "xla_flags": ""}
    plan = [("x", "first"), ("y", "raises"), ("z", "runs past the deadline"), ("w", "after the deadline")]
    # 5 s: steps x and y must end before the deadline even on a loaded 2-core machine; z waits for it.
    run = check.CheckRun(tmp_path, 5.0, plan=plan, header={"environment": env, "settings": {"attention_impl": "xla"}}, exit=fake_exit)

    def first(r):
        r.add({"row": "x", "name": "first row", "impl": "ours", "median_s": 0.1})
        on_disk = json.loads((tmp_path / "check.json").read_text())
        assert [row["name"] for row in on_disk["rows"]] == ["first row"]  # written before the step ends

    def raises(r):
        raise RuntimeError("boom")

    assert run.step("x", first) is True
    assert run.step("y", raises) is False
    run.step("z", lambda r: stopped.wait(30))
    assert run.step("w", lambda r: pytest.fail("ran after the deadline")) is False
    assert run.finish() == check.EXIT_DEADLINE

    ((status, at_exit),) = exits
    assert status == check.EXIT_DEADLINE and at_exit["stopped"] == "deadline (5 s) reached during step z"
    assert [(s["id"], s["status"]) for s in at_exit["steps"]] == [("x", "done"), ("y", "failed"), ("z", "stopped"), ("w", "not run")]
    assert [r["status"] for r in at_exit["rows"]] == ["ok", "failed"] and "RuntimeError: boom" in at_exit["rows"][1]["error"]
    table = (tmp_path / "check.md").read_text()
    assert "| y | raises; RuntimeError: boom |" in table and "stopped: deadline (5 s) reached during step z" in table


def _fake_compiles(fixed: float, per_sample: float):
    calls = []

    def compile_at(batch):
        calls.append(batch)
        return f"program B={batch}", fixed + per_sample * batch, 1.0

    return compile_at, calls


def test_fit_batch_finds_the_largest_batch_that_fits():
    # 10 GB fixed + 2 GB a sample, 100 GB free: 90% of it fits batch 40.
    compile_at, calls = _fake_compiles(10, 2)
    batch, program, tries = check.fit_batch(compile_at, 8, 100, time_left=lambda: 1e9)
    assert (batch, program) == (40, "program B=40") and calls == [8, 24, 40] and len(tries) == 3
    compile_at, calls = _fake_compiles(10, 2)  # starting too large: down to the fit, then stop
    assert check.fit_batch(compile_at, 64, 100, time_left=lambda: 1e9)[0] == 40 and calls == [64, 40]
    compile_at, calls = _fake_compiles(10, 2)  # no time for a second compile: the first batch, as it fits
    assert check.fit_batch(compile_at, 8, 100, time_left=lambda: 1.0)[0] == 8 and calls == [8]
    compile_at, calls = _fake_compiles(10, 2)  # no memory figure (CPU): the batch asked for
    assert check.fit_batch(compile_at, 3, None, time_left=lambda: 1e9)[0] == 3 and calls == [3]
    with pytest.raises(MemoryError, match="no train batch fits"):
        check.fit_batch(_fake_compiles(95, 2)[0], 4, 100, time_left=lambda: 1e9)


def test_missing_packages_are_named_with_the_offline_install_command(monkeypatch):
    assert {"jax", "flax", "diffusers", "torch"} <= set(requirements.declared())
    assert requirements.missing(["jax", "no-such-distribution"]) == ["no-such-distribution"]
    assert requirements.import_problem(("json",)) is None
    monkeypatch.setattr(requirements, "declared", lambda extras=(): ["jax", "no-such-distribution"])
    problem = requirements.import_problem(("no_such_module",))
    assert problem.startswith("cannot import no_such_module: No module named 'no_such_module'")
    assert "pip install --no-index --find-links WHEELS no-such-distribution" in problem


# ---------------------------------------------------------------- attention implementations and masking


def test_matmul_flops_counts_products_and_convolutions_as_xla_cpu_does():
    """The FLOPs behind MFU come from the jaxpr (the GPU backend's own cost analysis left out the cuBLAS and
    cuDNN calls): on a loop-free program they agree with XLA:CPU's analysis, gradients included (convolutions
    whose operands swap roles); a scan counts each trip (XLA's analysis counts a loop body once). Padding is
    counted as work, as MFU conventionally does (XLA leaves out the taps that fall on it: VALID here)."""
    import jax.numpy as jnp

    def net(w, k, x):
        y = jax.lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = jax.jit(lambda a: a @ w)(y.reshape(-1, 8))
        return jnp.sum(y**2)

    args = (jnp.ones((8, 8)), jnp.ones((3, 3, 4, 8)), jnp.ones((2, 6, 6, 4)))
    conv, matmul = 2 * 2 * 4 * 4 * 8 * (3 * 3 * 4), 2 * (2 * 4 * 4) * 8 * 8
    assert measure.matmul_flops(net, *args) == pytest.approx(conv + matmul)
    grad = jax.grad(net, argnums=(0, 1))
    ours = measure.matmul_flops(grad, *args)
    assert ours == pytest.approx(3 * (conv + matmul) - conv)  # no input gradient for x
    xla = jax.jit(grad).lower(*args).compile().cost_analysis()
    xla = xla[0] if isinstance(xla, (list, tuple)) else xla
    assert ours <= xla["flops"] <= 1.05 * ours  # XLA adds the elementwise work

    def looped(w, y):
        return jax.lax.scan(lambda c, _: (c @ w, None), y, None, length=3)[0]

    assert measure.matmul_flops(looped, jnp.ones((8, 8)), jnp.ones((32, 8))) == pytest.approx(3 * matmul)
    assert measure.matmul_flops(lambda a: a + 1, jnp.ones(3)) is None


def test_interleaved_timing_takes_turns_and_reverses_the_order_every_other_round():
    order = []
    timings = measure.time_interleaved([lambda: order.append("a"), lambda: order.append("b")], repeats=4, warmup=1)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then a b, b a, a b, b a
    assert [len(t.times) for t in timings] == [4, 4] and all(t.median >= 0 for t in timings)
