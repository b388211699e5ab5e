"""Rollout engines (drosim.llm.components.rollout_engines): the HF engine against sample_pairs, stop
tokens, bf16 sampling on the CPU, the vLLM output conversion and the vLLM engine's wiring
(against a stand-in ``vllm`` module: vLLM itself needs CUDA), the config keys, the clean
refusal of vLLM where it cannot run, and the generation rate in a run's metrics."""

from __future__ import annotations

import doctest
import importlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from llm_helpers import EOS, PAD, tiny_model, tiny_tokenizer

from drosim.llm.components.config import bundled_config_path, load_config
from drosim.llm.components.rollout import (
    SampledPairs,
    pairs_from_completions,
    render_prompts,
    sample_pairs,
)
from drosim.llm.components.rollout_engines import (
    HFGenerateEngine,
    RolloutEngine,
    SamplingSettings,
    VLLMEngine,
    make_rollout_engine,
    resolve_rollout_dtype,
    vllm_available,
)

PROMPTS = ["[BOS] w3 w4", "[BOS] w5", "[BOS] w6 w7 w8", "[BOS] w9"]
STOP = 5  # the word w5, made likely by the sampling model's bias
ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def sampling_model(dtype: torch.dtype = torch.float64):
    """The tiny policy with EOS and the stop word favoured while sampling, so that responses
    end early at either."""
    model = tiny_model(seed=0, dtype=dtype)
    model.generation_config.sequence_bias = {(EOS,): 3.5, (STOP,): 2.5}
    return model


def assert_same_pairs(ours: SampledPairs, theirs: SampledPairs) -> None:
    for field in ("input_ids", "attention_mask", "response_mask", "empty"):
        assert torch.equal(getattr(ours, field), getattr(theirs, field)), field
    assert ours.responses == theirs.responses
    assert ours.truncated == theirs.truncated


def completions_of(pairs: SampledPairs, prompt_length: int) -> list[list[int]]:
    """What an engine that stops at an end token returns: each row's generated tokens up to
    its response's end."""
    rows = pairs.input_ids.flatten(0, 1)[:, prompt_length:]
    lengths = pairs.response_mask.flatten(0, 1).sum(-1)
    return [row[:int(n)].tolist() for row, n in zip(rows, lengths, strict=True)]


# --------------------------------------------------------------------------- the HF engine


def test_the_hf_engine_samples_what_sample_pairs_samples():
    model, tokenizer = sampling_model(), tiny_tokenizer()
    engine = HFGenerateEngine(tokenizer, SamplingSettings(max_new_tokens=6, temperature=0.9))
    assert isinstance(engine, RolloutEngine) and engine.name == "hf"
    engine.sync_weights(model)
    torch.manual_seed(3)
    ours = engine.sample(PROMPTS)
    torch.manual_seed(3)
    theirs = sample_pairs(model, tokenizer, PROMPTS, max_new_tokens=6, temperature=0.9)
    assert_same_pairs(ours, theirs)


def test_the_hf_engine_needs_a_policy_first():
    engine = HFGenerateEngine(tiny_tokenizer(), SamplingSettings())
    with pytest.raises(RuntimeError, match="before sync_weights"):
        engine.sample(PROMPTS)


