"""The command blocks of README.md and the guides in docs/ cannot go stale.

Every shell block (```bash, ```sh, ```shell, ```console or a bare ```) in README.md and docs/*.md (not
docs/experiments.md, the dated log) carries a marker on the line before it, an HTML comment the page does not show:

    <!-- test: run NAME -->                  run here at toy size: RUNS[NAME] says what is substituted
    <!-- test: help -->                      flag-checked only (long runs, servers, several processes)
    <!-- test: needs real SD-1.5 weights --> flag-checked only; the text says what it needs
    <!-- test: needs real model weights -->  flag-checked only (construction models, FID/CLIP weights)
    <!-- test: needs an accelerator -->      flag-checked only
    <!-- test: the README commands (CI runs them) -->  the README's two commands: .ci/run runs the second

A block without a marker fails. The flag check: each `python scripts/X.py [SUB] ...` in a block names a script
that exists, and every `--flag` it uses appears in that script's (or subcommand's) `--help`; a
`--config.a.b=value` override names a field of the config it loads; every pip extra (`".[cuda]"`) is one
pyproject.toml declares. A `run` block runs verbatim in a temporary folder (with `scripts/` and `configs/` linked
into it and the environment's `python` first on PATH) after its substitutions: model folders become tiny ones built
here, sizes and step counts become small. Output blocks are ```text and not checked.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "experiments.md")]
GUIDES = [p for p in DOCS if p.parent.name == "docs"]
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
FLAG_CHECKED = {
    "help",
    "needs real SD-1.5 weights",
    "needs real model weights",
    "needs an accelerator",
    "the README commands (CI runs them)",
}
FENCE = re.compile(r"^(`{3,})\s*([\w-]*)\s*$")
MARKER = re.compile(r"^<!-- test: (.+?) -->$")
SCRIPT = re.compile(r"(?:^|/)scripts/(\w+)\.py$")
EXTRAS = re.compile(r"^(?:\.|layerdiff_jax)\[([\w,-]+)\]$")
CONTROL = {"&&", "||", ";", "|", "&", "(", ")", ">", ">>", "<", "2>", "2>&1"}


# ---- reading the blocks ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    marker: str | None
    text: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def run_name(self) -> str | None:
        return self.marker.split(" ", 1)[1] if self.marker and self.marker.startswith("run ") else None


def read_blocks(path: Path) -> list[Block]:
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, lang, start = match.group(1), match.group(2), i
        before = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(before)
        i += 1
        while i < len(lines) and lines[i].strip() != fence:
            i += 1
        blocks.append(Block(path, start + 1, lang, marker.group(1) if marker else None, "\n".join(lines[start + 1 : i])))
        i += 1
    return blocks


ALL_BLOCKS = [b for p in DOCS for b in read_blocks(p)]
SHELL_BLOCKS = [b for b in ALL_BLOCKS if b.lang in SHELL_LANGS]


def commands(text: str) -> list[str]:
    """The block's commands: continuation lines joined, comment lines and here-document bodies left out."""
    out, current, heredoc = [], "", None
    for line in text.splitlines():
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        if not current and line.strip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            out.append(current.strip())
            found = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", current)
            heredoc = found.group(1) if found else None
        current = ""
    if current.strip():
        out.append(current.strip())
    return out


def tokens(command: str) -> list[str]:
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def invocations(command: str) -> list[tuple[str, list[str]]]:
    """(script name, its arguments) for every `scripts/X.py` the command runs, also inside a quoted command."""
    found, segment = [], []
    for token in [*tokens(command), ";"]:
        if token in CONTROL:
            index = next((k for k, t in enumerate(segment) if SCRIPT.search(t)), None)
            if index is not None:
                found.append((SCRIPT.search(segment[index]).group(1), segment[index + 1 :]))
            segment = []
        elif "scripts/" in token and any(c.isspace() for c in token):  # gcloud ... --command="... scripts/x.py ..."
            found += invocations(token.split("=", 1)[1] if token.startswith("--") else token)
        else:
            segment.append(token)
    return found


