"""Benchmark: batched robust estimators against one cvxpy solve per fit, side by side.

    python bench/bench_estimators.py [--quick] [--device cpu|cuda]

1. speed: 256 fits (n = 512, d = 16) in one batched call per estimator, against cvxpy/Clarabel
   solving a few of the same problems one at a time; the ratio is per fit (target >= 100x);
2. scaling: seconds of one batched chi2-REBEL call as n, d and the number of trials grow;
(The full preset's peak memory is measured on the whole run: see the README.)

Writes bench/results/estimators_<device>.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

from drosim import reference
from drosim.dro import KL, Chi2, KLTemperature, Wasserstein
from drosim.estimators import dpo, rebel

RESULTS = Path(__file__).resolve().parent / "results"
ESTIMATORS = {
    "REBEL": ("rebel", None),
    "chi2-REBEL": ("rebel", Chi2(0.05)),
    "KL-REBEL": ("rebel", KL(0.05)),
    "KL-REBEL (temperature)": ("rebel", KLTemperature(1.0)),
    "W-REBEL": ("rebel", Wasserstein(0.05)),
    "DPO": ("dpo", None),
    "chi2-DPO": ("dpo", Chi2(0.05)),
    "KL-DPO (ball)": ("dpo", KL(0.05)),
    "KL-DPO (temperature)": ("dpo", KLTemperature(1.0)),
    "WDPO": ("dpo", Wasserstein(0.05, p=1)),
}


def problems(trials: int, n: int, d: int, device: str, seed: int = 0):
    """Gaussian dphi, linear relative rewards with noise 0.5 and Bradley-Terry labels."""
    g = torch.Generator().manual_seed(seed)
    dphi = torch.randn(trials, n, d, generator=g, dtype=torch.float64) / d**0.5
    theta = torch.randn(d, generator=g, dtype=torch.float64)
    dr = dphi @ theta + 0.5 * torch.randn(trials, n, generator=g, dtype=torch.float64)
    pref = torch.bernoulli(torch.sigmoid(dphi @ theta), generator=g)
    return dphi.to(device), dr.to(device), pref.to(device)


def fit(loss: str, spec, dphi, dr, pref):
    return rebel(dphi, dr, spec) if loss == "rebel" else dpo(dphi, pref, 1.0, spec)


def timed(call) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def speed(device: str, trials: int, n: int, d: int, cvxpy_fits: int) -> pd.DataFrame:
    dphi, dr, pref = problems(trials, n, d, device)
    rows = []
    for name, (loss, spec) in ESTIMATORS.items():
        fit(loss, spec, dphi[:2], dr[:2], pref[:2])  # warm-up
        ours = timed(lambda loss=loss, spec=spec: fit(loss, spec, dphi, dr, pref)) / trials
        solve = reference.rebel_fit if loss == "rebel" else (
            lambda x, y, s: reference.dpo_fit(x, y, 1.0, s))
        target = dr if loss == "rebel" else pref
        cvx = statistics.median(
            timed(lambda i=i, solve=solve, target=target, spec=spec: solve(
                dphi[i].cpu().numpy(), target[i].cpu().numpy(), spec))
            for i in range(cvxpy_fits))
        rows.append({"estimator": name, "trials": trials, "n": n, "d": d,
                     "ours_s_per_fit": ours, "cvxpy_s_per_fit": cvx, "ratio": cvx / ours,
                     "pass (>= 100x)": "PASS" if cvx / ours >= 100 else "FAIL"})
    return pd.DataFrame(rows)


def scaling(device: str, grid: list[tuple[int, int, int]]) -> pd.DataFrame:
    rows = []
    for trials, n, d in grid:
        dphi, dr, _ = problems(trials, n, d, device)
        rebel(dphi[:2], dr[:2], Chi2(0.05))
        rows.append({"trials": trials, "n": n, "d": d,
                     "chi2-REBEL batch seconds": timed(
                         lambda dphi=dphi, dr=dr: rebel(dphi, dr, Chi2(0.05)))})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer fits and a smaller grid")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    trials = 32 if args.quick else 256
    table = speed(args.device, trials, 512, 16, 2 if args.quick else 3)
    grid = ([(32, 256, 8), (32, 1024, 8)] if args.quick else
            [(64, 512, 16), (256, 512, 16), (1024, 512, 16), (256, 2048, 16),
             (256, 8192, 16), (256, 512, 4), (256, 512, 64)])
    growth = scaling(args.device, grid)
    lines = [f"# Estimator benchmark ({args.device}, torch {torch.__version__})", "",
             f"`python bench/bench_estimators.py{' --quick' if args.quick else ''}`; per-fit "
             "seconds: ours = one batched call / trials, cvxpy = median of single solves.", "",
             table.to_markdown(index=False, floatfmt=".3g"), "", growth.to_markdown(
                 index=False, floatfmt=".3g")]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (RESULTS / f"estimators_{args.device}{suffix}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
