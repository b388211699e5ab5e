"""C2 and C3: the squared parameter error of (DRO-)REBEL falls like sqrt(d/n), and like d/n.

Two kinds of world, judged separately; a world counts towards the verdict only where the
balls can act in it.

Gaussian world (:func:`drosim.studies.rates.run`): REBEL and every DRO-REBEL (chi-square,
KL, Wasserstein) under rho_n = c/n, c/sqrt(n) and a fixed rho = c, slopes of the median
error in n (at fixed d) and of the mean error in d (at fixed n):

* C3 (fast rate d/n): for REBEL and each DRO-REBEL with radius c/n, the slope in n is
  about -1 (its interval meets [-1.1, -0.9]) and the slope in d about +1 (meets [0.9, 1.1]);
* C2 (slow rate sqrt(d/n)): the slope in n is at most -1/2 within its interval, for REBEL
  and each DRO-REBEL whose radius shrinks (c/n and c/sqrt(n)).

The noise there is independent of dphi, so a chi-square or KL ball leaves REBEL's target at
theta* at every radius: those rows are least squares, shown but not counted; the world's
verdict is that of REBEL and W-REBEL (a Wasserstein ball shrinks w in every world).

Finite worlds (:func:`drosim.studies.rates.run_worlds`, 38 atoms of (dphi, dr), d = 3):
"skewed" and "misspecified", where chi2- and KL-REBEL's population target theta^rho moves
with the radius, and "well-specified", where it does not (not testable). The radii are the
covering ones, c/sqrt(n) for C2 and q/n for C3 (q: 90% quantile of chi^2_{S-1} / 2). Each
(world, family, schedule) holds when

* the exact bias ||theta^{rho_n} - theta*||_Sigma^2, computed from P alone out to
  n = 2^32, has a local exponent within EXPONENT_TOL of the claimed one (-1/2 for C2, -1 for
  C3) at its largest n: the rate the error reaches once the variance (order 1/n) is gone;
* the sampled error's slope on the covered range (P in the ball in at least half of the
  trials) is consistent with that curve: its interval reaches the exact bias's secant slope
  on the same range plus SLACK (the sample falls no slower than the bias it keeps).

The grid slope alone can miss C2 where the exact curve is still bending towards -1/2 (e.g.
-0.42 on n = 2^10..2^16 in the skewed world, whose exact bias has exponent -0.46 at 2^16 and
-0.497 at 2^32): the exact curve is what states the asymptotic exponent.

Per world: "reproduced" when every testable cell holds, "not reproduced" when none does,
"partially reproduced" for a mix, "inconclusive" when an interval is too wide, "not
testable here" when no ball acts. Combined over the worlds the same way.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from drosim.methods import Method
from drosim.paper_checks._framework import (
    HEADLINE_MAX_CHARS,
    REASON_MAX_CHARS,
    CheckResult,
    Preset,
    clip,
)
from drosim.paper_checks._slopes import MAX_WIDTH, describe, describe_all, overlaps, too_wide
from drosim.stats import per_x_statistics
from drosim.studies import coverage, rates
from drosim.studies.montecarlo import UNSCHEDULED, resolve_preset, scheduled_methods

FAST_N = (-1.1, -0.9)  # d/n in n
FAST_D = (0.9, 1.1)  # d/n in d
SLOW_N = -0.5  # sqrt(d/n) in n: the slow rate allows any slope at or below this
FAST_SCHEDULES = (UNSCHEDULED, "c/n")
SLOW_SCHEDULES = (UNSCHEDULED, "c/n", "c/sqrt(n)")
GAUSSIAN = "gaussian"
# Families whose ball acts in the Gaussian world (none: REBEL itself, the baseline).
ACTING_IN_GAUSSIAN = ("none", "wasserstein")
# Finite worlds: covering schedule -> (claim, the exponent it claims for the squared error).
CLAIMED = {schedule: (claim, rates.CLAIMED_EXPONENT[schedule])
           for schedule, claim in ((rates.SLOW_RADIUS, "C2"), (rates.FAST_RADIUS, "C3"))}
EXPONENT_TOL = 0.02  # the exact exponent at n = 2^32 is -0.497 for C2 (the n^-1/4 term)
SLACK = 0.05  # how much slower than its exact bias the sampled error may fall
REPORTED_SIZES = tuple(2**k for k in (16, 20, 24, 28, 32))  # exact exponents in the text
COLUMNS = ["world", "method", "schedule", "study", "n_min", "n_max", "coverage", "slope",
           "low", "high", "exact_slope", "reading"]
STATS_ORDER = ["study", "world", "method", "schedule", "x_name", "x", "median", "q10", "q90",
               "mean", "trials"]
REASON = ("Skewed noise or a misspecified reward makes the residual at theta* depend on "
          "dphi, so chi2 and KL balls move REBEL's target (squared bias ~ rho); in the "
          "well-specified worlds they leave it at theta* and only W-REBEL's ball acts. "
          "Errors are to the training P's targets: nothing unseen is protected.")
F_COVERAGE = (
    "f-divergence coverage (P in a chi-square or KL ball around P_n) needs every atom of P "
    "observed, so n >= S (the number of atoms; S = {atoms} here, n D(P || P_n) -> "
    "chi^2_(S-1) / 2), and it never holds for a continuous P, whose P_n is singular to it "
    "(D(P || P_n) = inf): the covering radii exist only in finitely supported worlds. ")


def methods(c: float) -> list[Method]:
    """REBEL and every DRO-REBEL under each radius schedule, with radius constant c."""
    return [m for m in scheduled_methods(c) if m.loss == "rebel"]


def run(preset: Preset = "quick", out: Path = Path("figures"),
        finite: dict[str, object] | None = None, **overrides: object) -> CheckResult:
    """Measure the slopes and exact bias exponents, draw the figures, judge C2 and C3.

    Args:
        preset: "quick" or "full", for both studies (drosim.studies.rates.PRESETS and
            WORLD_PRESETS; "full" runs n up to 2^14, d up to 64, 200 trials in the Gaussian
            world and n up to 2^24, 400 trials in the finite ones).
        out: folder for rate_n, rate_d and rate_worlds (.png and .pdf).
        finite: overrides of the finite-world study (e.g. a tiny grid for the tests).
        **overrides: overrides of the Gaussian-world study.

    Returns:
        The result; its table has one row per (world, method, schedule, study): slopes with
        their 90% intervals, and (study "exact bias") the exact bias's local exponents.
    """
    c = resolve_preset(rates.PRESETS, preset, overrides)["c"]
    frame = rates.run(preset, methods=methods(c), progress=False, **overrides)
    table = _gaussian_table(frame)
    gaussian = _gaussian_verdict(table)

    sampled = rates.run_worlds(preset, **(finite or {}))
    config = sampled.attrs["config"]
    exact = pd.concat([rates.exact_bias(world, config["exact_sizes"], config["c"],
                                        config["level"]) for world in coverage.WORLDS],
                      ignore_index=True)
    slopes = rates.world_slopes(sampled).assign(
        study="n", coverage=lambda t: t["coverage_n_max"])
    slopes["reading"] = [_finite_reading(row, exact) for _, row in slopes.iterrows()]
    verdicts = {GAUSSIAN: gaussian[0],
                **{world: _world_verdict(slopes[slopes["world"] == world], exact, world)
                   for world in coverage.WORLDS}}
    paths = [*rates.plot(frame, out, slope_table=table),
             *rates.plot_worlds(sampled, exact[exact["world"].isin(config["worlds"])], out)]

    measured = (
        f"Gaussian world: {gaussian[1]} -> {verdicts[GAUSSIAN]}. "
        + " ".join(_world_text(world, verdicts[world], slopes, exact)
                   for world in coverage.WORLDS)
        + " " + F_COVERAGE.format(atoms=_atoms())
        + f"Finite worlds: c = {config['c']}, q = the {config['level']} quantile of "
        f"chi^2_(S-1) / 2, n = {min(config['sizes'])}..{max(config['sizes'])} sampled "
        f"({config['trials']} trials, slopes of medians on the covered range, 90% bootstrap "
        f"intervals), exact bias out to n = 2^{round(math.log2(max(config['exact_sizes'])))}"
        f"; d = 3 is fixed there, so the slope in d is the Gaussian world's alone. "
        f"Figures: {', '.join(p.name for p in paths)}."
    )
    return CheckResult(
        claim="C2, C3",
        title="Rates of the squared Sigma-error of (DRO-)REBEL in n and d",
        paper_says=(
            "C2: ||theta_hat - theta*||_Sigma^2 = O~(sqrt(d/n)) under coverage. C3: O~(d/n), "
            "the parametric rate, matching non-robust RLHF in benign regimes."
        ),
        measured=measured,
        verdict=_combine(list(verdicts.values())),
        table=pd.concat([table, slopes[COLUMNS], _exact_rows(exact)], ignore_index=True),
        stats=_statistics(frame, sampled, exact),
        reason=clip(REASON, REASON_MAX_CHARS),
        headline=clip(_headline(slopes, exact), HEADLINE_MAX_CHARS),
    )


def _gaussian_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The Gaussian world's slopes with their readings, in COLUMNS; the chi2 and KL rows
    are marked as least squares (their ball does not act there)."""
    table = rates.slopes(frame)
    family = frame.groupby("method")["family"].first()
    grid = frame.attrs["config"]
    table["reading"] = [
        _reading(row) + ("" if family[row["method"]] in ACTING_IN_GAUSSIAN
                         else "; ball idle here (theta^rho = theta*): not counted")
        for _, row in table.iterrows()]
    by_n = table["study"] == "n"
    return table.assign(
        world=GAUSSIAN,
        n_min=by_n.map({True: min(grid["n_grid"], default=math.nan),
                        False: grid["samples"]}),
        n_max=by_n.map({True: max(grid["n_grid"], default=math.nan),
                        False: grid["samples"]}),
        coverage=math.nan, exact_slope=math.nan)[COLUMNS]


