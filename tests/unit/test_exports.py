"""The loop's final exports, read back the way LLaMA-Factory and TRL read them."""

from __future__ import annotations

import json

import pytest

from middo_ray.io import read_dataset
from middo_ray.final import LLAMAFACTORY_NAME, write_exports

pytestmark = pytest.mark.unit

SOURCE = [
    {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
    {"instruction": "Summarise the text.", "input": "Cats sleep a lot.", "output": "Cats nap often."},
    {"instruction": "And in French?", "input": "", "output": "Bonjour.", "system": "You translate.",
     "history": [["Say hello in English.", "Hello."]]},
]


@pytest.fixture()
def rows(tmp_path):
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in SOURCE), encoding="utf-8")
    return read_dataset(src).rows


def test_llamafactory_export_entry_points_at_a_file_with_its_columns(rows, tmp_path):
    """Guards the LLaMA-Factory export: dataset_info.json names the dataset, its file exists beside it,
    every mapped column is a key of every record, and the records read back to the same samples."""
    paths = write_exports(rows, tmp_path / "final")
    lf_dir = tmp_path / "final" / "llamafactory"
    assert paths["llamafactory_dir"] == str(lf_dir) and paths["llamafactory_dataset"] == LLAMAFACTORY_NAME
    entry = json.loads((lf_dir / "dataset_info.json").read_text(encoding="utf-8"))[LLAMAFACTORY_NAME]
    data_file = lf_dir / entry["file_name"]
    assert str(data_file) == paths["llamafactory_file"] and data_file.is_file()
    assert entry["formatting"] == "alpaca"
    assert entry["columns"] == {"prompt": "instruction", "query": "input", "response": "output",
                                "system": "system", "history": "history"}
    records = json.loads(data_file.read_text(encoding="utf-8"))
    assert len(records) == len(rows)
    assert all(set(entry["columns"].values()) <= set(r) for r in records)
    assert records[2]["history"] == [["Say hello in English.", "Hello."]] and records[2]["system"] == "You translate."
    assert [r["sample_id"] for r in read_dataset(data_file).rows] == [r["sample_id"] for r in rows]


def test_trl_messages_jsonl_has_role_content_lists(rows, tmp_path):
    """Guards the TRL export: one {"messages": [{role, content}, ...]} per line, user/assistant turns
    alternating after an optional system turn, ending with the sample's answer."""
    path = write_exports(rows, tmp_path / "final")["trl_messages"]
    lines = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert len(lines) == len(rows)
    for rec, row in zip(lines, rows):
        msgs = rec["messages"]
        assert isinstance(msgs, list) and all(set(m) == {"role", "content"} for m in msgs)
        turns = [m["role"] for m in msgs if m["role"] != "system"]
        assert turns == ["user", "assistant"] * (len(turns) // 2) and len(turns) >= 2
        assert msgs[-1]["content"] == row["output"]
    assert [m["role"] for m in lines[2]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert lines[1]["messages"][0]["content"] == "Summarise the text.\nCats sleep a lot."


def test_exports_do_not_clobber_other_datasets(rows, tmp_path):
    """Guards re-exports into a shared LLaMA-Factory directory: other dataset_info entries survive."""
    lf_dir = tmp_path / "final" / "llamafactory"
    lf_dir.mkdir(parents=True)
    (lf_dir / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.json"}}), encoding="utf-8")
    write_exports(rows, tmp_path / "final")
    info = json.loads((lf_dir / "dataset_info.json").read_text(encoding="utf-8"))
    assert set(info) == {"mine", LLAMAFACTORY_NAME}