def test_stop_token_ids_end_responses_as_eos_does():
    model, tokenizer = sampling_model(), tiny_tokenizer()
    engine = HFGenerateEngine(tokenizer, SamplingSettings(max_new_tokens=8,
                                                          stop_token_ids=(STOP,)))
    engine.sync_weights(model)
    torch.manual_seed(0)
    pairs = engine.sample(PROMPTS * 2)
    prompt_length = max(len(ids) for ids in render_prompts(tokenizer, PROMPTS)[0])
    ids = pairs.input_ids.flatten(0, 1)
    mask = pairs.response_mask.flatten(0, 1)
    ended_at = {EOS: 0, STOP: 0}
    for row in range(ids.shape[0]):
        generated = ids[row, prompt_length:].tolist()
        ends = [i for i, t in enumerate(generated) if t in (EOS, STOP)]
        end = ends[0] + 1 if ends else len(generated)
        if ends:
            ended_at[generated[ends[0]]] += 1
        # the end token is the last response token; generate wrote padding after it
        assert mask[row, prompt_length:].tolist() == [1] * end + [0] * (len(generated) - end)
        assert all(t == PAD for t in generated[end:])
        assert STOP not in generated[:end - 1] and EOS not in generated[:end - 1]
    assert ended_at[STOP] > 0 and ended_at[EOS] > 0  # both kinds of end were met
    # without the stop id, w5 is an ordinary word: some response runs on past it
    torch.manual_seed(0)
    plain = sample_pairs(model, tokenizer, PROMPTS * 2, max_new_tokens=8)
    inside = plain.input_ids.flatten(0, 1)[:, prompt_length:][
        plain.response_mask.flatten(0, 1)[:, prompt_length:].bool()]
    assert (inside == STOP).sum() > (ids[:, prompt_length:][mask[:, prompt_length:].bool()]
                                     == STOP).sum()


def test_bf16_rollout_on_the_cpu_returns_the_layout():
    model, tokenizer = sampling_model(torch.float32), tiny_tokenizer()
    assert resolve_rollout_dtype("auto", "cpu") == torch.float32
    assert resolve_rollout_dtype("bfloat16", "cpu") == torch.bfloat16
    engine = HFGenerateEngine(tokenizer, SamplingSettings(max_new_tokens=5),
                              dtype=resolve_rollout_dtype("bfloat16", "cpu"))
    engine.sync_weights(model)
    torch.manual_seed(0)
    pairs = engine.sample(PROMPTS)
    n, two, width = pairs.input_ids.shape
    assert (n, two) == (len(PROMPTS), 2) and pairs.input_ids.dtype == torch.long
    prompt_length = max(len(ids) for ids in render_prompts(tokenizer, PROMPTS)[0])
    assert width <= prompt_length + 5
    # the response mask covers generated positions only, and is attended
    assert not pairs.response_mask[..., :prompt_length].any()
    assert bool((pairs.attention_mask >= pairs.response_mask).all())
    assert bool((pairs.response_mask.sum(-1) >= 1).all()) and not pairs.empty.any()
    assert next(model.parameters()).dtype == torch.float32  # autocast: no copy, no cast


def test_a_stop_id_ends_a_chat_response_of_the_tiny_llama(tmp_path):
    """The Llama stand-in with its chat template, a newline as the stop id: responses end at
    the first newline or <eos> (counted in), and laid out again from their token ids (as a
    vLLM engine returns them) they are the same pairs."""
    from llm_stand_ins import tiny_llama_folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_llama_folder(tmp_path / "llama")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    newline = tokenizer.convert_tokens_to_ids("\n")
    model.generation_config.sequence_bias = {(newline,): 3.0}
    prompts = ["Say hi", [{"role": "user", "content": "Tell me a story"}], "Why?"] * 2
    engine = HFGenerateEngine(tokenizer, SamplingSettings(max_new_tokens=10, chat_template=True,
                                                          stop_token_ids=(newline,)))
    engine.sync_weights(model)
    torch.manual_seed(0)
    pairs = engine.sample(prompts)
    tokens, _ = render_prompts(tokenizer, prompts, chat_template=True)
    width = max(map(len, tokens))
    completions = completions_of(pairs, width)
    ends = [c[-1] for c in completions]
    assert newline in ends  # some responses ended at the stop id
    for completion in completions:
        inner = completion[:-1]
        assert newline not in inner and tokenizer.eos_token_id not in inner
    assert all("\n" not in r.rstrip("\n") for pair in pairs.responses for r in pair)
    assert_same_pairs(pairs_from_completions(tokenizer, tokens, completions,
                                             stop_token_ids=[newline]), pairs)


# ---------------------------------------------------------------- the vLLM conversion


