"""Prompts from `datasets` sources: local files of the paper's three formats (emotion,
HelpSteer2, Anthropic HH), saved folders, chat rendering, left truncation and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")

from drosim.llm.cli import main  # noqa: E402
from drosim.llm.components.data import hh_messages, load_prompts, prompt_text  # noqa: E402
from drosim.llm.components.demo_world import demo_prompts  # noqa: E402
from drosim.llm.components.rollout import render_prompts  # noqa: E402

EMOTION = {"text": ["i feel calm today", "i am so angry"], "label": [1, 3]}
HELPSTEER = {"prompt": ["Write a poem.", "Explain tides."], "response": ["r1", "r2"],
             "helpfulness": [3, 4]}
HH = {"chosen": ["\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: a joke?\n\nAssistant: ok",
                 "\n\nHuman: why?\n\nAssistant: because"],
      "rejected": ["\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: a joke?\n\nAssistant: no",
                   "\n\nHuman: why?\n\nAssistant: dunno"]}


def _write(table: dict, path: Path) -> Path:
    """``table`` (column -> values) as a file of ``path``'s format, or a saved folder."""
    dataset = datasets.Dataset.from_dict(table)
    if path.suffix == ".parquet":
        dataset.to_parquet(str(path))
    elif path.suffix == ".csv":
        dataset.to_csv(str(path), index=False)
    elif path.suffix == ".jsonl":
        rows = [dict(zip(table, row, strict=True)) for row in zip(*table.values(), strict=True)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        rows = [dict(zip(table, row, strict=True)) for row in zip(*table.values(), strict=True)]
        path.write_text(json.dumps(rows))
    else:
        dataset.save_to_disk(str(path))
    return path


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".json", ".csv", ""])
def test_emotion_and_helpsteer_prompts_load_from_every_format(tmp_path, suffix):
    emotion = _write(EMOTION, tmp_path / f"emotion{suffix}")
    assert load_prompts(str(emotion)) == EMOTION["text"]  # the only text column
    helpsteer = _write(HELPSTEER, tmp_path / f"helpsteer{suffix}")
    assert load_prompts(str(helpsteer)) == HELPSTEER["prompt"]  # "prompt" wins


def test_hh_transcripts_become_the_conversation_before_the_last_reply(tmp_path):
    path = _write(HH, tmp_path / "hh.parquet")
    prompts = load_prompts(str(path), field="chosen")
    assert prompts[0] == [{"role": "user", "content": "hi there"},
                          {"role": "assistant", "content": "hello"},
                          {"role": "user", "content": "a joke?"}]
    assert prompts[1] == [{"role": "user", "content": "why?"}]
    assert [prompt_text(p) for p in prompts] == ["a joke?", "why?"]
    assert hh_messages(HH["rejected"][0]) == prompts[0]


def test_a_dataset_dict_folder_reads_its_split(tmp_path):
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(HELPSTEER),
                          "test": datasets.Dataset.from_dict({"prompt": ["held out"]})}
                         ).save_to_disk(str(folder))
    assert load_prompts(str(folder), split="test") == ["held out"]
    with pytest.raises(ValueError, match="no split 'dev'; splits: train, test"):
        load_prompts(str(folder), split="dev")


def test_message_lists_and_text_files_load(tmp_path):
    chats = [[{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}]]
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": chats[0]}) + "\n")
    assert load_prompts(str(path), field="messages") == chats
    text = tmp_path / "p.txt"
    text.write_text("one\n\ntwo\n")
    assert load_prompts(str(text)) == ["one", "two"]


@pytest.mark.parametrize(("name", "table", "kwargs", "message"), [
    ("missing.parquet", None, {}, "does not exist"),
    ("p.xml", None, {}, "does not exist"),
    ("p.tsv", {}, {}, r"prompts: .*p\.tsv must be a \.txt"),
    ("e.parquet", EMOTION, {"field": "prompt"}, "no field 'prompt'; columns: text, label"),
    ("h.parquet", HH, {}, "2 text columns; set prompt_field .*chosen, rejected"),
    ("bad.jsonl", {"prompt": ["fine", 3]}, {}, "row 1: a prompt must be a string"),
])
def test_bad_sources_are_clear_errors(tmp_path, name, table, kwargs, message):
    path = tmp_path / name
    if table == {}:
        path.write_text("x")
    elif table is not None:
        rows = [dict(zip(table, row, strict=True)) for row in zip(*table.values(), strict=True)]
        if path.suffix == ".jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            _write(table, path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_prompts(str(path), **kwargs)


