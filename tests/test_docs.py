"""The documentation runs: every module's docstring examples and the README's Python blocks."""

from __future__ import annotations

import contextlib
import doctest
import importlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LLM = "drosim.llm."
MODULES = ["drosim.dro", "drosim.world", "drosim.estimators", "drosim.online",
           "drosim.stats", "drosim.chunks", "drosim.studies.targets",
           *(f"{LLM}components.{name}" for name in (
               "data", "demo_world", "logprobs", "losses", "methods", "objective", "rewards",
               "rollout", "sharding", "update", "evaluation", "lora", "config", "runtime")),
           *(f"{LLM}recipes.{name}" for name in ("stage0", "sft", "reward_training")),
           "drosim.llm.cli"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed"
    assert result.attempted > 0, f"{name} has no docstring example"


def readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_readme_has_python_examples():
    assert len(readme_blocks()) >= 3


@pytest.mark.parametrize("index", range(len(readme_blocks())))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    exec(compile(readme_blocks()[index], f"README.md block {index}", "exec"), {})


def _options(*command: str) -> set[str]:
    """The options ``drosim [COMMAND] --help`` lists."""
    from drosim import cli

    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:
        cli.main([*command, "--help"])
    return set(re.findall(r"--[a-z][a-z-]*", out.getvalue()))


def test_readme_options_exist():
    """Each option in a README paragraph that names ``drosim`` commands (and no other
    command line) is an option of one of them: none is credited to a command lacking it."""
    options = {command: _options(command) for command in ("run", "study", "worst-case")}
    top = _options()  # --version
    text = (ROOT / "README.md").read_text()
    checked = 0
    for paragraph in re.split(r"\n\s*\n", text):
        named = set(re.findall(r"(?<![-\w])drosim (run|study|worst-case)\b", paragraph))
        if not named or re.search(r"drosim-llm|python -m (?!drosim\.paper_checks)|pytest",
                                  paragraph):
            continue
        allowed = top.union(*(options[command] for command in named))
        unknown = set(re.findall(r"(?<![-\w])--[a-z][a-z-]*", paragraph)) - allowed
        assert not unknown, f"README: {sorted(unknown)} beside drosim {sorted(named)}"
        checked += 1
    assert checked >= 3


def test_readme_names_every_bundled_config():
    text = (ROOT / "README.md").read_text()
    listed = re.search(r"`llm/configs/\{([^}]*)\}\.yaml` are bundled", text)
    assert listed, "README: no list of the bundled configs"
    bundled = sorted(path.stem for path in (ROOT / "llm" / "configs").glob("*.yaml"))
    assert sorted(listed.group(1).split(",")) == bundled