def test_completions_laid_out_as_sample_pairs_lays_out_its_samples():
    model, tokenizer = sampling_model(), tiny_tokenizer()
    torch.manual_seed(1)
    sampled = sample_pairs(model, tokenizer, PROMPTS, max_new_tokens=7, stop_token_ids=[STOP],
                           max_prompt_tokens=3)
    tokens, truncated = render_prompts(tokenizer, PROMPTS, max_prompt_tokens=3)
    assert truncated == sampled.truncated == 1
    rebuilt = pairs_from_completions(tokenizer, tokens,
                                     completions_of(sampled, max(map(len, tokens))),
                                     stop_token_ids=[STOP], truncated=truncated)
    assert_same_pairs(rebuilt, sampled)


def test_completions_on_hand_made_ids():
    tokenizer = tiny_tokenizer()
    # prompt 0 sampled [w9 EOS] and [w9 w9 w9 w9]; prompt 1 sampled [EOS] and [w8 w5 w9]:
    # the stop id 5 ends the last one (a completion may run on past its end), and padding
    # after a completion that stopped short without an end token is not response
    pairs = pairs_from_completions(tokenizer, [[1, 6, 7], [1]],
                                   [[9, EOS], [9, 9, 9, 9], [EOS], [8, STOP, 9]],
                                   stop_token_ids=[STOP], truncated=2)
    assert pairs.input_ids.tolist() == [
        [[1, 6, 7, 9, EOS, PAD, PAD], [1, 6, 7, 9, 9, 9, 9]],
        [[PAD, PAD, 1, EOS, PAD, PAD, PAD], [PAD, PAD, 1, 8, STOP, 9, PAD]]]
    assert pairs.response_mask.tolist() == [
        [[0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1]],
        [[0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0]]]
    assert pairs.attention_mask.tolist() == [
        [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]],
        [[0, 0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0]]]
    assert pairs.responses == [["w9", "w9 w9 w9 w9"], ["", "w8 w5"]]
    assert pairs.empty.tolist() == [[False, False], [False, False]] and pairs.truncated == 2
    short = pairs_from_completions(tokenizer, [[1]], [[9], [9, 9, 9]])
    assert short.response_mask.tolist() == [[[0, 1, 0, 0], [0, 1, 1, 1]]]
    with pytest.raises(ValueError, match="two completions per prompt"):
        pairs_from_completions(tokenizer, [[1]], [[9]])
    with pytest.raises(ValueError, match="empty completion"):
        pairs_from_completions(tokenizer, [[1]], [[9], []])


# ---------------------------------------------- the vLLM engine, on a stand-in vllm module


class _Output(types.SimpleNamespace):
    pass


def fake_vllm(scripted: list[list[int]], calls: dict) -> types.ModuleType:
    """A ``vllm`` module whose LLM records what it is given and returns ``scripted``
    completions, two per prompt, in order."""
    module = types.ModuleType("vllm")

    class SamplingParams(types.SimpleNamespace):
        pass

    class Model:
        def load_weights(self, weights):
            calls["weights"] = dict(weights)

    class LLM:
        def __init__(self, **kwargs):
            calls["llm"] = kwargs
            runner = types.SimpleNamespace(model=Model())
            executor = types.SimpleNamespace(
                driver_worker=types.SimpleNamespace(model_runner=runner))
            self.llm_engine = types.SimpleNamespace(
                model_executor=executor,
                model_config=types.SimpleNamespace(max_model_len=32))

        def reset_prefix_cache(self):
            calls["reset"] = calls.get("reset", 0) + 1

        def generate(self, prompts, sampling_params, use_tqdm):
            calls["prompts"], calls["params"] = prompts, sampling_params
            return [_Output(outputs=[_Output(token_ids=tuple(scripted[2 * i + j]))
                                     for j in range(2)]) for i in range(len(prompts))]

    module.LLM, module.SamplingParams = LLM, SamplingParams
    return module


