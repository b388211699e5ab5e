"""``drosim-llm sft``: supervised fine-tuning of a causal LM, the stage-0 policy.

    sft("meta-llama/Llama-3.2-1B", "hh.parquet", "models/sft", field="chosen")

The data is one column of a table read by :func:`drosim.llm.components.data.read_table`:

- plain text (a string): the LM loss covers every token, an EOS appended so the model
  learns to stop;
- a conversation (a list of ``{"role", "content"}`` messages, or an Anthropic-HH transcript,
  read whole by :func:`drosim.llm.components.data.hh_conversation`): rendered with the tokenizer's
  chat template, the loss on the assistant turns only (each turn's text and the end-of-turn
  tokens its template writes after it). The turns are found by rendering the conversation
  up to each assistant message; a template that does not render a conversation as the
  concatenation of its turns (one that rewrites earlier turns), or a slow tokenizer (no
  character offsets), falls back to the loss on every token, with a note.

The output folder (model + tokenizer, chat template included) is what ``drosim-llm train``
takes as ``model``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from drosim.llm.components.data import HH_HUMAN, Message, as_messages, hh_conversation, read_table
from drosim.llm.recipes.stage0 import (
    check_recipe,
    claimed,
    fit,
    training_arguments,
)

IGNORE = -100  # the label transformers' LM loss skips
DEFAULT_FIELDS = ("text", "messages")


def sft(model: str, data: str, out: str | Path, *, field: str | None = None,
        split: str = "train", epochs: float = 1.0, lr: float = 2e-5, batch_size: int = 8,
        max_length: int = 1024, seed: int = 0, bf16: bool = False,
        trust_remote_code: bool = False, overwrite: bool = False, resume: bool = False,
        save_steps: int = 500, callbacks: Sequence[Any] = ()) -> Path:
    """Fine-tune the causal LM ``model`` on the texts or conversations of ``data``.

    Args:
        model: a local folder or hub name of a causal LM (and its tokenizer).
        data: a table (see :func:`drosim.llm.components.data.read_table`; a ``.txt`` file is one
            text per line).
        out: the folder to write (new or empty unless ``overwrite``).
        field: the column to train on; ``None``: ``"text"``, else ``"messages"``.
        split: the split of a ``DatasetDict`` folder or hub dataset.
        epochs: passes over the data.
        lr: peak learning rate (linear decay, AdamW, as ``Trainer`` does).
        batch_size: examples per step.
        max_length: tokens kept per example (the rest cut from the end).
        seed: seed of the initialisation, shuffling and dropout.
        bf16: bfloat16 mixed precision.
        trust_remote_code: allow a model folder that ships custom code.
        overwrite: replace a non-empty ``out`` and any interrupted run's checkpoints.
        resume: continue an interrupted run (same arguments) from its newest checkpoint in
            ``<out>.work/``.
        save_steps: steps between checkpoints.
        callbacks: more ``transformers.TrainerCallback`` objects.

    Returns:
        ``out``, holding the fine-tuned model, its tokenizer and ``train_metrics.json``.

    Raises:
        FileNotFoundError: a missing data file.
        FileExistsError: a non-empty ``out`` or an interrupted run's work dir, without
            ``overwrite`` (or ``resume``).
        ValueError: bad hyperparameters, an unreadable or empty table, an unknown column (the
            columns named), a row that is not a non-empty text or conversation (its index
            named), a conversation without a chat template, or custom code without
            ``trust_remote_code``, or a local model folder with damaged files; all before
            anything is written.
        OutputError: ``out`` is in use by another process (its pid named).

    Example:
        >>> sft("models/tiny", "texts.txt", "models/tiny-sft", epochs=3)  # doctest: +SKIP
        PosixPath('models/tiny-sft')
    """
    from transformers import Trainer

    from drosim.llm.recipes.export import load_pretrained_policy

    out = Path(out)
    work = check_recipe(out, model, epochs=epochs, lr=lr, batch_size=batch_size,
                        max_length=max_length, save_steps=save_steps, overwrite=overwrite,
                        resume=resume, trust_remote_code=trust_remote_code)
    table = read_table(data, split)
    column = sft_column(table.column_names, field, where=data)
    examples = [as_example(value, row=i, where=f"{data} field {column!r}")
                for i, value in enumerate(table[column])]
    policy, tokenizer = load_pretrained_policy(model, trust_remote_code=trust_remote_code)
    if policy.config.pad_token_id is None:
        policy.config.pad_token_id = tokenizer.pad_token_id
    rows = tokenize_examples(examples, tokenizer, max_length=max_length, where=data)
    with claimed(out, overwrite=overwrite, resume=resume):  # the first write
        trainer = Trainer(
            model=policy, processing_class=tokenizer, train_dataset=rows,
            data_collator=PadCollator(tokenizer.pad_token_id), callbacks=list(callbacks),
            args=training_arguments(work, epochs=epochs, lr=lr, batch_size=batch_size,
                                    seed=seed, bf16=bf16, save_steps=save_steps))
        fit(trainer, tokenizer, out, work, resume=resume, overwrite=overwrite,
            metrics={"examples": len(rows)})
    return out


def sft_column(columns: list[str], field: str | None, *, where: str) -> str:
    """The column to train on: ``field`` if given, else the first of :data:`DEFAULT_FIELDS`.

    Raises:
        ValueError: the column is missing; the columns named.

    Example:
        >>> sft_column(["id", "messages"], None, where="chats.jsonl")
        'messages'
    """
    if field is None:
        field = next((name for name in DEFAULT_FIELDS if name in columns), None)
        if field is None:
            raise ValueError(f"{where}: no 'text' or 'messages' column; pass --field, one of "
                             f"the columns: {', '.join(columns)}")
    if field not in columns:
        raise ValueError(f"{where}: no field {field!r}; columns: {', '.join(columns)}")
    return field


def as_example(value: Any, *, row: int, where: str) -> str | list[Message]:
    """One cell as a training example: a non-empty text, or a conversation (an HH
    transcript's whole conversation, or a list of string messages with an assistant turn).

    Raises:
        ValueError: naming ``where`` and the row, for anything else (None, NaN, empty text,
            malformed messages, a conversation with nothing to learn).

    Example:
        >>> as_example("\\n\\nHuman: hi\\n\\nAssistant: hello", row=0, where="hh")
        [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello'}]
    """
    if isinstance(value, str) and value.strip():
        return hh_conversation(value) if value.startswith(HH_HUMAN) else value
    messages = as_messages(value, needs="assistant")
    if messages is not None:
        return messages
    raise ValueError(f"{where}: row {row}: an example must be a non-empty string or a list of "
                     f"{{'role', 'content'}} messages with an assistant turn, got "
                     f"{value!r:.80}")


def tokenize_examples(examples: Sequence[str | list[Message]], tokenizer, *, max_length: int,
                      where: str) -> list[dict[str, list[int]]]:
    """Token ids and LM labels of each example (see the module docstring for the loss).

    A conversation whose assistant turns all lie beyond ``max_length`` teaches nothing and
    is dropped, with a note.

    Raises:
        ValueError: a conversation and a tokenizer without a chat template, or nothing left.
    """
    rows, dropped, every_token = [], 0, 0
    for example in examples:
        if isinstance(example, str):
            ids = tokenizer(example, truncation=True, max_length=max_length)["input_ids"]
            if not ids or ids[-1] != tokenizer.eos_token_id:
                ids = [*ids[:max_length - 1], tokenizer.eos_token_id]
            rows.append({"input_ids": ids, "labels": list(ids)})
            continue
        if not tokenizer.chat_template:
            raise ValueError(f"{where}: conversations need a tokenizer with a chat template; "
                             "this one has none")
        ids, labels, located = _chat_tokens(example, tokenizer, max_length)
        every_token += not located
        if all(label == IGNORE for label in labels):
            dropped += 1
            continue
        rows.append({"input_ids": ids, "labels": labels})
    if every_token:
        print(f"drosim-llm: note: {every_token} conversations are trained on every token: "
              "the chat template does not render them turn by turn (or the tokenizer has no "
              "character offsets)", file=sys.stderr)
    if dropped:
        print(f"drosim-llm: note: {dropped} conversations have no assistant token within "
              f"max_length={max_length} and are left out", file=sys.stderr)
    if not rows:
        raise ValueError(f"{where}: no example has an assistant token within "
                         f"max_length={max_length}")
    return rows


def _chat_tokens(messages: list[Message], tokenizer, max_length: int
                 ) -> tuple[list[int], list[int], bool]:
    """(ids, labels, whether the turns were located) of a rendered conversation: labels on
    the assistant turns' characters, or on every token when the turns cannot be located (see
    the module docstring)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = _assistant_spans(messages, tokenizer, text) if tokenizer.is_fast else None
    encoded = tokenizer(text, add_special_tokens=False,  # the template writes BOS itself
                        truncation=True, max_length=max_length,
                        return_offsets_mapping=spans is not None)
    ids = encoded["input_ids"]
    if spans is None:
        return ids, list(ids), False
    labels = [token if any(a < end and b > start for start, end in spans) else IGNORE
              for token, (a, b) in zip(ids, encoded["offset_mapping"], strict=True)]
    return ids, labels, True


def _assistant_spans(messages: list[Message], tokenizer, text: str
                     ) -> list[tuple[int, int]] | None:
    """Character spans of the assistant turns in ``text`` (the whole rendering): each from
    the end of the conversation before it (with the generation prompt) to the end of the
    conversation through it; ``None`` if a partial rendering is not a prefix of ``text``."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            start = tokenizer.apply_chat_template(messages[:i], tokenize=False,
                                                  add_generation_prompt=True)
            through = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        # a template may refuse a partial conversation (e.g. none, or not ending with a user)
        except Exception:
            return None
        if not (through.startswith(start) and text.startswith(through)):
            return None
        spans.append((len(start), len(through)))
    return spans


class PadCollator:
    """Right-pads ``input_ids`` (with ``pad_id``) and ``labels`` (with the ignored label) of
    a list of rows into tensors, with the attention mask.

    Example:
        >>> batch = PadCollator(0)([{"input_ids": [5, 6], "labels": [5, 6]},
        ...                         {"input_ids": [7], "labels": [7]}])
        >>> batch["input_ids"].tolist(), batch["labels"].tolist()
        ([[5, 6], [7, 0]], [[5, 6], [7, -100]])
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)

        def padded(key: str, value: int) -> torch.Tensor:
            return torch.tensor([row[key] + [value] * (width - len(row[key])) for row in rows])

        mask = [[1] * len(row["input_ids"]) + [0] * (width - len(row["input_ids"]))
                for row in rows]
        return {"input_ids": padded("input_ids", self.pad_id), "labels": padded("labels", IGNORE),
                "attention_mask": torch.tensor(mask)}
