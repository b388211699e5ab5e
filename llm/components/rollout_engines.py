"""Rollout engines: what samples the two responses of every prompt from pi_t.

The trainer calls ``engine.sync_weights(policy)`` once per iteration, then
``engine.sample(prompts)``; an evaluation syncs again (it follows the iteration's update) and
samples the held-out prompts through the same engine, from its own fixed seed
(:func:`drosim.llm.components.evaluation.engine_scores`). Two engines share one output
layout, :class:`SampledPairs` (left-padded prompt, right-padded responses, the response mask
ending at the first EOS or stop id, counted in it):

- :class:`HFGenerateEngine` (``rollout_engine: hf``, the default) samples from the live
  policy with ``transformers``' ``generate`` (:func:`~drosim.llm.components.rollout.sample_pairs`:
  KV cache on, both samples of every prompt in one call), under bf16 autocast on CUDA by
  default and in float32 on the CPU;
- :class:`VLLMEngine` (``rollout_engine: vllm``) samples with a ``vllm.LLM`` colocated on the
  training GPU, its weights loaded from the policy's ``state_dict`` every iteration.

Whichever engine sampled, the log-probabilities of pi_t are recomputed by the update's own
forward (:func:`drosim.llm.components.update.record_sampling_logprobs`); an engine only chooses
tokens.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import nn

from drosim.llm.components.data import Prompt, prompt_text
from drosim.llm.components.rollout import (
    SampledPairs,
    check_prompt_lengths,
    check_sampling,
    end_token_ids,
    pairs_from_completions,
    render_prompts,
    sample_pairs,
)

if TYPE_CHECKING:
    from drosim.llm.components.config import TrainConfig

ENGINES: tuple[str, ...] = ("hf", "vllm")
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16")
VLLM_INSTALL = "pip install 'drosim[vllm]'"


@dataclass(frozen=True)
class SamplingSettings:
    """How responses are sampled, the same for every engine (a run's config keys).

    Attributes:
        temperature: > 0.
        top_p: nucleus mass in (0, 1].
        max_new_tokens: response length cap >= 1.
        chat_template, max_prompt_tokens: as :func:`~drosim.llm.components.rollout.render_prompts`.
        stop_token_ids: extra ids that end a response, beside EOS.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    chat_template: bool | None = False
    max_prompt_tokens: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, config: TrainConfig) -> SamplingSettings:
        """The sampling keys of a run's config."""
        return cls(config.temperature, config.top_p, config.max_new_tokens,
                   config.chat_template, config.max_prompt_tokens,
                   tuple(config.stop_token_ids or ()))


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples two responses per prompt from the current policy pi_t."""

    name: str
    settings: SamplingSettings

    def sync_weights(self, policy: nn.Module) -> None:
        """Make the engine sample from ``policy``'s current weights (once per iteration,
        before :meth:`sample`)."""

    def sample(self, prompts: Sequence[Prompt]) -> SampledPairs:
        """Two responses for each of ``prompts`` (n strings or message lists), as
        :class:`SampledPairs` of ``(n, 2, T)`` tensors on the policy's device."""


