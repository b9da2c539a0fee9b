"""Output folders (`layerdiff_jax.fileio`): one writer per folder, nothing deleted that a tool did not write, no
unfinished run that reads as complete; and the tools' one-line errors for a locked, unwritable or full folder."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from script_support import load_script

from layerdiff_jax.convert.sd_folder import load_sd
from layerdiff_jax.data.layers import list_sample_folders, read_sample_folder
from layerdiff_jax.fileio import (
    LOCK_FILE,
    RECORD_FILE,
    OutputFolderError,
    Processes,
    check_finished,
    claim_output_folder,
    recorded_entries,
    staged_folder,
)
from layerdiff_jax.training.checkpoint import Checkpointer, CheckpointWriteError

REPO = Path(__file__).resolve().parents[1]
build_dataset = load_script("build_dataset")


def _lock(folder: Path, pid: int, tool: str = "sample.py") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "tool": tool, "since": "earlier"}))


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def live_pid():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield process.pid
    process.kill()
    process.wait()


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_a_folder_held_by_a_live_process_is_refused_naming_it(tmp_path, live_pid):
    out = tmp_path / "out"
    _lock(out, live_pid)
    with pytest.raises(OutputFolderError, match=rf"in use by sample.py \(PID {live_pid} on {socket.gethostname()}"):
        with claim_output_folder(out, tool="test"):
            pass
    assert (out / LOCK_FILE).exists()  # still the holder's


def test_a_stale_lock_is_taken_over_and_the_lock_released_after(tmp_path):
    out = tmp_path / "out"
    _lock(out, _dead_pid())
    with claim_output_folder(out, tool="test", overwrite=True) as record:
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
        record.add("a")
        (out / "a").write_text("x")
        record.finish()
    assert not (out / LOCK_FILE).exists() and recorded_entries(out) == {"a"}


def test_overwrite_removes_only_recorded_entries_and_only_once_the_new_run_writes(tmp_path):
    out = tmp_path / "out"
    with claim_output_folder(out, tool="test") as record:
        for name in ("a", "b", "c"):
            record.add(name)
            (out / name).mkdir()
        record.finish()
    with claim_output_folder(out, tool="test", overwrite=True) as record:
        assert _listing(out) == ["a", "b", "c"]  # nothing replaced before the new run writes
        record.add("a")
        assert _listing(out) == ["a"]
        record.finish()
    (out / "mine.txt").write_text("x")
    with pytest.raises(OutputFolderError, match=r"holds entries this tool did not write \(mine.txt\)"):
        with claim_output_folder(out, tool="test", overwrite=True):
            pass
    assert _listing(out) == ["a", "mine.txt"]


def test_an_unfinished_run_is_refused_by_readers(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with claim_output_folder(out, tool="sample.py") as record:
            record.add("sample_0000")
            (out / "sample_0000").mkdir()
            raise KeyboardInterrupt
    for read in (check_finished, list_sample_folders, read_sample_folder):
        with pytest.raises(OutputFolderError, match="unfinished run of sample.py"):
            read(out)


def test_a_refused_or_interrupted_run_that_wrote_nothing_leaves_no_folder(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(ValueError):
        with claim_output_folder(out, tool="test"):
            raise ValueError("the model does not load")
    assert not out.exists()


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_an_output_related_to_an_input_is_refused_before_anything_is_created(tmp_path, where):
    source = tmp_path / "source"
    source.mkdir()
    out = {"same": source, "inside": source / "out", "contains": tmp_path}[where]
    with pytest.raises(OutputFolderError, match="cannot be the output"):
        with claim_output_folder(out, tool="test", overwrite=True, inputs=[source]):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"] and not list(source.iterdir())


def test_a_staged_folder_keeps_the_lock_and_record_of_the_folder_it_replaces(tmp_path):
    out = tmp_path / "edited"
    with claim_output_folder(out, tool="edit.py") as record:
        record.add("sample.json")
        with staged_folder(out) as staging:
            (staging / "sample.json").write_text("{}")
        assert (out / LOCK_FILE).exists() and (out / RECORD_FILE).exists() and (out / "sample.json").exists()


def _two_processes() -> list[Processes]:
    """Processes 0 and 1 of one run, for threads: an all-gather over a barrier."""
    values, barrier = [0, 0], threading.Barrier(2, timeout=30)

    def allgather(index):
        def gather(value):
            values[index] = value
            barrier.wait()
            gathered = list(values)
            barrier.wait()  # read before either process's next value
            return gathered

        return gather

    return [Processes(i, allgather(i)) for i in range(2)]


def test_a_multi_process_run_stopped_before_merging_is_unfinished_and_overwrite_removes_every_part(tmp_path):
    """Two processes write one folder and are killed before the end: what each recorded (process 1 in its part-file)
    counts as the run's, so a rerun with --overwrite removes all of it, the part-file too."""
    out = tmp_path / "out"

    def write_and_die(processes, name):
        with pytest.raises(KeyboardInterrupt):
            with claim_output_folder(out, tool="sample.py", processes=processes) as record:
                record.start()
                record.add(name)
                (out / name).mkdir()
                raise KeyboardInterrupt

    threads = [threading.Thread(target=write_and_die, args=(p, f"sample_000{p.index}")) for p in _two_processes()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert recorded_entries(out) == {"sample_0000", "sample_0001"} and (out / ".layerdiff_outputs.process_1.json").exists()
    with pytest.raises(OutputFolderError, match=r"unfinished run of sample.py \(interrupted, failed, or still writing; 2 entries"):
        check_finished(out)
    with claim_output_folder(out, tool="sample.py", overwrite=True) as record:
        record.add("sample_0000")
        record.finish()
    assert sorted(p.name for p in out.iterdir()) == [RECORD_FILE, "sample_0000"] and recorded_entries(out) == {"sample_0000"}


def test_export_writes_only_into_its_own_folder(tmp_path, capsys):
    out = tmp_path / "export"
    assert build_dataset.main(["export", "--out", str(out), "--num", "3"]) == 0
    assert build_dataset.main(["export", "--out", str(out), "--num", "3"]) == 1  # not asked to overwrite
    assert "not an empty folder" in capsys.readouterr().err
    assert build_dataset.main(["export", "--out", str(out), "--num", "2", "--overwrite"]) == 0
    assert _listing(out) == ["sample_00000", "sample_00001"]
    (out / "keep.png").write_bytes(b"x")
    assert build_dataset.main(["export", "--out", str(out), "--num", "1", "--overwrite"]) == 1
    assert "keep.png" in capsys.readouterr().err and _listing(out) == ["keep.png", "sample_00000", "sample_00001"]


def test_two_writers_on_one_folder_and_ctrl_c(tmp_path):
    """A second export on a folder a running export holds is refused naming the first; Ctrl-C then ends the
    first with one line, and the folder it leaves reads as an unfinished export."""
    out = tmp_path / "export"
    command = [sys.executable, str(REPO / "scripts" / "build_dataset.py"), "export", "--num", "100000", "--out", str(out)]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "sample_00001").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.poll() is not None else "timed out"
            time.sleep(0.05)
        second = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        assert f"is in use by build_dataset.py export (PID {first.pid} on {socket.gethostname()}" in second.stderr
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 130
    assert err.strip().splitlines()[-1].startswith("interrupted after ") and "keeps them, marked as unfinished" in err
    assert "Traceback" not in err
    with pytest.raises(OutputFolderError, match="unfinished run of build_dataset.py export"):
        list_sample_folders(out)


