"""One online iteration of drosim-llm's trainer against TRL's GRPO and RLOO trainers.

Both frameworks load the same files, written once to a temporary folder: a random GPT-2
policy, a byte-level BPE tokenizer trained here on the demo corpus, a random GPT-2
sequence classifier (one label) as the reward model, and the prompts. Each round times one
iteration of every framework, in turn (drosim REBEL, drosim chi2-REBEL, TRL GRPO, TRL RLOO),
each from a freshly built trainer; one untimed warm-up round comes first. Per framework:

* generation: sampling two responses per prompt (drosim: ``roll_out``; TRL: ``_generate``);
* reward: scoring the responses (drosim: ``score_batch``; TRL: ``_calculate_rewards``);
* update: the rest of the iteration, every policy forward / backward and the optimiser step
  (drosim: ``update``, log pi_t included; TRL: the training step minus the two
  phases above, from its ``on_step_begin`` to its ``on_step_end`` callback, so any
  reference / old-policy forward and its bookkeeping are in it);
* tokens/s: generated tokens per second of the whole iteration.

TRL is not a dependency of drosim: it lives in its own environment, made by
``bench/iteration_env.sh``::

    bash bench/iteration_env.sh
    OMP_NUM_THREADS=1 .bench-venv/bin/python bench/bench_iteration.py

writes ``bench/results/iteration_cpu.md``. ``--device cuda`` (and ``--vllm``: TRL's colocated
vLLM, drosim's ``rollout_engine=vllm``; needs vLLM in .bench-venv) is the GPU variant, not
run where this was written (a CPU machine); ``--frameworks rebel`` runs drosim alone, without
TRL; ``--quick`` is a tiny setting for a smoke test.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import itertools
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
DROSIM = ("rebel", "chi2-rebel")  # drosim methods
TRL = ("grpo", "rloo")  # TRL trainers
FRAMEWORKS = (*DROSIM, *TRL)
TARGET = 0.8  # issue 20: drosim's whole iteration at most 0.8x TRL GRPO's
CHI2_RHO = 0.1
EOS, PAD = "<|endoftext|>", "<pad>"
OBJECTIVE = "reward"  # the reward model's one label
VLLM_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "localhost",
            "MASTER_PORT": "29531"}


@dataclass(frozen=True)
class Settings:
    """The benchmark's setting (the issue's by default; ``--quick``: a tiny one)."""

    prompts: int = 64
    new_tokens: int = 32
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    vocab: int = 50257  # GPT-2's: the LM head's share of the work as in a real GPT-2
    rounds: int = 3
    warmup: int = 1
    lr: float = 1e-6
    seed: int = 0
    device: str = "cpu"
    vllm: bool = False
    frameworks: tuple[str, ...] = FRAMEWORKS

    @property
    def samples(self) -> int:
        """Responses per iteration: two per prompt."""
        return 2 * self.prompts


QUICK = {"prompts": 4, "new_tokens": 4, "n_layer": 1, "n_embd": 32, "n_head": 2, "vocab": 300,
         "rounds": 1, "warmup": 0}


@dataclass(frozen=True)
class Timing:
    """One framework's iteration, in seconds; ``tokens``: response tokens generated."""

    generation_s: float
    reward_s: float
    update_s: float
    total_s: float
    tokens: int


@dataclass(frozen=True)
class World:
    """The files both frameworks load."""

    policy: Path
    reward: Path
    prompt_file: Path
    prompts: list[str]
    vocab: int  # the tokenizer's size (the corpus may not fill Settings.vocab)


# ------------------------------------------------------------------------------ the world


