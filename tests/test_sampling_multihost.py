"""scripts/sample.py on a pod: two real jax.distributed processes on localhost, one CPU device each, sample one request
file into one shared folder. Each writes the samples its device drew, numbered as a one-process run numbers them and
equal to that run's; process 0 merges what each recorded writing and marks the run finished only when both succeeded.

6 samples in batches of 4: the second batch is filled with 2 repeats, which lie on process 1 and are not written.
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from sampling_toy import SIZE, make_random_layerdiff
from train_support import communicate_all, free_port, subprocess_env

from layerdiff_jax.data.layers import list_sample_folders, read_sample_folder
from layerdiff_jax.fileio import RECORD_FILE, OutputFolderError, recorded_entries
from layerdiff_jax.sampling.outputs import CONTACT_SHEET

pytestmark = pytest.mark.slow  # end-to-end runs (see pyproject.toml)
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sample.py"
SAMPLES = [f"sample_{i:04d}" for i in range(6)]
# Process 0's device holds rows 0-1 of each batch, process 1's rows 2-3: samples 0, 1, 4, 5 and 2, 3.
SHARES = {"0": [CONTACT_SHEET, *SAMPLES[:2], *SAMPLES[4:]], "1": SAMPLES[2:4]}
# scripts/sample.py with its sample writer failing on process 1 for sample 3.
FAILING_ON_PROCESS_1 = """
import os, sys
from script_support import load_script
from layerdiff_jax.sampling import outputs

write = outputs.write_sample

def failing_on_sample_3(sample, folder, **kwargs):
    if folder.name == "sample_0003":
        raise OSError(f"{folder}: simulated write failure")
    return write(sample, folder, **kwargs)

if os.environ["JAX_PROCESS_ID"] == "1":
    outputs.write_sample = failing_on_sample_3
sys.exit(load_script("sample").main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def request_args(tmp_path_factory):
    """sample.py's arguments but --out: a toy model, 6 samples of 2 requests, 2 steps, no layered files."""
    folder = tmp_path_factory.mktemp("multihost")
    spec = folder / "requests.json"
    spec.write_text(json.dumps([
        {"prompt": "a red circle on a blue background", "layer_prompts": ["a red circle"], "num_samples": 4},
        {"prompt": "a green square and a red circle", "layer_prompts": ["a green square", "a red circle"], "num_samples": 2, "seed": 42},
    ]))
    model = make_random_layerdiff(folder / "model", trained_size=SIZE)
    return ["--checkpoint", str(model), "--spec", str(spec), "--steps", "2", "--batch-size", "4", "--seed", "3", "--quiet", "--formats"]


def _outputs(folder: Path) -> dict[str, str]:
    """Every file a run wrote (not the folder's bookkeeping), by path: its SHA-256."""
    files = (p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _run_two_processes(command: list[str]) -> list[tuple[int, str]]:
    """(exit status, stderr) of `command` run as processes 0 and 1 of one jax.distributed run, one CPU device each."""
    env = subprocess_env(devices=1, fast_compile=True)
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", JAX_NUM_PROCESSES="2")
    processes = [
        subprocess.Popen(command, env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = communicate_all(processes, timeout=300)
    return [(p.returncode, err) for p, (_, err) in zip(processes, outputs)]


def test_each_process_writes_its_share_and_the_run_equals_one_process(request_args, tmp_path):
    out = tmp_path / "pod"
    for status, err in _run_two_processes([sys.executable, str(SCRIPT), *request_args, "--distributed", "--out", str(out)]):
        assert status == 0, err[-4000:]
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["finished"] and record["entries"] == [CONTACT_SHEET, *SAMPLES]
    assert record["by_process"] == SHARES  # disjoint, and every sample once
    assert [p.name for p in list_sample_folders(out)] == SAMPLES
    assert sorted(p.name for p in out.iterdir()) == [RECORD_FILE, CONTACT_SHEET, *SAMPLES]  # no part-file, lock or repeat left

    # One process with both devices: the same batches on the same devices, written by one host.
    single = tmp_path / "single"
    subprocess.run([sys.executable, str(SCRIPT), *request_args, "--out", str(single)], env=subprocess_env(devices=2, fast_compile=True),
                   check=True, capture_output=True, timeout=300)
    assert _outputs(out) == _outputs(single)
    assert [read_sample_folder(out / name).metadata["seed"] for name in SAMPLES] == [3, 4, 5, 6, 42, 43]


def test_a_write_failing_on_one_process_leaves_the_run_unfinished(request_args, tmp_path):
    out = tmp_path / "pod"
    command = [sys.executable, "-c", FAILING_ON_PROCESS_1, *request_args, "--distributed", "--out", str(out)]
    (status0, err0), (status1, err1) = _run_two_processes(command)
    assert status1 == 1 and err1.strip().splitlines() == [f"sample.py: error: {out / 'sample_0003'}: simulated write failure"]
    assert status0 == 1 and err0.strip().splitlines() == [
        f"sample.py: error: another process could not write all its outputs (its errors say which); {out} is marked unfinished"
    ]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [CONTACT_SHEET, *SAMPLES[:3], *SAMPLES[4:]]
    assert recorded_entries(out) == {CONTACT_SHEET, *SAMPLES}  # the failed one too: --overwrite replaces it
    with pytest.raises(OutputFolderError, match="unfinished run of sample.py"):
        list_sample_folders(out)