def _gaussian_verdict(table: pd.DataFrame) -> tuple[str, str]:
    """The Gaussian world's verdict from the rows whose ball acts, and its text."""
    counted = table[~table["reading"].str.endswith("not counted")]
    by_n = counted[counted["study"] == "n"]
    by_d = counted[counted["study"] == "d"]
    fast_n = by_n[by_n["schedule"].isin(FAST_SCHEDULES)]
    fast_d = by_d[by_d["schedule"].isin(FAST_SCHEDULES)]
    slow_n = by_n[by_n["schedule"].isin(SLOW_SCHEDULES)]
    off_fast = pd.concat([fast_n[[not overlaps(r, FAST_N) for _, r in fast_n.iterrows()]],
                          fast_d[[not overlaps(r, FAST_D) for _, r in fast_d.iterrows()]]])
    off_slow = slow_n[slow_n["low"] > SLOW_N]
    if too_wide(pd.concat([fast_n, fast_d, slow_n])):
        verdict = "inconclusive"
    else:
        verdict = "reproduced" if off_fast.empty and off_slow.empty else "not reproduced"
    idle = table[table["reading"].str.endswith("not counted") & (table["study"] == "n")]
    text = (
        f"C3, slopes in n and d of REBEL and W-REBEL with radius c/n: "
        f"{describe_all(fast_n)} (n); {describe_all(fast_d)} (d) -> {_outcome(off_fast)} "
        f"(intervals must meet [-1.1, -0.9] in n and [0.9, 1.1] in d). C2, slopes in n of "
        f"REBEL and W-REBEL at c/n, c/sqrt(n) at most -0.5 within their interval -> "
        f"{_outcome(off_slow)}. Not counted, the noise being independent of dphi (least "
        f"squares): " + ", ".join(f"{describe(r)} at {r['schedule']}"
                                  for _, r in idle.iterrows()))
    return verdict, text