def test_an_empty_dataset_is_refused(tmp_path):
    header_only = tmp_path / "empty.csv"
    header_only.write_text("prompt,label\n")
    with pytest.raises(ValueError, match=r"prompts: cannot read the file .*empty.csv \(no rows"):
        load_prompts(str(header_only))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n")
    with pytest.raises(ValueError, match=r"blank\.txt holds no prompt"):
        load_prompts(str(blank))
    empty = _write({"prompt": ["x"]}, tmp_path / "e.jsonl")
    empty.write_text("")
    with pytest.raises(ValueError, match=r"prompts: cannot read the file .*e\.jsonl"):
        load_prompts(str(empty))


def test_an_offline_hub_name_is_named(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError,
                       match="prompts: cannot load the hub dataset 'someone/no-such-set'"):
        load_prompts("someone/no-such-set")


@pytest.mark.parametrize("key", ["prompts", "eval_prompts"])
def test_train_names_a_missing_prompt_file_before_writing(tmp_path, capsys, key):
    out = tmp_path / "run"
    missing = tmp_path / "nowhere.parquet"
    assert main(["train", "--config", "smoke", f"{key}={missing}", f"out_dir={out}"]) == 2
    assert f"{key}='{missing}': no such file or directory" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------ rendering, truncation


def _chat_tokenizer(template: bool = True):
    """A word-level tokenizer (built in-process) with a tiny chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "[UNK] <user> <assistant> <system> hi a joke? why? hello be kind w1 w2 w3 w4 w5"
    model = models.WordLevel({w: i for i, w in enumerate(words.split())}, unk_token="[UNK]")
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    if template:
        tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} "
                                   "{% endfor %}{% if add_generation_prompt %}<assistant>"
                                   "{% endif %}")
    return tokenizer


def test_chat_prompts_are_rendered_with_the_template():
    tokenizer = _chat_tokenizer()
    ids, cut = render_prompts(tokenizer, [[{"role": "user", "content": "hi"}], "why?"],
                              chat_template=None)
    assert cut == 0
    assert [tokenizer.convert_ids_to_tokens(i) for i in ids] == [
        ["<user>", "hi", "<assistant>"], ["<user>", "why?", "<assistant>"]]
    plain, _ = render_prompts(tokenizer, ["why?"], chat_template=False)
    assert tokenizer.convert_ids_to_tokens(plain[0]) == ["why?"]


def test_a_template_that_writes_bos_does_not_get_a_second_one():
    from tokenizers import processors

    tokenizer = _chat_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "[BOS]"})
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", bos)])
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    (chat, plain), _ = render_prompts(tokenizer, [[{"role": "user", "content": "hi"}], "hi"])
    assert tokenizer.convert_ids_to_tokens(chat) == ["[BOS]", "<user>", "hi", "<assistant>"]
    assert tokenizer.convert_ids_to_tokens(plain) == ["[BOS]", "hi"]  # a plain string: one BOS


def test_left_truncation_keeps_the_last_tokens_and_counts():
    tokenizer = _chat_tokenizer(template=False)
    ids, cut = render_prompts(tokenizer, ["w1 w2 w3 w4 w5", "w1 w2"], max_prompt_tokens=3)
    assert cut == 1
    assert [tokenizer.convert_ids_to_tokens(i) for i in ids] == [["w3", "w4", "w5"],
                                                                 ["w1", "w2"]]


def test_a_required_or_needed_template_that_is_missing_is_refused():
    tokenizer = _chat_tokenizer(template=False)
    with pytest.raises(ValueError, match="chat_template=true, but the tokenizer has no"):
        render_prompts(tokenizer, ["hi"], chat_template=True)
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        render_prompts(tokenizer, [[{"role": "user", "content": "hi"}]], chat_template=None)


# ---------------------------------------------------------------------------------- end to end


def test_train_reads_a_parquet_and_a_jsonl_with_a_field_and_truncates(tmp_path, capsys):
    words = demo_prompts(40, seed=3)
    long = [" ".join(words[i:i + 5]) for i in range(0, 40, 5)]  # 10+ words each
    train = _write({"question": long, "id": list(range(8))}, tmp_path / "train.parquet")
    evals = _write({"question": long[:4]}, tmp_path / "eval.jsonl")
    out = tmp_path / "run"
    assert main(["train", "--config", "smoke", f"prompts={train}", f"eval_prompts={evals}",
                 "prompt_field=question", "max_prompt_tokens=8", "iterations=1",
                 f"out_dir={out}"]) == 0
    assert "lost their first tokens" in capsys.readouterr().err
    assert (out / "metrics.jsonl").exists()
