"""The stage-0 recipes on the local stand-ins: ``sft`` lowers the LM loss of its texts and of
its conversations' assistant turns, ``train-reward`` learns the six emotions, both write
folders that ``drosim-llm train`` loads, refuse bad input before training, and resume."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from llm_stand_ins import (  # noqa: E402
    CHAT_TEMPLATE,
    EMOTIONS,
    armolike_folder,
    char_tokenizer,
    tiny_llama_folder,
    write_emotion,
    write_hh,
)

from drosim.llm.cli import main  # noqa: E402
from drosim.llm.components.rewards import SequenceClassifierReward  # noqa: E402
from drosim.llm.recipes.export import load_pretrained_policy  # noqa: E402
from drosim.llm.recipes.reward_training import label_ids, train_reward  # noqa: E402
from drosim.llm.recipes.sft import IGNORE, as_example, sft, tokenize_examples  # noqa: E402
from drosim.llm.recipes.stage0 import METRICS_FILE, work_dir  # noqa: E402

TEXTS = ["the cat sat on the mat", "a happy dog runs home", "we like warm bread",
         "rain falls on the sea"]
FAST = {"epochs": 20, "lr": 1e-2, "batch_size": 2, "max_length": 96}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The tiny Llama policy folder (with the chat template)."""
    return tiny_llama_folder(tmp_path_factory.mktemp("base") / "llama")


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ------------------------------------------------------------------ independent measurements


@torch.no_grad()
def _mean_nll(folder: Path, sequences: list[tuple[list[int], int]]) -> float:
    """Mean next-token NLL of each (ids, first scored position) under the model in
    ``folder``, averaged over sequences; written from the definition, one sequence at a time."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    losses = []
    for ids, first in sequences:
        logits = model(torch.tensor([ids])).logits[0]
        log_probs = torch.log_softmax(logits[:-1].double(), -1)
        targets = torch.tensor(ids[1:])
        token_nll = -log_probs.gather(1, targets[:, None])[:, 0]
        losses.append(token_nll[first - 1:].mean())
    return float(torch.stack(losses).mean())


def _text_sequences(tokenizer, texts: list[str]) -> list[tuple[list[int], int]]:
    """Each text's tokens and EOS, every token scored."""
    return [(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id], 1) for text in texts]


def _reply_sequences(tokenizer, conversations: list[list[dict]]) -> list[tuple[list[int], int]]:
    """Each rendered conversation, only its last assistant reply scored."""
    sequences = []
    for messages in conversations:
        prompt, full = (tokenizer(tokenizer.apply_chat_template(
            m, tokenize=False, add_generation_prompt=g), add_special_tokens=False)["input_ids"]
            for m, g in ((messages[:-1], True), (messages, False)))
        assert full[:len(prompt)] == prompt
        sequences.append((full, len(prompt)))
    return sequences


# ------------------------------------------------------------------------------------- sft


def test_sft_lowers_the_loss_of_plain_texts(tmp_path, base):
    data = _jsonl(tmp_path / "texts.jsonl", [{"text": t, "id": i} for i, t in enumerate(TEXTS)])
    tokenizer = char_tokenizer()
    before = _mean_nll(base, _text_sequences(tokenizer, TEXTS))
    out = sft(str(base), str(data), tmp_path / "sft", **FAST)
    after = _mean_nll(out, _text_sequences(tokenizer, TEXTS))
    assert after < 0.8 * before, (before, after)
    assert not work_dir(out).exists()  # the checkpoints go once the folder is written
    assert json.loads((out / METRICS_FILE).read_text())["examples"] == len(TEXTS)


def test_sft_on_hh_learns_the_replies_and_keeps_the_chat_template(tmp_path, base):
    data = write_hh(tmp_path / "hh.parquet")
    chats = [as_example(t, row=0, where="") for t in datasets.Dataset.from_parquet(
        str(data))["chosen"]]
    tokenizer = char_tokenizer()
    before = _mean_nll(base, _reply_sequences(tokenizer, chats))
    out = sft(str(base), str(data), tmp_path / "sft", field="chosen", **FAST)
    after = _mean_nll(out, _reply_sequences(tokenizer, chats))
    assert after < 0.8 * before, (before, after)
    policy, loaded = load_pretrained_policy(str(out))
    assert loaded.chat_template == CHAT_TEMPLATE
    assert isinstance(policy, transformers.LlamaForCausalLM)


