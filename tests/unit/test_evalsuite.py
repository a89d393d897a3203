"""Benchmark scorers on hand-made cases and on real rows of each benchmark; the code sandbox; config; stop rule."""

from __future__ import annotations

import json
import socket
import sys
import threading

import numpy as np
import pytest

from middo_ray.config import ConfigError, ConvergeConfig, build_config
from middo_ray.converge import best_round, lower_is_better, should_stop
from middo_ray.evalsuite import (BENCHMARKS, extract_boxed, extract_code, extract_gsm8k_answer, extract_math_answer,
                                 humaneval_program, math_answers_equal, mbpp_program, normalize_math_answer,
                                 normalize_number, pick_subset, run_program, score_gsm8k, score_item, score_math,
                                 score_mc, suite_items)
from middo_ray.evalsuite.benchmarks import MBPP_TEST_IDS, read_jsonl

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------------------------------------
# GSM8K.

@pytest.mark.parametrize("text,expected", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("#### 1,234", "1234"),
    ("#### $5.", "5"),
    ("so the change is -3 dollars.\n#### -3", "-3"),
    ("Each costs 2.50, so the answer is 7.50.", "7.5"),
    ("The answer is: $1,000,000.", "1000000"),
    ("First 3 apples, then 4 more: 7", "7"),
    ("#### 18\nHuman: next question 99", "18"),
    ("It is \u22124 degrees.", "-4"),
    ("no number here", None),
])
def test_gsm8k_extraction(text, expected):
    """Guards the final-number rule: ####, then 'answer is', then the last number; $ , . and minus handled."""
    assert extract_gsm8k_answer(text) == expected


def test_gsm8k_scoring_right_and_wrong():
    """Guards exact match: equal values score 1 whatever the formatting, a different number scores 0."""
    assert score_gsm8k("So she has #### 18.00", "18") == (1.0, "18")
    assert score_gsm8k("#### 1,000", "1000")[0] == 1.0
    assert score_gsm8k("#### 17", "18") == (0.0, "17")
    assert score_gsm8k("I do not know.", "18") == (0.0, None)
    assert score_gsm8k("#### -18", "18")[0] == 0.0
    assert [normalize_number(x) for x in ("$1,000.50", "-0.50", "5.", "+3", "0.0", "abc", "12%")] == \
        ["1000.5", "-0.5", "5", "3", "0", None, "12"]


# ---------------------------------------------------------------------------------------------
# MATH.

def test_extract_boxed_nested_last_and_bare():
    """Guards \\boxed extraction: nested braces, the last box wins, \\boxed 5, \\fbox, unbalanced skipped."""
    assert extract_boxed(r"so $\boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{\left( 3, \frac{\pi}{2} \right)}") == r"\left( 3, \frac{\pi}{2} \right)"
    assert extract_boxed(r"first \boxed{1} then \boxed{2}") == "2"
    assert extract_boxed(r"it is \boxed 5$ done") == "5"
    assert extract_boxed(r"\fbox{x+1}") == "x+1"
    assert extract_boxed(r"\boxed{3} and \boxed{4") == "3"
    assert extract_boxed("no box") is None
    assert extract_math_answer("The final answer is $7$. I hope it is correct.") == "7"
    assert extract_math_answer("nothing") is None