def bpe_tokenizer(corpus: Sequence[str], vocab: int):
    """A byte-level BPE tokenizer fitted to ``corpus`` (EOS ``<|endoftext|>``, padding
    ``<pad>`` on the left, as generation wants)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # GPT-2 adds the embedding of any token_type_ids it is given: never return them
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS,
                                   pad_token=PAD, padding_side="left",
                                   model_input_names=["input_ids", "attention_mask"])


def filler_corpus(vocab: int, seed: int) -> list[str]:
    """Random lower-case words, enough for a BPE to fill ``vocab`` tokens (the demo corpus
    alone fills about 760): the policy then has a GPT-2-sized vocabulary and LM head."""
    g = torch.Generator().manual_seed(seed)
    count = max(0, vocab - 1000) * 20  # words: about 20 per merge fill the vocabulary
    lengths = torch.randint(3, 10, (count,), generator=g).tolist()
    letters = (torch.randint(0, 26, (sum(lengths),), generator=g) + ord("a")).tolist()
    text, start = [], 0
    for length in lengths:
        text.append("".join(map(chr, letters[start:start + length])))
        start += length
    return [" ".join(text[i:i + 50]) for i in range(0, len(text), 50)]


def write_world(folder: Path, settings: Settings) -> World:
    """Write the random policy, the reward model (both with the tokenizer) and the prompts
    under ``folder``; the same seed writes the same files."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    from drosim.llm.components.demo_world import demo_corpus, demo_prompts

    tokenizer = bpe_tokenizer(demo_corpus(2000, seed=settings.seed)
                              + filler_corpus(settings.vocab, seed=settings.seed),
                              settings.vocab)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=settings.n_embd,
                        n_layer=settings.n_layer, n_head=settings.n_head, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, num_labels=1,
                        id2label={0: OBJECTIVE}, label2id={OBJECTIVE: 0})
    torch.manual_seed(settings.seed)
    world = World(folder / "policy", folder / "reward", folder / "prompts.txt",
                  demo_prompts(settings.prompts, seed=settings.seed + 1), len(tokenizer))
    policy = GPT2LMHeadModel(config)
    # Every response is new_tokens long in both frameworks: drosim's sampling reads this
    # default from the model folder, TRL is given it as a generation argument.
    policy.generation_config.min_new_tokens = settings.new_tokens
    for model, path in ((policy, world.policy),
                        (GPT2ForSequenceClassification(config), world.reward)):
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    world.prompt_file.write_text("\n".join(world.prompts) + "\n")
    return world


# ---------------------------------------------------------------------------------- drosim


def optional_keys(settings: Settings) -> dict[str, Any]:
    """drosim's keys for this benchmark where this drosim has them: ``packing`` on (its
    default); ``reward_batch_size`` is left at drosim's default."""
    from drosim.llm.components.config import TrainConfig

    names = {field.name for field in dataclasses.fields(TrainConfig)}
    wanted = {"packing": True}
    return {key: value for key, value in wanted.items() if key in names}


def drosim_config(world: World, settings: Settings, method: str, out_dir: Path):
    """The drosim configuration of one iteration: every pair in one minibatch, one epoch."""
    from drosim.llm.components.config import TrainConfig

    return TrainConfig(
        model=str(world.policy), reward=str(world.reward), prompts=str(world.prompt_file),
        eval_prompts=str(world.prompt_file), train_mixture={OBJECTIVE: 1.0},
        eval_mixtures=[{OBJECTIVE: 1.0}], method=method,
        chi2_rho=CHI2_RHO if method == "chi2-rebel" else None, iterations=1,
        pairs_per_iteration=settings.prompts, minibatch_size=settings.prompts, epochs=1,
        lr=settings.lr, max_new_tokens=settings.new_tokens, device=settings.device,
        dtype="float32", rollout_engine="vllm" if settings.vllm else "hf", progress=False,
        seed=settings.seed, out_dir=str(out_dir), **optional_keys(settings))


def time_drosim(world: World, settings: Settings, method: str, out_dir: Path) -> Timing:
    """One iteration of drosim-llm's trainer, phase by phase (the steps of ``run_loop``),
    from a freshly set-up run."""
    from drosim.llm.components.checkpoint import TrainState
    from drosim.llm.components.config import validate_config
    from drosim.llm.components.runtime import Distributed, iteration_seed, seed_everything
    from drosim.llm.recipes.trainer import roll_out, score_batch, set_up, update

    config = drosim_config(world, settings, method, out_dir)
    run = set_up(config, Distributed(), method=validate_config(config))
    seed_everything(iteration_seed(config.seed, 0, 0))
    marks = [synced(settings.device)]
    prompts, pairs, _ = roll_out(run, TrainState(0, 0, {}))
    marks.append(synced(settings.device))
    batch = score_batch(run, prompts, pairs)
    marks.append(synced(settings.device))
    update(run, batch)
    marks.append(synced(settings.device))
    generation, reward, step = (b - a for a, b in itertools.pairwise(marks))
    return Timing(generation, reward, step, marks[-1] - marks[0],
                  int(pairs.response_mask.sum()))


