"""Reading and writing SFT data (middo_ray.io) and the bundled demo data (middo_ray.demo)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from middo_ray.demo import demo_path, resolve
from middo_ray.io import detect_format, export_llamafactory, export_messages_jsonl, read_dataset, write_dataset, \
    write_lineage
from middo_ray.schema import LINEAGE_COLUMNS, ROW_COLUMNS, make_row, sample_id

pytestmark = pytest.mark.unit

ALPACA = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "2 + 3 = 5."},
    {"instruction": "Summarise the text.", "input": "Cats sleep a lot.", "output": "Cats sleep much."},
    {"instruction": "And in French?", "input": "", "output": "Bonjour.", "system": "You translate.",
     "history": [["Say hello.", "Hello."]]},
]

OPENAI_MULTI = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi."},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "6."},
]}

SHAREGPT = {"conversations": [
    {"from": "system", "value": "Be kind."},
    {"from": "human", "value": "Name a colour."},
    {"from": "gpt", "value": "Blue."},
]}


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _write_json(path: Path, rows: list) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def _ids(rows: list[dict]) -> list[str]:
    return [r["sample_id"] for r in rows]


# ---------------------------------------------------------------------------------------------
# Format detection


def test_detect_format_from_extension_and_keys(tmp_path):
    """Guards auto-detection: alpaca json/jsonl, OpenAI and ShareGPT messages, parquet by extension."""
    assert detect_format(_write_json(tmp_path / "a.json", ALPACA)) == "alpaca"
    assert detect_format(_write_jsonl(tmp_path / "a.jsonl", ALPACA)) == "alpaca"
    assert detect_format(_write_jsonl(tmp_path / "m.jsonl", [OPENAI_MULTI])) == "messages"
    assert detect_format(_write_jsonl(tmp_path / "s.jsonl", [SHAREGPT])) == "messages"
    pq.write_table(pa.Table.from_pylist(ALPACA[:2]), tmp_path / "p.parquet")
    assert detect_format(tmp_path / "p.parquet") == "parquet"


def test_detect_format_skips_broken_first_line(tmp_path):
    """Guards detection looking at the first *valid* row, not a broken first line."""
    path = tmp_path / "a.jsonl"
    path.write_text("{broken\n" + json.dumps(ALPACA[0]) + "\n", encoding="utf-8")
    assert detect_format(path) == "alpaca"


def test_detect_format_unknown_names_keys_and_formats(tmp_path):
    """Guards the error for an unknown layout: it names the keys seen and the supported formats."""
    path = _write_jsonl(tmp_path / "x.jsonl", [{"prompt": "p", "response": "r"}])
    with pytest.raises(ValueError) as err:
        detect_format(path)
    assert "prompt" in str(err.value) and "response" in str(err.value)
    assert "alpaca" in str(err.value) and "messages" in str(err.value)
    with pytest.raises(ValueError, match="unsupported extension"):
        detect_format(tmp_path / "data.csv")


# ---------------------------------------------------------------------------------------------
# Reading each format


def test_read_alpaca_json_and_jsonl_agree(tmp_path):
    """Guards alpaca reading: a JSON list and JSONL of the same rows give the same canonical rows."""
    from_json = read_dataset(_write_json(tmp_path / "a.json", ALPACA))
    from_jsonl = read_dataset(_write_jsonl(tmp_path / "a.jsonl", ALPACA))
    assert from_json.format == from_jsonl.format == "alpaca" and from_json.style == "alpaca"
    assert _ids(from_json.rows) == _ids(from_jsonl.rows)
    assert from_json.n_input == 3 and not from_json.rejects
    row = from_json.rows[2]
    assert set(ROW_COLUMNS) <= set(row)
    assert row["system"] == "You translate." and json.loads(row["history"]) == [["Say hello.", "Hello."]]
    assert row["origin"] == "seed" and row["round"] == 0 and row["parent_id"] is None
    assert from_json.rows[1]["input"] == "Cats sleep a lot."
    assert row["sample_id"] == sample_id(row["instruction"], "", row["output"], row["system"], row["history"])


def test_read_alpaca_history_as_json_string(tmp_path):
    """Guards that a history given as the canonical JSON string equals the same history as a list."""
    as_string = dict(ALPACA[2], history=json.dumps(ALPACA[2]["history"]))
    a = read_dataset(_write_jsonl(tmp_path / "a.jsonl", [ALPACA[2]])).rows[0]
    b = read_dataset(_write_jsonl(tmp_path / "b.jsonl", [as_string])).rows[0]
    assert a["sample_id"] == b["sample_id"]


def test_read_openai_single_turn(tmp_path):
    """Guards OpenAI messages with one exchange: user -> instruction, assistant -> output, no history."""
    rec = {"messages": [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima."}]}
    res = read_dataset(_write_jsonl(tmp_path / "m.jsonl", [rec]))
    assert res.format == "messages" and res.style == "openai"
    row = res.rows[0]
    assert (row["instruction"], row["output"], row["system"], row["history"], row["input"]) == \
        ("Capital of Peru?", "Lima.", "", "", "")


def test_read_openai_multi_turn(tmp_path):
    """Guards multi-turn conversion: earlier pairs -> history, last pair -> instruction/output, system kept."""
    row = read_dataset(_write_jsonl(tmp_path / "m.jsonl", [OPENAI_MULTI])).rows[0]
    assert row["system"] == "Be brief."
    assert json.loads(row["history"]) == [["Hi.", "Hello!"], ["What is 2 + 2?", "4."]]
    assert row["instruction"] == "And 3 + 3?" and row["output"] == "6."


def test_read_sharegpt(tmp_path):
    """Guards ShareGPT conversations (from/value, human/gpt/system) and the top-level system key."""
    top_system = {"system": "Top.", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]}
    res = read_dataset(_write_jsonl(tmp_path / "s.jsonl", [SHAREGPT, top_system]))
    assert res.format == "messages" and res.style == "sharegpt" and not res.rejects
    assert (res.rows[0]["system"], res.rows[0]["instruction"], res.rows[0]["output"]) == ("Be kind.", "Name a colour.", "Blue.")
    assert res.rows[1]["system"] == "Top."


def test_read_parquet_alpaca_and_messages_columns(tmp_path):
    """Guards Parquet input with alpaca columns (nulls as empty) and with a messages column."""
    alpaca_table = pa.Table.from_pylist([{"instruction": "Add 1 and 1.", "input": None, "output": "2."}])
    pq.write_table(alpaca_table, tmp_path / "a.parquet")
    res = read_dataset(tmp_path / "a.parquet")
    assert res.format == "parquet" and res.style == "alpaca" and res.rows[0]["input"] == ""
    pq.write_table(pa.Table.from_pylist([OPENAI_MULTI]), tmp_path / "m.parquet")
    res = read_dataset(tmp_path / "m.parquet")
    assert res.format == "parquet" and res.style == "openai"
    assert res.rows[0]["output"] == "6." and len(json.loads(res.rows[0]["history"])) == 2


def test_format_override_and_unknown_format(tmp_path):
    """Guards an explicit format: 'messages' on an alpaca file rejects rows instead of guessing; bad names fail."""
    path = _write_jsonl(tmp_path / "a.jsonl", ALPACA[:1])
    res = read_dataset(path, format="messages")
    assert not res.rows and "no 'messages'" in res.rejects[0]["reason"]
    with pytest.raises(ValueError, match="unknown data format"):
        read_dataset(path, format="csv")
    with pytest.raises(ValueError, match="not a .parquet"):
        read_dataset(path, format="parquet")


# ---------------------------------------------------------------------------------------------
# Rejects


def test_rejects_of_seed_with_invalid(tmp_path):
    """Guards the rejects path on the demo file with invalid rows: reasons, row numbers, rejects file."""
    rejects_file = tmp_path / "out" / "rejects.jsonl"
    res = read_dataset(demo_path("seed_with_invalid"), rejects_path=rejects_file)
    assert res.n_input == 8 and len(res.rows) == 5 and len(res.rejects) == 3
    reasons = {r["line"]: r["reason"] for r in res.rejects}
    assert reasons[3] == "empty output" and reasons[5] == "missing instruction"
    assert reasons[7].startswith("invalid JSON line")
    written = [json.loads(line) for line in rejects_file.read_text(encoding="utf-8").splitlines()]
    assert written == res.rejects
    assert all(set(r) == {"file", "line", "reason", "raw"} for r in written)
    assert {r["file"] for r in written} == {str(demo_path("seed_with_invalid"))}


def test_every_input_row_is_accounted_for(tmp_path):
    """Guards that each kind of bad row is rejected with a clear reason and none is silently dropped."""
    bad = [
        ALPACA[0],
        ["not", "an", "object"],
        {"instruction": "   ", "output": "x"},
        {"instruction": "Q", "output": 5},
        {"instruction": "Q", "output": "A", "history": [["only one"]]},
        ALPACA[0],
    ]
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(r) for r in bad]
    path.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n", encoding="utf-8")
    res = read_dataset(path)
    assert res.n_input == 6 == len(res.rows) + len(res.rejects)
    reasons = {r["line"]: r["reason"] for r in res.rejects}
    # Line 4 is blank, so rows after it keep their physical line numbers.
    assert reasons[2].startswith("not an object")
    assert reasons[3] == "empty instruction"
    assert "non-string field 'output'" in reasons[5]
    assert "history item 0" in reasons[6]
    assert reasons[7].startswith("exact duplicate of row 1")
    assert json.loads(res.rejects[-1]["raw"]) == ALPACA[0]


def test_conversation_rejects(tmp_path):
    """Guards the chat-specific reasons: no user turn, no final assistant, unknown role, misplaced system."""
    def conv(*turns):
        return {"messages": [{"role": r, "content": c} for r, c in turns]}

    rows = [
        conv(("user", "Q"), ("assistant", "A")),
        conv(("system", "S"), ("assistant", "A")),
        conv(("user", "Q"), ("assistant", "A"), ("user", "Q2")),
        conv(("user", "Q"), ("tool", "T"), ("assistant", "A")),
        conv(("user", "Q"), ("system", "S"), ("assistant", "A")),
        conv(("user", "Q"), ("user", "Q2"), ("assistant", "A")),
        {"messages": "not a list"},
        {"messages": [{"role": "user", "content": ["part"]}, {"role": "assistant", "content": "A"}]},
    ]
    res = read_dataset(_write_jsonl(tmp_path / "c.jsonl", rows))
    assert len(res.rows) == 1 and len(res.rejects) == 7
    reasons = [r["reason"] for r in res.rejects]
    assert reasons[0] == "messages with no user turn"
    assert reasons[1] == "conversation does not end with an assistant turn"
    assert reasons[2].startswith("unknown role 'tool'")
    assert "system message" in reasons[3]
    assert "alternate" in reasons[4]
    assert "must be a list" in reasons[5]
    assert "non-string field 'content'" in reasons[6]


def test_rejects_file_created_even_when_empty(tmp_path):
    """Guards that rejects_path always exists after a read, so 'no rejects' is visible."""
    rejects_file = tmp_path / "rejects.jsonl"
    res = read_dataset(_write_jsonl(tmp_path / "a.jsonl", ALPACA), rejects_path=rejects_file)
    assert not res.rejects and rejects_file.is_file() and rejects_file.read_text() == ""


def test_missing_file_and_broken_json_list(tmp_path):
    """Guards clear errors: a missing path names the path and the fix; a broken JSON list says how to fix it."""
    with pytest.raises(FileNotFoundError, match="nope.json.*data.path"):
        read_dataset(tmp_path / "nope.json")
    broken = tmp_path / "b.json"
    broken.write_text('[{"instruction": "a", "output": "b"},', encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_dataset(broken)


# ---------------------------------------------------------------------------------------------
# Writing


@pytest.mark.parametrize("fmt,name,style", [
    ("alpaca", "out.json", None),
    ("alpaca", "out.jsonl", None),
    ("messages", "out.jsonl", "openai"),
    ("messages", "out.jsonl", "sharegpt"),
    ("parquet", "out.parquet", None),
])
def test_round_trip_keeps_sample_ids(tmp_path, fmt, name, style):
    """Guards read -> write -> read giving identical sample_ids in every format (history and system included)."""
    source = ALPACA if fmt != "messages" else [ALPACA[0], ALPACA[2]]  # chat formats have no 'input' field
    first = read_dataset(_write_jsonl(tmp_path / "src.jsonl", source))
    out = write_dataset(first.rows, tmp_path / name, fmt, style=style)
    second = read_dataset(out)
    assert _ids(second.rows) == _ids(first.rows) and not second.rejects
    if fmt == "messages":
        assert second.style == style
    if name.endswith(".json"):
        assert isinstance(json.loads(out.read_text(encoding="utf-8")), list)


def test_chat_round_trip_from_messages(tmp_path):
    """Guards multi-turn messages surviving a messages -> canonical -> messages -> canonical trip."""
    first = read_dataset(_write_jsonl(tmp_path / "m.jsonl", [OPENAI_MULTI, SHAREGPT]))
    for style in ("openai", "sharegpt"):
        again = read_dataset(write_dataset(first.rows, tmp_path / f"{style}.jsonl", "messages", style=style))
        assert _ids(again.rows) == _ids(first.rows)


def test_lineage_parquet_has_all_columns(tmp_path):
    """Guards the lineage file: canonical + lineage columns, scalar extras (numpy too), containers left out."""
    parent = make_row("Q", "A")
    child = make_row("Q simpler", "A", parent_id=parent["sample_id"], origin="complexity", round=1,
                     trigger={"loss_cur": 3.2})
    rows = [dict(parent, loss_cur=1.5, quality=np.float32(7.0), flags=["x"]),
            dict(child, loss_cur=None, quality=np.float32(6.5), flags=[])]
    table = pq.read_table(write_lineage(rows, tmp_path / "lineage.parquet"))
    assert set(ROW_COLUMNS) <= set(table.column_names)
    assert {"loss_cur", "quality"} <= set(table.column_names) and "flags" not in table.column_names
    data = table.to_pylist()
    assert data[1]["parent_id"] == parent["sample_id"] and data[1]["origin"] == "complexity"
    assert data[1]["round"] == 1 and json.loads(data[1]["trigger"]) == {"loss_cur": 3.2}
    assert data[0]["parent_id"] is None and data[1]["loss_cur"] is None
    assert table.schema.field("round").type == pa.int64()
    for col in LINEAGE_COLUMNS:
        assert col in table.column_names


def test_llamafactory_export(tmp_path):
    """Guards the LLaMA-Factory export: a valid dataset_info.json entry and a data file that reads back."""
    rows = read_dataset(_write_jsonl(tmp_path / "src.jsonl", ALPACA)).rows
    out_dir = tmp_path / "lf"
    (out_dir).mkdir()
    (out_dir / "dataset_info.json").write_text(json.dumps({"other": {"file_name": "o.json"}}), encoding="utf-8")
    data_file = export_llamafactory(rows, out_dir, "middo_round1")
    info = json.loads((out_dir / "dataset_info.json").read_text(encoding="utf-8"))
    assert "other" in info  # earlier entries are kept
    entry = info["middo_round1"]
    assert entry["file_name"] == data_file.name and (out_dir / entry["file_name"]).is_file()
    assert entry["formatting"] == "alpaca"
    assert entry["columns"] == {"prompt": "instruction", "query": "input", "response": "output",
                                "system": "system", "history": "history"}
    records = json.loads(data_file.read_text(encoding="utf-8"))
    # Every mapped column is present in every record (LLaMA-Factory reads missing keys as null).
    assert all(set(entry["columns"].values()) <= set(r) for r in records)
    assert _ids(read_dataset(data_file).rows) == _ids(rows)


def test_llamafactory_export_single_turn_maps_only_present_columns(tmp_path):
    """Guards that plain alpaca rows export without system/history columns or mappings."""
    rows = read_dataset(_write_jsonl(tmp_path / "src.jsonl", ALPACA[:2])).rows
    data_file = export_llamafactory(rows, tmp_path, "plain")
    entry = json.loads((tmp_path / "dataset_info.json").read_text(encoding="utf-8"))["plain"]
    assert set(entry["columns"]) == {"prompt", "query", "response"}
    assert all(set(r) == {"instruction", "input", "output"} for r in json.loads(data_file.read_text()))


def test_export_messages_jsonl_for_trl(tmp_path):
    """Guards the TRL export: OpenAI messages per line, system first, ending with the assistant answer."""
    rows = read_dataset(_write_jsonl(tmp_path / "src.jsonl", ALPACA)).rows
    path = export_messages_jsonl(rows, tmp_path / "trl.jsonl")
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == len(rows)
    assert lines[1]["messages"][0] == {"role": "user", "content": "Summarise the text.\nCats sleep a lot."}
    msgs = lines[2]["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[-1]["content"] == "Bonjour."


# ---------------------------------------------------------------------------------------------
# Demo data and shared data


def test_resolve_demo_path():
    """Guards 'demo' resolving to the packaged seed file."""
    assert resolve("demo") == str(demo_path("seed")) and demo_path("seed").is_file()
    assert resolve("/data/x.jsonl") == "/data/x.jsonl"
    with pytest.raises(ValueError, match="unknown demo file"):
        demo_path("nope")


def test_demo_seed_loads_clean_and_defects_are_in_it():
    """Guards the demo seed: zero rejects, 200-260 rows, every defect id present, every defect kind used."""
    res = read_dataset(demo_path("seed"))
    assert not res.rejects and 200 <= len(res.rows) <= 260
    ids = set(_ids(res.rows))
    defects = json.loads(demo_path("defects").read_text(encoding="utf-8"))
    assert defects and set(defects) <= ids
    assert set(defects.values()) == {"wrong_answer", "mismatched", "truncated", "near_duplicate", "convoluted"}
    assert 0.10 <= len(defects) / len(res.rows) <= 0.20


def test_demo_texts_are_short():
    """Guards the demo's size limits (instruction <= 30 words, output <= 50) that keep the CPU demo fast."""
    for row in read_dataset(demo_path("seed")).rows:
        assert len(row["instruction"].split()) <= 30 and len(row["output"].split()) <= 50


