"""Smoke tests of bench/bench_dro.py and bench/bench_llm.py, and the published chi2 baseline's
documented defect."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from drosim.dro import chi2_worst_case
from drosim.paper_checks.published import (
    published_chi2_candidates,
    published_chi2_objective,
    published_chi2_value_at,
    published_kl_weights,
)

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_dro.py"


def _import_bench_script(name: str) -> ModuleType:
    """bench/<name>.py imported as the module ``name`` (bench/ is not a package).

    The scripts import their sibling ``peak_memory`` as ``python bench/<name>.py`` finds it
    (the script's folder is on the path); it is imported here the same way, from its file.
    """
    for module_name in ("peak_memory", name):
        if module_name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(module_name,
                                                      BENCH.with_name(f"{module_name}.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses resolve annotations through it
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """bench/bench_dro.py imported as a module."""
    return _import_bench_script("bench_dro")


def _exp_losses(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.empty(n, dtype=torch.float64).exponential_(generator=gen)


def test_run_benchmark_tiny(bench: ModuleType) -> None:
    pytest.importorskip("cvxpy")
    df = bench.run_benchmark(ns=[64], batch=4, repeats=1, baseline_problems=2)
    assert list(df.columns) == bench.COLUMNS
    devices = bench.available_devices()
    assert len(df) == len(bench.SOLVERS) * len(devices)
    assert set(df["solver"]) == {"chi2", "kl"}
    for column in ("ours_s", "cvxpy_s", "cvxpy/ours"):
        assert (df[column] > 0).all() and df[column].map(math.isfinite).all(), column
    chi2 = df[df["solver"] == "chi2"]
    assert (chi2["published_s"] > 0).all() and chi2["published/ours"].map(math.isfinite).all()
    # The timed problems are solved, and solved right.
    assert (df["max_abs_err_vs_cvxpy"] < 1e-5).all()
    assert (df["pass"] == "-").all()  # the speed target applies at n = 4096 only


def test_markdown_table(bench: ModuleType) -> None:
    df = bench.pd.DataFrame({"a": [1.0, math.nan], "b": ["x", "y"]})
    lines = bench.to_markdown(df).splitlines()
    assert len(lines) == 4 and lines[0].startswith("|") and "n/a" in lines[3]


def test_memory_probe_calibrates(bench: ModuleType) -> None:
    """One input-sized copy measures as about one input (4 MiB, in a fresh process)."""
    r = bench.measure_memory("copy", 8, 65536, "cpu", timeout_s=60)
    assert r["input_bytes"] == 8 * 65536 * 8
    assert 0.5 <= r["extra_bytes"] / r["input_bytes"] <= 2.0, r


def test_published_chi2_worst_case_below_mean() -> None:
    """With sqrt(2 rho) < 1 the published value falls below the mean (the expression is
    unbounded below in eta; see drosim.paper_checks.published_chi2)."""
    losses = _exp_losses(64, seed=0)
    mean = float(losses.mean())
    published = published_chi2_objective(losses, 0.01)
    assert published.objective < mean
    assert float(chi2_worst_case(losses, 0.01).value) >= mean
    # g is increasing there, so the search returns its left-most candidate, min - 1.
    assert published.eta == float(losses.min()) - 1
    assert published.objective == published_chi2_value_at(losses, published.eta, 0.01)


@pytest.mark.parametrize("rho", [0.5, 2.0])
def test_published_chi2_finite_when_sqrt_2rho_at_least_one(rho: float) -> None:
    losses = _exp_losses(64, seed=0)
    published = published_chi2_objective(losses, rho)
    assert math.isfinite(published.objective)
    # Not the chi-square worst case, whose constant is sqrt(1 + 2 rho) > sqrt(2 rho).
    assert published.objective < float(chi2_worst_case(losses, rho).value)


def test_published_candidates_and_attached_gradients() -> None:
    losses = torch.tensor([2.0, 0.0, 2.0, 1.0], dtype=torch.float64, requires_grad=True)
    assert published_chi2_candidates(losses).tolist() == [-1.0, 0.0, 1.0, 2.0, 3.0]
    out = published_chi2_objective(losses, 2.0)
    out.loss.backward()  # the weights are NOT detached: the gradient goes through them
    assert out.weights.requires_grad and losses.grad is not None
    assert not torch.allclose(losses.grad, out.weights.detach())
    kl = published_kl_weights(losses, 0.5)
    assert kl.weights.requires_grad
    assert float(kl.weights.detach().sum()) == pytest.approx(1.0)
    assert float(kl.loss.detach()) == pytest.approx(float((kl.weights * losses).sum().detach()))


def test_published_timing_extrapolates_over_budget(bench: ModuleType) -> None:
    """Over the time budget, a prefix of the candidates is timed and the table says so."""
    losses = bench.make_losses(1, 1024)
    seconds, note = bench.time_published(losses, 0.1, count=1, budget_s=0.0)
    assert seconds > 0 and math.isfinite(seconds)
    assert note.startswith("EXTRAPOLATED") and f"of {1024 + 2} candidates" in note


# ------------------------------------------------------------------- bench/bench_llm.py


@pytest.fixture(scope="module")
def bench_llm() -> ModuleType:
    """bench/bench_llm.py imported as a module."""
    pytest.importorskip("transformers")
    return _import_bench_script("bench_llm")


def test_llm_bench_quick(bench_llm: ModuleType, tmp_path: Path) -> None:
    """The timing sections run at tiny sizes, the batched and per-sample results agree, and
    every ratio is a positive finite number (memory: see the next test)."""
    argv = ["--quick", "--methods", "chi2-rebel,w-rebel,kl-dpo", "--sections",
            "steps,penalty,logprobs", "--out-dir", str(tmp_path)]
    assert bench_llm.main(argv) == 0
    md = (tmp_path / "llm_cpu_tiny_quick.md").read_text()
    assert "## Targets" in md and "w-rebel / rebel" in md and "kl-dpo / dpo" in md
    df = bench_llm.pd.read_csv(tmp_path / "llm_cpu_tiny_quick.csv")
    assert set(df["section"]) == {"steps", "penalty", "logprobs"}
    steps = df[df["section"] == "steps"]
    assert list(steps["method"]) == ["rebel", "dpo", "chi2-rebel", "w-rebel", "kl-dpo"]
    assert list(steps["over"]) == ["rebel", "dpo", "rebel", "rebel", "dpo"]
    for column in ("ratio", "ratio_of_min", "loop/batched"):
        values = df[column].dropna()
        assert len(values) > 0 and (values > 0).all() and values.map(math.isfinite).all()
    penalty = df[df["section"] == "penalty"]
    assert list(penalty["pairs"]) == [2, 4]
    assert (penalty["checked"] == "penalty, norms, grads").all()  # small: the full loop runs
    assert (df["max_rel_err"].dropna() < 1e-3).all()


def test_llm_bench_memory_worker(bench_llm: ModuleType) -> None:
    """A fresh worker process measures one step's peak extra memory."""
    settings, _ = bench_llm.parse_args(["--quick"])
    result = bench_llm.memory.run_worker("w-rebel", settings, timeout_s=120)
    assert result["method"] == "w-rebel" and result["before_bytes"] > 0
    assert result["extra_bytes"] > 0


def test_llm_bench_loop_extrapolation(bench_llm: ModuleType) -> None:
    """Over its time budget the per-sample loop runs one sample and is extrapolated."""
    settings, _ = bench_llm.parse_args(["--quick", "--loop-budget", "0"])
    model = bench_llm.build_model(settings, bench_llm.demo_tokenizer())
    row = bench_llm.penalty.penalty_row(model, 4, settings, full_loop=False)
    assert row["loop_timing"] == "1 of 4 samples, extrapolated"
    assert row["checked"] == "norms of 1 samples" and row["max_rel_err"] < 1e-3
    assert row["loop_s"] > 0 and math.isfinite(row["loop/batched"])


def test_emotion_pipeline_bench_tiny(tmp_path: Path) -> None:
    """The GPU session's Emotion pipeline runs end to end at its --tiny size on the CPU, and
    refuses to write into a non-empty folder."""
    import json
    import subprocess

    script = BENCH.with_name("emotion_pipeline.py")
    out = tmp_path / "emotion"
    result = subprocess.run([sys.executable, str(script), "--out", str(out), "--tiny",
                             "--device", "cpu"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads((out / "emotion_pipeline.json").read_text())
    assert set(measured["seconds"]) == {"sft", "train_reward", "train_rebel",
                                        "train_chi2-rebel", "report"}
    assert all(rate > 0 for rate in measured["generation_tokens_per_s"].values())
    again = subprocess.run([sys.executable, str(script), "--out", str(out), "--tiny"],
                           capture_output=True, text=True)
    assert again.returncode != 0 and "is not empty" in again.stderr


# ------------------------------------------------------------- bench/bench_iteration.py


@pytest.fixture(scope="module")
def bench_iteration() -> ModuleType:
    """bench/bench_iteration.py imported as a module."""
    pytest.importorskip("transformers")
    return _import_bench_script("bench_iteration")


def test_iteration_bench_drosim_quick(bench_iteration: ModuleType, tmp_path: Path) -> None:
    """drosim's half runs one tiny iteration without TRL: every phase is timed, the phases
    add up to the total, and every response has the full new_tokens."""
    assert bench_iteration.main(["--quick", "--frameworks", "rebel", "--out-dir",
                                 str(tmp_path)]) == 0
    md = (tmp_path / "iteration_cpu_quick.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 and rows[1].startswith("| drosim rebel |")  # header, drosim only
    assert "not measured" in md  # no GRPO, no ratio
    settings = bench_iteration.Settings(**bench_iteration.QUICK)
    timing = bench_iteration.time_framework(
        bench_iteration.write_world(tmp_path / "world", settings), settings, "rebel",
        tmp_path / "run")
    phases = (timing.generation_s, timing.reward_s, timing.update_s)
    assert all(s > 0 for s in phases)
    assert sum(phases) == pytest.approx(timing.total_s, rel=1e-6)
    assert timing.tokens == settings.samples * settings.new_tokens  # min = max new tokens


def test_iteration_bench_refuses_without_trl(bench_iteration: ModuleType,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Asked for a TRL trainer where TRL is not importable, it says how to get it."""
    monkeypatch.setattr(bench_iteration, "trl_available", lambda: False)
    assert bench_iteration.main(["--quick", "--frameworks", "rebel,grpo"]) == 2
    assert "run bench/iteration_env.sh" in capsys.readouterr().err
    if not torch.cuda.is_available():  # the GPU variant is refused, not run on the CPU
        with pytest.raises(SystemExit):
            bench_iteration.parse_args(["--vllm", "--device", "cuda"])


# ------------------------------------------------------- bench/gpu_iteration_session.sh


def test_gpu_iteration_session_dry_run() -> None:
    """The prepared GPU session parses, and every script and option it names exists."""
    import os
    import subprocess

    script = BENCH.with_name("gpu_iteration_session.sh")
    result = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True,
                            text=True, cwd=BENCH.parents[1], timeout=300,
                            env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "dry-run: 0 problem(s)" in result.stdout
    for name in ("bench_llama_1b", "bench_iteration", "vllm_equivalence"):
        assert f"dry-run: {name}" in result.stdout


def test_llm_bench_flop_rates_count_real_tokens_only(bench_llm: ModuleType) -> None:
    """Padding adds no FLOPs: the same sequences padded wider give the same rates, and
    attention counts each sequence's own length squared."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from drosim.llm.components.batch import PairBatch

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    lengths = torch.tensor([[3, 5], [2, 7]])

    def batch(width: int) -> PairBatch:
        mask = (torch.arange(width) < lengths[..., None]).long()
        zeros = torch.zeros(2, 2)
        return PairBatch(mask, mask, mask, zeros, zeros, zeros)

    rates = bench_llm.steps.flop_rates(model, batch(8), 2.0, 100.0)
    params = sum(p.numel() for p in model.parameters())
    assert rates["model_tflops"] == pytest.approx(6 * params * 17 / 2.0 / 1e12)
    assert rates["attention_tflops"] == pytest.approx(6 * 2 * 16 * (9 + 25 + 4 + 49) / 2e12)
    assert rates["mfu"] == pytest.approx(rates["model_tflops"] / 100.0)
    assert bench_llm.steps.flop_rates(model, batch(32), 2.0, 100.0) == pytest.approx(rates)
