"""JSONL loaders: round trips, and every malformed line names the file, the line number and the field."""

import pytest

from instructrl_fast.data import (
    DemoTask,
    GoldLabeler,
    Prompt,
    load_comparisons_jsonl,
    load_prompts_jsonl,
    load_sft_jsonl,
    save_jsonl,
)


def _write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_roundtrip_of_the_embedded_data(tmp_path):
    task = DemoTask(seed=0)
    demos, comps, prompts = task.demonstrations(20), task.comparisons(10, GoldLabeler(0)), task.prompts("test", 16)
    assert save_jsonl(tmp_path / "sft.jsonl", demos) == 20
    save_jsonl(tmp_path / "cmp.jsonl", comps)
    save_jsonl(tmp_path / "prompts.jsonl", prompts)
    assert load_sft_jsonl(tmp_path / "sft.jsonl") == demos
    assert load_comparisons_jsonl(tmp_path / "cmp.jsonl") == comps
    assert load_prompts_jsonl(str(tmp_path / "prompts.jsonl")) == prompts
    assert not (tmp_path / "sft.jsonl.tmp").exists()


def test_blank_lines_and_user_prompts(tmp_path):
    path = _write(tmp_path, ['{"prompt": "write a poem"}', "", '{"prompt": "Q: add 1 2\\nA:", "answer": "3"}'])
    assert load_prompts_jsonl(path) == [Prompt("write a poem", "user", None), Prompt("Q: add 1 2\nA:", "user", "3")]


@pytest.mark.parametrize("loader, lines, bad_line, message", [
    (load_sft_jsonl, ['{"prompt": "a", "response": "b"}', '{"prompt": "a"}'], 2, "missing field 'response'"),
    (load_sft_jsonl, ['{"prompt": 3, "response": "b"}'], 1, "field 'prompt' must be str, got int"),
    (load_sft_jsonl, ['{"prompt": "a", "response": ""}'], 1, "field 'response' must not be empty"),
    (load_sft_jsonl, ['{"prompt": "a", "response": "b"}', "{not json"], 2, "invalid JSON"),
    (load_sft_jsonl, ['["a", "b"]'], 1, "expected a JSON object"),
    (load_comparisons_jsonl, ['{"prompt": "p", "responses": ["a"], "ranking": [0]}'], 1,
     "field 'responses' must hold at least 2"),
    (load_comparisons_jsonl, ['{"prompt": "p", "responses": ["a", 2], "ranking": [0, 1]}'], 1,
     "field 'responses' item 1 must be str"),
    (load_comparisons_jsonl, ['{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}'], 1,
     "field 'ranking' must be a permutation"),
    (load_comparisons_jsonl, ['{"prompt": "p", "responses": ["a", "b"], "ranking": [0, true]}'], 1,
     "field 'ranking' must be a permutation"),
    (load_comparisons_jsonl, ['{"prompt": "p", "responses": ["a", "b"]}'], 1, "missing field 'ranking'"),
    (load_prompts_jsonl, ['{"prompt": "p"}', '{"prompt": "q", "answer": 5}'], 2, "field 'answer' must be str or"),
    (load_prompts_jsonl, ['{"text": "p"}'], 1, "missing field 'prompt'"),
])
def test_errors_name_file_line_and_field(tmp_path, loader, lines, bad_line, message):
    path = _write(tmp_path, lines)
    with pytest.raises(ValueError) as err:
        loader(path)
    assert f"{path}:{bad_line}:" in str(err.value)
    assert message in str(err.value)


def test_empty_file_and_bad_path(tmp_path):
    path = _write(tmp_path, [""])
    with pytest.raises(ValueError, match="no records"):
        load_sft_jsonl(path)
    with pytest.raises(TypeError, match="path"):
        load_sft_jsonl(3)
