"""The online DRO-REBEL training loop, as a recipe of small steps.

    train(config)
      prepare_out_dir      refuse, before anything is written, what cannot work (sources,
                           damaged model folders) and an earlier run's out_dir (unless
                           resume / overwrite); check_resume: a resume may change only
                           RESUME_MAY_CHANGE; the prompts are read
      claimed_out_dir      create out_dir and lock it for the whole run (one writer)
      set_up               process group, device, policy, reference, rewards, optimiser; the
                           prompts must fit the policy (check_prompts_fit); a run that fails
                           here removes what it created
      resume_from          the newest intact checkpoint (with --resume); only now does
                           --overwrite delete the earlier run's outputs
      for each iteration t:
        roll_out           the next pairs_per_iteration prompts (this rank's share); the
                           rollout engine syncs pi_t's weights and samples two responses
                           per prompt
        score_batch        rewards under every objective, mixed by the training mixture
                           (a random minority_fraction of the pairs: by the minority
                           mixture)
        update             `epochs` passes of minibatch updates (drosim.llm.components.update), the
                           ambiguity set around each minibatch or, with
                           robust_scope=iteration, around all of the iteration's pairs
        evaluate           every `eval_every` iterations: held-out prompts (split over the
                           ranks), mixture grid, win rates against the initial policy
        save_checkpoint    every `checkpoint_every` iterations, and on SIGTERM / SIGINT
      finish               the final policy and tokenizer in <out_dir>/final

Metrics go to ``<out_dir>/metrics.jsonl`` (and TensorBoard when asked and installed). A signal
lets the loop finish its iteration, save, and exit. ``resume=True`` restarts from the latest
checkpoint: weights, optimiser, scheduler, iteration and data position are restored and every
iteration draws its randomness from a seed of (run, rank, iteration), so on CPU a resumed run
ends with the same bits as an uninterrupted one. Under ``torchrun`` every rank samples its own
share of the prompts and the robust objective is global over ranks (see
:mod:`drosim.llm.components.objective`); whatever is written once per run is written by rank 0 while
the others wait. With ``sharding: fsdp2`` the policy and reference are sharded over the ranks
(:mod:`drosim.llm.components.sharding`): every forward is then a collective, and checkpoints are
written by all ranks together. Evaluation splits the held-out prompts over the ranks.

The process group, devices, seeds, signals, metrics file and collectives are the runtime's
(:mod:`drosim.llm.components.runtime`); ``model: demo`` is built by
:mod:`drosim.llm.components.demo_world`, so the trainer never imports the demo that calls it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import pickle
import shutil
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm.auto import tqdm

from drosim.llm.components.batch import PairBatch
from drosim.llm.components.checkpoint import (
    CorruptCheckpointError,
    TrainState,
    check_model_folder,
    checkpoints_newest_first,
    load_checkpoint,
    save_checkpoint,
)
from drosim.llm.components.config import (
    TrainConfig,
    check_token_ids,
    config_method,
    config_to_dict,
    load_config,
    save_config,
    validate_config,
)
from drosim.llm.components.data import Prompt, PromptStream, load_prompts, prompt_text
from drosim.llm.components.evaluation import (
    engine_scores,
    gather_scores,
    mixture_report,
    prompt_shard,
)
from drosim.llm.components.logprobs import packing_refusal, sequence_logprobs
from drosim.llm.components.lora import apply_lora, causal_lm, reference_model
from drosim.llm.components.methods import Method
from drosim.llm.components.objective import IterationLosses
from drosim.llm.components.rewards import (
    NormalizedReward,
    RewardModel,
    SequenceClassifierReward,
    WordListReward,
    mixture_weights,
    refuse_untrusted_code,
    score,
)
from drosim.llm.components.rollout import (
    SampledPairs,
    check_prompt_lengths,
    disable_dropout,
    render_prompts,
    warn_truncated,
)
from drosim.llm.components.rollout_engines import (
    RolloutEngine,
    check_rollout_engine,
    make_rollout_engine,
)
from drosim.llm.components.runtime import (
    Distributed,
    MetricsLog,
    StopFlag,
    global_sums,
    init_distributed,
    iteration_seed,
    resolve_device,
    seed_everything,
    use_device,
)
from drosim.llm.components.sharding import is_sharded, shard_policy
from drosim.llm.components.update import (
    StepStats,
    maybe_compile,
    record_sampling_logprobs,
    update_step,
)
from drosim.llm.recipes.export import FINAL_DIR, load_pretrained_policy, write_pretrained
from drosim.output import OutputError, ensure_writable, locked

EVAL_SEED = 1234
DEMO_TRAIN_PROMPT_SEED, DEMO_EVAL_PROMPT_SEED = 1, 2
# What a run writes into its out_dir (a cached base model, base/, is not a run's output).
INITIAL_EVAL_FILE = "eval_initial.pt"  # the initial policy's evaluation scores (win rates)
RESUMES_FILE = "resumes.jsonl"  # one line per --resume: where it resumed, what it changed
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "checkpoints", "final", "tensorboard",
               INITIAL_EVAL_FILE, RESUMES_FILE)
# The keys naming what a run reads: saved as absolute paths when they are local paths, so
# that a resume or an export does not depend on the folder it is started from.
SOURCE_KEYS = ("model", "tokenizer", "reward", "prompts", "eval_prompts")
# The keys a --resume may change. They say how long the run goes on, how often it evaluates
# and saves, how it reports, and where or with how much memory it runs: none of them changes
# what the remaining iterations compute from the checkpoint (out_dir is the same folder,
# perhaps spelled another way). Every other key (method, radii, model, tokenizer, reward,
# prompts, seeds, lr, batch shape, ...) defines the run: a resume changing one would continue
# the checkpoint as another run, so it is refused.
RESUME_MAY_CHANGE = frozenset({
    "iterations", "eval_every", "checkpoint_every", "progress", "tensorboard", "device",
    "gradient_checkpointing", "vllm_gpu_memory_utilization", "trust_remote_code", "out_dir",
})


# ---------------------------------------------------------------------------- models, data


@contextlib.contextmanager
def named_source(key: str, source: str):
    """Prefix an ``OSError`` of loading ``source`` with the config key and whether it was
    read as a local folder or a hub name (``transformers`` says only that the hub was
    unreachable when a relative path such as ``models/sft`` does not exist)."""
    try:
        yield
    except OSError as error:
        where = "local folder" if Path(source).expanduser().exists() else (
            "not a local folder, so read as a hub name")
        raise OSError(f"{key}={source!r} ({where}): {error}") from error


def load_policy(config: TrainConfig, out_dir: Path, world: Distributed | None = None):
    """The initial policy and its tokenizer: ``model="demo"`` builds (once, cached in
    ``out_dir/base``, by the main rank while the others wait) the offline demo's
    pre-trained tiny GPT-2; anything else is passed to ``from_pretrained`` (a local
    directory or a hub name)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    source = config.model
    if source == "demo":
        # imported here: the demo world needs transformers' tokenizer training, which a
        # run on a real model never loads
        from drosim.llm.components.demo_world import build_demo_base

        world = world or Distributed()
        if world.is_main:
            build_demo_base(out_dir / "base", seed=config.seed)
        world.barrier()
        source = str(out_dir / "base")
    with named_source("model", source):
        return load_pretrained_policy(source, tokenizer=config.tokenizer,
                                      trust_remote_code=config.trust_remote_code,
                                      dtype=config.dtype,
                                      attn_implementation=config.attn_implementation)