def test_demo_generator_is_deterministic(tmp_path):
    """Guards that regenerating the demo data gives byte-identical files."""
    from middo_ray.demo.generate import write_all

    write_all(tmp_path)
    for name in ("seed", "mc", "defects", "seed_with_invalid"):
        packaged = demo_path(name)
        assert (tmp_path / packaged.name).read_bytes() == packaged.read_bytes(), name


def test_demo_mc_items_format():
    """Guards the MC set's format: {query, choices, gold} with a 0-based gold index, like ARC files."""
    items = [json.loads(line) for line in demo_path("mc").read_text(encoding="utf-8").splitlines()]
    assert 50 <= len(items) <= 70
    for item in items:
        assert set(item) == {"query", "choices", "gold"}
        assert item["query"].startswith("Question: ") and len(item["choices"]) == 4
        assert len(set(item["choices"])) == 4 and 0 <= item["gold"] < 4


def test_read_shared_alpaca_en_demo(shared_data, tmp_path):
    """Guards reading real public alpaca data (LLaMA-Factory's alpaca_en_demo.json) from ../shared/data."""
    path = shared_data / "sft" / "alpaca_en_demo.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    res = read_dataset(path, rejects_path=tmp_path / "rejects.jsonl")
    assert res.format == "alpaca" and res.n_input == len(raw) == len(res.rows) + len(res.rejects)
    for src, row in zip(raw[:5], res.rows[:5]):
        assert (row["instruction"], row["input"], row["output"]) == (src["instruction"], src["input"], src["output"])
    # This file repeats 14 samples verbatim (999 rows, 985 distinct); those are the only rejects.
    assert res.rejects and all(r["reason"].startswith("exact duplicate of row") for r in res.rejects)


def test_bad_row_corpus_every_row_is_a_row_or_a_reject_with_file_line_and_reason(tmp_path):
    """Guards the corpus of bad rows (tests/corpus): each kind is refused at read time with its file, its line
    and a reason naming the problem; the good rows stay; rows in = rows kept + rows rejected."""
    from tests.corpus import write_bad_alpaca

    path = tmp_path / "mixed.jsonl"
    good = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in good))
    expected = write_bad_alpaca(path, good[1], first_line=len(good) + 1, append=True)
    res = read_dataset(path, rejects_path=tmp_path / "rejects.jsonl")
    assert res.n_input == len(res.rows) + len(res.rejects) == len(good) + len(expected) + 1
    assert [r["instruction"] for r in res.rows] == [r["instruction"] for r in good] + ["Name a prime number."]
    got = {r["line"]: r for r in res.rejects}
    assert set(got) == set(expected)
    for line, fragment in expected.items():
        assert fragment in got[line]["reason"], (line, got[line]["reason"])
        assert got[line]["file"] == str(path)
    written = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in written] == sorted(expected)
