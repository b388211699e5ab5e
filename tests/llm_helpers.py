"""Tiny models, random response-pair batches and independent references for the llm tests.

Everything here is built from a config in-process (no download, CPU). The references
(:func:`naive_logprobs`, :func:`flat_grad`, :func:`directional_derivative`) are written from
the definitions, not from drosim.llm, so a test that uses them checks the library against the
mathematics rather than against itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from drosim.llm.components.batch import PairBatch
from drosim.llm.components.methods import make_method
from drosim.llm.components.update import update_step

F64 = torch.float64
PAD, BOS, EOS = 0, 1, 2
VOCAB = 40
# Ordinary (non-special) token ids drawn for prompts and responses.
FIRST_WORD = 3
# A word-level vocabulary of VOCAB entries: the three special tokens, then w3 .. w39.
WORDS = ["[PAD]", "[BOS]", "[EOS]"] + [f"w{i}" for i in range(FIRST_WORD, VOCAB)]


def tiny_config(**overrides) -> GPT2Config:
    """A two-layer, 16-wide GPT-2 config without dropout; ``overrides`` replace fields."""
    kwargs = dict(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=32,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=BOS,
                  eos_token_id=EOS, pad_token_id=PAD)
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


def tiny_model(seed: int = 0, dtype: torch.dtype = F64) -> GPT2LMHeadModel:
    """A freshly initialised tiny GPT-2 LM in eval mode, in ``dtype`` (float64 by default).

    The initial weights (std 0.02) make every token nearly equiprobable; the weights are
    spread out a little so that log-probabilities, losses and their gradients are far from
    the degenerate uniform model.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(tiny_config()).to(dtype).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:  # weight matrices; LayerNorm gains and biases stay as set
                param.add_(0.3 * torch.randn(param.shape, generator=generator, dtype=dtype))
    return model


def tiny_tokenizer(*, pad: bool = True) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over :data:`WORDS`, built in-process (ids match
    :func:`tiny_config`: [PAD] 0, [BOS] 1, [EOS] 2). ``pad=False`` leaves it without a pad
    token, as GPT-2's own tokenizer. Unknown words map to [EOS]; the tests use listed words
    only."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)},
                                         unk_token="[EOS]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = dict(bos_token="[BOS]", eos_token="[EOS]", unk_token="[EOS]")
    if pad:
        special["pad_token"] = "[PAD]"
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def random_pair_batch(n: int, *, seed: int = 0, max_prompt: int = 5, max_response: int = 5,
                      empty_rows: Sequence[int] = (), with_reference: bool = True,
                      dtype: torch.dtype = F64) -> PairBatch:
    """n random pairs: left-padded prompts then right-padded responses of varied lengths.

    Every prompt starts with BOS and has 1..``max_prompt`` tokens in all; every response has
    1..``max_response`` tokens (some ending in EOS) except the flat rows listed in
    ``empty_rows`` (row 2i + j is response j of prompt i), which have none. The common length is
    ``max_prompt + max_response``; the two responses of a prompt share the prompt. Rewards,
    sampling and reference log-probabilities are drawn varied (no ties) so robust weights
    are generic.
    """
    generator = torch.Generator().manual_seed(seed)

    def randint(low: int, high: int, size=()) -> Tensor:
        return torch.randint(low, high, size, generator=generator)

    length = max_prompt + max_response
    ids = torch.full((n, 2, length), PAD, dtype=torch.long)
    attention = torch.zeros((n, 2, length), dtype=torch.long)
    response = torch.zeros((n, 2, length), dtype=torch.long)
    for i in range(n):
        prompt_length = int(randint(1, max_prompt + 1))
        prompt = torch.cat([torch.tensor([BOS]), randint(FIRST_WORD, VOCAB, (prompt_length - 1,))])
        start = max_prompt - prompt_length
        for j in range(2):
            ids[i, j, start:max_prompt] = prompt
            attention[i, j, start:max_prompt] = 1
            if 2 * i + j in empty_rows:
                continue
            response_length = int(randint(1, max_response + 1))
            tokens = randint(FIRST_WORD, VOCAB, (response_length,))
            if bool(randint(0, 2)):
                tokens[-1] = EOS
            ids[i, j, max_prompt:max_prompt + response_length] = tokens
            attention[i, j, max_prompt:max_prompt + response_length] = 1
            response[i, j, max_prompt:max_prompt + response_length] = 1
    rewards = torch.rand((n, 2), generator=generator, dtype=dtype) * 2 - 1
    sampling = -torch.rand((n, 2), generator=generator, dtype=dtype) * 10 - 5
    reference = -torch.rand((n, 2), generator=generator, dtype=dtype) * 10 - 5
    return PairBatch(ids, attention, response, sampling, rewards,
                     reference if with_reference else None)