def load_reward_model(config: TrainConfig, device: str) -> RewardModel:
    """The demo's word-list reward, or a ``transformers`` reward model read with the config's
    ``trust_remote_code``, ``reward_output``, ``reward_heads``, ``reward_dtype``,
    ``reward_max_length`` and ``reward_batch_size`` (and transformers' default attention
    kernel); either one with the fixed ``reward_normalization`` when given. The one model
    scores the training pairs and the evaluations."""
    if config.reward == "demo":
        from drosim.llm.components.demo_world import OBJECTIVES

        reward_model: RewardModel = WordListReward(OBJECTIVES)
    else:
        dtype = None if config.reward_dtype == "auto" else getattr(torch, config.reward_dtype)
        with named_source("reward", config.reward):
            reward_model = SequenceClassifierReward(
                config.reward, device=device, trust_remote_code=config.trust_remote_code,
                output=config.reward_output, heads=config.reward_heads, dtype=dtype,
                max_length=config.reward_max_length, batch_size=config.reward_batch_size)
    if config.reward_normalization:
        reward_model = NormalizedReward(reward_model, config.reward_normalization)
    return reward_model


def score_pairs(reward_model: RewardModel, prompts: list[str], pairs: SampledPairs
                ) -> torch.Tensor:
    """``(n, 2, objectives)`` scores of the sampled pairs."""
    flat = score(reward_model, [p for p in prompts for _ in range(2)],
                 [r for pair in pairs.responses for r in pair])
    return flat.view(len(prompts), 2, -1)


# --------------------------------------------------------------------------------- the steps


def check_sources(config: TrainConfig) -> None:
    """Refuse, before anything is written, what cannot work: sharding outside ``torchrun``,
    a CUDA device on a torch without CUDA, a model, tokenizer or reward model given as a
    local path (absolute, or starting with ``.`` or ``~``) that does not exist, and a local
    model folder with custom code (``auto_map``) without ``trust_remote_code``, and a prompt
    source that names a local file (a path, or a name with a suffix) that does not exist, and
    ``rollout_engine=vllm`` without vLLM or without CUDA. (A hub name is looked up by
    ``from_pretrained`` or ``load_dataset`` itself.)

    Raises:
        ValueError: naming the key and what is wrong.
    """
    if config.sharding == "fsdp2" and "MASTER_ADDR" not in os.environ:
        raise ValueError("sharding=fsdp2 shards over the ranks of a torchrun job: launch "
                         "with torchrun --nproc-per-node N, or use sharding=none")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda, but this torch build has no CUDA device "
                         f"(torch {torch.__version__}): use device=cpu or device=auto")
    for key in ("model", "tokenizer", "reward"):
        source = getattr(config, key)
        if not source or source == "demo":
            continue
        if source.startswith(("/", ".", "~")) and not Path(source).expanduser().exists():
            raise ValueError(f"{key}={source!r}: no such file or directory")
        refuse_untrusted_code(key, source, trust_remote_code=config.trust_remote_code)
    for key in ("prompts", "eval_prompts"):
        source = getattr(config, key)
        path = Path(source).expanduser()
        # a hub dataset name ("org/name") has neither a leading "/", ".", "~" nor a suffix
        looks_local = source.startswith(("/", ".", "~")) or path.suffix
        if source != "demo" and looks_local and not path.exists():
            raise ValueError(f"{key}={source!r}: no such file or directory")
    check_rollout_engine(config)


