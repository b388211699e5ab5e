"""The documentation runs: every module's docstring examples and the README's Python blocks."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["drosim.dro", "drosim.world", "drosim.estimators", "drosim.online",
           "drosim.stats", "drosim.chunks", "drosim.studies.targets", "drosim.llm.data",
           "drosim.llm.demo_world", "drosim.llm.logprobs", "drosim.llm.losses",
           "drosim.llm.methods", "drosim.llm.objective", "drosim.llm.rewards",
           "drosim.llm.rollout", "drosim.llm.sharding", "drosim.llm.update",
           "drosim.llm.recipes", "drosim.llm.sft", "drosim.llm.reward_training",
           "drosim.llm.evaluation", "drosim.llm.lora"]


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