def synced(device: str) -> float:
    """``time.perf_counter()`` once the device's queued work is done."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


# ------------------------------------------------------------------------------------- TRL


def trl_available() -> bool:
    """Whether TRL can be imported (it is installed in ``.bench-venv`` only)."""
    return importlib.util.find_spec("trl") is not None


def trl_trainer(world: World, settings: Settings, kind: str, out_dir: Path):
    """A TRL GRPO or RLOO trainer of one optimiser step over all the samples: two per prompt,
    one minibatch, no gradient accumulation, ``beta=0`` (no reference model, as REBEL),
    float32, no gradient checkpointing (both TRL defaults on) and no dropout, as drosim."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config_class, trainer_class = {"grpo": (GRPOConfig, GRPOTrainer),
                                   "rloo": (RLOOConfig, RLOOTrainer)}[kind]
    args = config_class(
        output_dir=str(out_dir), per_device_train_batch_size=settings.samples,
        gradient_accumulation_steps=1, num_generations=2,
        max_completion_length=settings.new_tokens, max_steps=1, learning_rate=settings.lr,
        weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="constant", beta=0.0,
        temperature=1.0, top_p=1.0, top_k=0, bf16=False, gradient_checkpointing=False,
        disable_dropout=True, use_cpu=settings.device == "cpu", use_vllm=settings.vllm,
        vllm_mode="colocate", report_to="none", save_strategy="no", logging_strategy="no",
        disable_tqdm=True, seed=settings.seed, model_init_kwargs={"dtype": "float32"},
        generation_kwargs={"min_new_tokens": settings.new_tokens})
    return trainer_class(model=str(world.policy), reward_funcs=str(world.reward), args=args,
                         train_dataset=Dataset.from_dict({"prompt": world.prompts}))


