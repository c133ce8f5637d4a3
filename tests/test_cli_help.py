"""The command line helps: every flag explained with its default, examples per command, --version,
plain-text description, and no torch / transformers / datasets import before a command needs them."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from asymlora.cli import COMMANDS, build_parser, main


def all_parsers(parser: argparse.ArgumentParser, path: str = "asymlora"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_parsers(sub, f"{path} {name}")


def test_every_flag_and_argument_has_help() -> None:
    missing = [f"{path}: {action.dest}" for path, parser in all_parsers(build_parser())
               for action in parser._actions if not action.help]  # fmt: skip
    assert missing == []


def test_every_command_shows_examples_and_defaults(capsys) -> None:
    for command in COMMANDS:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "example" in text and f"asymlora {command}" in text.split("example", 1)[1], command
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    assert "(default: 8)" in text and "(default: test)" in text and "split seed (default: 0)" in text


def test_version_and_a_plain_description(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("asymlora 0.")
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and "ALoRA" in text


def test_help_and_task_listing_import_no_heavy_library(cache) -> None:
    script = (
        "import sys; from asymlora.cli import main; main(['tasks', '--offline']);"
        "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules];"
        "print('HEAVY', heavy)"
    )
    env = {**os.environ, "ASYMLORA_CACHE": str(cache)}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert "commonsense (8 tasks)" in out and "HEAVY []" in out


def test_the_federated_method_choices_are_the_registry_s() -> None:
    from asymlora.cli import FEDERATED_METHODS
    from asymlora.federated.registry import METHODS

    assert tuple(METHODS) == FEDERATED_METHODS