def previous_run(out_dir: Path) -> list[str]:
    """The outputs of an earlier run found in ``out_dir``."""
    return [name for name in RUN_OUTPUTS if (out_dir / name).exists()]


def absolute_sources(config: TrainConfig) -> TrainConfig:
    """``config`` with each of :data:`SOURCE_KEYS` that names an existing local path made
    absolute (relative to the current folder); hub names and ``demo`` are kept as given.

    Example:
        >>> absolute_sources(TrainConfig(model="demo", reward="org/rm")).reward
        'org/rm'
    """
    changes = {}
    for key in SOURCE_KEYS:
        source = getattr(config, key)
        if source and source != "demo" and Path(source).expanduser().exists():
            changes[key] = os.path.abspath(Path(source).expanduser())
    return replace(config, **changes)


def saved_config_changes(config: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """How ``config`` differs from the configuration saved in its ``out_dir``:
    ``{key: (saved, requested)}``, empty when nothing is saved there. Local paths are
    compared as absolute paths on both sides (:func:`absolute_sources`).

    Raises:
        ValueError: a saved ``config.yaml`` that cannot be read.
    """
    saved_file = Path(config.out_dir) / "config.yaml"
    if not saved_file.is_file():
        return {}
    try:
        saved = load_config(saved_file)
    except (ValueError, OSError) as error:
        raise ValueError(f"cannot read the saved configuration {saved_file} ({error}): the "
                         "run cannot be checked or continued; start a new run") from None
    before = config_to_dict(absolute_sources(saved))
    now = config_to_dict(absolute_sources(config))
    return {key: (before.get(key), value) for key, value in now.items()
            if before.get(key) != value}


def check_resume(config: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Refuse a ``--resume`` that changes what the saved run is; returns the changes it may
    make (:data:`RESUME_MAY_CHANGE`), ``{key: (saved, requested)}``.

    Raises:
        ValueError: listing every refused change as ``key: saved -> requested``.
    """
    changes = saved_config_changes(config)
    refused = [f"{key}: {saved!r} -> {requested!r}"
               for key, (saved, requested) in changes.items() if key not in RESUME_MAY_CHANGE]
    if refused:
        raise ValueError(f"--resume: {config.out_dir} holds a run of another configuration "
                         f"({'; '.join(refused)}): resume with its saved values or start a "
                         "new run (another out_dir, or --overwrite)")
    return changes


def check_model_folders(config: TrainConfig) -> None:
    """Refuse a damaged local model, tokenizer or reward folder
    (:func:`drosim.llm.components.checkpoint.check_model_folder`) before anything is written.

    Raises:
        ValueError: naming the key, the file and what is wrong.
    """
    for key in ("model", "tokenizer", "reward"):
        source = getattr(config, key)
        if source and source != "demo":
            check_model_folder(key, source)


def prepare_out_dir(config: TrainConfig, *, resume: bool, overwrite: bool) -> list[str]:
    """Check, before any rank joins the process group or anything is written, that the run
    may use its ``out_dir``; returns the earlier run's outputs found there.

    Raises:
        ValueError: a source that cannot work (:func:`check_sources`), a damaged local
            model folder (:func:`check_model_folders`), or an ``out_dir`` holding an earlier
            run without ``resume`` or ``overwrite``.
    """
    out_dir = Path(config.out_dir)
    check_sources(config)
    check_model_folders(config)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"cannot write to the output folder {out_dir}: not a folder")
    found = previous_run(out_dir)
    if found and not (resume or overwrite):
        raise ValueError(f"out_dir {out_dir} holds an earlier run ({', '.join(found)}): pass "
                         "--resume to continue it, --overwrite to replace it, or choose "
                         "another out_dir")
    return found


def load_run_prompts(config: TrainConfig) -> tuple[list[Prompt], list[Prompt]]:
    """The training prompts and the held-out prompts the run evaluates on (read before
    anything is written, so that a bad row is refused first)."""
    prompts = load_prompts(config.prompts, field=config.prompt_field, split=config.prompt_split,
                           demo_seed=DEMO_TRAIN_PROMPT_SEED)
    eval_prompts = load_prompts(config.eval_prompts, field=config.prompt_field,
                                split=config.eval_prompt_split or config.prompt_split,
                                demo_seed=DEMO_EVAL_PROMPT_SEED)
    return prompts, eval_prompts[:config.num_eval_prompts]


def check_prompts_fit(config: TrainConfig, policy: nn.Module, tokenizer,
                      prompts: list[Prompt]) -> None:
    """Refuse, before the run writes anything, prompts that the policy cannot be sampled on:
    ``chat_template=true`` (or a conversation) without a chat template, a prompt whose
    tokens plus ``max_new_tokens`` exceed the policy's positions, and ``stop_token_ids``
    outside the tokenizer's vocabulary.

    Raises:
        ValueError: from :func:`drosim.llm.components.rollout.render_prompts`,
            :func:`drosim.llm.components.rollout.check_prompt_lengths` (naming the prompt) and
            :func:`drosim.llm.components.config.check_token_ids`.
    """
    # len(tokenizer), not the embedding's rows: those are often padded past the real tokens
    check_token_ids(config, len(tokenizer))
    tokens, _ = render_prompts(tokenizer, prompts, chat_template=config.chat_template,
                               max_prompt_tokens=config.max_prompt_tokens)
    positions = getattr(getattr(policy, "config", None), "max_position_embeddings", None)
    check_prompt_lengths([prompt_text(p) for p in prompts], [len(t) for t in tokens],
                         config.max_new_tokens, positions)


@contextlib.contextmanager
def claimed_out_dir(out_dir: Path, world: Distributed):
    """Rank 0 creates ``out_dir`` and holds its lock (:func:`drosim.output.locked`) for the
    block: one writer per run. The other ranks learn whether rank 0 got it, and fail too if
    not.

    Raises:
        OutputError: the folder cannot be written, or another process holds it (rank 0's
            message names its pid).
    """
    with contextlib.ExitStack() as stack:
        refusal = None
        if world.is_main:
            try:
                ensure_writable(out_dir)
                stack.enter_context(locked(out_dir))
            except OutputError as error:
                refusal = error
        if world.largest(int(refusal is not None)):
            raise refusal or OutputError(f"{out_dir} could not be claimed by rank 0")
        yield


def out_dir_entries(out_dir: Path) -> set[str] | None:
    """The names in ``out_dir``, or None when it does not exist."""
    return {path.name for path in out_dir.iterdir()} if out_dir.is_dir() else None


@contextlib.contextmanager
def undone_on_failure(out_dir: Path, before: set[str] | None, world: Distributed):
    """If the block fails (a run that cannot start), rank 0 removes what the run created in
    ``out_dir``: the folder itself when it was new (``before`` None), else the entries not
    in ``before`` (the demo base, the lock file), so that the refusal leaves no trace."""
    try:
        yield
    except BaseException:
        if world.is_main:
            if before is None:
                shutil.rmtree(out_dir, ignore_errors=True)
            else:
                for name in out_dir_entries(out_dir) - before:
                    remove_path(out_dir / name)
        raise


def remove_path(path: Path) -> None:
    """Delete a file or a folder tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@dataclass
class Run:
    """Everything a run sets up once and its steps share."""

    config: TrainConfig
    out_dir: Path
    world: Distributed
    device: str
    method: Method
    policy: nn.Module
    # what the update calls: the policy, or its torch.compile wrapper (same parameters)
    update_policy: nn.Module
    tokenizer: Any
    # the frozen initial policy of the DPO-type methods (None under LoRA: the adapter is
    # disabled instead, see drosim.llm.components.lora.reference_model)
    reference: nn.Module | None
    reward_model: RewardModel
    alpha: torch.Tensor  # (objectives,) training mixture weights
    stream: PromptStream
    eval_prompts: list[Prompt]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    engine: RolloutEngine  # samples the training pairs and the evaluation's
    # (objectives,) weights of the minority's mixture; None: every pair uses alpha
    minority_alpha: torch.Tensor | None = None
    packing: bool = False  # whether the update's forwards are packed (update_packing)

    @property
    def local_pairs(self) -> int:
        return self.config.pairs_per_iteration // self.world.world_size

    @property
    def local_minibatch(self) -> int:
        return self.config.minibatch_size // self.world.world_size


def set_up(config: TrainConfig, world: Distributed,
           prompts: tuple[list[Prompt], list[Prompt]] | None = None,
           method: Method | None = None) -> Run:
    """Device, method (``method``: the one :func:`validate_config` built, else
    :func:`config_method`), policy (dropout off; LoRA adapters with ``lora_rank``), reference
    (none under LoRA), reward model, prompts (``prompts``: the training and held-out ones
    read already, else :func:`load_run_prompts`), optimiser (of the trained parameters),
    rollout engine.

    Raises:
        ValueError: pairs or minibatches that do not split evenly over the ranks, or
            ``lora_target_modules`` that name no module of the policy.
    """
    out_dir = Path(config.out_dir)
    device = use_device(config.device, world)
    if config.pairs_per_iteration % world.world_size or config.minibatch_size % world.world_size:
        raise ValueError(f"pairs_per_iteration ({config.pairs_per_iteration}) and "
                         f"minibatch_size ({config.minibatch_size}) must be multiples of the "
                         f"{world.world_size} ranks")
    method = config_method(config) if method is None else method
    seed_everything(config.seed)
    policy, tokenizer = load_policy(config, out_dir, world)
    policy.to(device)
    disable_dropout(policy)
    reference = None
    if config.lora_rank is not None:
        # After disable_dropout: the adapters keep lora_dropout (validate_config allows it
        # only where no forward must be repeated exactly). The reference is the policy with
        # its adapter disabled (reference_model): no frozen copy.
        policy = apply_lora(policy, rank=config.lora_rank, alpha=config.lora_alpha,
                            dropout=config.lora_dropout,
                            target_modules=config.lora_target_modules)
    elif method.pointwise != "rebel":
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if config.gradient_checkpointing:
        policy.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.sharding == "fsdp2":
        mixed_precision = torch.bfloat16 if config.bf16 else None
        shard_policy(policy, mixed_precision=mixed_precision)
        # The reference is sharded too: a replicated copy would hold the whole model on
        # every rank, the memory sharding exists to save; its forward only gathers blocks.
        if reference is not None:
            shard_policy(reference, mixed_precision=mixed_precision)
    policy.train()
    reward_model = load_reward_model(config, device)
    alpha = mixture_weights(reward_model.objectives, config.train_mixture).to(device)
    minority_alpha = None if config.minority_mixture is None else mixture_weights(
        reward_model.objectives, config.minority_mixture).to(device)
    train_prompts, eval_prompts = prompts or load_run_prompts(config)
    stream = PromptStream(train_prompts, seed=config.seed)
    # the trained parameters only: all of them, or a LoRA policy's adapters
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad],
                                  lr=config.lr, weight_decay=config.weight_decay)
    warmup = config.warmup_iterations
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: min(1.0, (it + 1) / warmup) if warmup else 1.0)
    update_policy = maybe_compile(causal_lm(policy), config.compile)
    return Run(config, out_dir, world, device, method, policy, update_policy, tokenizer,
               reference, reward_model, alpha, stream, eval_prompts,
               optimizer, scheduler, make_rollout_engine(config, policy, tokenizer, device),
               minority_alpha, update_packing(config, update_policy, world))