# ---- what the scripts accept ----------------------------------------------------------------------------------


@functools.cache
def script_help(script: str, subcommand: str | None = None) -> str:
    path = ROOT / "scripts" / f"{script}.py"
    assert path.is_file(), f"scripts/{script}.py does not exist"
    cmd = [sys.executable, str(path), *([subcommand] if subcommand else []), "--help"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    # argparse exits 0 after --help, absl 1: either way the help is on stdout
    assert result.returncode in (0, 1) and "--" in result.stdout, f"{' '.join(cmd[1:])} exited {result.returncode}:\n{result.stderr[-2000:]}"
    return result.stdout


def subcommands(help_text: str) -> list[str]:
    match = re.search(r"usage: \S+ \[-h\] \{([\w,-]+)\}", help_text)
    return match.group(1).split(",") if match else []


def defined_flags(help_text: str) -> set[str]:
    """The flags the help's option lines define (argparse `  --name X`, absl `  --name:` and `  --[no]name:`)."""
    flags = set()
    for no, name in re.findall(r"^\s+(?:-\w, )?--(\[no\])?([A-Za-z][\w-]*)", help_text, re.MULTILINE):
        flags.add(f"--{name}")
        if no:
            flags.add(f"--no{name}")
    return flags


@functools.cache
def load_config(path: str):
    file = (ROOT / path).resolve()
    assert file.is_file(), f"config file {path} does not exist"
    spec = importlib.util.spec_from_file_location(f"docs_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def config_file(script: str, args: list[str], help_text: str) -> str:
    for k, arg in enumerate(args):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and k + 1 < len(args):
            return args[k + 1]
    default = re.search(r"--config: .*?\(default: '([^']+)'\)", help_text, re.DOTALL)
    assert default, f"scripts/{script}.py: --config.<field> overrides without a --config file"
    return default.group(1)


def flag_problems(script: str, args: list[str]) -> list[str]:
    if not args:  # nothing to check but that it exists (some scripts import much before they parse --help)
        return [] if (ROOT / "scripts" / f"{script}.py").is_file() else [f"scripts/{script}.py does not exist"]
    help_text = script_help(script)
    subs = subcommands(help_text)
    if subs:
        positional = next((a for a in args if not a.startswith("-")), None)
        if positional not in subs:
            return [f"scripts/{script}.py needs one of {subs}, got {positional!r}"]
        help_text = script_help(script, positional)
    known = defined_flags(help_text)
    problems = []
    for arg in args:
        arg = arg.strip("[]")
        if not arg.startswith("--"):
            continue
        name = arg.split("=", 1)[0]
        if name.startswith("--config.") and "--config" in known:
            config = load_config(config_file(script, args, help_text))
            node, path = config, name[len("--config.") :]
            for part in path.split("."):
                if not hasattr(node, "keys") or part not in node:
                    problems.append(f"scripts/{script}.py: {name}: no field {path!r} in its config")
                    break
                node = node[part]
        elif name not in known:
            problems.append(f"scripts/{script}.py: {name} is not in its --help")
    return problems


@functools.cache
def declared_extras() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


# ---- the tests --------------------------------------------------------------------------------------------------


def test_every_command_block_has_a_known_marker():
    assert len(SHELL_BLOCKS) > 20, "the docs' command blocks were not found"
    unmarked = [b.id for b in SHELL_BLOCKS if b.marker is None]
    assert not unmarked, f"command blocks without a `<!-- test: ... -->` marker on the line before: {unmarked}"
    unknown = [f"{b.id}: {b.marker!r}" for b in SHELL_BLOCKS if b.marker not in FLAG_CHECKED and b.run_name is None]
    assert not unknown, f"unknown markers: {unknown}"
    stray = [b.id for b in ALL_BLOCKS if b.lang not in SHELL_LANGS and b.marker is not None]
    assert not stray, f"markers before blocks that are not shell blocks: {stray}"


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=lambda b: b.id)
def test_block_flags_match_the_scripts(block):
    problems = []
    for command in commands(block.text):
        for script, args in invocations(command):
            problems += flag_problems(script, args)
        for token in tokens(command):
            match = EXTRAS.match(token)
            if match:
                problems += [f"pip extra [{e}] is not in pyproject.toml" for e in match.group(1).split(",") if e not in declared_extras()]
    assert not problems, f"{block.id}:\n" + "\n".join(problems)


def test_the_readme_test_command_is_what_ci_runs():
    (block,) = [b for b in SHELL_BLOCKS if b.marker == "the README commands (CI runs them)"]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()][-1]
    assert ci in block.text.splitlines(), ".ci/run's command and the README's command 2 differ"