def test_the_loss_covers_the_assistant_turns_only():
    tokenizer = char_tokenizer()
    chat = as_example("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant: yo",
                      row=0, where="")
    (row,) = tokenize_examples([chat], tokenizer, max_length=200, where="")
    assert tokenizer.decode(row["input_ids"]) == (
        "<bos><user>hi<eos><assistant>hello<eos><user>and?<eos><assistant>yo<eos>")
    assert tokenizer.decode([t for t in row["labels"] if t != IGNORE]) == "hello<eos>yo<eos>"
    (text,) = tokenize_examples(["plain"], tokenizer, max_length=200, where="")
    assert text["labels"] == text["input_ids"] and text["input_ids"][-1] == 2  # EOS added


def test_a_template_that_rewrites_earlier_turns_trains_on_every_token(capsys):
    tokenizer = char_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{% if loop.last %}[{{ m['content'] }}]"
                               "{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    (row,) = tokenize_examples([chat], tokenizer, max_length=200, where="")
    assert row["labels"] == row["input_ids"]
    assert "1 conversations are trained on every token" in capsys.readouterr().err


def test_conversations_cut_to_nothing_are_left_out(capsys):
    chats = [[{"role": "user", "content": "a long question " * 5},
              {"role": "assistant", "content": "ok"}],
             [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]]
    rows = tokenize_examples(chats, char_tokenizer(), max_length=20, where="")
    assert len(rows) == 1
    assert "1 conversations have no assistant token within max_length=20" in (
        capsys.readouterr().err)
    with pytest.raises(ValueError, match="no example has an assistant token"):
        tokenize_examples(chats[:1], char_tokenizer(), max_length=20, where="")


# ----------------------------------------------------------------------------- train-reward