def resume_from(run: Run) -> TrainState | None:
    """Load the newest intact checkpoint of the run's out_dir into the run; ``None`` when
    there is none (a damaged one is skipped with a warning: nothing is loaded from it)."""
    for candidate in checkpoints_newest_first(run.out_dir):
        try:
            return load_checkpoint(candidate, model=run.policy, optimizer=run.optimizer,
                                   scheduler=run.scheduler, map_location=run.device)
        except (CorruptCheckpointError, FileNotFoundError) as error:
            if run.world.is_main:
                print(f"drosim-llm: warning: {error}; trying the one before it",
                      file=sys.stderr)
    if run.world.is_main:
        print(f"drosim-llm: no intact checkpoint in {run.out_dir / 'checkpoints'}: --resume "
              "starts the run from scratch", file=sys.stderr)
    return None


def roll_out(run: Run, state: TrainState) -> tuple[list[str], SampledPairs, float]:
    """This rank's share of the iteration's prompts, two responses sampled for each by the
    run's engine (its weights synced to the policy first), and the seconds sampling took.

    The prompts returned are those the reward model is given: the original text of each
    (a conversation's last user message), not its chat rendering or truncation."""
    prompts = run.stream.take(state.data_position, run.config.pairs_per_iteration)
    prompts = prompts[run.world.rank * run.local_pairs:(run.world.rank + 1) * run.local_pairs]
    run.policy.eval()
    run.engine.sync_weights(run.policy)
    started = time.perf_counter()
    pairs = run.engine.sample(prompts)
    if run.device.startswith("cuda"):
        torch.cuda.synchronize(run.device)  # the time of the tokens, not of their launch
    seconds = time.perf_counter() - started
    run.policy.train()
    warn_truncated(pairs.truncated, len(prompts), f"iteration at prompt {state.data_position}",
                   run.config.max_prompt_tokens)
    return [prompt_text(p) for p in prompts], pairs, seconds