def time_trl(world: World, settings: Settings, kind: str, out_dir: Path) -> Timing:
    """One optimiser step of a fresh TRL trainer: its step from ``on_step_begin`` to
    ``on_step_end``, the time inside ``_generate`` and ``_calculate_rewards``, and the
    response tokens ``_generate`` returned."""
    from transformers import PrinterCallback, TrainerCallback

    trainer = trl_trainer(world, settings, kind, out_dir)
    spent = {"generation": 0.0, "reward": 0.0, "tokens": 0}

    def timed(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = synced(settings.device)
            result = method(*args, **kwargs)
            spent[name] += synced(settings.device) - started
            if name == "generation":  # (prompt_ids, completion_ids, ...)
                spent["tokens"] += sum(len(ids) for ids in result[1])
            return result
        return wrapper

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            spent["begin"] = synced(settings.device)

        def on_step_end(self, args, state, control, **kwargs):
            spent["total"] = synced(settings.device) - spent["begin"]

    trainer._generate = timed("generation", trainer._generate)
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
    trainer.add_callback(StepClock())
    trainer.remove_callback(PrinterCallback)  # its end-of-training summary line
    trainer.train()
    generation, reward, total = spent["generation"], spent["reward"], spent["total"]
    return Timing(generation, reward, total - generation - reward, total, spent["tokens"])


# ----------------------------------------------------------------------------------- rounds


def time_framework(world: World, settings: Settings, framework: str, out_dir: Path) -> Timing:
    """One iteration of ``framework`` (a drosim method or a TRL trainer), one CPU thread."""
    torch.set_num_threads(1)
    timing = (time_drosim if framework in DROSIM else time_trl)(
        world, settings, framework, out_dir)
    if settings.device == "cuda":
        # the timed trainer (and its vLLM engine) is garbage now: free its memory before
        # the next framework builds its own
        gc.collect()
        torch.cuda.empty_cache()
    return timing


def run_rounds(world: World, settings: Settings, folder: Path,
               log: Callable[[str], None] = print) -> dict[str, list[Timing]]:
    """The warm-up rounds (discarded), then ``settings.rounds`` timed rounds, the frameworks
    alternating within each round (their outputs under ``folder``)."""
    timings: dict[str, list[Timing]] = {name: [] for name in settings.frameworks}
    for round_index in range(settings.warmup + settings.rounds):
        timed = round_index >= settings.warmup
        for framework in settings.frameworks:
            out_dir = folder / f"{framework}-{round_index}"
            timing = time_framework(world, settings, framework, out_dir)
            if timed:
                timings[framework].append(timing)
            log(f"round {round_index}{'' if timed else ' (warm-up)'} {framework}: "
                f"{timing.total_s:.2f} s")
    return timings


# ---------------------------------------------------------------------------------- report


def summary_rows(timings: dict[str, list[Timing]]) -> list[dict[str, Any]]:
    """Per framework: each phase's median over the rounds, the best total, tokens/s (of the
    median total) and the median total over TRL GRPO's (when GRPO ran)."""
    medians = {name: {key: statistics.median(getattr(t, key) for t in rounds)
                      for key in ("generation_s", "reward_s", "update_s", "total_s", "tokens")}
               for name, rounds in timings.items()}
    grpo = medians.get("grpo", {}).get("total_s")
    return [{"framework": framework_label(name), **m,
             "best_total_s": min(t.total_s for t in timings[name]),
             "tokens_per_s": m["tokens"] / m["total_s"],
             "over_grpo": m["total_s"] / grpo if grpo else float("nan")}
            for name, m in medians.items()]


def framework_label(name: str) -> str:
    """The table's name of a framework."""
    return f"drosim {name}" if name in DROSIM else f"TRL {name.upper()}"


COLUMNS = (("framework", "framework", "{}"), ("generation_s", "generation s", "{:.2f}"),
           ("reward_s", "reward s", "{:.3f}"), ("update_s", "update s", "{:.2f}"),
           ("total_s", "total s", "{:.2f}"), ("best_total_s", "best total s", "{:.2f}"),
           ("tokens", "tokens", "{:.0f}"), ("tokens_per_s", "tokens/s", "{:.0f}"),
           ("over_grpo", "total / GRPO", "{:.2f}"))


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (NaN as ``n/a``).

    Example:
        >>> row = dict.fromkeys([key for key, _, _ in COLUMNS], 1.0) | {"framework": "x"}
        >>> to_markdown([row]).splitlines()[2].startswith("| x | 1.00 |")
        True
    """
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = ["n/a" if isinstance(row[key], float) and row[key] != row[key]
                 else fmt.format(row[key]) for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(timings: dict[str, list[Timing]]) -> str:
    """The issue's target: drosim REBEL's median total at most 0.8x TRL GRPO's; with the
    ratio of each round's two totals (run next to each other, they share the machine's load
    more than the medians do)."""
    if not {"rebel", "grpo"} <= timings.keys():
        return "Target (drosim REBEL <= 0.8x TRL GRPO): not measured (both must run)."
    ratio = (statistics.median(t.total_s for t in timings["rebel"])
             / statistics.median(t.total_s for t in timings["grpo"]))
    paired = [ours.total_s / grpo.total_s
              for ours, grpo in zip(timings["rebel"], timings["grpo"], strict=True)]
    return (f"Target: drosim REBEL's whole iteration <= {TARGET}x TRL GRPO's: "
            f"**{ratio:.2f}x, {'PASS' if ratio <= TARGET else 'FAIL'}** (ratio of the "
            f"medians; each round's ratio: {', '.join(f'{r:.2f}' for r in paired)}, median "
            f"{statistics.median(paired):.2f}).")


def report(timings: dict[str, list[Timing]], settings: Settings, vocab: int, command: str,
           versions: dict[str, str], load: tuple[float, float]) -> str:
    """The results file: the command, the setting, the table, the verdict and the notes.
    ``load``: the machine's 1-minute load average before and after the rounds."""
    rows = summary_rows(timings)
    keys = optional_keys(settings)
    setting = (f"{settings.prompts} prompts x 2 samples, {settings.new_tokens} new tokens "
               f"(min_new_tokens = max_new_tokens: every response is full length in both), "
               f"random GPT-2 policy and reward model ({settings.n_layer} layers, n_embd "
               f"{settings.n_embd}, BPE vocabulary {vocab}), float32, one AdamW step "
               f"over all {settings.samples} samples (one minibatch), lr {settings.lr}, "
               f"{torch.get_num_threads()} thread(s), device {settings.device}"
               f"{', vLLM rollouts' if settings.vllm else ''}.")
    return "\n".join([
        "# One online iteration: drosim-llm vs TRL",
        "", "```", command, "```", "",
        setting,
        f"Versions: {', '.join(f'{k} {v}' for k, v in versions.items())}. drosim keys set: "
        f"{keys or 'none'}; the others at drosim's defaults (reward_batch_size included).",
        f"Median of {settings.rounds} timed rounds (after {settings.warmup} warm-up round), "
        "frameworks alternating in each round, each from a fresh trainer; each column is its "
        "own median, so the phases need not add up to the total exactly. `best total s`: "
        "the fastest round. tokens/s: generated tokens per second of the whole iteration. "
        f"Load average before / after: {load[0]:.1f} / {load[1]:.1f} on {os.cpu_count()} "
        "CPUs (above 1, other processes shared the machine and the rounds vary with them).",
        "", to_markdown(rows), "", verdict(timings), "", gap_notes(rows, settings), ""])