def _finite_reading(row: pd.Series, exact: pd.DataFrame) -> str:
    """One finite-world cell: "holds", "fails" or why not, with the numbers behind it."""
    if row["family"] == "none":
        return "no ball: " + ("parametric, about -1" if overlaps(row, FAST_N)
                              else "not -1")
    curve = _curve(exact, row["world"], row["method"], row["schedule"])
    claim, claimed = CLAIMED[row["schedule"]]
    if curve["bias"].max() <= coverage.IDLE_BIAS:
        return f"{claim}: not testable (theta^rho = theta*)"
    last = curve["exponent"].iloc[-1]
    asymptotic = abs(last - claimed) <= EXPONENT_TOL
    consistent = row["low"] <= row["exact_slope"] + SLACK
    if row["high"] - row["low"] > MAX_WIDTH:
        outcome = "inconclusive"
    else:
        outcome = "holds" if asymptotic and consistent and row["coverage"] >= 0.5 else "fails"
    return (f"{claim} {outcome}: exact exponent {last:.3f} at n = 2^"
            f"{round(math.log2(curve['n'].iloc[-1]))} (claimed {claimed:g}), sampled "
            f"{'no slower than' if consistent else 'slower than'} its exact bias "
            f"({row['exact_slope']:.2f}) on the covered range, coverage {row['coverage']:.2f}")


