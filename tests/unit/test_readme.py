"""README.md against the code: its commands run what exists, with options that exist, in the venv."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from libe_cnn import cli
from libe_cnn.__main__ import build_parser as command_parser

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()

# What a command of the README starts with (after any VAR=value): an interpreter, make or libe-cnn.
STARTS = ("python", ".venv/bin/python", "sudo", "make", "libe-cnn", ".venv/bin/libe-cnn")
INTERPRETERS = ("python", ".venv/bin/python")
# Words that stand for something the reader fills in: RUN_DIR, N, `...`, `[--data-dir DIR]`.
PLACEHOLDER = re.compile(r"^\.\.\.$|^[A-Z][A-Z_]*(\.png)?$|^\[|\]$")


def block_commands(text: str) -> list[str]:
    """The command lines of the ``` / ```sh / ```bash blocks, joined across `\\`, without comments."""
    commands = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S):
        if lang not in ("", "sh", "bash"):
            continue
        body = body.replace("\\\n", " ")
        for line in body.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if command_words(line):
                commands.append(line)
    return commands


def inline_commands(text: str) -> list[str]:
    """The `...` spans outside the blocks that are commands."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    spans = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]  # a span may wrap
    return [span for span in spans if command_words(span)]


def command_words(line: str) -> list[str]:
    """The words of `line` from the program on (VAR=value prefixes dropped), or [] if it is no command."""
    try:
        words = shlex.split(line)
    except ValueError:
        return []
    while words and re.match(r"^[A-Z_]+=", words[0]):
        words = words[1:]
    return words if words and words[0] in STARTS else []


COMMANDS = block_commands(README) + inline_commands(README)


def program(words: list[str]) -> list[str]:
    """The words after sudo and the interpreter: a script and its options, or -m MODULE and its."""
    if words[0] == "sudo":
        words = words[1:]
    return words[1:] if words[0] in INTERPRETERS else words


def has_placeholder(words: list[str]) -> bool:
    return any(PLACEHOLDER.search(w) for w in words)


def check_options(words: list[str], parser) -> None:
    """Every option given exists in `parser`; with nothing to fill in, the whole line parses."""
    known = set(parser._option_string_actions)
    unknown = [w.split("=")[0] for w in words if w.startswith("-") and w.split("=")[0] not in known]
    assert unknown == [], f"{shlex.join(words)}: no such option {unknown}"
    if not has_placeholder(words):
        try:
            parser.parse_args(words)
        except SystemExit:
            pytest.fail(f"{shlex.join(words)} does not parse")


def test_the_readme_has_commands():
    assert len(COMMANDS) > 20
    assert any("run_libe_cnn.py" in c for c in COMMANDS) and any(c.startswith("make ") for c in COMMANDS)


def test_every_python_command_runs_the_venvs_interpreter():
    bare = [c for c in COMMANDS if command_words(c)[0] == "python" or command_words(c)[:2] == ["sudo", "python"]]
    assert bare == []  # torch is in .venv: a bare `python` has it only while the venv is active


def trainer_args(command: str) -> list[str] | None:
    """The options of a run_libe_cnn.py or `libe-cnn train` command; None for other commands."""
    words = program(command_words(command))
    if words[0] == "run_libe_cnn.py":
        return words[1:]
    if words[0] in ("libe-cnn", ".venv/bin/libe-cnn") and words[1:2] == ["train"]:
        return words[2:]
    if words[:3] == ["-m", "libe_cnn", "train"]:
        return words[3:]
    return None


TRAINER_COMMANDS = [c for c in COMMANDS if trainer_args(c) is not None]


def test_trainer_commands_are_found():
    assert len(TRAINER_COMMANDS) >= 6


@pytest.mark.parametrize("command", TRAINER_COMMANDS)
def test_trainer_commands_use_options_that_exist(command):
    check_options(trainer_args(command), cli.build_parser())


def libe_cnn_commands() -> list[list[str]]:
    """The arguments of each `libe-cnn ...` or `python -m libe_cnn ...` command."""
    found = []
    for command in COMMANDS:
        words = program(command_words(command))
        if words[0] in ("libe-cnn", ".venv/bin/libe-cnn"):
            found.append(words[1:])
        elif words[:2] == ["-m", "libe_cnn"]:
            found.append(words[2:])
    return found


@pytest.mark.parametrize("args", [a for a in libe_cnn_commands() if a and a[0] != "train"], ids=shlex.join)
def test_libe_cnn_commands_use_options_that_exist(args):
    parser = command_parser()
    assert args[0] in parser._subparsers._group_actions[0].choices, f"no command {args[0]}"
    check_options(args[1:], parser._subparsers._group_actions[0].choices[args[0]])


def module_path(module: str) -> Path | None:
    base = ROOT / module.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__main__.py"):
        if path.is_file():
            return path
    return None


def scripts() -> list[tuple[str, Path | None, list[str]]]:
    """Each command's script or -m module, the file that runs it (None: none), and its arguments."""
    found = []
    for command in COMMANDS:
        words = program(command_words(command))
        if words[:1] == ["-m"]:
            found.append((command, module_path(words[1]), words[2:]))
        elif words[0].endswith(".py"):
            found.append((command, ROOT / words[0] if (ROOT / words[0]).is_file() else None, words[1:]))
    return found


def test_every_script_and_module_exists():
    missing = [command for command, path, _ in scripts() if path is None]
    assert missing == []
    # Anywhere in the text, not only in commands: python -m MODULE.
    modules = set(re.findall(r"(?<![\w-])-m ([a-z_][\w.]*[\w])", README))
    assert {"libe_cnn", "benchmarks.links"} <= modules
    assert sorted(m for m in modules if module_path(m) is None) == []


def test_other_scripts_take_the_options_given():
    """Options of benchmarks and mnist/nn.py, which build their parsers in main(): each is in the source."""
    wrong = []
    for command, path, args in scripts():
        if path is None or path.name in ("run_libe_cnn.py", "__main__.py"):
            continue
        source = path.read_text()
        wrong += [f"{command}: {w}" for w in args if w.startswith("-") and f'"{w.split("=")[0]}"' not in source]
    assert wrong == []


def test_paths_in_the_readme_exist():
    paths = set(re.findall(r"(?<![\w/.*-])((?:[\w.-]+/)+[\w.-]+\.(?:py|sh|md|toml|txt|csv))\b", README))
    # NAME.py, in `libe_cnn/strategies/NAME.py`, stands for a file the reader writes.
    placeholders = {p for p in paths if Path(p).stem.isupper() and Path(p).stem != "README"}
    assert {p for p in paths - placeholders if not (ROOT / p).exists()} == set()


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([\w-]+)\s*:(?!=)", text, flags=re.M))


def test_make_targets_exist():
    targets = make_targets()
    used = {next(w for w in command_words(c)[1:] if "=" not in w) for c in COMMANDS
            if command_words(c)[0] == "make" and any("=" not in w for w in command_words(c)[1:])}
    assert used and used <= targets, used - targets


def resume_list() -> list[str]:
    """The options the README says `--resume` may change, in the paragraph after the resume commands."""
    paragraph = re.search(r"The resumed run continues in place:.*?(?:\n\n)", README, flags=re.S)
    assert paragraph, "the README's paragraph on what a resumed run may change"
    sentence = re.search(r"Only (.*?) may\s+change", paragraph.group(0), flags=re.S)
    assert sentence, "the README's sentence `Only ... may change`"
    return re.findall(r"`(--[\w-]+)`", sentence.group(1))


def test_the_options_resume_may_change_are_those_of_the_code():
    assert sorted(resume_list()) == sorted(cli.RESUME_OPTIONS)
