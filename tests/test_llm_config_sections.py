"""The config's sections: one home per key (type, default, doc), flat and nested spellings,
the canonical saved form, the generated documentation and a light import."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import yaml

from drosim.llm.components import methods
from drosim.llm.components.config import (
    TrainConfig,
    bundled_config_path,
    config_to_dict,
    config_to_sections,
    load_config,
    save_config,
    validate_config,
)
from drosim.llm.components.config_docs import expected_texts
from drosim.llm.components.config_sections import KEY_SECTIONS, SECTIONS, AlgorithmSection

DEMO_PATH = bundled_config_path("demo")
DEMO = load_config(DEMO_PATH)


def test_every_key_has_one_section_and_a_one_line_doc():
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert names == [f.name for section in SECTIONS.values()
                     for f in dataclasses.fields(section)]
    assert list(KEY_SECTIONS) == names and not set(SECTIONS) & set(names)
    for section in SECTIONS.values():
        assert section.__doc__
        for f in dataclasses.fields(section):
            assert f.metadata["doc"] and "\n" not in f.metadata["doc"], f.name


def test_nested_flat_and_mixed_files_load_to_the_same_config(tmp_path):
    nested, flat = tmp_path / "nested.yaml", tmp_path / "flat.yaml"
    nested.write_text(yaml.safe_dump(config_to_sections(DEMO), sort_keys=False))
    flat.write_text(yaml.safe_dump(config_to_dict(DEMO), sort_keys=False))
    assert load_config(nested) == load_config(flat) == DEMO
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(DEMO_PATH.read_text() + "\n")
    assert load_config(mixed, ["loop.lr=0.5"]) == load_config(mixed, ["lr=0.5"])
    assert load_config(mixed, ["algorithm.method=dpo"]).method == "dpo"


def test_saving_writes_the_sections_and_reads_back_equal(tmp_path):
    config = dataclasses.replace(DEMO, method="chi2-rebel", chi2_rho=0.2, lr=3e-5,
                                 train_mixture={"joy": 0.7, "calm": 0.3})
    save_config(config, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert list(saved) == list(SECTIONS) and saved["loop"]["lr"] == 3e-5
    assert load_config(tmp_path / "config.yaml") == config
    assert config.section("algorithm") == AlgorithmSection(
        **{k: v for k, v in config_to_dict(config).items() if KEY_SECTIONS[k] == "algorithm"})


@pytest.mark.parametrize(("text", "message"), [
    ("loop: {lrr: 0.1}\n", "unknown key 'lrr' of section 'loop' in .*; did you mean 'lr'"),
    ("loop: 3\n", "section 'loop' must be a mapping of its keys, got int"),
    ("lr: 0.1\nloop: {lr: 0.2}\n", "'lr' is set twice .*section 'loop'"),
    ("algoritm: {method: dpo}\n", "unknown config key 'algoritm' .*did you mean 'algorithm'"),
])
def test_bad_sections_are_refused_in_one_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        load_config(path)
    assert "\n" not in str(err.value)


def test_bad_dotted_overrides_are_refused_in_one_line():
    for override, message in [("loop.lrr=1", "unknown key 'lrr' of section 'loop'"),
                              ("loop={lr: 1}", "names the section 'loop'"),
                              ("lop.lr=1", "unknown config key 'lop.lr'")]:
        with pytest.raises(ValueError, match=message) as err:
            load_config(DEMO_PATH, [override])
        assert "\n" not in str(err.value)


def test_the_committed_readme_table_and_demo_comments_are_generated():
    for path, text in expected_texts().items():
        assert path.read_text() == text, \
            f"{path} is stale: python -m drosim.llm.components.config_docs"


def test_the_method_is_built_once_with_what_the_trainer_needs():
    method = validate_config(dataclasses.replace(DEMO, method="wdpo", w_gradient="exact"))
    assert (method.name, method.needs_input_gradients, method.w_gradient) == (
        "wdpo", True, "exact")
    assert not validate_config(DEMO).needs_input_gradients
    with pytest.raises(ValueError, match="w_gradient must be one of finite-difference, exact"):
        methods.make_method("wdpo", w_gradient="numeric")


def test_the_method_defaults_have_one_home():
    defaults = {f.name: f.default for f in dataclasses.fields(AlgorithmSection)}
    assert (defaults["chi2_rho"], defaults["kl_rho"]) == (None, None)  # DEFAULT_RADIUS
    assert (defaults["kl_tau"], defaults["w_rho"], defaults["w_p"]) == (
        methods.DEFAULT_KL_TAU, methods.DEFAULT_W_RHO, methods.DEFAULT_W_P)
    assert defaults["w_gradient"] == methods.W_GRADIENTS[0]


def test_parsing_a_config_imports_no_update_or_transformers():
    code = ("import sys; "
            "from drosim.llm.components.config import bundled_config_path, load_config; "
            "load_config(bundled_config_path('demo'), ['method=w-rebel']); "
            "print(sorted(m for m in ('drosim.llm.components.update', "
            "'drosim.llm.recipes.trainer', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
