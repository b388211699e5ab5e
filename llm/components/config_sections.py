"""The training config's sections: every key's type, default and one-line documentation.

Each section is a dataclass whose fields carry their documentation in
``field(metadata={"doc": ...})``; :class:`drosim.llm.components.config.TrainConfig` is their flat
composition, so a key is read as ``config.lr`` and written as ``lr``, ``loop.lr`` or
``loop: {lr: ...}``. The README's key table and ``llm/configs/demo.yaml``'s comments are
generated from these fields (:mod:`drosim.llm.components.config_docs`).

The world (policy, prompts, reward model, mixtures) has no default: a run names it, e.g.
``model: demo`` and the rest of ``llm/configs/demo.yaml`` for the built-in tiny world.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from drosim.llm.components.methods import (
    DEFAULT_KL_TAU,
    DEFAULT_W_P,
    DEFAULT_W_RHO,
    W_GRADIENTS,
    Method,
    make_method,
)
from drosim.llm.components.rewards import DEFAULT_BATCH_SIZE as REWARD_BATCH_SIZE
from drosim.llm.components.rollout_engines import DTYPES as ROLLOUT_DTYPES
from drosim.llm.components.rollout_engines import ENGINES
from drosim.llm.components.sharding import SHARDINGS

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
DTYPES: tuple[str, ...] = ("float32", "bfloat16")


def doc(text: str) -> dict[str, str]:
    """A config key's field metadata: its one-line documentation, read by
    :mod:`drosim.llm.components.config_docs` (``field(default=..., metadata=doc("..."))``)."""
    return {"doc": text}


def require(keys: Any, name: str, ok: Callable[[Any], bool], requirement: str) -> None:
    """Refuse the value of key ``name`` of ``keys`` (a section or a config) that fails ``ok``.

    Raises:
        ValueError: ``"{name} must be {requirement}, got {value!r}"``.
    """
    value = getattr(keys, name)
    if not ok(value):
        raise ValueError(f"{name} must be {requirement}, got {value!r}")


def require_choice(keys: Any, name: str, choices: Sequence[str]) -> None:
    """Refuse a value of key ``name`` that is not one of ``choices``."""
    require(keys, name, lambda v: v in choices, f"one of {', '.join(choices)}")


def check_mixture(name: str, mixture: dict[str, float]) -> None:
    """A mixture weighs objectives: finite, non-negative weights with a positive sum.

    Raises:
        ValueError: naming the mixture and the first bad weight, or a sum that is not > 0.
    """
    for objective, weight in mixture.items():
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"{name}: the weight of {objective!r} must be finite and >= 0, "
                             f"got {weight!r}")
    if not sum(mixture.values()) > 0:
        raise ValueError(f"{name}: the weights must sum to a positive number, got {mixture}")


@dataclass
class PolicySection:
    """The policy to train."""

    model: str | None = field(default=None, metadata=doc(
        "\"demo\" (the built-in tiny world) or a local path / hub name; required"))
    tokenizer: str | None = field(default=None, metadata=doc(
        "the tokenizer; null: the same as `model`"))


@dataclass
class DataSection:
    """The training and held-out prompts, and how they are rendered."""

    prompts: str | None = field(default=None, metadata=doc(
        "\"demo\", a .txt (one prompt per line), .parquet / .jsonl / .json / .csv file, a "
        "save_to_disk folder or a hub dataset name; required"))
    eval_prompts: str | None = field(default=None, metadata=doc(
        "the held-out prompts, as `prompts`; required"))
    prompt_field: str | None = field(default=None, metadata=doc(
        "the prompts' column (strings, chat message lists or HH transcripts); null: \"prompt\", "
        "else the only text column"))
    prompt_split: str = field(default="train", metadata=doc(
        "the split of a hub dataset or a saved DatasetDict"))
    eval_prompt_split: str | None = field(default=None, metadata=doc(
        "eval_prompts' split; null: prompt_split"))
    max_prompt_tokens: int | None = field(default=None, metadata=doc(
        "keep the last max_prompt_tokens tokens of a longer (rendered) prompt; null: no cut"))
    chat_template: bool | None = field(default=None, metadata=doc(
        "render prompts with the tokenizer's chat template: null when it has one, true "
        "(required), false (never)"))


    def check_data(self) -> None:
        """A prompt field and split are non-empty names, a prompt token budget is >= 1.

        Raises:
            ValueError: naming the key.
        """
        if self.prompt_field is not None and not self.prompt_field:
            raise ValueError("prompt_field is empty; name a column, or null to pick 'prompt' "
                             "or the only text column")
        if not self.prompt_split:
            raise ValueError("prompt_split is empty; name a split such as 'train'")
        if self.eval_prompt_split is not None and not self.eval_prompt_split:
            raise ValueError("eval_prompt_split is empty; name a split such as 'test', or "
                             "null for prompt_split")
        require(self, "max_prompt_tokens", lambda v: v is None or v >= 1, ">= 1 or null")

@dataclass
class RewardSection:
    """The reward model and how its scores are read."""

    reward: str | None = field(default=None, metadata=doc(
        "\"demo\" (rule-based word lists) or a HF sequence classifier; required"))
    reward_output: str = field(default="logits", metadata=doc(
        "the reward model's output attribute holding the scores: \"logits\", or e.g. \"rewards\" "
        "(ArmoRM) or \"score\""))
    reward_heads: dict[str, int | str] | None = field(default=None, metadata=doc(
        "objective -> head index or id2label name; null: every head id2label names"))
    reward_normalization: dict[str, list[float]] | None = field(default=None, metadata=doc(
        "objective -> [shift, scale]: the score r is used as (r - shift) / scale; null: raw "
        "scores"))
    reward_max_length: int | None = field(default=1024, metadata=doc(
        "the reward model's input tokens, at most its positions (longer inputs lose their first"
        " tokens, warned); null: the model's own limit"))
    reward_dtype: str = field(default="auto", metadata=doc(
        "the reward model's weights: auto (bf16 on CUDA), float32 or bfloat16"))
    reward_batch_size: int = field(default=REWARD_BATCH_SIZE, metadata=doc(
        "texts per reward model forward, in training and evaluation, batched longest first; "
        "8: the fastest on one CPU thread in bench/results/reward_batch_cpu.md (CUDA not "
        "measured: bench/reward_batch.py --device cuda)"))


    def check_reward_model(self) -> None:
        """The reward keys that can be checked without the model: the output attribute is an
        identifier, every head an index >= 0 or a non-empty label, the rule-based demo reward
        (which has neither) not given them, a known dtype, an input budget and a batch size
        >= 1, and affine maps that keep every score finite and its order (scale > 0).

        Raises:
            ValueError: naming the key.
        """
        if not self.reward_output.isidentifier():
            raise ValueError(f"reward_output must be an attribute name such as 'logits' or "
                             f"'rewards', got {self.reward_output!r}")
        heads = self.reward_heads
        if heads is not None:
            if not heads:
                raise ValueError("reward_heads is empty; give objective -> head index or "
                                 "label, or null for every head the model's id2label names")
            for name, head in heads.items():
                if (head < 0) if isinstance(head, int) else not head:
                    raise ValueError(f"reward_heads[{name!r}] must be a head index >= 0 or "
                                     f"an id2label name, got {head!r}")
        if self.reward == "demo" and (heads is not None or self.reward_output != "logits"):
            raise ValueError("reward_output and reward_heads choose a model's output heads; "
                             "the rule-based reward=demo has none: leave them unset")
        require_choice(self, "reward_dtype", ("auto", *DTYPES))
        require(self, "reward_max_length", lambda v: v is None or v >= 1, ">= 1 or null")
        require(self, "reward_batch_size", lambda v: v >= 1, ">= 1")
        for objective, pair in (self.reward_normalization or {}).items():
            if not (len(pair) == 2 and math.isfinite(pair[0]) and math.isfinite(pair[1])
                    and pair[1] > 0):
                raise ValueError(f"reward_normalization[{objective!r}] must be [shift, scale] "
                                 f"with a finite shift and a finite scale > 0, got {pair!r}")

@dataclass
class MixtureSection:
    """The objective mixtures trained on and evaluated."""

    train_mixture: dict[str, float] = field(default_factory=dict, metadata=doc(
        "objective -> weight; required"))
    eval_mixtures: list[dict[str, float]] = field(default_factory=list, metadata=doc(
        "the mixtures evaluated (objective -> weight each); required"))
    minority_mixture: dict[str, float] | None = field(default=None, metadata=doc(
        "heterogeneous annotators: the mixture that scores a random minority_fraction of each "
        "iteration's pairs instead of train_mixture; null: none"))
    minority_fraction: float = field(default=0.0, metadata=doc(
        "the share of each iteration's pairs scored under minority_mixture, in [0, 1)"))


    def check_mixtures(self) -> None:
        """Valid training and evaluation mixtures (at least one of these), and a minority
        fraction in [0, 1) (1 would leave no training mixture) given exactly with a valid
        minority mixture. (The objectives are checked against the reward model's when it
        is loaded.)

        Raises:
            ValueError: naming the mixture or key.
        """
        check_mixture("train_mixture", self.train_mixture)
        require(self, "minority_fraction", lambda v: 0 <= v < 1, "in [0, 1)")
        if (self.minority_mixture is None) != (self.minority_fraction == 0):
            raise ValueError("minority_mixture and minority_fraction go together: a mixture "
                             f"with a fraction > 0, or neither (got minority_mixture="
                             f"{self.minority_mixture}, minority_fraction="
                             f"{self.minority_fraction})")
        if self.minority_mixture is not None:
            check_mixture("minority_mixture", self.minority_mixture)
        if not self.eval_mixtures:
            raise ValueError("eval_mixtures is empty; give at least one mixture to evaluate")
        for i, mixture in enumerate(self.eval_mixtures):
            check_mixture(f"eval_mixtures[{i}]", mixture)

@dataclass
class AlgorithmSection:
    """The training method: its pointwise loss and ambiguity set (drosim.llm.components.methods)."""

    method: str = field(default="rebel", metadata=doc(
        "the method, one of drosim.llm.components.methods.METHODS"))
    eta: float = field(default=0.1, metadata=doc("REBEL's step size"))
    beta: float = field(default=0.1, metadata=doc("DPO's / IPO's beta"))
    chi2_rho: float | None = field(default=None, metadata=doc(
        "the chi2-* ball's radius; null: 0.01 (DEFAULT_RADIUS), or protect_fraction's"))
    kl_rho: float | None = field(default=None, metadata=doc(
        "the kl-rebel ball's radius; null: 0.01 (DEFAULT_RADIUS), or protect_fraction's"))
    protect_fraction: float | None = field(default=None, metadata=doc(
        "f in (0, 1]: the smallest ball holding every reweighting onto a subpopulation of mass "
        "f (chi2-* and kl-rebel, their radius null)"))
    robust_scope: str = field(default="minibatch", metadata=doc(
        "the ball's support: minibatch (each step's pairs) or iteration (all the iteration's; "
        "chi2-*, kl-rebel, kltemp-rebel, kl-dpo)"))
    kl_tau: float = field(default=DEFAULT_KL_TAU, metadata=doc(
        "the KL temperature of kltemp-rebel and kl-dpo"))
    w_rho: float = field(default=DEFAULT_W_RHO, metadata=doc(
        "the Wasserstein set's radius (w-rebel, wdpo)"))
    w_p: float = field(default=DEFAULT_W_P, metadata=doc("the Wasserstein set's order p >= 1"))
    w_gradient: str = field(default=W_GRADIENTS[0], metadata=doc(
        "the Wasserstein penalty's gradient: finite-difference, or exact (a double backward, "
        "for verification)"))


    def build_method(self) -> Method:
        """The section's :class:`~drosim.llm.components.methods.Method`: its radii resolved by
        :func:`~drosim.llm.components.methods.make_method` (a null radius is not given, so that
        ``protect_fraction`` may set the ball, else ``DEFAULT_RADIUS``), with ``w_gradient``.

        Raises:
            ValueError: as :func:`~drosim.llm.components.methods.make_method`.
        """
        return make_method(self.method, chi2_rho=self.chi2_rho, kl_rho=self.kl_rho,
                           kl_tau=self.kl_tau, w_rho=self.w_rho, w_p=self.w_p,
                           protect_fraction=self.protect_fraction, w_gradient=self.w_gradient)

@dataclass
class LoopSection:
    """The training loop: iterations, batches, optimiser, evaluation and checkpoints."""

    iterations: int = field(default=30, metadata=doc(
        "training iterations (roll out, score, update)"))
    pairs_per_iteration: int = field(default=32, metadata=doc(
        "prompts per iteration (two responses each), over all ranks"))
    epochs: int = field(default=2, metadata=doc("passes over each iteration's pairs"))
    minibatch_size: int = field(default=16, metadata=doc(
        "pairs per optimiser step, over all ranks"))
    lr: float = field(default=1e-3, metadata=doc("the learning rate"))
    weight_decay: float = field(default=0.0, metadata=doc("AdamW's weight decay"))
    max_grad_norm: float = field(default=1.0, metadata=doc(
        "the gradient clipping norm; .inf: no clipping"))
    warmup_iterations: int = field(default=0, metadata=doc(
        "iterations of linear learning-rate warmup"))
    eval_every: int = field(default=5, metadata=doc(
        "evaluate every this many iterations (and at the end)"))
    num_eval_prompts: int = field(default=64, metadata=doc("the held-out prompts evaluated"))
    checkpoint_every: int = field(default=10, metadata=doc("checkpoint every this many iterations"))
    seed: int = field(default=0, metadata=doc("the run's seed, in [0, 2**32)"))


@dataclass
class RolloutSection:
    """Sampling the responses."""

    temperature: float = field(default=1.0, metadata=doc("the sampling temperature"))
    top_p: float = field(default=1.0, metadata=doc("nucleus sampling's top_p, in (0, 1]"))
    max_new_tokens: int = field(default=12, metadata=doc("the longest response, in tokens"))
    rollout_engine: str = field(default="hf", metadata=doc(
        "what samples the training pairs and the evaluations': hf (transformers' generate) or "
        "vllm (CUDA only, pip install 'drosim[vllm]')"))
    rollout_dtype: str = field(default="auto", metadata=doc(
        "the sampling precision: auto (bfloat16 on CUDA, float32 on CPU), float32 or bfloat16"))
    stop_token_ids: list[int] | None = field(default=None, metadata=doc(
        "extra token ids that end a response as EOS does (e.g. an end-of-turn id)"))
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata=doc(
        "the fraction of the GPU's memory the vLLM engine may take"))


    def check_rollout(self) -> None:
        """A known engine and dtype, token ids >= 0 and a memory fraction in (0, 1).

        Raises:
            ValueError: naming the key.
        """
        require_choice(self, "rollout_engine", ENGINES)
        require_choice(self, "rollout_dtype", ROLLOUT_DTYPES)
        if self.stop_token_ids is not None and any(i < 0 for i in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids >= 0, got "
                             f"{self.stop_token_ids}")
        require(self, "vllm_gpu_memory_utilization", lambda v: 0 < v < 1, "in (0, 1)")

@dataclass
class LoraSection:
    """LoRA (PEFT) adapters; lora_rank null: full fine-tuning."""

    lora_rank: int | None = field(default=None, metadata=doc(
        "train rank-lora_rank adapters on frozen weights; null: full fine-tuning"))
    lora_alpha: float = field(default=16.0, metadata=doc(
        "an adapter adds (lora_alpha / lora_rank) B A x"))
    lora_dropout: float = field(default=0.0, metadata=doc(
        "dropout on the adapters' input (DPO-type methods without a Wasserstein set)"))
    lora_target_modules: list[str] | None = field(default=None, metadata=doc(
        "the modules to adapt (names or suffixes, or [all-linear]); null: PEFT's default for "
        "the architecture"))


    def check_lora(self) -> None:
        """No adapter keys without a rank; with one, a rank >= 1, an alpha > 0, a dropout in
        [0, 1) and a non-empty target list. (Target modules that name nothing are refused
        when the adapter is built, by :func:`drosim.llm.components.lora.apply_lora`.)

        Raises:
            ValueError: naming the key(s).
        """
        if self.lora_rank is None:
            defaults = LoraSection()
            changed = [name for name in ("lora_alpha", "lora_dropout", "lora_target_modules")
                       if getattr(self, name) != getattr(defaults, name)]
            if changed:
                raise ValueError(f"{', '.join(changed)} configure a LoRA adapter, but "
                                 "lora_rank is null (full fine-tuning): set lora_rank, or "
                                 "leave them unset")
            return
        require(self, "lora_rank", lambda v: v >= 1, ">= 1 (or null: full fine-tuning)")
        require(self, "lora_alpha", lambda v: 0 < v < math.inf, "finite and > 0")
        require(self, "lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)")
        if self.lora_target_modules is not None and not self.lora_target_modules:
            raise ValueError("lora_target_modules is empty; name modules to adapt, or null "
                             "for PEFT's default for the architecture")

@dataclass
class SystemSection:
    """Devices, precision, kernels, remote code, sharding and outputs."""

    device: str = field(default="auto", metadata=doc("auto, cpu or cuda"))
    trust_remote_code: bool = field(default=False, metadata=doc(
        "run the custom code (config.json `auto_map`) of the policy and the reward model; a "
        "folder with such code is refused without it"))
    dtype: str = field(default="float32", metadata=doc(
        "the policy's (and the DPO reference's) weights: float32 or bfloat16 (then the "
        "optimiser state is bf16 too)"))
    attn_implementation: str | None = field(default=None, metadata=doc(
        "the policy's attention kernel (sdpa, eager, flash_attention_2, ...); null: "
        "transformers' default"))
    bf16: bool = field(default=False, metadata=doc("autocast the update's forward to bfloat16"))
    gradient_checkpointing: bool = field(default=False, metadata=doc(
        "recompute activations in the backward"))
    compile: bool = field(default=False, metadata=doc(
        "torch.compile the update's forward and backward (not the Wasserstein methods)"))
    packing: bool = field(default=True, metadata=doc(
        "padding-free update forwards: the pairs' real tokens concatenated into rows, "
        "per-sequence position ids, attention masked per sequence (where the policy's "
        "attention kernel supports it; else padded, said once in the run log)"))
    sharding: str = field(default="none", metadata=doc(
        "none, or fsdp2 (shards weights, gradients, optimiser)"))
    tensorboard: bool = field(default=False, metadata=doc("also log the metrics to TensorBoard"))
    progress: bool = field(default=True, metadata=doc("show a progress bar"))
    out_dir: str = field(default="runs/default", metadata=doc("the run's folder"))


    def check_system(self) -> None:
        """A known device, sharding and weight dtype, and a named attention kernel.

        Raises:
            ValueError: naming the key.
        """
        require_choice(self, "sharding", SHARDINGS)
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; valid devices: "
                             f"{', '.join(DEVICES)}")
        require_choice(self, "dtype", DTYPES)
        if self.attn_implementation is not None and not self.attn_implementation:
            raise ValueError("attn_implementation is empty; name a kernel such as 'sdpa', or "
                             "null for transformers' default")

# section name -> section, in the order of the config's keys
SECTIONS: dict[str, type] = {
    "policy": PolicySection, "data": DataSection, "reward_model": RewardSection,
    "mixtures": MixtureSection, "algorithm": AlgorithmSection, "loop": LoopSection,
    "rollout": RolloutSection, "lora": LoraSection, "system": SystemSection,
}
# flat key -> its section's name: the alias table of ``section.key``
KEY_SECTIONS: dict[str, str] = {f.name: name for name, section in SECTIONS.items()
                                for f in dataclasses.fields(section)}