@pytest.mark.parametrize("pred,gold", [
    (r"\dfrac{1}{2}", r"\frac12"),
    ("0.5", r"\frac{1}{2}"),
    ("1/2", r"\tfrac{1}{2}"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
    ("90", r"90^\circ"),
    ("5.4", r"5.4 \text{ cents}"),
    ("5", "x = 5"),
    ("10080", r"10,\!080"),
    (r"\$32,348", "32348"),
    ("(C)", r"\text{(C)}"),
    (r"\frac{270}{7}", r"\frac{270}7\text{ degrees}"),
    ("-\\frac{35}{9}", "-\\frac{70}{18}"),
    (r"\sqrt2", r"\sqrt{2}"),
    ("12", "12.0"),
])
def test_math_equal_forms(pred, gold):
    """Guards the documented normalisation: each pair writes the same answer."""
    assert math_answers_equal(pred, gold), (normalize_math_answer(pred), normalize_math_answer(gold))


@pytest.mark.parametrize("pred,gold", [
    (r"\frac{1}{3}", r"\frac{1}{2}"),
    ("3", "3x"),
    ("(3,4)", "(3,4]"),
    ("-5", "5"),
    (None, "5"),
    ("", "5"),
])
def test_math_wrong_answers_score_zero(pred, gold):
    """Guards against over-normalisation: a different answer (or none) never matches."""
    assert not math_answers_equal(pred, gold)
    assert score_math(f"so \\boxed{{{pred}}}" if pred else "no idea", gold)[0] == 0.0


# ---------------------------------------------------------------------------------------------
# Multiple choice.

def test_mc_argmax_scoring():
    """Guards option scoring: the highest log-likelihood is the prediction; any other gold scores 0."""
    assert score_mc([-4.0, -0.5, -3.0], 1) == (1.0, 1)
    assert score_mc([-4.0, -0.5, -3.0], 0) == (0.0, 1)
    assert score_mc([-1.0, -1.0], 0) == (1.0, 0)   # ties go to the first option
    assert score_item({"suite": "arc_easy", "scores": [-2.0, -9.0], "gold": 1})[0] == 0.0


# ---------------------------------------------------------------------------------------------
# Code: assembly, sandbox.

HE_PROBLEM = {
    "prompt": "def add(a: int, b: int) -> int:\n    \"\"\"Sum of a and b.\"\"\"\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}


def test_extract_code_forms():
    """Guards code extraction: the first fenced block, an unclosed fence, or the raw text."""
    assert extract_code("Here:\n```python\nx = 1\n```\nand ```python\ny = 2\n```") == "x = 1\n"
    assert extract_code("```\nx = 1\n") == "x = 1\n"
    assert extract_code("    return a + b\n") == "    return a + b\n"


def test_humaneval_body_and_full_function_pass_wrong_fails():
    """Guards HumanEval assembly: a body continuing the prompt and a full function both pass; a wrong one fails."""
    assert run_program(humaneval_program(HE_PROBLEM, "    return a + b\n")).passed
    full = "Sure:\n```python\ndef add(a, b):\n    return a + b\n```"
    assert run_program(humaneval_program(HE_PROBLEM, full)).passed
    assert not run_program(humaneval_program(HE_PROBLEM, "    return a - b\n")).passed
    assert score_item({"suite": "humaneval", "problem": HE_PROBLEM, "output": "    return a * b\n"})[0] == 0.0


def test_mbpp_program_pass_and_fail():
    """Guards MBPP assembly: setup after the code (it may use the solution's classes), asserts last."""
    problem = {"test_list": ["assert double(B(2).v) == 4"], "test_setup_code": ""}
    code = "class B:\n    def __init__(self, v):\n        self.v = v\ndef double(x):\n    return 2 * x\n"
    assert run_program(mbpp_program(problem, code)).passed
    assert not run_program(mbpp_program(problem, code.replace("2 * x", "x + 1"))).passed
    setup = {"test_list": ["assert total == 7"], "test_setup_code": "total = add(3, 4)"}
    assert run_program(mbpp_program(setup, "def add(a, b):\n    return a + b\n")).passed


@pytest.fixture()
def local_server():
    """A TCP server on 127.0.0.1 that answers b'pong', to prove a connection would otherwise work."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(20)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.sendall(b"pong")
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield srv.getsockname()[1]
    stop.set()
    srv.close()


def _connect_program(port: int) -> str:
    return ("import socket\n"
            f"s = socket.create_connection(('127.0.0.1', {port}), timeout=5)\n"
            "assert s.recv(4) == b'pong'\n")


def test_network_is_blocked_by_each_layer(local_server):
    """Guards 'no network': a program that reaches a live local server outside the sandbox fails inside
    it, with the socket bootstrap alone, with the network namespace alone (where the kernel allows one),
    and with both."""
    import subprocess

    prog = _connect_program(local_server)
    plain = subprocess.run([sys.executable, "-c", prog], capture_output=True, timeout=30)
    assert plain.returncode == 0, plain.stderr   # the control: the server is reachable
    both = run_program(prog)
    assert not both.passed and not both.timed_out
    sockets_only = run_program(prog, net_namespace=False)
    assert not sockets_only.passed and "disabled" in sockets_only.output_tail
    probe = subprocess.run(["unshare", "--user", "--net", "true"], capture_output=True) \
        if __import__("shutil").which("unshare") else None
    if probe is not None and probe.returncode == 0:
        # A child process without the bootstrap: only the namespace stops it.
        child = f"import subprocess, sys\nsys.exit(subprocess.run([sys.executable, '-c', {prog!r}]).returncode)\n"
        assert not run_program(child, block_sockets=True).passed
        assert not run_program(prog, block_sockets=False).passed


def test_infinite_loop_is_killed_and_limits_apply(monkeypatch):
    """Guards the wall-time kill, the memory limit, the temp-dir cwd and the scrubbed environment."""
    looping = run_program("while True:\n    pass\n", timeout_s=1.0)
    assert looping.timed_out and not looping.passed and looping.returncode is None
    sleeper = run_program("import subprocess\nsubprocess.Popen(['sleep', '60'])\nwhile True:\n    pass\n",
                          timeout_s=1.0)
    assert sleeper.timed_out
    hog = run_program("x = bytearray(800 * 1024 * 1024)\n", memory_mb=256)
    assert not hog.passed and "MemoryError" in hog.output_tail
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    env = run_program("import os, tempfile\n"
                      "assert 'HTTPS_PROXY' not in os.environ and 'HOME' in os.environ\n"
                      "assert os.getcwd().startswith(os.environ['TMPDIR'])\n"
                      "open('scratch.txt', 'w').write('ok')\n")
    assert env.passed, env.output_tail


# ---------------------------------------------------------------------------------------------
# Subsets, config, stop rule.

def test_subsets_are_deterministic_and_seeded():
    """Guards reproducible subsets: same (seed, suite) gives the same items; another seed or suite differs."""
    a = pick_subset(1000, 20, 0, "gsm8k")
    assert a == pick_subset(1000, 20, 0, "gsm8k") and len(set(a)) == 20 and a == sorted(a)
    assert a != pick_subset(1000, 20, 1, "gsm8k") and a != pick_subset(1000, 20, 0, "mbpp")
    assert pick_subset(5, 20, 0, "x") == [0, 1, 2, 3, 4] and pick_subset(5, None, 0, "x") == [0, 1, 2, 3, 4]


def test_eval_config_suites_and_metric_validation(shared_data, tmp_path):
    """Guards EvalConfig: naming a suite enables it (list, mapping, dotted override), the metric must be
    known and enabled, and a missing file is an error naming the file and the key to set."""
    cfg = build_config({"eval": {"suites": ["gsm8k", "arc_easy"], "metric": "average"}})
    assert list(cfg.eval.suites.enabled()) == ["gsm8k", "arc_easy"]
    cfg = build_config(overrides=["eval.suites.mbpp.limit=7", "eval.metric=mbpp"])
    assert cfg.eval.suites.mbpp.enabled and cfg.eval.suites.mbpp.limit == 7
    assert cfg.eval.suite_file("mbpp") == shared_data / "eval" / "mbpp.jsonl"
    assert cfg.eval.shots_file("gsm8k") == shared_data / "eval" / "gsm8k_train.jsonl"
    assert list(build_config().eval.suites.enabled()) == []   # the demo stays fast
    assert set(type(cfg.eval.suites).model_fields) == set(BENCHMARKS)
    with pytest.raises(ConfigError) as err:
        build_config({"eval": {"suites": {"gsm8k": {"path": str(tmp_path / "none.jsonl")}, "mmlu": {}},
                               "data_dir": str(tmp_path), "metric": "arc_easy"}})
    text = str(err.value)
    assert "none.jsonl' does not exist; set eval.suites.gsm8k.path" in text
    assert "mmlu.zip" in text and "eval.data_dir" in text
    assert "'arc_easy' but that suite is not enabled" in text
    with pytest.raises(ConfigError, match="did you mean 'gsm8k'"):
        build_config({"eval": {"suites": ["gsmk8"]}})
    with pytest.raises(ConfigError, match="eval.metric 'accuracy' is unknown"):
        build_config(overrides=["eval.metric=accuracy"])


def test_stop_rule_reads_suite_scores_in_the_right_direction():
    """Guards converge with suite metrics: scores are higher-better, loss lower-better, average works."""
    assert lower_is_better("heldout_loss") and not lower_is_better("gsm8k") and not lower_is_better("average")
    cfg = ConvergeConfig(max_rounds=10, patience=1, min_delta=0.0)
    rising = [{"gsm8k": 0.10}, {"gsm8k": 0.20}]
    assert should_stop(rising, cfg, "gsm8k", 1, None) == (False, "")
    stop, why = should_stop([{"gsm8k": 0.20}, {"gsm8k": 0.15}], cfg, "gsm8k", 1, None)
    assert stop and "plateau: gsm8k" in why
    assert best_round([{"average": 0.3}, {"average": 0.5}, {"average": 0.4}], "average") == 1
    assert best_round([{"heldout_loss": 0.3}, {"heldout_loss": 0.5}], "heldout_loss") == 0


# ---------------------------------------------------------------------------------------------
# Real rows of each benchmark in ../shared/data.

def test_real_gsm8k_gold_answers_score_one(shared_data):
    """Guards GSM8K parsing on every real test row: the gold solution scores 1, gold + 1 scores 0; shots
    come from the train split."""
    path = shared_data / "eval" / "gsm8k_test.jsonl"
    rows = read_jsonl(path, ("question", "answer"))
    items = suite_items("gsm8k", path, shared_data / "eval" / "gsm8k_train.jsonl", 4, None, None, 0)
    assert len(items) == len(rows) == 1319
    train_q = {json.loads(line)["question"] for line in open(shared_data / "eval" / "gsm8k_train.jsonl")}
    assert len(items[0]["shots"]) == 4 and all(s[0].split("\n")[0] in train_q for s in items[0]["shots"])
    assert all("<<" not in s[1] for s in items[0]["shots"])
    for row, item in zip(rows, items):
        assert score_item({**item, "output": row["answer"]})[0] == 1.0, row["answer"][-40:]
        wrong = str(int(float(item["gold"])) + 1)
        assert score_item({**item, "output": f"#### {wrong}"})[0] == 0.0


@pytest.mark.parametrize("name", ["math500", "math"])
def test_real_math_solutions_score_one(shared_data, name):
    """Guards MATH parsing on real rows: each reference solution's last box matches the gold answer, and
    another row's (different) answer scores 0."""
    path = shared_data / "eval" / ("math500_test.jsonl" if name == "math500" else "math_test.jsonl")
    items = suite_items(name, path, None, 0, None, 500 if name == "math" else None, 0)
    rows = read_jsonl(path, ("problem", "solution"))
    assert len(items) == 500
    for i, item in enumerate(items):
        row = rows[int(item["uid"].split("/")[1])]   # without shots the pool is the file
        assert item["row"]["instruction"].startswith(row["problem"])
        assert score_item({**item, "output": row["solution"]})[0] == 1.0, item["gold"]
        other = items[(i + 1) % len(items)]["gold"]
        if not math_answers_equal(other, item["gold"]):
            assert score_item({**item, "output": f"\\boxed{{{other}}}"})[0] == 0.0


@pytest.mark.parametrize("name,file", [("arc_challenge", "arc_challenge_test.jsonl"),
                                       ("arc_easy", "arc_easy_test.jsonl")])
def test_real_arc_items_and_shots(shared_data, name, file):
    """Guards ARC loading: the shots are the head of the file and never scored; gold indexes the choices."""
    path = shared_data / "eval" / file
    rows = read_jsonl(path, ("query", "choices", "gold"))
    items = suite_items(name, path, None, 3, None, 50, 0)
    shot_queries = {r["query"] for r in rows[:3]}
    assert len(items) == 50 and [s[0] for s in items[0]["shots"]] == [r["query"] for r in rows[:3]]
    assert items[0]["shots"][0][1] == rows[0]["choices"][rows[0]["gold"]]
    for item in items:
        assert item["row"]["instruction"] not in shot_queries and item["kind"] == "mc"
        assert len(item["choices"]) >= 3 and 0 <= item["gold"] < len(item["choices"])
        onehot = [0.0 if j == item["gold"] else -5.0 for j in range(len(item["choices"]))]
        assert score_item({**item, "scores": onehot})[0] == 1.0
        assert score_item({**item, "scores": [-s for s in onehot]})[0] == 0.0


def test_real_mmlu_items_and_dev_shots(shared_data):
    """Guards MMLU parsing: 14042 test items over 57 subjects, letters as options, shots from the same
    subject's dev split."""
    path = shared_data / "eval" / "mmlu.zip"
    items = suite_items("mmlu", path, None, 5, None, None, 0)
    assert len(items) == 14042 and len({it["subject"] for it in items}) == 57
    sample = items[:: 700]
    for item in sample:
        assert item["choices"] == ["A", "B", "C", "D"] and 0 <= item["gold"] <= 3
        assert len(item["shots"]) == 5 and all(s[1] in "ABCD" for s in item["shots"])
        subject = item["subject"].replace("_", " ")
        assert all(f"question about {subject}." in s[0] for s in item["shots"])
        assert item["row"]["instruction"].endswith("Answer with the letter of the correct option.")
    assert np.bincount([it["gold"] for it in items], minlength=4).min() > 3000   # golds are not all 'A'


def test_real_humaneval_canonical_passes_wrong_fails(shared_data):
    """Guards HumanEval on real problems: the canonical solution passes its tests, a wrong body fails."""
    path = shared_data / "eval" / "HumanEval.jsonl.gz"
    items = suite_items("humaneval", path, None, 0, None, 12, 0)
    assert len(items) == 12 and items[0]["uid"].startswith("humaneval/HumanEval/")
    for item in items:
        assert score_item({**item, "output": item["gold"]})[0] == 1.0, item["uid"]
        assert score_item({**item, "output": "    return None\n"})[0] == 0.0, item["uid"]


def test_real_mbpp_gold_passes_wrong_fails(shared_data):
    """Guards MBPP on real tasks: the test split is scored, shots come from the prompt split (2, 3, 4),
    the reference code passes and a wrong function fails."""
    path = shared_data / "eval" / "mbpp.jsonl"
    pool = suite_items("mbpp", path, None, 3, None, None, 0)
    assert len(pool) == 500 and all(int(it["uid"].split("/")[1]) in MBPP_TEST_IDS for it in pool)
    rows = {r["task_id"]: r for r in read_jsonl(path, ("text", "code", "task_id", "test_list"))}
    assert [s[0].split("\n")[0] for s in pool[0]["shots"]] == [rows[i]["text"] for i in (2, 3, 4)]
    items = suite_items("mbpp", path, None, 3, None, 12, 0)
    for item in items:
        assert score_item({**item, "output": f"```python\n{item['gold']}\n```"})[0] == 1.0, item["uid"]
        assert score_item({**item, "output": "def nothing():\n    return None\n"})[0] == 0.0, item["uid"]


def test_bad_benchmark_file_names_the_line(tmp_path):
    """Guards file errors: a row missing a key names the file, the line and what the benchmark needs."""
    path = tmp_path / "gsm.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n" + json.dumps({"q": 1}) + "\n")
    with pytest.raises(ValueError, match=r"gsm.jsonl:2: missing \['question', 'answer'\]"):
        suite_items("gsm8k", path, None, 0, None, None, 0)