def local_minority_pairs(config: TrainConfig, world: Distributed) -> int:
    """How many of this rank's pairs the minority scores each iteration.

    Over all ranks they are ``round(minority_fraction * pairs_per_iteration)`` (Python's
    round), dealt out as evenly as integers allow: every rank gets ``total // world_size``
    and the first ``total % world_size`` ranks one more."""
    total = round(config.minority_fraction * config.pairs_per_iteration)
    return total // world.world_size + int(world.rank < total % world.world_size)


def minority_rows(run: Run) -> torch.Tensor:
    """``(local_pairs,)`` bool: this rank's pairs the minority scores, drawn from the
    iteration's global torch RNG (seeded per run, rank and iteration, so a resumed run draws
    the same rows)."""
    rows = torch.zeros(run.local_pairs, dtype=torch.bool)
    rows[torch.randperm(run.local_pairs)[:local_minority_pairs(run.config, run.world)]] = True
    return rows.to(run.device)


def score_batch(run: Run, prompts: list[str], pairs: SampledPairs) -> PairBatch:
    """The pairs as a training batch: mixed rewards, and the reference's log-probabilities
    for the DPO-type methods (pi_t's are recorded by :func:`update`); a LoRA policy's
    reference is itself with its adapter disabled.

    Rewards mix the objectives by the training mixture, except on the minority's rows
    (:func:`minority_rows`), mixed by the minority's: annotators who weigh the objectives
    differently, the run's methods not told which pairs are theirs."""
    scores = score_pairs(run.reward_model, prompts, pairs).to(run.device)
    rewards = scores @ run.alpha
    if run.minority_alpha is not None:  # drawn only then: a run without one is unchanged
        rewards = torch.where(minority_rows(run)[:, None], scores @ run.minority_alpha, rewards)
    reference_logprobs = None
    if run.method.pointwise != "rebel":
        with torch.no_grad(), reference_model(run.policy, run.reference) as reference:
            reference_logprobs = sequence_logprobs(
                reference, pairs.input_ids.flatten(0, 1), pairs.attention_mask.flatten(0, 1),
                pairs.response_mask.flatten(0, 1)).logprobs.view(-1, 2)
    return PairBatch(pairs.input_ids, pairs.attention_mask, pairs.response_mask, None,
                     rewards, reference_logprobs)