def _world_verdict(slopes: pd.DataFrame, exact: pd.DataFrame, world: str) -> str:
    """A finite world's verdict from its robust cells (the module note)."""
    if exact.loc[exact["world"] == world, "bias"].max() <= coverage.IDLE_BIAS:
        return "not testable here"
    cells = slopes.loc[slopes["family"] != "none", "reading"]
    if cells.empty:
        return "not testable here"  # sampled in no world of this run: exact curve only
    if cells.str.contains("inconclusive").any():
        return "inconclusive"
    held = cells.str.contains(" holds:")
    return "reproduced" if held.all() else "partially reproduced" if held.any() else (
        "not reproduced")


def _combine(verdicts: list[str]) -> str:
    """The check's verdict from the worlds' (the module note)."""
    testable = [v for v in verdicts if v != "not testable here"]
    if not testable:
        return "not testable here"
    if "inconclusive" in testable:
        return "inconclusive"
    if all(v == "reproduced" for v in testable):
        return "reproduced"
    if any(v in ("reproduced", "partially reproduced") for v in testable):
        return "partially reproduced"
    return "not reproduced"


def _curve(exact: pd.DataFrame, world: str, method: str, schedule: str) -> pd.DataFrame:
    """One exact bias curve, in increasing n."""
    return exact[(exact["world"] == world) & (exact["method"] == method)
                 & (exact["schedule"] == schedule)].sort_values("n")


def _exponents_text(curve: pd.DataFrame) -> str:
    """The exact exponents at REPORTED_SIZES, e.g. "-0.458 (2^16), ..., -0.498 (2^32)"."""
    shown = curve[curve["n"].isin(REPORTED_SIZES)]
    return ", ".join(f"{r.exponent:.3f} (2^{round(math.log2(r.n))})"
                     for r in shown.itertuples())


def _world_text(world: str, verdict: str, slopes: pd.DataFrame, exact: pd.DataFrame
                ) -> str:
    """One finite world: its verdict, then per schedule the exact exponents and the
    sampled slopes beside them."""
    if verdict == "not testable here":
        bias = exact.loc[exact["world"] == world, "bias"].max()
        return (f"{world} world: not testable here (exact bias at most {bias:.0e} at every "
                f"covering radius: the balls leave REBEL's target at theta*).")
    of_world = slopes[slopes["world"] == world]
    parts = []
    for schedule, (claim, claimed) in CLAIMED.items():
        cells = of_world[of_world["schedule"] == schedule]
        parts.append(f"{claim} (claimed exponent {claimed:g}) at rho_n = {schedule}: "
                     + "; ".join(_cell_text(row, exact) for _, row in cells.iterrows()))
    plain = of_world[of_world["family"] == "none"]
    return (f"{world} world -> {verdict}. " + ". ".join(parts)
            + f". REBEL (no ball): {describe_all(plain)}.")


def _cell_text(row: pd.Series, exact: pd.DataFrame) -> str:
    """One finite-world cell: the exact exponents, the sampled slope beside the exact
    bias's on the same range, and the outcome."""
    curve = _curve(exact, row["world"], row["method"], row["schedule"])
    return (f"{row['method']} exact exponents {_exponents_text(curve)}, sampled on n = "
            f"{row['n_min']}..{row['n_max']} {describe(row)} beside exact "
            f"{row['exact_slope']:.2f} (coverage {row['coverage']:.2f}) -> "
            f"{row['reading'].split(':')[0]}")


