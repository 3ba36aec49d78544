"""Reading JSONL preference data: the three record forms and every bad input."""

from __future__ import annotations

import json

import pytest

from tabpo.common.errors import DataError
from tabpo.data.records import PreferenceExample, read_preferences

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
USER = {"role": "user", "content": "Annotate: I trust your judgement"}
GOOD = {"prompt": "Annotate: hi", "chosen": '{"results": []}', "rejected": '{"results": [1]}'}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def write(tmp_path, *records, name="prefs.jsonl"):
    """One line per record: dicts as JSON, strings verbatim."""
    path = tmp_path / name
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_standard_form_with_system(tmp_path):
    path = write(tmp_path, {**GOOD, "system": "You are a helpful assistant."}, "", GOOD)
    examples, stats = read_preferences(path)
    assert examples[0] == PreferenceExample(
        prompt=[SYSTEM, {"role": "user", "content": "Annotate: hi"}],
        chosen='{"results": []}',
        rejected='{"results": [1]}',
        line=1,
        conversational=False,
    )
    assert examples[1].prompt == [{"role": "user", "content": "Annotate: hi"}]
    assert examples[1].line == 3  # the blank line 2 is skipped but counted
    assert (stats.read, stats.skipped_identical, stats.kept) == (2, 0, 2)


def test_explicit_prompt_conversational(tmp_path):
    """A multi-turn prompt keeps its order; `system` is not added when the prompt has one."""
    prompt = [SYSTEM, {"role": "user", "content": "hi"}, assistant("hello"), USER]
    record = {"prompt": prompt, "chosen": [assistant("A")], "rejected": [assistant("B")]}
    (example,), _ = read_preferences(write(tmp_path, {**record, "system": "other"}))
    assert example.prompt == prompt
    assert (example.chosen, example.rejected, example.conversational) == ("A", "B", True)


def test_implicit_prompt_conversational(tmp_path):
    """No `prompt`: the messages before the last (assistant) one are the prompt."""
    record = {"chosen": [USER, assistant("A")], "rejected": [USER, assistant("B")], "system": "S"}
    (example,), _ = read_preferences(write(tmp_path, record))
    assert example.prompt == [{"role": "system", "content": "S"}, USER]
    assert (example.chosen, example.rejected, example.conversational) == ("A", "B", True)


def test_identical_pairs_are_skipped_and_counted(tmp_path):
    same = {**GOOD, "rejected": GOOD["chosen"]}
    examples, stats = read_preferences(write(tmp_path, GOOD, same, GOOD))
    assert [e.line for e in examples] == [1, 3]
    assert (stats.read, stats.skipped_identical, stats.kept) == (3, 1, 2)


def test_all_identical_is_an_error(tmp_path):
    same = {**GOOD, "rejected": GOOD["chosen"]}
    with pytest.raises(DataError, match="prefs.jsonl.*all 2 records have chosen identical"):
        read_preferences(write(tmp_path, same, same))


def test_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    (example,), _ = read_preferences(path)
    assert example.chosen == GOOD["chosen"]


def conversation(**overrides):
    record = {"prompt": [USER], "chosen": [assistant("A")], "rejected": [assistant("B")]}
    return {**record, **overrides}