def test_guides_start_with_what_you_need_and_links_resolve():
    for guide in GUIDES:
        headings = re.findall(r"^## (.+)$", guide.read_text(), re.MULTILINE)
        assert headings and headings[0] == "What you need", f"{guide.name}: the first section is {headings[:1]}"
    for page in [*DOCS, ROOT / "docs" / "experiments.md"]:
        for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", page.read_text()):
            if not re.match(r"\w+://", target):
                assert (page.parent / target).exists(), f"{page.relative_to(ROOT)}: link to {target} goes nowhere"


def test_the_readme_layout_names_every_part_of_the_package():
    readme = (ROOT / "README.md").read_text()
    missing = [
        entry.name
        for entry in (ROOT / "layerdiff_jax").iterdir()
        if not entry.name.startswith(("_", "."))
        and not re.search(rf"`layerdiff_jax/{entry.name}[`/]" if entry.is_dir() else rf"`{re.escape(entry.name)}`", readme)
    ]
    assert not missing, f"README.md's Layout does not name {missing}"


# ---- running the `run` blocks ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
    subs: tuple[tuple[str, str], ...] = ()  # (text in the block, replacement): each must occur; {model} {micro_sd}
    expect: tuple[str, ...] = ()  # paths (globs) the block must have written, relative to its folder
    needs: tuple[str, ...] = ()  # "model": a tiny LayerDiff model folder; "micro_sd": a tiny SD folder
    setup: str | None = None  # "edit_sample": a 3-layer sample folder at samples/sample_0000
    timeout: int = 300


TOY_MODEL = (("outputs/demo/train/model", "{model}"),)
SMALL_SYNTHETIC = (("--num-train 1000", "--num-train 8"), ("--num-test 100", "--num-test 2"), ("--resolution 64", "--resolution 16"))
MICRO_TRAINING = (
    "--config.model.sd_path={micro_sd} --config.data.resolution=16 --config.train.num_steps=2 "
    "--config.train.warmup_steps=0 --config.model.layerdiff.enhancer_heads=2 --config.log.every_steps=1"
)

RUNS = {
    "readme-sample-edit": Run(TOY_MODEL, ("samples/sample_0000/layers.ora", "samples/contact_sheet.png", "edited/sample.json"), ("model",)),
    "data-synthetic": Run(SMALL_SYNTHETIC, ("data/shapes/**/dataset_info.json", "docs/images/synthetic_samples.png")),
    "data-folders": Run((("--num 16", "--num 2"),), ("my_samples/sample_00001/sample.json", "data/mine/**/dataset_info.json")),
    "data-oracle": Run((("--num 16", "--num 2"),), ("data/constructed_oracle/summary.json", "data/oracle/**/dataset_info.json")),
    "train-cpu": Run(
        (*SMALL_SYNTHETIC, ("--workdir runs/shapes", f"--workdir runs/shapes {MICRO_TRAINING}")),
        ("runs/shapes/model/layerdiff/config.json", "runs/shapes/metrics.jsonl"),
        ("micro_sd",),
    ),
    "sample-spec": Run(TOY_MODEL, ("samples/sample_0002/layers.psd", "samples/contact_sheet.png"), ("model",)),
    "edit": Run(TOY_MODEL, ("edited/inpaint/layers.ora", "edited/restyle/sample.json"), ("model",), setup="edit_sample"),
    "evaluate": Run((("--num 16", "--num 4"),), ("metrics.json",)),
}
RUN_BLOCKS = {b.run_name: b for b in SHELL_BLOCKS if b.run_name}