def near_policy(batch: PairBatch, model: nn.Module, *, seed: int = 0, noise: float = 0.3
                ) -> PairBatch:
    """``batch`` with sampling and reference log-probabilities set to ``model``'s own plus
    Gaussian noise of std ``noise``, as after a few updates away from pi_t and pi_ref: the
    REBEL and DPO losses then have the moderate, varied sizes of a real run."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        logprobs = naive_logprobs(model, batch.flat("input_ids"), batch.flat("attention_mask"),
                                  batch.flat("response_mask")).view(len(batch), 2)

    def noisy() -> Tensor:
        return logprobs + noise * torch.randn(logprobs.shape, generator=generator,
                                              dtype=logprobs.dtype)

    return PairBatch(batch.input_ids, batch.attention_mask, batch.response_mask, noisy(),
                     batch.rewards, noisy())


def unpadded(ids: Tensor, attention: Tensor, response: Tensor) -> tuple[Tensor, Tensor]:
    """One row's real tokens and its response mask restricted to them (padding dropped)."""
    keep = attention.bool()
    return ids[keep], response[keep]


def naive_logprobs(model: nn.Module, ids: Tensor, attention: Tensor, response: Tensor
                   ) -> Tensor:
    """Reference log pi(y | x) per row: strip each row's padding, run the model on that row
    alone (no mask, default positions) and sum log_softmax over its response tokens."""
    values = []
    for row in range(ids.shape[0]):
        tokens, mask = unpadded(ids[row], attention[row], response[row])
        logits = model(input_ids=tokens[None], use_cache=False).logits[0]
        logp = torch.log_softmax(logits, dim=-1)
        total = logits.new_zeros(())
        for t in range(1, tokens.shape[0]):
            if mask[t]:
                total = total + logp[t - 1, tokens[t]]
        values.append(total)
    return torch.stack(values)


def repad(ids: Tensor, attention: Tensor, response: Tensor, side: str
          ) -> tuple[Tensor, Tensor, Tensor]:
    """The same ``(batch, T)`` sequences with all of each row's padding moved to ``side``
    ("left" or "right")."""
    out_ids = torch.full_like(ids, PAD)
    out_attention, out_response = torch.zeros_like(attention), torch.zeros_like(response)
    length = ids.shape[1]
    for row in range(ids.shape[0]):
        tokens, mask = unpadded(ids[row], attention[row], response[row])
        k = tokens.shape[0]
        where = slice(0, k) if side == "right" else slice(length - k, length)
        out_ids[row, where], out_attention[row, where], out_response[row, where] = tokens, 1, mask
    return out_ids, out_attention, out_response


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The model's parameters that require a gradient (tied weights listed once)."""
    return [p for p in model.parameters() if p.requires_grad]


def flat_grad(value: Tensor, params: Sequence[nn.Parameter], **kwargs) -> Tensor:
    """d value / d params as one flat vector (zeros for parameters it does not depend on)."""
    grads = torch.autograd.grad(value, params, allow_unused=True, **kwargs)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                      for g, p in zip(grads, params, strict=True)])


def flat_param_grads(params: Sequence[nn.Parameter]) -> Tensor:
    """The accumulated ``.grad`` of every parameter as one flat vector (zeros where None)."""
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1)
                      for p in params])


def random_direction(params: Sequence[nn.Parameter], seed: int) -> list[Tensor]:
    """A unit-norm random direction in parameter space, one tensor per parameter."""
    generator = torch.Generator().manual_seed(seed)
    direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
    norm = torch.sqrt(sum(d.square().sum() for d in direction))
    return [d / norm for d in direction]


def directional_derivative(fn: Callable[[], float], params: Sequence[nn.Parameter],
                           direction: Sequence[Tensor], h: float = 1e-5) -> float:
    """Central difference (fn(theta + h v) - fn(theta - h v)) / 2h; restores theta exactly."""
    saved = [p.detach().clone() for p in params]
    values = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for p, s, d in zip(params, saved, direction, strict=True):
                p.copy_(s + sign * h * d)
        values.append(fn())
    with torch.no_grad():
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)
    return (values[0] - values[1]) / (2 * h)


def attention_ops(w_gradient: str, device: str = "cpu") -> set[str]:
    """The attention operators one float32 W-REBEL update_step runs (profiler names)."""
    model = tiny_model(seed=0, dtype=torch.float32)
    batch = near_policy(random_pair_batch(6, seed=1, dtype=torch.float32), model).to(device)
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with torch.profiler.profile() as profile:
        update_step(model, optimizer, batch, make_method("w-rebel", w_rho=0.1), eta=1.0,
                    beta=0.5, max_grad_norm=None, w_gradient=w_gradient)
    return {event.key for event in profile.key_averages() if "attention" in event.key}


def shared_pair_batch() -> PairBatch:
    """Eight pairs (one response empty), log-probabilities near the initial policy's: the
    batch the two-rank tests split."""
    return near_policy(random_pair_batch(8, seed=21, empty_rows=(5,)), tiny_model(seed=0),
                       seed=22)


def _rank_main(rank: int, store: str, on_rank: Callable, batch: PairBatch, out: str) -> None:
    """One gloo rank: ``on_rank`` of its half of ``batch``, saved to ``out/rank{rank}.pt``."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        half = len(batch) // 2
        torch.save(on_rank(batch.select(slice(rank * half, (rank + 1) * half))),
                   Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_on_two_ranks(on_rank: Callable[[PairBatch], dict], batch: PairBatch, tmp: Path
                     ) -> list[dict]:
    """What ``on_rank(local half of batch)`` returns on each of two gloo processes
    (``on_rank`` must be a module-level function, so that the processes can import it)."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(str(tmp / "store"), on_rank, batch, str(tmp)), nprocs=2,
             join=True)
    return [torch.load(tmp / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
