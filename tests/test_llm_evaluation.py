"""The evaluation report (mixture rewards, worst case, win rates), its split over ranks, and
the reward model options it depends on (fixed normalisation, cut long inputs, dtype)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.distributed as dist
from llm_helpers import run_on_two_ranks, shared_pair_batch, tiny_model, tiny_tokenizer
from llm_stand_ins import char_tokenizer, tiny_classifier_folder

from drosim.llm.components.evaluation import (
    engine_scores,
    gather_scores,
    mixture_report,
    prompt_shard,
    sample_scores,
    win_rate,
)
from drosim.llm.components.rewards import (
    CallableReward,
    NormalizedReward,
    SequenceClassifierReward,
    score,
)
from drosim.llm.components.rollout import sample_pairs
from drosim.llm.components.rollout_engines import (
    HFGenerateEngine,
    SamplingSettings,
    resolve_rollout_dtype,
)

EVAL_PROMPTS = ["[BOS] w3 w4", "[BOS] w5", "[BOS] w6 w7 w8", "[BOS] w9", "[BOS] w10 w11"]
# responses are told apart by their length and their characters
TEXT_REWARD = CallableReward(lambda p, r: [[float(len(t)), float(sum(map(ord, t)) % 101)]
                                           for t in r], ("length", "characters"))


def test_win_rate_counts_every_pair_and_ties_half():
    scores = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    baseline = torch.tensor([[2.0, 3.0], [1.0, -1.0]])
    # prompt 0: 1 vs (2, 3) -> 0, 0; 3 vs (2, 3) -> 1, 0.5; prompt 1: 0 vs (1, -1) -> 0, 1 twice
    expected = (0 + 0 + 1 + 0.5 + 0 + 1 + 0 + 1) / 8
    assert float(win_rate(scores, baseline)) == pytest.approx(expected)
    assert float(win_rate(baseline, baseline)) == pytest.approx(0.5)  # against itself


def test_mixture_report_matches_a_hand_computation():
    scores = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[3.0, 1.0], [1.0, 1.0]]])  # (2, 2, 2)
    baseline = torch.zeros(2, 2, 2)
    mixtures = [{"a": 1.0}, {"b": 1.0}, {"a": 0.25, "b": 0.75}]
    report = mixture_report(scores, ["a", "b"], mixtures, baseline=baseline)
    assert report["objective/a"] == pytest.approx(5 / 4)
    assert report["objective/b"] == pytest.approx(4 / 4)
    mixed = (0.25 * scores[..., 0] + 0.75 * scores[..., 1]).mean()
    assert report["reward/0.25 a + 0.75 b"] == pytest.approx(float(mixed))
    assert report["reward/worst"] == pytest.approx(1.0)
    assert report["reward/mean"] == pytest.approx((5 / 4 + 1 + float(mixed)) / 3)
    # objective a is 0 (a tie with the baseline's 0) in one of four responses: 3.5 / 4
    assert report["win_rate/1 a"] == pytest.approx(0.875)
    assert report["win_rate/worst"] == min(report[f"win_rate/{m}"]
                                           for m in ("1 a", "1 b", "0.25 a + 0.75 b"))
    assert not any(k.startswith("win_rate/") for k in mixture_report(scores, ["a", "b"],
                                                                      mixtures))


@pytest.mark.parametrize("bad", [torch.zeros(3, 2, 2), torch.zeros(2, 2, 3)])
def test_a_baseline_of_other_prompts_or_objectives_is_refused(bad):
    with pytest.raises(ValueError, match="do not match"):
        mixture_report(torch.zeros(2, 2, 2), ["a", "b"], [{"a": 1.0}], baseline=bad)


def test_a_mixture_of_an_unknown_objective_is_refused():
    with pytest.raises(ValueError, match="c"):
        mixture_report(torch.zeros(2, 2, 2), ["a", "b"], [{"c": 1.0}])


@pytest.mark.parametrize("n, world", [(5, 2), (4, 2), (1, 3), (7, 4)])
def test_prompt_shards_cover_the_prompts_in_order_with_equal_lengths(n, world):
    prompts = [f"p{i}" for i in range(n)]
    shards = [prompt_shard(prompts, rank, world) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank runs as many generate calls
    assert [p for shard in shards for p in shard][:n] == prompts


def _gather_on_rank(_batch) -> torch.Tensor:
    """Each rank's scores are its prompts' indices: the gathered tensor must be 0..4."""
    prompts = list(range(5))
    shard = prompt_shard(prompts, dist.get_rank(), dist.get_world_size())
    local = torch.tensor(shard, dtype=torch.float32).view(-1, 1, 1).expand(-1, 2, 3)
    return gather_scores(local.contiguous(), len(prompts))


def test_gathered_scores_are_in_prompt_order_without_the_padding(tmp_path):
    results = run_on_two_ranks(_gather_on_rank, shared_pair_batch(), tmp_path)
    expected = torch.arange(5.0).view(-1, 1, 1).expand(-1, 2, 3)
    for gathered in results:
        assert torch.equal(gathered, expected)


def test_normalised_rewards_are_a_fixed_affine_map():
    raw = CallableReward(lambda p, r: [[float(len(t)), 10.0] for t in r], ("length", "ten"))
    normalised = NormalizedReward(raw, {"ten": [10.0, 4.0], "length": [1.0, 2.0]})
    scores = normalised(["q", "q"], ["abc", "a"])
    assert torch.equal(scores, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="does not score"):
        NormalizedReward(raw, {"joy": [0.0, 1.0]})


def test_train_normalises_the_rewards_it_logs(tmp_path):
    from drosim.llm.components.config import bundled_config_path, load_config
    from drosim.llm.recipes.trainer import train

    runs = {}
    for name, extra in [("raw", []), ("scaled", ["reward_normalization={joy: [1.0, 0.5], "
                                                  "calm: [1.0, 0.5]}"])]:
        # the same seed builds the same demo base, so both runs sample the same responses
        train(load_config(bundled_config_path("smoke"), [
            f"out_dir={tmp_path / name}", "iterations=1", "progress=false", *extra]))
        runs[name] = [json.loads(line) for line in
                      (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    raw, scaled = runs["raw"][0], runs["scaled"][0]  # the initial evaluations
    for objective in ("joy", "calm"):
        assert scaled[f"objective/{objective}"] == pytest.approx(
            (raw[f"objective/{objective}"] - 1.0) / 0.5, abs=1e-5)
    # an objective left out keeps its raw scores
    assert scaled["objective/anger"] == pytest.approx(raw["objective/anger"], abs=1e-6)


def test_a_long_reward_input_keeps_its_end_and_is_counted(tmp_path, capsys):
    folder = tiny_classifier_folder(tmp_path / "classifier")
    model = SequenceClassifierReward(folder, max_length=8)
    tokenizer = char_tokenizer(chat_template=False)
    long_prompt = "abcdefghijklmnop"
    scores = model([long_prompt, "a"], ["xyz", "b"])
    assert model.truncated == 1
    assert "1 of 2 texts were longer than reward_max_length = 8" in capsys.readouterr().err
    # the cut text is scored as its last 8 tokens alone
    alone = SequenceClassifierReward(folder, max_length=64)
    tail = tokenizer.decode(tokenizer(long_prompt + " xyz")["input_ids"][-8:])
    assert torch.allclose(scores[0], alone.model(**tokenizer(tail, return_tensors="pt")
                                                 ).logits[0].detach(), atol=1e-5)


def test_the_reward_dtype_is_the_weights_dtype(tmp_path):
    folder = tiny_classifier_folder(tmp_path / "classifier")
    model = SequenceClassifierReward(folder, dtype=torch.bfloat16)
    assert next(model.model.parameters()).dtype == torch.bfloat16
    assert model(["hi"], ["there"]).dtype == torch.float32


@pytest.mark.parametrize("override, match", [
    ("dtype=float16", "dtype must be one of float32, bfloat16"),
    ("reward_dtype=half", "reward_dtype must be one of auto"),
    ("attn_implementation=''", "attn_implementation is empty"),
    ("reward_normalization={joy: [0.0, 0.0]}", r"reward_normalization\['joy'\]"),
    ("reward_normalization={joy: [0.0]}", r"reward_normalization\['joy'\]"),
    ("reward_normalization={joy: [.nan, 1.0]}", r"reward_normalization\['joy'\]"),
    ("reward_max_length=0", "reward_max_length must be >= 1"),
])
def test_bad_model_keys_are_refused(override, match):
    from drosim.llm.components.config import bundled_config_path, load_config

    with pytest.raises(ValueError, match=match):
        load_config(bundled_config_path("smoke"), [override])


def test_win_rates_survive_a_resume_and_a_damaged_baseline_only_costs_them(tmp_path, capsys):
    from drosim.llm.components.config import bundled_config_path, load_config
    from drosim.llm.recipes.trainer import INITIAL_EVAL_FILE, train

    def run(iterations: int, out) -> list[dict]:
        train(load_config(bundled_config_path("smoke"), [
            f"out_dir={out}", f"iterations={iterations}", "eval_every=1",
            "checkpoint_every=1", "progress=false"]), resume=True)
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["kind"] == "eval"]

    kept, damaged = tmp_path / "kept", tmp_path / "damaged"
    for out in (kept, damaged):
        run(1, out)
    (damaged / INITIAL_EVAL_FILE).write_bytes(b"not a tensor")
    resumed = run(2, kept)
    assert resumed[-1]["iteration"] == 2 and "win_rate/mean" in resumed[-1]
    capsys.readouterr()
    without = run(2, damaged)
    assert "no win rates: cannot read" in capsys.readouterr().err
    assert without[-1]["iteration"] == 2 and "win_rate/mean" not in without[-1]
    assert without[-1]["reward/mean"] == resumed[-1]["reward/mean"]  # the run itself is intact


# ------------------------------------------------- evaluation sampling on the rollout engine


def generate_scores(policy, tokenizer, prompts, *, seed: int, batch_size: int, **sampling):
    """What evaluation computed before it sampled through an engine: ``sample_pairs`` in
    float32, batch by batch, from a forked RNG seeded with ``seed``."""
    scores = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            pairs = sample_pairs(policy, tokenizer, chunk, **sampling)
            responses = [r for pair in pairs.responses for r in pair]
            texts = [p for p in chunk for _ in range(2)]
            scores.append(score(TEXT_REWARD, texts, responses).view(len(chunk), 2, -1))
    return torch.cat(scores)


def test_the_hf_engine_on_the_cpu_evaluates_as_generate_did():
    policy, tokenizer = tiny_model(dtype=torch.float32), tiny_tokenizer()
    assert resolve_rollout_dtype("auto", "cpu") == torch.float32  # the run's CPU engine
    expected = generate_scores(policy, tokenizer, EVAL_PROMPTS, seed=7, batch_size=2,
                               temperature=0.9, max_new_tokens=5)
    engine = HFGenerateEngine(tokenizer, SamplingSettings(temperature=0.9, max_new_tokens=5))
    engine.sync_weights(policy)
    assert torch.equal(engine_scores(engine, TEXT_REWARD, EVAL_PROMPTS, batch_size=2, seed=7),
                       expected)
    assert torch.equal(sample_scores(policy, tokenizer, TEXT_REWARD, EVAL_PROMPTS,
                                     temperature=0.9, max_new_tokens=5, batch_size=2, seed=7),
                       expected)


def test_engine_evaluation_leaves_the_global_rng_untouched_and_uses_its_seed():
    policy, tokenizer = tiny_model(dtype=torch.float32), tiny_tokenizer()
    engine = HFGenerateEngine(tokenizer, SamplingSettings(max_new_tokens=5))
    engine.sync_weights(policy)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = engine_scores(engine, TEXT_REWARD, EVAL_PROMPTS, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(engine_scores(engine, TEXT_REWARD, EVAL_PROMPTS, seed=1), first)
    assert not torch.equal(engine_scores(engine, TEXT_REWARD, EVAL_PROMPTS, seed=2), first)
    with pytest.raises(ValueError, match="at least one prompt"):
        engine_scores(engine, TEXT_REWARD, [])


class SnapshotEngine(HFGenerateEngine):
    """An HF engine that samples from a copy of the policy taken at each sync, as vLLM does
    (its own weights), and records its calls in ``log``."""

    def __init__(self, *args, log: list, **kwargs):
        super().__init__(*args, **kwargs)
        self.log = log

    def sync_weights(self, policy):
        self.log.append(("sync", None))
        super().sync_weights(copy.deepcopy(policy))

    def sample(self, prompts):
        self.log.append(("sample", list(prompts)))
        return super().sample(prompts)


def test_a_run_evaluates_through_its_engine_synced_after_the_update(tmp_path, monkeypatch):
    from drosim.llm.components.config import bundled_config_path, load_config
    from drosim.llm.recipes import trainer

    def evaluations(out, engine_log=None) -> list[dict]:
        if engine_log is not None:
            def snapshot_engine(config, policy, tokenizer, device):
                engine = SnapshotEngine(tokenizer, SamplingSettings.from_config(config),
                                        dtype=resolve_rollout_dtype(config.rollout_dtype,
                                                                    device), log=engine_log)
                engine.sync_weights(policy)
                return engine
            monkeypatch.setattr(trainer, "make_rollout_engine", snapshot_engine)
        config = load_config(bundled_config_path("smoke"), [
            f"out_dir={out}", "iterations=2", "eval_every=1", "progress=false"])
        trainer.train(config)
        return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "eval"]

    live = evaluations(tmp_path / "live")
    log: list = []
    snapshot = evaluations(tmp_path / "snapshot", log)
    config = load_config(bundled_config_path("smoke"))
    eval_prompts = trainer.load_run_prompts(config)[1]
    # every evaluation (iterations 0, 1, 2) samples the held-out prompts, right after a sync
    evaluated = [i for i, (kind, prompts) in enumerate(log) if prompts == eval_prompts]
    assert len(evaluated) == 3
    assert all(log[i - 1] == ("sync", None) for i in evaluated)
    # from the updated weights: as the engine sharing the live policy samples
    assert [r["iteration"] for r in snapshot] == [0, 1, 2]
    assert snapshot == live
