"""`tabpo inspect` through Typer's CliRunner, on a tokenizer the test builds and saves."""

from __future__ import annotations

import json

import pytest
from helpers import ANNOTATION, build_chatml_tokenizer
from typer.testing import CliRunner

from tabpo.cli.app import app

SWAPPED = ANNOTATION.replace("build trust", "connection")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    build_chatml_tokenizer(directory)
    return directory


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "Annotate: I trust your judgement.", "chosen": ANNOTATION, "rejected": SWAPPED},
        {"prompt": "Annotate: rent is late.", "chosen": ANNOTATION, "rejected": '{"results": []}'},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def run(*args):
    return CliRunner().invoke(app, ["inspect", *map(str, args)])


def test_json_shows_tokens_ids_mask_weights(model_dir, data_file):
    """Pair 0 swaps the Sub-code "build trust" -> "connection": the tokens of that value are
    Sub-code values (1.2) and differ (x 1.2) = 1.44; the Code value tokens are 1.1; the
    completion ends at the end-of-turn token "<|im_end|>" (mask 1, weight 1), where
    generation stops: the newline the template writes after it is not trained on; prompt
    tokens have mask 0 and weight 0."""
    result = run("--model", model_dir, "--data", data_file, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    n = doc["prompt_length"]
    for side, answer in (("chosen", ANNOTATION), ("rejected", SWAPPED)):
        view = doc[side]
        assert len(view["tokens"]) == len(view["ids"]) == len(view["mask"]) == len(view["weights"])
        assert view["mask"][:n] == [0] * n and set(view["mask"][n:]) == {1}
        assert view["weights"][:n] == [0.0] * n
        assert "".join(view["tokens"][n:]) == answer + "<|im_end|>"
        assert view["tokens"][-1] == "<|im_end|>" and view["weights"][-1] == 1.0

    def weights_over(view, value):
        """(weight, differs) of every completion token overlapping `value`'s characters."""
        text = "".join(view["tokens"][n:])
        start, pos, out = text.index(value), 0, []
        for t, w, d in zip(
            view["tokens"][n:], view["weights"][n:], view["differs"][n:], strict=True
        ):
            if pos < start + len(value) and start < pos + len(t):
                out.append((w, d))
            pos += len(t)
        return out

    swapped = weights_over(doc["chosen"], "build trust")
    assert swapped and all(w == pytest.approx(1.44) and d for w, d in swapped)
    code = weights_over(doc["chosen"], "PartnershipPatient")
    assert code and all(w == pytest.approx(1.1) and not d for w, d in code)


def test_view_renders_both_sides(model_dir, data_file):
    result = run("--model", model_dir, "--data", data_file, "--index", 1)
    assert result.exit_code == 0, result.output
    assert "chosen:" in result.output and "rejected:" in result.output
    assert "line 2" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--index", "5"], "--index 5 is out of range"),
        (["--align", "diagonal"], "--align must be one of edit, position"),
        (["--max-length", "8"], "pair 0 is skipped"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(model_dir, data_file, args, message):
    result = run("--model", model_dir, "--data", data_file, *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_missing_model_dir_and_bad_data_line(tmp_path, model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": 3}\n')
    result = run("--model", model_dir, "--data", bad)
    assert result.exit_code == 2
    assert "bad.jsonl:2" in result.output
    result = run("--model", tmp_path / "nope", "--data", bad)
    assert result.exit_code == 2