def update(run: Run, batch: PairBatch) -> list[StepStats]:
    """``epochs`` passes over the batch in random minibatches, one optimiser step each.

    Before the first step ``robust_scope=iteration`` fills its loss cache
    (:func:`start_iteration`), and a REBEL-type method records log pi_t
    (:func:`pending_sampling_logprobs`; the first minibatch's comes from its own step's
    forward, at theta_t). Each step of the iteration scope weighs its minibatch by the worst
    case over the whole cache (:class:`IterationLosses`), which lives for this iteration's
    epochs only (nothing of it is checkpointed: checkpoints fall between iterations). The
    forwards are packed where :func:`update_packing` allowed (``run.packing``).
    """
    config = run.config
    autocast_dtype = torch.bfloat16 if config.bf16 else None
    packing = run.packing
    steps = []
    iteration_losses = pending = None
    for epoch in range(config.epochs):
        order = torch.randperm(run.local_pairs).to(run.device)
        if epoch == 0:
            batch, iteration_losses = start_iteration(run, batch, order, autocast_dtype,
                                                      packing)
            pending = pending_sampling_logprobs(run, batch, order, autocast_dtype, packing)
        for start in range(0, run.local_pairs, run.local_minibatch):
            rows = order[start:start + run.local_minibatch]
            aggregate = (None if iteration_losses is None
                         else partial(iteration_losses.objective, rows=rows))
            sampling_out = None if pending is None else pending.new_empty(len(rows), 2)
            steps.append(update_step(
                run.update_policy, run.optimizer, batch.select(rows), run.method,
                eta=config.eta, beta=config.beta, max_grad_norm=config.max_grad_norm,
                autocast_dtype=autocast_dtype, w_gradient=run.method.w_gradient,
                aggregate=aggregate, packing=packing, sampling_out=sampling_out))
            if sampling_out is not None:
                pending[rows] = sampling_out
                batch, pending = replace(batch, sampling_logprobs=pending), None
    run.scheduler.step()
    return steps


def update_packing(config: TrainConfig, update_policy: nn.Module, world: Distributed) -> bool:
    """Whether the update packs its forwards (decided once, by :func:`set_up`): ``packing``
    is on and the policy's attention kernel isolates packed sequences
    (:func:`drosim.llm.components.logprobs.packing_refusal`); a fallback to padded forwards
    is said in the run's log."""
    if not config.packing:
        return False
    refusal = packing_refusal(update_policy)
    if refusal is not None and world.is_main:
        print(f"drosim-llm: packing=true, but {refusal}: the update's forwards stay padded",
              file=sys.stderr)
    return refusal is None


def start_iteration(run: Run, batch: PairBatch, order: torch.Tensor,
                    autocast_dtype: torch.dtype | None, packing: bool = False
                    ) -> tuple[PairBatch, IterationLosses | None]:
    """What ``robust_scope=iteration`` needs before the iteration's first step: every pair's
    loss at theta_t, the :class:`IterationLosses` cache, from one no-grad forward of every
    pair, minibatch by minibatch in the first epoch's ``order``
    (:func:`drosim.llm.components.update.record_sampling_logprobs`). A REBEL-type method's
    log pi_t comes from the same forward (its policy term is then 0); the DPO-type methods
    pay this forward for the cache. Under ``robust_scope=minibatch``, nothing
    (:func:`pending_sampling_logprobs` records REBEL's log pi_t).

    Args:
        run: the run (its policy at theta_t).
        batch: this rank's ``(local_pairs,)`` pairs.
        order: ``(local_pairs,)`` the first epoch's permutation.
        autocast_dtype: the update's autocast dtype, or None.
        packing: whether the update's forwards are packed (the recording packs alike).

    Returns:
        The batch (with ``sampling_logprobs`` for REBEL under the iteration scope) and the
        loss cache (None for ``robust_scope=minibatch``).
    """
    if run.config.robust_scope != "iteration":
        return batch, None
    logprobs = record_sampling_logprobs(
        run.update_policy, batch, order, run.local_minibatch, method=run.method,
        autocast_dtype=autocast_dtype, w_gradient=run.method.w_gradient, packing=packing)
    if run.method.pointwise == "rebel":
        batch = replace(batch, sampling_logprobs=logprobs)
    losses = run.method.losses(logprobs, batch, eta=run.config.eta, beta=run.config.beta)
    return batch, IterationLosses(losses, run.method.spec)


def pending_sampling_logprobs(run: Run, batch: PairBatch, order: torch.Tensor,
                              autocast_dtype: torch.dtype | None, packing: bool = False
                              ) -> torch.Tensor | None:
    """A REBEL-type method's log pi_t that :func:`start_iteration` did not record, computed
    as the first epoch's updates will compute log pi_theta, so that each iteration's first
    step sees a policy term of exactly 0.

    The first minibatch is left out: its step's own forward, at theta_t, supplies its log
    pi_t (``update_step(..., sampling_out=...)``), so an iteration of one minibatch runs no
    recording forward at all.

    Returns:
        ``(local_pairs, 2)`` log pi_t, NaN on the first minibatch's rows (``order[:m]``),
        which its step fills; None when nothing is pending (a DPO-type method, or the batch
        has its log pi_t already).
    """
    if run.method.pointwise != "rebel" or batch.sampling_logprobs is not None:
        return None
    return record_sampling_logprobs(
        run.update_policy, batch, order, run.local_minibatch, method=run.method,
        autocast_dtype=autocast_dtype, w_gradient=run.method.w_gradient, packing=packing,
        skip_first=True)