def _headline(slopes: pd.DataFrame, exact: pd.DataFrame) -> str:
    """C2's decisive numbers in the first sampled world: chi2-REBEL's exact exponent at the
    smallest and largest reported n, and its sampled slope."""
    row = slopes[(slopes["family"] == "chi2")
                 & (slopes["schedule"] == rates.SLOW_RADIUS)].iloc[0]
    curve = _curve(exact, row["world"], row["method"], rates.SLOW_RADIUS)
    ends = curve[curve["n"].isin(REPORTED_SIZES)].iloc[[0, -1]]
    first, last = ends.itertuples()
    return (f"{row['world']} chi2-REBEL, rho=c/sqrt(n): exact bias exponent "
            f"{first.exponent:.2f} at n=2^{round(math.log2(first.n))}, {last.exponent:.3f} at "
            f"2^{round(math.log2(last.n))}; sampled {row['slope']:.2f} "
            f"[{row['low']:.2f}, {row['high']:.2f}]")


def _exact_rows(exact: pd.DataFrame) -> pd.DataFrame:
    """The exact bias's local exponents at REPORTED_SIZES as table rows (study "exact
    bias", the exponent in the slope column)."""
    shown = exact[exact["n"].isin(REPORTED_SIZES)]
    return pd.DataFrame({
        "world": shown["world"], "method": shown["method"], "schedule": shown["schedule"],
        "study": "exact bias", "n_min": shown["n"], "n_max": shown["n"],
        "coverage": math.nan, "slope": shown["exponent"], "low": math.nan,
        "high": math.nan, "exact_slope": math.nan,
        "reading": "local exponent of ||theta^rho_n - theta*||_Sigma^2"})


def _statistics(frame: pd.DataFrame, sampled: pd.DataFrame, exact: pd.DataFrame
                ) -> pd.DataFrame:
    """Per-x statistics of every world, long format with a ``world`` column: the Gaussian
    sweeps (studies "n", "d"), the finite worlds' errors (study "n") and coverage (study
    "coverage", its mean the fraction of trials covered), and the exact bias (study "exact
    bias", trials 0: one exact value, in every statistic's column)."""
    gaussian = study_statistics(frame).assign(world=GAUSSIAN)
    robust = sampled[sampled["family"] != "none"]
    finite = [per_x_statistics(sampled, "n", "error", study="n",
                               by=("world", "method", "schedule")),
              per_x_statistics(robust.assign(covered=robust["covered"].astype(float)), "n",
                               "covered", study="coverage", by=("world", "method", "schedule"))]
    curve = exact.rename(columns={"n": "x"}).assign(
        study="exact bias", x_name="n", median=exact["bias"], q10=exact["bias"],
        q90=exact["bias"], mean=exact["bias"], trials=0)
    return pd.concat([gaussian, *finite, curve], ignore_index=True)[STATS_ORDER]


def study_statistics(frame: pd.DataFrame) -> pd.DataFrame:
    """Per-x statistics of the error of both Gaussian sweeps (study "n": x = n, "d":
    x = d), per method and radius schedule: what the slopes are fitted to."""
    return pd.concat([per_x_statistics(frame[frame["study"] == study], study, "error",
                                       study=study, by=("method", "schedule"))
                      for study in ("n", "d") if (frame["study"] == study).any()],
                     ignore_index=True)


def _atoms() -> int:
    """S, the number of atoms of (dphi, dr) in the finite worlds."""
    return coverage.world_outcomes("skewed")[1].rebel.size


def _outcome(failing: pd.DataFrame) -> str:
    """The word "holds", or "fails for" and the slopes outside their band."""
    if failing.empty:
        return "holds"
    return "fails for " + ", ".join(f"{describe(r)} in {r['study']}" for _, r in
                                    failing.iterrows())


def _reading(row: pd.Series) -> str:
    """How one Gaussian-world slope reads against the claimed rates."""
    if row["study"] == "d":
        return "about +1 (d/n)" if overlaps(row, FAST_D) else "not +1"
    if overlaps(row, FAST_N):
        return "parametric, about -1"
    if row["low"] <= SLOW_N:
        return "between sqrt(d/n) and d/n" if row["slope"] > FAST_N[1] else "faster than d/n"
    return "slower than sqrt(d/n): a plateau or bias"