BAD_RECORDS = {
    "malformed JSON": ('{"prompt": "p", "chosen": ', None),
    "not an object": ('["p", "c", "r"]', None),
    "missing rejected": ({"prompt": "p", "chosen": "c"}, "rejected"),
    "missing chosen": ({"prompt": "p", "rejected": "r"}, "chosen"),
    "missing prompt": ({"chosen": "c", "rejected": "r"}, "prompt"),
    "prompt not a string": ({**GOOD, "prompt": 3}, "prompt"),
    "chosen a number": ({**GOOD, "chosen": 3}, "chosen"),
    "rejected of another form": ({**GOOD, "rejected": [assistant("r")]}, "rejected"),
    "system not a string": ({**GOOD, "system": ["S"]}, "system"),
    "empty chosen": ({**GOOD, "chosen": "  \n"}, "chosen"),
    "empty rejected": ({**GOOD, "rejected": ""}, "rejected"),
    "empty prompt": ({**GOOD, "prompt": " "}, "prompt"),
    "empty message list": (conversation(prompt=[]), "prompt"),
    "prompt a string beside messages": (conversation(prompt="p"), "prompt"),
    "message not an object": (conversation(prompt=["hi"]), "prompt[0]"),
    "message without role": (conversation(prompt=[{"content": "hi"}]), "prompt[0].role"),
    "content not a string": (
        conversation(prompt=[{"role": "user", "content": None}]),
        "prompt[0].content",
    ),
    "unknown role": (conversation(prompt=[{"role": "robot", "content": "hi"}]), "prompt[0].role"),
    "prompt ends with assistant": (conversation(prompt=[USER, assistant("x")]), "prompt"),
    "two assistant messages": (conversation(chosen=[assistant("A"), assistant("B")]), "chosen"),
    "user turn as answer": (conversation(rejected=[USER]), "rejected"),
    "empty conversational answer": (conversation(chosen=[assistant(" ")]), "chosen"),
    "implicit prompt differs": (
        {"chosen": [USER, assistant("A")], "rejected": [SYSTEM, USER, assistant("B")]},
        "rejected",
    ),
    "implicit without assistant turn": (
        {"chosen": [USER], "rejected": [USER, assistant("B")]},
        "chosen",
    ),
    "implicit without prompt": (
        {"chosen": [assistant("A")], "rejected": [assistant("B")]},
        "chosen",
    ),
}


@pytest.mark.parametrize("bad, field", BAD_RECORDS.values(), ids=BAD_RECORDS.keys())
def test_bad_record_names_file_line_and_field(tmp_path, bad, field):
    """The bad record sits on line 3, after a good one and a blank line."""
    path = write(tmp_path, GOOD, "", bad, GOOD, name="bad.jsonl")
    with pytest.raises(DataError) as err:
        read_preferences(path)
    message = str(err.value)
    assert "bad.jsonl:3" in message
    assert (err.value.line, err.value.field) == (3, field)
    if field is not None:
        assert f"field '{field}'" in message


def test_prompt_differs_message(tmp_path):
    bad, _ = BAD_RECORDS["implicit prompt differs"]
    with pytest.raises(DataError, match="prompt differs between chosen and rejected"):
        read_preferences(write(tmp_path, bad))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nowhere.jsonl: file not found"):
        read_preferences(tmp_path / "nowhere.jsonl")


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="empty.jsonl: the file holds no records"):
        read_preferences(path)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match="latin1.jsonl:2: not valid UTF-8"):
        read_preferences(path)


def test_prompt_completion_records(tmp_path):
    """TRL's prompt/completion form (SFT data): the completion is the chosen answer and there
    is no rejected; conversational completions are one assistant message."""
    import json

    from tabpo.common.errors import DataError
    from tabpo.data.records import read_preferences

    path = tmp_path / "sft.jsonl"
    rows = [
        {"prompt": "p1", "completion": "a1", "system": "s"},
        {"prompt": [{"role": "user", "content": "p2"}],
         "completion": [{"role": "assistant", "content": "a2"}]},
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, stats = read_preferences(path)
    assert [(e.chosen, e.rejected) for e in examples] == [("a1", None), ("a2", None)]
    assert examples[0].prompt == [{"role": "system", "content": "s"},
                                  {"role": "user", "content": "p1"}]  # fmt: skip
    path.write_text(json.dumps({"completion": "a"}) + "\n")
    with pytest.raises(DataError, match=r"sft.jsonl:1: field 'prompt': missing"):
        read_preferences(path)
    path.write_text(json.dumps({"prompt": "p", "completion": "  "}) + "\n")
    with pytest.raises(DataError, match="field 'completion': empty completion"):
        read_preferences(path)