@torch.no_grad()
def _accuracy(folder: Path, texts: list[str], labels: list[int]) -> float:
    """Top-logit accuracy of the classifier in ``folder``, one unpadded text at a time."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    hits = [int(model(**tokenizer(t, return_tensors="pt")).logits.argmax()) == y
            for t, y in zip(texts, labels, strict=True)]
    return sum(hits) / len(hits)


def test_train_reward_learns_the_emotions_and_loads_as_a_reward(tmp_path, base):
    data = write_emotion(tmp_path / "emotion.parquet", repeat=8)
    table = datasets.Dataset.from_parquet(str(data))
    out = train_reward(str(base), str(data), tmp_path / "rm", labels=EMOTIONS,
                       eval_fraction=0.1, epochs=4, lr=3e-3, batch_size=8, max_length=64)
    assert _accuracy(out, table["text"][:18], table["label"][:18]) > 0.8  # chance: 1/6
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert metrics["labels"] == EMOTIONS and 0 <= metrics["eval_accuracy"] <= 1
    assert metrics["eval_rows"] == 14 and metrics["train_rows"] == 130
    reward = SequenceClassifierReward(out)
    assert reward.objectives == tuple(EMOTIONS)
    assert reward(["how was it?"], ["i am so happy today"]).shape == (1, 6)


def test_label_names_come_from_a_class_label_then_labels_then_the_values():
    class_label = datasets.ClassLabel(names=["neg", "pos"])
    assert label_ids([1, 0], class_label, None, where="x") == (["neg", "pos"], [1, 0])
    assert label_ids([1, 0], None, ["no", "yes"], where="x") == (["no", "yes"], [1, 0])
    assert label_ids(["yes", "no"], None, ["yes", "no"], where="x") == (["yes", "no"], [0, 1])
    assert label_ids(["b", "a"], None, None, where="x") == (["a", "b"], [1, 0])
    assert label_ids([7, 2], None, None, where="x") == (["2", "7"], [1, 0])
    with pytest.raises(ValueError, match="disagree with the column's ClassLabel"):
        label_ids([1, 0], class_label, ["pos", "neg"], where="x")


# ------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("rows", "kwargs", "error", "message"), [
    ([{"text": None, "label": 0}, {"text": "b", "label": 1}], {}, ValueError,
     "row 0: the text must be a non-empty string, got None"),
    ([{"text": "a", "label": 0}, {"text": " ", "label": 1}], {}, ValueError,
     "row 1: the text must be a non-empty string"),
    ([{"text": "a", "label": 0}, {"text": "b", "label": 1.5}], {}, ValueError,
     "row 1: a label must be an int or a string, got 1.5"),
    ([{"text": "a", "label": 0}, {"text": "b", "label": None}], {}, ValueError,
     "row 1: a label must be an int or a string, got None"),
    ([{"text": "a", "label": 0}, {"text": "b", "label": float("nan")}], {}, ValueError,
     "row 1: a label must be an int or a string, got nan"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": 1}], {}, ValueError,
     "labels mix ints and strings"),
    ([{"text": "a", "label": 0}, {"text": "b", "label": 3}], {"labels": ["x", "y"]},
     ValueError, r"row 1: label 3 is not one of the 2 classes \['x', 'y'\]"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "z"}], {"labels": ["x", "y"]},
     ValueError, "row 1: label 'z' is not one of"),
    ([{"text": "a", "label": 1}, {"text": "b", "label": 1}], {}, ValueError,
     "at least two classes"),
    ([{"text": "a", "label": 0}], {"text_field": "sentence"}, ValueError,
     "no field 'sentence'; columns: text, label"),
    ([{"text": "a", "label": 0}, {"text": "b", "label": 1}], {"epochs": 0}, ValueError,
     "epochs must be a positive number"),
    ([{"text": "a", "label": 0}, {"text": "b", "label": 1}], {"lr": -1.0}, ValueError,
     "lr must be a positive number"),
    ([{"text": "a", "label": 0}, {"text": "b", "label": 1}], {"batch_size": 0}, ValueError,
     "batch_size must be an integer >= 1"),
    ([{"text": "a", "label": 0}, {"text": "b", "label": 1}], {"eval_fraction": 0.9},
     ValueError, "leaves no training row"),
])
def test_train_reward_refuses_bad_input_before_training(tmp_path, base, rows, kwargs, error,
                                                         message):
    data = _jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "rm"
    with pytest.raises(error, match=message):
        train_reward(str(base), str(data), out, **kwargs)
    assert not out.exists() and not work_dir(out).exists()


@pytest.mark.parametrize(("rows", "kwargs", "message"), [
    ([{"text": "ok"}, {"text": None}], {}, "row 1: an example must be a non-empty string"),
    ([{"text": "ok"}, {"text": ""}], {}, "row 1: an example must be a non-empty string"),
    ([{"text": "ok"}, {"text": float("nan")}], {}, "row 1: an example must be"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], {},
     "row 0: .* with an assistant turn"),
    ([{"prompt": "hi", "id": 1}], {}, "no 'text' or 'messages' column; pass --field, one of "
                                      "the columns: prompt, id"),
    ([{"text": "hi"}], {"field": "body"}, "no field 'body'; columns: text"),
    ([{"text": "hi"}], {"max_length": 1}, "max_length must be an integer >= 2"),
])
def test_sft_refuses_bad_input_before_training(tmp_path, base, rows, kwargs, message):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in rows))
    out = tmp_path / "sft"
    with pytest.raises(ValueError, match=message):
        sft(str(base), str(data), out, **kwargs)
    assert not out.exists() and not work_dir(out).exists()


@pytest.mark.parametrize("recipe", [sft, train_reward])
def test_missing_corrupt_and_empty_data_are_refused(tmp_path, base, recipe):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        recipe(str(base), str(tmp_path / "nowhere.parquet"), tmp_path / "o")
    corrupt = tmp_path / "bad.parquet"
    corrupt.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="cannot read"):
        recipe(str(base), str(corrupt), tmp_path / "o")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n")
    with pytest.raises(ValueError, match="holds no row"):
        recipe(str(base), str(blank), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_conversation_needs_a_chat_template(tmp_path):
    plain = tiny_llama_folder(tmp_path / "plain", chat_template=False)
    data = write_hh(tmp_path / "hh.parquet")
    with pytest.raises(ValueError, match="conversations need a tokenizer with a chat template"):
        sft(str(plain), str(data), tmp_path / "o", field="chosen")


@pytest.mark.parametrize("recipe", [sft, train_reward])
def test_custom_code_and_a_non_empty_out_are_refused(tmp_path, recipe):
    marker = tmp_path / "imported"
    armo = armolike_folder(tmp_path / "armo", marker, char_tokenizer())
    data = write_emotion(tmp_path / "e.parquet")
    with pytest.raises(ValueError, match=r"ships custom code.*trust_remote_code=true"):
        recipe(str(armo), str(data), tmp_path / "o")
    assert not marker.exists()  # nothing of its code ran
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not empty"):
        recipe(str(armo), str(data), out)
    assert (out / "keep.txt").read_text() == "mine"


# --------------------------------------------------------------------------------- resume


class _Crash(transformers.TrainerCallback):
    """Raise right after the checkpoint of ``step`` is saved: an interrupted run."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