PHASES = {
    "generation_s": (
        "generation", "both sample with transformers' `generate` over the same {samples} rows "
        "(KV cache, top_k 0, top_p 1, temperature 1, min = max new tokens), so the model work "
        "is equal; around it TRL tokenises the prompts, "
        "cuts every row at its first EOS into Python lists and decodes the completions, "
        "drosim renders the prompts and builds the pairs' masks as tensors"),
    "reward_s": (
        "reward", "both decode the responses, join them to their prompts, re-tokenise and run "
        "the same classifier, TRL in one right-padded batch of all the texts, drosim in "
        "`reward_batch_size` batches sorted by length (its default: the fastest batch on one "
        "CPU thread, bench/results/reward_batch_cpu.md), which pad less"),
    "update_s": (
        "update", "TRL (beta 0 and one step per generation: no reference or old-policy "
        "forward) runs one forward with gradients over the padded prompt + completion rows "
        "with logits at the completion positions only (`logits_to_keep`), then, in its loss "
        "(TRL 1.16, `_get_per_token_logps_and_entropies` with `compute_entropy=True`), "
        "divides the logits by the temperature (a copy), takes each position's log-sum-exp "
        "and the per-token entropy, a full softmax over the vocabulary kept for the backward; "
        "then backward, clipping and AdamW. drosim REBEL's forward packs the pairs' real "
        "tokens (`packing`), runs the LM head on the response positions only, and takes each "
        "position's log-probability a chunk of rows at a time (one log-sum-exp and a gather, "
        "saving only the logits for the backward, which recomputes the softmax a chunk at a "
        "time); log pi_t of the iteration's single minibatch is read from that same forward "
        "(no extra forward); the robust weights are a few tensor operations on {pairs} "
        "losses. The vocabulary sets the gap: at GPT-2's 50257 tokens the per-position "
        "softmax work dominates TRL's update; with a tiny vocabulary (`--vocab 2048`) both "
        "updates are the same transformer forward and backward"),
}