def train_record(run: Run, iteration: int, batch: PairBatch, pairs: SampledPairs,
                 steps: list[StepStats], seconds: float, generation_seconds: float
                 ) -> dict[str, Any]:
    """The metrics line of one training iteration (means over its optimiser steps).

    ``generation_tokens_per_s`` is the response tokens sampled per second of sampling, summed
    over the ranks (they sample at once: the job's rate); ``generation_seconds`` is this
    rank's (rank 0's) sampling time. ``max_weight`` is the largest weight of rank 0's pairs
    over the steps. The ``robust/`` keys describe each step's worst case over its scope (the
    global minibatch, or all of the iteration's pairs), averaged over the iteration's steps:
    ``robust/dual`` (eta* or tau*; omitted for a set that solves no dual: the mean, a fixed
    temperature, a Wasserstein penalty), ``robust/max_weight`` (the largest weight q_i) and
    ``robust/effective_pairs`` (1 / sum_i q_i^2). ``update_padding_fraction`` is the
    share of padding among the token positions of the update's forwards (rank 0's; near 0
    with ``packing``).
    """
    # one all-reduce and one host sync for every count of the line, over all ranks
    reward_sum, pair_count, empty, truncated, minority, rate = global_sums([
        batch.rewards.sum(), batch.rewards.numel(), pairs.empty.sum(), pairs.truncated,
        local_minority_pairs(run.config, run.world),
        pairs.response_mask.sum() / max(generation_seconds, 1e-9)], run.device)
    return {"iteration": iteration, "kind": "train",
            "train_reward": reward_sum / pair_count,
            "objective": sum(s.objective for s in steps) / len(steps),
            "loss": sum(s.mean_loss for s in steps) / len(steps),
            "grad_norm": sum(s.grad_norm for s in steps) / len(steps),
            "max_weight": max(s.max_weight for s in steps),
            "update_padding_fraction": sum(s.padding_fraction for s in steps) / len(steps),
            **robust_record(steps),
            "empty_responses": int(empty),
            "truncated_prompts": int(truncated),
            "minority_pairs": int(minority),
            "lr": run.scheduler.get_last_lr()[0],
            "generation_tokens_per_s": rate,
            "generation_seconds": generation_seconds,
            "seconds": seconds}


def robust_record(steps: list[StepStats]) -> dict[str, float]:
    """The ``robust/`` keys of a metrics line: each diagnostic's mean over the steps
    (:class:`drosim.llm.components.objective.RobustDiagnostics`), ``robust/dual`` only where the set
    solves one."""
    record = {}
    if steps[0].robust.dual is not None:
        record["robust/dual"] = sum(s.robust.dual for s in steps) / len(steps)
    record["robust/max_weight"] = sum(s.robust.max_weight for s in steps) / len(steps)
    record["robust/effective_pairs"] = (sum(s.robust.effective_pairs for s in steps)
                                        / len(steps))
    return record


def evaluate(run: Run, iteration: int, log: MetricsLog | None) -> None:
    """Score the held-out prompts under the mixture grid, each rank its share, and have
    rank 0 log the report. The responses are sampled by the run's rollout engine
    (:func:`~drosim.llm.components.evaluation.engine_scores`), its weights synced first, so
    that every evaluation samples with the training rollouts' engine and dtype. The first
    evaluation's scores (the initial policy's) are kept in ``out_dir/eval_initial.pt``: later
    reports give win rates against them."""
    config = run.config
    world = run.world
    shard = prompt_shard(run.eval_prompts, world.rank, world.world_size)
    # The training rollouts' engine and dtype, from the weights just updated (an engine
    # with its own copy, vLLM, last synced before this iteration's update), sampled as
    # roll_out samples: the policy in eval mode.
    run.policy.eval()
    run.engine.sync_weights(run.policy)
    try:
        local = engine_scores(run.engine, run.reward_model, shard,
                              seed=EVAL_SEED + world.rank, device=run.device)
    finally:
        run.policy.train()
    scores = gather_scores(local, len(run.eval_prompts), run.device)
    if not world.is_main:
        return
    initial_file = run.out_dir / INITIAL_EVAL_FILE
    if iteration == 0:
        staging = initial_file.with_suffix(".tmp")
        torch.save(scores, staging)
        staging.replace(initial_file)
    baseline = None
    if iteration > 0:
        try:
            baseline = torch.load(initial_file)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
            # missing (a run from before win rates) or damaged: the run goes on without them
            print(f"drosim-llm: warning: no win rates: cannot read {initial_file} ({error})",
                  file=sys.stderr)
    if baseline is not None and baseline.shape != scores.shape:
        print(f"drosim-llm: warning: {initial_file} holds scores of {tuple(baseline.shape)}, "
              f"not {tuple(scores.shape)}: no win rates", file=sys.stderr)
        baseline = None
    report = mixture_report(scores, run.reward_model.objectives, config.eval_mixtures,
                            baseline=baseline)
    if log is not None:
        log.write({"iteration": iteration, "kind": "eval", **report})


def checkpoint(run: Run, state: TrainState) -> None:
    """Rank 0 saves the checkpoint (every rank its shards, when sharded); the others wait."""
    if run.world.is_main or is_sharded(run.policy):
        save_checkpoint(run.out_dir, model=run.policy, optimizer=run.optimizer,
                        scheduler=run.scheduler, state=state)
    run.world.barrier()


