"""What every section of the LLM benchmark shares: its settings, the model sizes, the
randomly initialised models, the synthetic batches and the targets of the ratios."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from drosim.llm.components.batch import PairBatch
from drosim.llm.components.demo_world import demo_corpus, demo_model_config, train_demo_tokenizer
from drosim.llm.components.logprobs import sequence_logprobs
from drosim.llm.components.methods import (
    DEFAULT_KL_TAU,
    DEFAULT_RADIUS,
    DEFAULT_W_P,
    DEFAULT_W_RHO,
    make_method,
)

BASELINES = ("rebel", "dpo")
ROBUST = ("chi2-rebel", "kl-rebel", "kltemp-rebel", "w-rebel", "wdpo", "kl-dpo", "chi2-dpo")
# The demo's radii (llm/configs/demo.yaml): the trainer's defaults, which
# drosim.llm.components.methods holds, the balls' radii spelled out.
RADII = {"chi2_rho": DEFAULT_RADIUS, "kl_rho": DEFAULT_RADIUS, "kl_tau": DEFAULT_KL_TAU,
         "w_rho": DEFAULT_W_RHO, "w_p": DEFAULT_W_P}
ETA, BETA, LR, MAX_GRAD_NORM = 0.1, 0.1, 1e-5, 1.0
# At most, over the plain method: chi2 / KL 1.05x on CPU and 1.03x on CUDA (time and
# memory), W 2.0x the time and 1.5x the peak memory.
TARGET_DIVERGENCE = {"cpu": 1.05, "cuda": 1.03}
TARGET_WASSERSTEIN = {"time": 2.0, "memory": 1.5}
# Dense bf16 peak (TFLOP/s, vendor datasheets) of the GPUs the MFU column knows.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
PAD, BOS, EOS, FIRST_WORD = 0, 1, 2, 4  # the demo tokenizer's special ids (unk = 3)
WARMUP_PAIRS = 2
MMAP_THRESHOLD = 65536  # bytes; pinning it disables glibc's growing (RSS-hiding) threshold
# The timed process keeps freed memory instead (no mmap of large blocks, no trimming), so a
# step's time is not its page faults: otherwise the two-pass Wasserstein step, which frees
# and re-allocates its big activations once more, pays for up to 5% more faults.
TIMING_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**34)}
SECTIONS = {
    "steps": "1. update_step seconds per method (median over rounds), ratio over the plain "
             "method",
    "penalty": "2. W penalty + its backward to the parameters: batched vs per-sample loop",
    "logprobs": "3. Response log-probs, forward included: sequence_logprobs vs the per-row "
                "re-tokenising loop",
    "memory": "4. Peak extra memory of one update_step, ratio over the plain method",
    "generation": "5. Generation rate of each rollout engine: response tokens per second",
}


@dataclass(frozen=True)
class ModelSize:
    """A GPT-2 or Llama architecture; ``vocab_size`` None takes the demo tokenizer's
    vocabulary."""

    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int | None
    seq_len: int  # default prompt + response tokens (the prompt gets a quarter)
    family: str = "gpt2"
    n_kv_head: int | None = None  # Llama: grouped-query attention
    intermediate: int | None = None  # Llama: the MLP's width


MODELS = {
    "tiny": ModelSize(2, 64, 4, None, 32),  # the offline demo's policy
    "small": ModelSize(4, 256, 4, 4096, 64),  # the CPU default: 16 prompt + 48 response
    "gpt2-small": ModelSize(12, 768, 12, 50257, 128),  # GPT-2 small, for the GPU
    # Llama-3.2-1B's shape (tied embeddings, 1.24B parameters), random init, for the GPU
    "llama-1b": ModelSize(16, 2048, 32, 128256, 512, family="llama", n_kv_head=8,
                          intermediate=8192),
    # the same family at a CPU-sized shape, to test the Llama path (--quick --model llama-tiny)
    "llama-tiny": ModelSize(2, 64, 4, 512, 32, family="llama", n_kv_head=2, intermediate=128),
}


@dataclass(frozen=True)
class Settings:
    """What one benchmark run measures, and at which sizes (see ``bench_llm.parse_args``)."""

    device: str
    model: str
    pairs: int
    seq_len: int
    bf16: bool
    repeats: int
    penalty_pairs: tuple[int, ...]
    loop_budget_s: float
    methods: tuple[str, ...]
    sections: tuple[str, ...]
    memory_jobs: int
    seed: int
    quick: bool
    out_dir: Path
    gradient_checkpointing: bool = False
    peak_tflops: float | None = None
    packing: bool = False  # padding-free update forwards (the trainer's ``packing`` key)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """bfloat16 under ``--bf16``, else None (no autocast)."""
        return torch.bfloat16 if self.bf16 else None

    @property
    def tolerance(self) -> float:
        """Relative tolerance of the equality checks (bf16 rounds at 2^-8)."""
        return 5e-2 if self.bf16 else 1e-3


def autocast(settings: Settings) -> contextlib.AbstractContextManager:
    """bf16 autocast on the settings' device when ``--bf16``, else nothing."""
    if not settings.bf16:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(settings.device).type, dtype=torch.bfloat16)


# ------------------------------------------------------------------------ model and batches