def test_the_vllm_engine_wiring(monkeypatch):
    for key in ENV_KEYS:  # set, then removed: what the engine sets is undone after the test
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setenv("MASTER_PORT", "29999")  # a launcher's value is kept
    calls: dict = {}
    scripted = [[9, EOS], [9, 9, 9, 9], [EOS], [8, STOP, 9]]
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(scripted, calls))
    tokenizer, policy = tiny_tokenizer(), tiny_model()
    settings = SamplingSettings(temperature=0.7, top_p=0.9, max_new_tokens=4,
                                stop_token_ids=(STOP,))
    engine = VLLMEngine("some/model", tokenizer, settings, device="cpu",
                        dtype=torch.bfloat16, gpu_memory_utilization=0.25, seed=7)
    assert isinstance(engine, RolloutEngine) and engine.name == "vllm"
    assert calls["llm"] == {"model": "some/model", "tokenizer": "some/model",
                            "dtype": "bfloat16", "gpu_memory_utilization": 0.25,
                            "distributed_executor_backend": "external_launcher", "seed": 7,
                            "max_model_len": None, "trust_remote_code": False}
    # one process outside torchrun: rank 0 of 1, for vLLM's external launcher
    assert [os.environ[k] for k in ENV_KEYS] == ["0", "0", "1", "127.0.0.1", "29999"]

    engine.sync_weights(policy)
    assert calls["weights"].keys() == policy.state_dict().keys() and calls["reset"] == 1

    torch.manual_seed(0)
    pairs = engine.sample(["[BOS] w6 w7", "[BOS]"])
    assert calls["prompts"] == [{"prompt_token_ids": [1, 6, 7]}, {"prompt_token_ids": [1]}]
    first, second = calls["params"]
    assert (first.n, first.temperature, first.top_p, first.max_tokens) == (2, 0.7, 0.9, 4)
    assert first.stop_token_ids == [EOS, STOP] and first.ignore_eos and not first.detokenize
    # prompt i's two samples are seeded base + 2i and base + 2i + 1 (vLLM adds the index)
    assert second.seed == first.seed + 2
    assert_same_pairs(pairs, pairs_from_completions(tokenizer, [[1, 6, 7], [1]], scripted,
                                                    stop_token_ids=[STOP]))


def test_a_vllm_evaluation_seeds_its_requests_from_the_evaluation_seed(monkeypatch):
    from drosim.llm.components.evaluation import engine_scores
    from drosim.llm.components.rewards import CallableReward

    for key in ENV_KEYS:
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm([[9, EOS], [8, EOS]] * 2, calls))
    engine = VLLMEngine("some/model", tiny_tokenizer(), SamplingSettings(max_new_tokens=4),
                        device="cpu", dtype=torch.float32, gpu_memory_utilization=0.25)
    reward = CallableReward(lambda p, r: [[float(len(t))] for t in r], ["length"])

    def request_seeds(seed: int) -> list[int]:
        engine_scores(engine, reward, ["[BOS] w6 w7", "[BOS]"], seed=seed)
        return [params.seed for params in calls["params"]]

    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = request_seeds(1)
    assert torch.equal(torch.get_rng_state(), state)  # the training RNG is untouched
    assert request_seeds(1) == first  # every evaluation samples with the same noise
    assert request_seeds(2) != first
    torch.manual_seed(1)  # the seeds are drawn from the evaluation seed's RNG
    assert first[0] == int(torch.randint(2**31, ()))


# ------------------------------------------------------------------ config and refusals