def finish(run: Run) -> None:
    """Rank 0 saves the final policy and tokenizer as a Hugging Face folder; the others
    wait. A sharded policy is first gathered, on the CPU, by every rank together; a LoRA
    policy is written merged, its adapter also in ``final/adapter``
    (:func:`drosim.llm.recipes.export.write_pretrained`)."""
    full = None
    if is_sharded(run.policy):
        full = get_model_state_dict(run.policy, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
    if run.world.is_main:
        # overwrite: a finished run resumed again rewrites its own final/
        write_pretrained(run.policy, run.tokenizer, run.out_dir / FINAL_DIR, overwrite=True,
                         state_dict=full)
    run.world.barrier()


# ------------------------------------------------------------------------------- the recipe


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Run (or resume) the online loop described by ``config``; returns the run directory.

    The final policy and tokenizer are saved to ``<out_dir>/final``. An ``out_dir`` that
    holds an earlier run is refused unless ``resume`` (continue it from its latest
    checkpoint, with the same configuration but :data:`RESUME_MAY_CHANGE`; a run without
    one starts afresh, and says so) or ``overwrite`` (its outputs are deleted once the new
    run has started).

    Everything that can be checked is checked before anything is written (the config, the
    sources and local model folders, the prompts, a resume's saved configuration); then
    ``out_dir`` is created and locked for the whole run (one writer per run), and the
    policy, reward model and the prompts' fit to the policy are checked before the earlier
    outputs are touched. A run that fails to start removes what it created.

    Raises:
        ValueError: an invalid configuration, an ``out_dir`` holding an earlier run (without
            ``resume`` or ``overwrite``), one in use by another process, a resume that
            changes the run, or bad data met during training (NaN rewards, empty batches),
            with the rows named.
        OSError: an ``out_dir`` or checkpoint that cannot be written.
        SystemExit: after SIGTERM / SIGINT, once the checkpoint is written (code 128 + signal).
    """
    method = validate_config(config)
    config = absolute_sources(config)
    out_dir = Path(config.out_dir)
    found = prepare_out_dir(config, resume=resume, overwrite=overwrite)
    changes = check_resume(config) if resume else {}
    prompts = load_run_prompts(config)
    world = init_distributed(resolve_device(config.device, 0),
                             always=config.sharding == "fsdp2")
    use_device(config.device, world)  # the claim's collective runs on it
    before = out_dir_entries(out_dir)
    with claimed_out_dir(out_dir, world):
        with undone_on_failure(out_dir, before, world):
            run = set_up(config, world, prompts, method)
            check_prompts_fit(config, run.policy, run.tokenizer, [*prompts[0], *prompts[1]])
            state = (resume_from(run) if resume else None) or TrainState(0, 0, {})
        if world.is_main:
            if overwrite and not resume:  # only now: the new run has started
                for name in found:
                    remove_path(out_dir / name)
            if resume:
                record_resume(out_dir, state.iteration, changes)
        world.barrier()
        run_loop(run, state)
    return run.out_dir


def record_resume(out_dir: Path, iteration: int, changes: dict[str, tuple[Any, Any]]) -> None:
    """Append the resume to ``out_dir/resumes.jsonl`` (the iteration it continues from and
    the keys it changed, ``{key: [saved, requested]}``) and say once what changed."""
    record = {"iteration": iteration, "changed": {k: list(v) for k, v in changes.items()}}
    with (out_dir / RESUMES_FILE).open("a") as f:
        f.write(json.dumps(record) + "\n")
    if changes:
        print(f"drosim-llm: resuming {out_dir} at iteration {iteration} with "
              + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
              + f" (recorded in {RESUMES_FILE})", file=sys.stderr)


def run_loop(run: Run, state: TrainState) -> None:
    """The iterations from ``state`` to ``config.iterations``: the initial evaluation (a new
    run), then roll out, score, update, log, evaluate and checkpoint each; the final policy
    at the end. Rank 0 writes the config and the metrics."""
    config, world = run.config, run.world
    log = None
    if world.is_main:
        save_config(config, run.out_dir / "config.yaml")
        log = MetricsLog(run.out_dir / "metrics.jsonl",
                         keep_until=state.iteration if state.iteration else None,
                         tensorboard=config.tensorboard)
    try:
        with StopFlag() as stop:
            if state.iteration == 0:
                evaluate(run, 0, log)
            bar = tqdm(range(state.iteration, config.iterations), initial=state.iteration,
                       total=config.iterations, desc=config.method,
                       disable=not (config.progress and world.is_main))
            for iteration in bar:
                started = time.perf_counter()
                # a seed per (run, rank, iteration): ranks sample different responses, and a
                # resumed run draws what the uninterrupted one drew whatever the rank count
                seed_everything(iteration_seed(config.seed, world.rank, iteration))
                prompts, pairs, generation_seconds = roll_out(run, state)
                batch = score_batch(run, prompts, pairs)
                steps = update(run, batch)
                state = TrainState(iteration + 1,
                                   state.data_position + config.pairs_per_iteration, {})
                record = train_record(run, iteration + 1, batch, pairs, steps,
                                      time.perf_counter() - started, generation_seconds)
                if log is not None:
                    log.write(record)
                    bar.set_postfix(reward=f"{record['train_reward']:.3f}",
                                    objective=f"{record['objective']:.3g}")
                if (iteration + 1) % config.eval_every == 0 or iteration + 1 == config.iterations:
                    evaluate(run, iteration + 1, log)
                # A signal reaches the ranks at slightly different times: they agree to stop
                # after the same iteration, or their checkpoint's collectives would not match.
                stopping = world.largest(stop.signal or 0)
                if stopping or (iteration + 1) % config.checkpoint_every == 0:
                    checkpoint(run, state)
                if stopping:
                    print(f"\nstopped by signal {stopping} after iteration {iteration + 1}; "
                          f"resume with --resume (checkpoint in {run.out_dir / 'checkpoints'})",
                          file=sys.stderr)
                    raise SystemExit(128 + stopping)
            finish(run)
    finally:
        if log is not None:
            log.close()