def gap_notes(rows: list[dict[str, Any]], settings: Settings) -> str:
    """The paragraph explaining each phase's gap between drosim REBEL and TRL GRPO, with the
    measured medians, and the bound generation and reward put on the ratio."""
    by_name = {row["framework"]: row for row in rows}
    ours, grpo = by_name.get(framework_label("rebel")), by_name.get(framework_label("grpo"))
    if ours is None or grpo is None:
        return ""
    lines = ["## Each phase's gap explained (drosim REBEL minus TRL GRPO, medians)", ""]
    for key, (name, why) in PHASES.items():
        lines.append(f"* **{name}**: {ours[key]:.2f} s vs {grpo[key]:.2f} s "
                     f"({ours[key] - grpo[key]:+.2f} s): "
                     f"{why.format(samples=settings.samples, pairs=settings.prompts)}.")
    shared = ours["generation_s"] + ours["reward_s"]
    budget = TARGET * grpo["total_s"] - shared
    lines += ["", f"Generation and reward, the same transformers calls in both, take "
              f"{shared:.2f} s of drosim's iteration: an update of zero seconds would leave "
              f"drosim at {shared / grpo['total_s']:.2f}x GRPO's {grpo['total_s']:.2f} s. "
              + (f"The {TARGET}x target leaves drosim's update at most {budget:.2f} s (it took "
                 f"{ours['update_s']:.2f} s)." if budget > 0 else
                 f"The {TARGET}x target is out of reach of a faster update alone: it needs "
                 "less time around the shared calls or a faster generation / reward phase.")]
    return "\n".join(lines)


def versions() -> dict[str, str]:
    """The versions of the frameworks that ran."""
    import transformers

    found = {"torch": torch.__version__, "transformers": transformers.__version__}
    if trl_available():
        import trl

        found["trl"] = trl.__version__
    return found


# ------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str]) -> tuple[Settings, Path]:
    """The settings and the output folder of a command line.

    Raises:
        SystemExit: (argparse) an unknown framework, CUDA asked for where there is none.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                        help=f"comma-separated, of {', '.join(FRAMEWORKS)}")
    parser.add_argument("--rounds", type=int, default=Settings.rounds)
    parser.add_argument("--quick", action="store_true", help="a tiny setting (a smoke test)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--vllm", action="store_true",
                        help="vLLM rollouts in both frameworks (CUDA only)")
    parser.add_argument("--vocab", type=int, default=Settings.vocab,
                        help="the BPE vocabulary size (default: GPT-2's, %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    frameworks = tuple(name for name in args.frameworks.split(",") if name)
    unknown = sorted(set(frameworks) - set(FRAMEWORKS))
    if unknown or not frameworks:
        parser.error(f"--frameworks: unknown {unknown}; choose from {', '.join(FRAMEWORKS)}")
    if (args.device == "cuda" or args.vllm) and not torch.cuda.is_available():
        parser.error("--device cuda / --vllm need a CUDA device, and this torch has none")
    if args.vllm and args.device != "cuda":
        parser.error("--vllm needs --device cuda")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.vocab < 300:
        parser.error(f"--vocab must be >= 300 (the byte alphabet and specials), got {args.vocab}")
    settings = Settings(**({"vocab": args.vocab} | (QUICK if args.quick else {})))
    settings = dataclasses.replace(settings, frameworks=frameworks, device=args.device,
                                   vllm=args.vllm,
                                   rounds=args.rounds if not args.quick else settings.rounds)
    return settings, args.out_dir


def main(argv: Sequence[str] | None = None) -> int:
    """Run the rounds, print the table and write ``iteration_<device>[_quick].md``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    settings, out_dir = parse_args(argv)
    if set(settings.frameworks) & set(TRL) and not trl_available():
        print("bench_iteration: TRL is not importable here: run bench/iteration_env.sh and "
              "use .bench-venv/bin/python (or pass --frameworks rebel,chi2-rebel)",
              file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # transformers' deprecation notes about the arguments TRL's configs pass on
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    if settings.vllm:
        # TRL's colocated vLLM runs as rank 0 of a one-process torch.distributed job
        for key, value in VLLM_ENV.items():
            os.environ.setdefault(key, value)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_iteration_") as folder:
        world = write_world(Path(folder) / "world", settings)
        timings = run_rounds(world, settings, Path(folder))
    command = " ".join(["OMP_NUM_THREADS=1", ".bench-venv/bin/python",
                        "bench/bench_iteration.py", *map(shlex.quote, argv)])
    text = report(timings, settings, world.vocab, command, versions(),
                  (load_before, os.getloadavg()[0]))
    print(text)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"iteration_{settings.device}{'_vllm' if settings.vllm else ''}"
    if settings.vocab != Settings.vocab and "--quick" not in argv:
        name += f"_vocab{settings.vocab}"
    (out_dir / f"{name}{'_quick' if '--quick' in argv else ''}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