def demo_tokenizer():
    """The offline demo's word-level tokenizer (special ids: pad 0, bos 1, eos 2, unk 3)."""
    return train_demo_tokenizer(demo_corpus(500))


def build_model(settings: Settings, tokenizer) -> GPT2LMHeadModel | LlamaForCausalLM:
    """A randomly initialised model of ``settings.model``'s size, without dropout, built on
    its device (a 1B model initialised on the CPU would take most of a minute)."""
    torch.manual_seed(settings.seed)
    size = MODELS[settings.model]
    if size.family == "llama":
        config = LlamaConfig(vocab_size=size.vocab_size, hidden_size=size.n_embd,
                             num_hidden_layers=size.n_layer, num_attention_heads=size.n_head,
                             num_key_value_heads=size.n_kv_head,
                             intermediate_size=size.intermediate,
                             max_position_embeddings=max(2048, settings.seq_len),
                             rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=BOS,
                             eos_token_id=EOS, pad_token_id=PAD)
        with torch.device(settings.device):
            model = LlamaForCausalLM(config)
    elif size.vocab_size is None:
        config = demo_model_config(tokenizer, n_layer=size.n_layer, n_embd=size.n_embd,
                                   n_head=size.n_head, n_positions=max(64, settings.seq_len))
    else:
        config = GPT2Config(vocab_size=size.vocab_size, n_layer=size.n_layer,
                            n_embd=size.n_embd, n_head=size.n_head,
                            n_positions=max(1024, settings.seq_len), resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=BOS,
                            eos_token_id=EOS, pad_token_id=PAD)
    if size.family == "gpt2":
        model = GPT2LMHeadModel(config).to(settings.device)
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def prompt_width_of(seq_len: int) -> int:
    """Prompt positions of a synthetic sequence: a quarter of it."""
    return max(2, seq_len // 4)


def synthetic_batch(model: GPT2LMHeadModel, pairs: int, seq_len: int, seed: int) -> PairBatch:
    """``pairs`` prompts with two responses each, laid out as ``generate`` returns them.

    Prompts (<bos> and random words) are left-padded to seq_len // 4 tokens with lengths
    drawn from [a quarter, all] of that; responses right-padded to the rest, lengths drawn
    likewise per response. Rewards are N(0, 1); the sampling log-probabilities are the
    model's own, the reference's the model's plus N(0, 1) noise.
    """
    gen = torch.Generator().manual_seed(seed)
    prompt_width = prompt_width_of(seq_len)
    response_width = seq_len - prompt_width
    vocab = model.config.vocab_size
    prompt_len = torch.randint(max(2, prompt_width // 4), prompt_width + 1, (pairs, 1, 1),
                               generator=gen)
    response_len = torch.randint(max(1, response_width // 4), response_width + 1, (pairs, 2, 1),
                                 generator=gen)
    position = torch.arange(seq_len)
    prompt_mask = (position < prompt_width) & (position >= prompt_width - prompt_len)
    response_mask = (position >= prompt_width) & (position < prompt_width + response_len)
    attention_mask = (prompt_mask | response_mask).long()
    ids = torch.randint(FIRST_WORD, vocab, (pairs, 2, seq_len), generator=gen)
    ids[:, 1, :prompt_width] = ids[:, 0, :prompt_width]  # one prompt per pair
    ids[position.expand_as(ids) == prompt_width - prompt_len] = BOS
    ids[attention_mask == 0] = PAD
    device = next(model.parameters()).device
    ids, attention_mask = ids.to(device), attention_mask.to(device)
    response_mask = response_mask.long().to(device)
    with torch.no_grad():  # in slices of rows: a 1B model's full-batch logits would not fit
        own = torch.cat([sequence_logprobs(model, *(t.view(-1, seq_len)[rows] for t in (
            ids, attention_mask, response_mask))).logprobs
            for rows in torch.arange(2 * pairs).split(16)]).view(pairs, 2)
    rewards = torch.randn(pairs, 2, generator=gen).to(device)
    reference = own + torch.randn(pairs, 2, generator=gen).to(device)
    return PairBatch(ids, attention_mask, response_mask, own, rewards, reference)


def methods_with_baselines(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` plus the plain method every robust one is compared with, baselines first."""
    wanted = set(names) | {make_method(name).pointwise for name in names}
    return tuple(m for m in (*BASELINES, *ROBUST) if m in wanted)


def baseline_of(name: str) -> str:
    """The plain method ``name`` is compared with (itself for a plain method)."""
    return make_method(name).pointwise


def target_of(name: str, device: str = "cpu", measure: str = "time") -> float | None:
    """The largest allowed ratio over the plain method (None for a plain method)."""
    spec = make_method(name).spec
    if spec is None:
        return None
    if spec.needs_input_gradients:
        return TARGET_WASSERSTEIN[measure]
    return TARGET_DIVERGENCE[torch.device(device).type]


def verdict(ratio: float, target: float | None) -> str:
    """PASS or FAIL of ``ratio`` against ``target``; "-" where there is none."""
    if target is None:
        return "-"
    return "PASS" if ratio <= target else "FAIL"


def max_rel_err(got: Tensor, want: Tensor) -> float:
    """max |got - want| / max |want| (0 when both are 0)."""
    scale = want.abs().max().clamp_min(torch.finfo(want.dtype).tiny)
    return float((got.float() - want.float()).abs().max() / scale.float())