@pytest.mark.parametrize("override, message", [
    ("rollout_engine=sglang", "rollout_engine must be one of hf, vllm"),
    ("rollout_dtype=float16", "rollout_dtype must be one of auto, float32, bfloat16"),
    ("stop_token_ids=[3, -1]", "stop_token_ids must be token ids >= 0"),
    ("stop_token_ids=3", "stop_token_ids: expected a list"),
    ("vllm_gpu_memory_utilization=1.5", "vllm_gpu_memory_utilization must be in (0, 1)"),
    ("vllm_gpu_memory_utilization=0", "vllm_gpu_memory_utilization must be in (0, 1)"),
])
def test_bad_rollout_keys_are_refused(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        load_config(bundled_config_path("smoke"), [override])


@pytest.mark.parametrize("other, match", [("sharding=fsdp2", "sharding=fsdp2"),
                                          ("lora_rank=4", "a LoRA policy")])
def test_vllm_with_fsdp2_or_lora_is_refused(other, match):
    with pytest.raises(ValueError, match=f"rollout_engine=vllm cannot sample .*{match}"):
        load_config(bundled_config_path("smoke"), ["rollout_engine=vllm", other])


def test_make_rollout_engine_reads_the_config(tmp_path):
    config = load_config(bundled_config_path("smoke"),
                         ["stop_token_ids=[5]", "rollout_dtype=bfloat16", "temperature=0.5",
                          f"out_dir={tmp_path}"])
    policy = tiny_model()
    engine = make_rollout_engine(config, policy, tiny_tokenizer(), "cpu")
    assert isinstance(engine, HFGenerateEngine) and engine.policy is policy
    assert engine.dtype == torch.bfloat16
    assert engine.settings == SamplingSettings(0.5, 1.0, config.max_new_tokens, None, None,
                                               (5,))


@pytest.mark.skipif(vllm_available(), reason="vllm is installed here")
def test_vllm_not_installed_is_refused_in_one_line_before_out_dir(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "drosim.llm.cli", "train", "--config", "smoke",
         "rollout_engine=vllm", f"out_dir={out}"],
        capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin"})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "pip install 'drosim[vllm]'" in result.stderr
    assert not out.exists()


def test_vllm_on_the_cpu_is_refused_before_out_dir(tmp_path, monkeypatch):
    from drosim.llm.components import rollout_engines
    from drosim.llm.recipes.trainer import train

    monkeypatch.setattr(rollout_engines, "vllm_available", lambda: True)
    out = tmp_path / "run"
    config = load_config(bundled_config_path("smoke"),
                         ["rollout_engine=vllm", "device=cpu", f"out_dir={out}"])
    with pytest.raises(ValueError, match=r"rollout_engine=vllm samples on a CUDA GPU, but "
                                         r"device=cpu .*use rollout_engine=hf") as error:
        train(config)
    assert "\n" not in str(error.value)
    assert not out.exists()


# ------------------------------------------------------------------------ a training run


def test_generation_rate_is_in_the_metrics(tmp_path):
    from drosim.llm.components.demo_world import build_demo_base
    from drosim.llm.recipes.trainer import train

    base = build_demo_base(tmp_path / "base", pretrain_steps=20, corpus_size=300)
    config = load_config(bundled_config_path("smoke"),
                         [f"model={base}", f"out_dir={tmp_path / 'run'}", "iterations=2",
                          "eval_every=2", "checkpoint_every=2", "stop_token_ids=[5]"])
    out = train(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in records if r["kind"] == "train"]
    assert [r["iteration"] for r in train_lines] == [1, 2]
    for record in train_lines:
        assert record["generation_tokens_per_s"] > 0
        assert 0 < record["generation_seconds"] <= record["seconds"]


def test_docstring_examples_run():
    module = importlib.import_module("drosim.llm.components.rollout_engines")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_demo_yaml_names_the_rollout_keys():
    text = Path(bundled_config_path("demo")).read_text()
    for key in ("rollout_engine: hf", "rollout_dtype: auto", "stop_token_ids: null",
                "vllm_gpu_memory_utilization: 0.3"):
        assert key in text


def test_the_bench_measures_the_generation_rate(tmp_path):
    from test_bench_smoke import _import_bench_script

    bench_llm = _import_bench_script("bench_llm")
    argv = ["--quick", "--sections", "generation", "--repeats", "1", "--out-dir",
            str(tmp_path)]
    assert bench_llm.main(argv) == 0
    table = bench_llm.pd.read_csv(tmp_path / "llm_cpu_tiny_quick.csv")
    assert list(table.engine) == ["hf float32"]  # vLLM and bf16 autocast: CUDA only
    assert (table.tokens_per_s > 0).all() and (table.response_tokens > 0).all()