class _FirstStep(transformers.TrainerCallback):
    """Record the step a run starts from."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = state.global_step


def test_an_interrupted_sft_resumes_from_its_checkpoint(tmp_path, base, capsys):
    data = _jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in TEXTS * 2])
    options = {**FAST, "epochs": 2, "batch_size": 2, "save_steps": 2}  # 8 steps
    out = tmp_path / "sft"
    with pytest.raises(KeyboardInterrupt):
        sft(str(base), str(data), out, callbacks=[_Crash(4)], **options)
    assert not out.exists()
    assert sorted(p.name for p in work_dir(out).iterdir()) == ["checkpoint-2", "checkpoint-4"]
    with pytest.raises(FileExistsError, match="--resume to continue it"):
        sft(str(base), str(data), out, **options)
    (work_dir(out) / "checkpoint-6").mkdir()  # killed while saving: no trainer_state.json
    first = _FirstStep()
    sft(str(base), str(data), out, resume=True, callbacks=[first], **options)
    assert first.start == 4
    assert "checkpoint-6 is incomplete" in capsys.readouterr().err
    assert json.loads((out / METRICS_FILE).read_text())["global_step"] == 8
    assert not work_dir(out).exists()
    # the resumed run ends where an uninterrupted one does
    whole = sft(str(base), str(data), tmp_path / "whole", **options)
    resumed, uninterrupted = (transformers.AutoModelForCausalLM.from_pretrained(p)
                              for p in (out, whole))
    for (name, a), b in zip(resumed.state_dict().items(), uninterrupted.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, msg=name)


class _Signal(transformers.TrainerCallback):
    """Send this process SIGTERM during ``step`` (as a job scheduler would)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_saves_the_current_step_and_stops_without_writing_out(tmp_path, base, capsys):
    data = _jsonl(tmp_path / "e.jsonl", [{"text": t, "label": i % 2}
                                          for i, t in enumerate(TEXTS)])
    out = tmp_path / "rm"
    options = {"epochs": 2, "batch_size": 1, "save_steps": 100, "max_length": 32,
               "eval_fraction": 0}
    with pytest.raises(SystemExit) as stopped:
        train_reward(str(base), str(data), out, callbacks=[_Signal(3)], **options)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert "resume with --resume" in capsys.readouterr().err
    assert not out.exists()
    assert [p.name for p in work_dir(out).iterdir()] == ["checkpoint-3"]  # not a step lost
    first = _FirstStep()
    train_reward(str(base), str(data), out, resume=True, callbacks=[first], **options)
    assert first.start == 3 and SequenceClassifierReward(out).objectives == ("0", "1")
    assert "eval_accuracy" not in json.loads((out / METRICS_FILE).read_text())


# ------------------------------------------------------------------------------------ CLI


def test_the_cli_writes_folders_train_accepts(tmp_path, capsys, base):
    texts = _jsonl(tmp_path / "t.jsonl", [{"text": t} for t in TEXTS])
    emotion = write_emotion(tmp_path / "emotion.jsonl", repeat=2)
    policy, reward = tmp_path / "sft", tmp_path / "rm"
    assert main(["sft", "--model", str(base), "--data", str(texts), "--out", str(policy),
                 "--epochs", "1", "--lr", "1e-3", "--max-length", "64", "--bf16"]) == 0
    assert main(["train-reward", "--model", str(base), "--data", str(emotion), "--out",
                 str(reward), "--labels", ",".join(EMOTIONS), "--epochs", "1",
                 "--batch-size", "8", "--max-length", "64"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote the fine-tuned model to {policy}" in printed
    assert "held-out accuracy" in printed and ", ".join(EMOTIONS) in printed
    run = tmp_path / "run"
    assert main(["train", "--config", "smoke", f"model={policy}", f"reward={reward}",
                 "train_mixture={joy: 0.5, love: 0.5}", "eval_mixtures=[{joy: 1.0}]",
                 "iterations=1", f"out_dir={run}"]) == 0
    assert (run / "final").is_dir()


@pytest.mark.parametrize("argv", [
    ["sft", "--epochs", "0"],
    ["train-reward", "--labels", "only"],
    ["sft", "--model", "EMPTY"],
])
def test_cli_errors_exit_2(tmp_path, capsys, base, argv):
    data = write_emotion(tmp_path / "e.jsonl")
    (tmp_path / "EMPTY").mkdir()  # a model folder without a model
    argv = [str(tmp_path / a) if a == "EMPTY" else a for a in argv]
    full = ["--model", str(base), "--data", str(data), "--out", str(tmp_path / "o"), *argv[1:]]
    assert main([argv[0], *full]) == 2
    assert "drosim-llm: error:" in capsys.readouterr().err