def test_training_refuses_a_workdir_another_run_holds(tmp_path, live_pid):
    from layerdiff_jax.training.config import base_config
    from layerdiff_jax.training.trainer import train

    _lock(tmp_path, live_pid, tool="train.py")
    with pytest.raises(OutputFolderError, match=rf"in use by train.py \(PID {live_pid}"):
        train(base_config(), tmp_path)  # refused before the config is read or anything is loaded
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]


def test_an_unfinished_conversion_does_not_load(tmp_path):
    for name in ("unet", "vae", "text_encoder"):
        (tmp_path / name).mkdir()
    (tmp_path / RECORD_FILE).write_text(json.dumps({"tool": "convert_weights.py", "finished": False, "entries": ["unet"]}))
    with pytest.raises(OutputFolderError, match="unfinished run of convert_weights.py"):
        load_sd(tmp_path)


class _FullDisk:
    """An orbax CheckpointManager whose writes fail as tensorstore reports a full disk."""

    def all_steps(self):
        return [250, 500]

    def save(self, step, args, force):
        raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "ckpt/500.orbax-checkpoint-tmp/x":\nFailed writing\n...')

    def wait_until_finished(self):
        pass


def test_a_checkpoint_that_cannot_be_written_is_one_error_naming_the_last_complete_one(tmp_path):
    checkpointer = Checkpointer.__new__(Checkpointer)
    checkpointer.directory, checkpointer.manager = tmp_path, _FullDisk()
    with pytest.raises(CheckpointWriteError) as error:
        checkpointer.save(750, state=None, data_iterator=None)
    message = str(error.value)
    assert "\n" not in message and "RESOURCE_EXHAUSTED" in message and message.endswith("the last complete checkpoint is step 500")


def _train_py(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *args], capture_output=True, text=True, env=env, timeout=300)


def test_train_py_bad_config_file_and_unwritable_workdir_are_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n    pass\n")
    result = _train_py(f"--config={bad}", f"--workdir={tmp_path / 'w'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["train.py: bad config: the --config file does not load: SyntaxError: invalid syntax (bad.py, line 1)"]
    (tmp_path / "file").write_text("")
    result = _train_py(f"--config={REPO / 'configs' / 'shapes_cpu.py'}", f"--workdir={tmp_path / 'file' / 'w'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'file' / 'w'} cannot be created")
