"""``drosim-llm train-reward``: a sequence classifier on labelled text, a stage-0 reward.

    train_reward("distilroberta-base", "emotion.parquet", "models/emotion-rm")

Each label is a class and each class an objective: the output folder's ``id2label`` names
the heads, so ``SequenceClassifierReward(out)`` scores a response under every label (the
paper's six emotions). From a causal-LM base the classification head is new (that is the
point); from a classifier with other labels the head is replaced.

The classifier is trained on the plain texts, so the folder's tokenizer is written without
a chat template: :class:`~drosim.llm.components.rewards.SequenceClassifierReward` then scores the
plain text ``prompt + " " + response`` rather than a chat rendering it never saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from drosim.llm.components.data import read_table
from drosim.llm.recipes.stage0 import (
    check_recipe,
    check_rows,
    claimed,
    eval_rows,
    fit,
    training_arguments,
)


def train_reward(model: str, data: str, out: str | Path, *, text_field: str = "text",
                 label_field: str = "label", labels: Sequence[str] | None = None,
                 split: str = "train", eval_fraction: float = 0.1, epochs: float = 1.0,
                 lr: float = 2e-5, batch_size: int = 16, max_length: int = 512, seed: int = 0,
                 bf16: bool = False, trust_remote_code: bool = False, overwrite: bool = False,
                 resume: bool = False, save_steps: int = 500,
                 callbacks: Sequence[Any] = ()) -> Path:
    """Train ``model`` as a classifier of ``data``'s labels; write it as ``out``.

    Args:
        model: a local folder or hub name (a classifier, or a base model whose new head is
            trained).
        data: a table (see :func:`drosim.llm.components.data.read_table`).
        out: the folder to write (new or empty unless ``overwrite``).
        text_field: the column of the texts.
        label_field: the column of the labels (ints or strings).
        labels: the class names, in id order, when the column is not a ``ClassLabel``
            (which names them itself); ``None``: string labels sorted, or the ints.
        split: the split of a ``DatasetDict`` folder or hub dataset.
        eval_fraction: the seeded random fraction of rows held out for the accuracy.
        epochs, lr, batch_size, max_length, seed, bf16: as :func:`drosim.llm.recipes.sft.sft`.
        trust_remote_code: allow a model folder that ships custom code.
        overwrite: replace a non-empty ``out`` and any interrupted run's checkpoints.
        resume: continue an interrupted run (same arguments) from ``<out>.work/``.
        save_steps: steps between checkpoints.
        callbacks: more ``transformers.TrainerCallback`` objects.

    Returns:
        ``out``: the classifier, its tokenizer and ``train_metrics.json`` (``eval_accuracy``
        on the held-out rows when ``eval_fraction > 0``, ``train_loss``, the label names).

    Raises:
        FileNotFoundError: a missing data file.
        FileExistsError: a non-empty ``out`` or an interrupted run's work dir, without
            ``overwrite`` (or ``resume``).
        ValueError: bad hyperparameters, an unreadable or empty table, an unknown column (the
            columns named), an empty or missing text, a label that is not an int or string
            or not one of ``labels``, fewer than two classes, or custom code without
            ``trust_remote_code``, or a local model folder with damaged files; all before
            anything is written.
        OutputError: ``out`` is in use by another process (its pid named).

    Example:
        >>> train_reward("models/base", "emotion.parquet", "models/rm")  # doctest: +SKIP
        PosixPath('models/rm')
    """
    from transformers import DataCollatorWithPadding, Trainer, set_seed

    out = Path(out)
    work = check_recipe(out, model, epochs=epochs, lr=lr, batch_size=batch_size,
                        max_length=max_length, save_steps=save_steps, overwrite=overwrite,
                        resume=resume, trust_remote_code=trust_remote_code)
    texts, names, ids = read_labelled(data, split, text_field=text_field,
                                      label_field=label_field, labels=labels)
    train_idx, eval_idx = eval_rows(len(texts), eval_fraction, seed)
    set_seed(seed)  # the new head is initialised while loading
    classifier, tokenizer = load_classifier(model, names, trust_remote_code=trust_remote_code)
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    rows = [{"input_ids": e, "label": i} for e, i in zip(encoded, ids, strict=True)]
    metrics: dict[str, Any] = {"labels": names, "train_rows": len(train_idx),
                               "eval_rows": len(eval_idx)}
    held_out = [rows[i] for i in eval_idx]
    with claimed(out, overwrite=overwrite, resume=resume):  # the first write
        trainer = Trainer(
            model=classifier, processing_class=tokenizer,
            train_dataset=[rows[i] for i in train_idx],
            data_collator=DataCollatorWithPadding(tokenizer), callbacks=list(callbacks),
            args=training_arguments(work, epochs=epochs, lr=lr, batch_size=batch_size,
                                    seed=seed, bf16=bf16, save_steps=save_steps))
        fit(trainer, tokenizer, out, work, resume=resume, overwrite=overwrite,
            metrics=metrics, evaluate=(lambda: {"eval_accuracy": accuracy(trainer, held_out)})
            if held_out else None)
    return out


def read_labelled(data: str, split: str, *, text_field: str, label_field: str,
                  labels: Sequence[str] | None) -> tuple[list[str], list[str], list[int]]:
    """The texts of ``data``'s table, its class names and each row's class id.

    Args:
        data: a table (see :func:`drosim.llm.components.data.read_table`).
        split: the split of a ``DatasetDict`` folder or hub dataset.
        text_field: the column of the texts.
        label_field: the column of the labels.
        labels: the class names in id order, or None (see :func:`label_ids`).

    Returns:
        (texts, class names in id order, each row's class id).

    Raises:
        FileNotFoundError: a missing data file.
        ValueError: an unreadable or empty table, an unknown column (the columns named), an
            empty or missing text, or a label refused by :func:`label_ids`.
    """
    table = read_table(data, split)
    for field in (text_field, label_field):
        if field not in table.column_names:
            raise ValueError(f"{data}: no field {field!r}; columns: "
                             f"{', '.join(table.column_names)}")
    texts = list(table[text_field])
    check_rows("the text", texts, where=f"{data} field {text_field!r}")
    names, ids = label_ids(list(table[label_field]), table.features[label_field], labels,
                           where=f"{data} field {label_field!r}")
    return texts, names, ids


def label_ids(values: Sequence[Any], feature: Any, labels: Sequence[str] | None, *,
              where: str) -> tuple[list[str], list[int]]:
    """(class names in id order, each row's class id) of a label column.

    The names come from a ``ClassLabel`` feature, else ``labels``, else the sorted distinct
    string labels, else the sorted distinct ints (named by their digits, ids by rank). A
    whole float is read as its int: an int column with a missing value reads as floats, and
    the missing one is then the row refused.

    Raises:
        ValueError: a label that is not an int or string (None, NaN, 1.5, a bool), an int
            outside the names' ids, a string not among them, ``labels`` that disagree with a
            ``ClassLabel`` or repeat a name, a column mixing ints and strings, or fewer than
            two classes.

    Example:
        >>> label_ids(["joy", "fear", "joy"], None, None, where="x")
        (['fear', 'joy'], [1, 0, 1])
        >>> label_ids([3, 1], None, None, where="x")
        (['1', '3'], [1, 0])
    """
    values = [int(v) if isinstance(v, float) and v.is_integer() else v for v in values]
    for row, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"{where}: row {row}: a label must be an int or a string, got "
                             f"{value!r:.80}")
    kinds = {type(value) for value in values}
    if len(kinds) > 1:
        raise ValueError(f"{where}: labels mix ints and strings")
    class_names = getattr(feature, "names", None)  # a datasets.ClassLabel
    if class_names is not None and labels is not None and list(labels) != list(class_names):
        raise ValueError(f"{where}: labels {list(labels)} disagree with the column's "
                         f"ClassLabel names {list(class_names)}")
    names = [str(n) for n in (class_names or labels or [])]
    if len(set(names)) != len(names):
        raise ValueError(f"labels repeat a name: {names}")
    if not names:
        distinct = sorted(set(values))
        names = [str(v) for v in distinct]
        index = {value: i for i, value in enumerate(distinct)}
    elif kinds == {str}:
        index = {name: i for i, name in enumerate(names)}
    else:
        index = {i: i for i in range(len(names))}
    if len(names) < 2:
        raise ValueError(f"{where}: a classifier needs at least two classes, got {names}")
    for row, value in enumerate(values):
        if value not in index:
            raise ValueError(f"{where}: row {row}: label {value!r} is not one of the "
                             f"{len(names)} classes {names} (ids 0 to {len(names) - 1})")
    return names, [index[value] for value in values]


def load_classifier(model: str, names: list[str], *, trust_remote_code: bool):
    """A float32 sequence classifier with one head per name (``id2label`` set) and its
    tokenizer (EOS as padding when it has none; no chat template, see the module).

    Example:
        >>> load_classifier("models/base", ["joy", "fear"], trust_remote_code=False)
        ... # doctest: +SKIP
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = None
    classifier = AutoModelForSequenceClassification.from_pretrained(
        model, num_labels=len(names), id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)}, dtype=torch.float32,
        trust_remote_code=trust_remote_code,
        # a classifier of other labels: its head is replaced, not an error
        ignore_mismatched_sizes=True)
    # the classifier reads its score at the last non-padding token: it must know padding
    classifier.config.pad_token_id = tokenizer.pad_token_id
    return classifier, tokenizer


def accuracy(trainer, rows: list[dict[str, Any]]) -> float:
    """The fraction of ``rows`` whose label is the trained classifier's top logit."""
    prediction = trainer.predict(rows)
    logits = prediction.predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    return float((np.argmax(logits, axis=-1) == np.asarray(prediction.label_ids)).mean())