def resolve_rollout_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """The sampling precision of ``rollout_dtype`` on ``device``.

    Args:
        name: one of :data:`DTYPES`; "auto" is bfloat16 on CUDA, float32 elsewhere.
        device: the policy's device.

    Returns:
        ``torch.bfloat16`` or ``torch.float32``.

    Raises:
        ValueError: an unknown name.

    Example:
        >>> resolve_rollout_dtype("auto", "cpu"), resolve_rollout_dtype("auto", "cuda:0")
        (torch.float32, torch.bfloat16)
    """
    if name not in DTYPES:
        raise ValueError(f"rollout_dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, name)


class HFGenerateEngine:
    """``transformers``' ``generate`` on the live policy (:func:`sample_pairs`).

    ``sync_weights`` only records which module to sample from: the engine shares the
    policy's parameters, so it always samples from the current weights. A bfloat16 ``dtype``
    runs ``generate`` under autocast (the float32 weights are not copied).

    Example:
        >>> engine = HFGenerateEngine(tok, SamplingSettings(max_new_tokens=8))  # doctest: +SKIP
        >>> engine.sync_weights(policy)                                   # doctest: +SKIP
        >>> pairs = engine.sample(["Tell me a story"])                    # doctest: +SKIP
    """

    name = "hf"

    def __init__(self, tokenizer, settings: SamplingSettings, *,
                 dtype: torch.dtype = torch.float32) -> None:
        self.tokenizer = tokenizer
        self.settings = settings
        self.dtype = dtype
        self.policy: nn.Module | None = None

    def sync_weights(self, policy: nn.Module) -> None:
        self.policy = policy

    def sample(self, prompts: Sequence[Prompt]) -> SampledPairs:
        """Two responses per prompt; see :func:`sample_pairs`.

        Raises:
            RuntimeError: called before :meth:`sync_weights`.
            ValueError: as :func:`sample_pairs`.
        """
        if self.policy is None:
            raise RuntimeError("HFGenerateEngine.sample before sync_weights: no policy yet")
        s = self.settings
        device_type = next(self.policy.parameters()).device.type
        autocast = (torch.autocast(device_type, dtype=self.dtype)
                    if self.dtype != torch.float32 else contextlib.nullcontext())
        with autocast:
            return sample_pairs(self.policy, self.tokenizer, prompts,
                                temperature=s.temperature, top_p=s.top_p,
                                max_new_tokens=s.max_new_tokens, chat_template=s.chat_template,
                                max_prompt_tokens=s.max_prompt_tokens,
                                stop_token_ids=s.stop_token_ids)


def vllm_available() -> bool:
    """Whether the ``vllm`` package can be imported (without importing it: that is slow)."""
    return importlib.util.find_spec("vllm") is not None


def check_rollout_engine(config: TrainConfig) -> None:
    """Refuse, before anything is written, a vLLM engine that cannot start: vLLM not
    installed, or a device that is not CUDA.

    Raises:
        ValueError: one line saying what to do.
    """
    if config.rollout_engine != "vllm":
        return
    if not vllm_available():
        raise ValueError(f"rollout_engine=vllm needs the vllm package: {VLLM_INSTALL} "
                         "(or use rollout_engine=hf)")
    cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if not cuda:
        raise ValueError(f"rollout_engine=vllm samples on a CUDA GPU, but device="
                         f"{config.device} resolves to the CPU here: use rollout_engine=hf")


def _free_port() -> int:
    """A TCP port no process listens on now (as TRL's ``ensure_master_addr_port`` picks one,
    so that two runs on one machine do not meet at a fixed port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _set_launcher_env(device: torch.device) -> None:
    """The ``torchrun`` variables vLLM's ``external_launcher`` backend reads, where no
    launcher set them (one process: rank 0 of 1), so the engine runs in this process."""
    index = 0 if device.index is None else device.index
    for key, value in (("RANK", "0"), ("LOCAL_RANK", str(index)), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())


class VLLMEngine:
    """A ``vllm.LLM`` colocated with the training process on the same GPU.

    The engine is built as TRL's ``GRPOTrainer`` builds its ``vllm_mode="colocate"`` engine
    (trl/generation/vllm_generation.py): ``distributed_executor_backend="external_launcher"``
    runs vLLM's worker in this process (under ``torchrun``, one engine per rank, seeded per
    rank), with ``gpu_memory_utilization`` capping what it takes for weights and KV cache.
    Prompts are given as the token ids of :func:`render_prompts` (the chat template and
    truncation of the HF engine), and both samples of a prompt come from one request
    (``n=2``). vLLM's own EOS handling is off (``ignore_eos``) and the tokenizer's EOS is
    passed with the stop ids instead, so a response ends exactly where the HF engine's would
    (a model's generation config may name other EOS ids, which ``generate`` is told to
    ignore too). Each prompt's request is seeded from torch's global RNG (prompt i gets
    ``base + 2i``, its two samples ``base + 2i`` and ``base + 2i + 1``), so a run resumed
    from a checkpoint samples what the uninterrupted run sampled.

    Args:
        model: the policy's Hugging Face folder or hub name (vLLM loads its architecture;
            the weights are replaced by :meth:`sync_weights`).
        tokenizer: the policy's tokenizer (rendering, EOS, decoding).
        settings: the sampling settings.
        device: the training device (CUDA).
        dtype: the engine's weight dtype (bfloat16 or float32).
        gpu_memory_utilization: the fraction of the GPU's memory vLLM may take, in (0, 1).
        seed: the engine's seed (offset by the rank under ``torchrun``).
        tokenizer_source: the tokenizer's folder or hub name (None: ``model``'s).
        trust_remote_code: run the model folder's custom code.
        max_model_len: the engine's context length (None: the model's).

    Raises:
        ImportError: vLLM is not installed.
    """

    name = "vllm"

    def __init__(self, model: str, tokenizer, settings: SamplingSettings, *,
                 device: str | torch.device, dtype: torch.dtype,
                 gpu_memory_utilization: float, seed: int = 0,
                 tokenizer_source: str | None = None, trust_remote_code: bool = False,
                 max_model_len: int | None = None) -> None:
        from vllm import LLM  # the optional extra: imported only when this engine is used

        self.device = torch.device(device)
        _set_launcher_env(self.device)
        self.tokenizer = tokenizer
        self.settings = settings
        self.end_ids = end_token_ids(tokenizer, settings.stop_token_ids)
        self.llm = LLM(model=model, tokenizer=tokenizer_source or model,
                       dtype=str(dtype).removeprefix("torch."),
                       gpu_memory_utilization=gpu_memory_utilization,
                       distributed_executor_backend="external_launcher",
                       seed=seed + int(os.environ["RANK"]), max_model_len=max_model_len,
                       trust_remote_code=trust_remote_code)

    def sync_weights(self, policy: nn.Module) -> None:
        """Load the policy's current weights into the engine.

        The documented colocated path of TRL's ``GRPOTrainer`` (``sync_weights`` /
        ``_push_param_to_vllm`` in trl/generation/vllm_generation.py, ``vllm_mode=
        "colocate"``): the in-process worker's model takes the Hugging Face names and tensors
        of the ``state_dict`` through its ``load_weights``, then the prefix cache, computed
        with the old weights, is reset.
        """
        model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        model.load_weights(policy.state_dict().items())
        self.llm.reset_prefix_cache()

    def sample(self, prompts: Sequence[Prompt]) -> SampledPairs:
        """Two responses per prompt, laid out by :func:`pairs_from_completions`.

        Raises:
            ValueError: as :func:`sample_pairs` (no prompts, bad parameters, a prompt too
                long for the engine's context).
        """
        from vllm import SamplingParams

        s = self.settings
        check_sampling(prompts, s.temperature, s.top_p, s.max_new_tokens)
        tokens, truncated = render_prompts(self.tokenizer, prompts,
                                           chat_template=s.chat_template,
                                           max_prompt_tokens=s.max_prompt_tokens)
        check_prompt_lengths([prompt_text(p) for p in prompts], [len(t) for t in tokens],
                             s.max_new_tokens, self.llm.llm_engine.model_config.max_model_len)
        base = int(torch.randint(2**31, ()))
        params = [SamplingParams(n=2, temperature=s.temperature, top_p=s.top_p,
                                 max_tokens=s.max_new_tokens, stop_token_ids=self.end_ids,
                                 ignore_eos=True, seed=base + 2 * i, detokenize=False)
                  for i in range(len(tokens))]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in tokens],
                                    sampling_params=params, use_tqdm=False)
        completions = [list(sample.token_ids) for output in outputs for sample in output.outputs]
        pairs = pairs_from_completions(self.tokenizer, tokens, completions,
                                       stop_token_ids=s.stop_token_ids, truncated=truncated)
        # the trainer scores and updates on the policy's device, as with the HF engine
        return pairs._replace(input_ids=pairs.input_ids.to(self.device),
                              attention_mask=pairs.attention_mask.to(self.device),
                              response_mask=pairs.response_mask.to(self.device),
                              empty=pairs.empty.to(self.device))


def vllm_model_source(config: TrainConfig) -> str:
    """The folder or hub name vLLM loads the policy's architecture from: the run's
    ``model``, or for ``model=demo`` the base model the trainer built in ``out_dir/base``."""
    return str(Path(config.out_dir) / "base") if config.model == "demo" else str(config.model)


def make_rollout_engine(config: TrainConfig, policy: nn.Module, tokenizer,
                        device: str) -> RolloutEngine:
    """The engine ``config.rollout_engine`` names, set up for ``policy`` on ``device``.

    Args:
        config: the run's config (rollout_engine, rollout_dtype, stop_token_ids,
            vllm_gpu_memory_utilization and the sampling keys).
        policy: the policy; the engine samples from its weights after each sync.
        tokenizer: its tokenizer.
        device: the training device.

    Returns:
        A :class:`HFGenerateEngine` or a :class:`VLLMEngine`, weights synced.

    Raises:
        ValueError: an unknown engine, or vLLM where it cannot run
            (:func:`check_rollout_engine`).
    """
    settings = SamplingSettings.from_config(config)
    dtype = resolve_rollout_dtype(config.rollout_dtype, device)
    if config.rollout_engine == "hf":
        engine: RolloutEngine = HFGenerateEngine(tokenizer, settings, dtype=dtype)
    elif config.rollout_engine == "vllm":
        check_rollout_engine(config)
        max_model_len = (None if config.max_prompt_tokens is None
                         else config.max_prompt_tokens + config.max_new_tokens)
        engine = VLLMEngine(vllm_model_source(config), tokenizer, settings, device=device,
                            dtype=dtype,
                            gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                            seed=config.seed, tokenizer_source=config.tokenizer,
                            trust_remote_code=config.trust_remote_code,
                            max_model_len=max_model_len)
    else:
        raise ValueError(f"rollout_engine must be one of {', '.join(ENGINES)}, got "
                         f"{config.rollout_engine!r}")
    engine.sync_weights(policy)
    return engine