def test_every_run_block_has_its_substitutions():
    names = [b.run_name for b in SHELL_BLOCKS if b.run_name]
    assert len(names) == len(set(names)), f"run names used twice: {names}"
    assert set(names) == set(RUNS), f"run blocks without an entry in RUNS: {set(names) - set(RUNS)}; entries without a block: {set(RUNS) - set(names)}"


@pytest.fixture(scope="session")
def docs_fixtures(tmp_path_factory):
    """Built once, on first use: "model" (a toy LayerDiff model folder recording 4 DDIM steps: edit.py restyle's
    default strength 0.25 leaves it one), "micro_sd" (a tiny SD folder), "jax_cache" (compiled programs)."""
    root = tmp_path_factory.mktemp("docs_fixtures")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            if name == "model":
                from sampling_toy import make_random_layerdiff

                built[name] = make_random_layerdiff(root / "model", trained_size=32)
                (built[name] / "sampling.json").write_text(json.dumps({"steps": 4, "guidance": 1.0}) + "\n")
            elif name == "micro_sd":
                from train_support import make_micro_sd

                built[name] = make_micro_sd(root / "micro_sd")
            elif name == "jax_cache":
                built[name] = root / "jax_cache"
        return built[name]

    return get


def block_env(cache: Path) -> dict[str, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("XLA_FLAGS", None)
    return env


@pytest.mark.parametrize("name", sorted(RUNS))
def test_run_block(name, tmp_path, docs_fixtures):
    block, run = RUN_BLOCKS[name], RUNS[name]
    values = {need: str(docs_fixtures(need)) for need in run.needs}
    text = block.text
    for old, new in run.subs:
        assert old in text, f"{block.id}: {old!r} is no longer in the block: update RUNS[{name!r}]"
        text = text.replace(old, new.format(**values))
    for folder in ("scripts", "configs"):
        (tmp_path / folder).symlink_to(ROOT / folder)
    env = block_env(docs_fixtures("jax_cache"))
    if run.setup == "edit_sample":  # what a sampling run leaves: a 3-layer sample folder at the toy model's size
        made = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "build_dataset.py"), "export", "--out", "exported", "--num", "1", "--resolution", "32", "--layer-mix", "3:1"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )
        assert made.returncode == 0, made.stderr[-2000:]
        (tmp_path / "samples").mkdir()
        shutil.move(tmp_path / "exported" / "sample_00000", tmp_path / "samples" / "sample_0000")
    (tmp_path / "block.sh").write_text(text + "\n")
    result = subprocess.run(["bash", "-eo", "pipefail", "block.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=run.timeout)
    assert result.returncode == 0, f"{block.id} exited {result.returncode}:\n{text}\n--- stderr:\n{result.stderr[-4000:]}"
    for pattern in run.expect:
        assert list(tmp_path.glob(pattern)), f"{block.id}: wrote no {pattern}"
    if name == "evaluate":  # the guide says: on ground-truth samples every prompt-following score is 1.0
        overall = json.loads((tmp_path / "metrics.json").read_text())["groups"]["overall"]
        scores = {k: overall[k] for k in ("layer_colour_accuracy", "shape_accuracy", "background_colour_accuracy", "clean_mask_rate")}
        assert all(v == 1.0 for v in scores.values()), scores
