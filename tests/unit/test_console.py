"""The loop's console: the loop's lines only, one progress display (in place on a terminal, a line every
LINE_EVERY_S otherwise), progress.json for `middo status`."""

import io
import json
import logging

import pytest

from middo_ray import console

pytestmark = pytest.mark.unit


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.fixture
def quiet_console(monkeypatch):
    """console.configure on a captured non-terminal stream; the logging set-up is restored afterwards."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    loggers = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level, logging.getLogger(n).propagate)
               for n in ("middo", "middo_ray")}
    stream = _Stream(tty=False)
    monkeypatch.setattr(console, "_state", {"quiet": True, "run_dir": None, "tty": None})
    console.configure(verbose=False, stream=stream)
    yield stream
    root.handlers[:], root.level = saved
    for n, (handlers, level, propagate) in loggers.items():
        lg = logging.getLogger(n)
        lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate


def test_quiet_console_shows_the_loops_lines_and_libraries_warnings_only(quiet_console):
    logging.getLogger("middo").info("loop line")
    logging.getLogger("middo_ray.train").info("train line")
    logging.getLogger("ray.data").info("ray data info")
    logging.getLogger("some.library").info("library info")
    logging.getLogger("some.library").warning("library warning")
    out = quiet_console.getvalue()
    assert "loop line" in out and "train line" in out and "library warning" in out
    assert "ray data info" not in out and "library info" not in out
    assert console.ray_init_kwargs() == {"log_to_driver": False, "logging_level": logging.WARNING}


def test_progress_off_a_terminal_is_a_line_every_interval_and_a_file(quiet_console, monkeypatch, tmp_path):
    monkeypatch.setattr(console, "LINE_EVERY_S", 0.0)
    monkeypatch.setattr(console, "FILE_EVERY_S", 0.0)
    console.set_run_dir(str(tmp_path))
    try:
        console.stage_started(3, "diagnose")
        p = console.Progress("diagnose", 200, "rows")
        for done in (50, 100):
            p.update(done)
        lines = [ln for ln in quiet_console.getvalue().splitlines() if "diagnose:" in ln]
        assert len(lines) == 2 and "[round 3] diagnose: 100/200 rows" in lines[-1] and "ETA" in lines[-1]
        running = json.loads((tmp_path / "progress.json").read_text())
        assert (running["round"], running["stage"], running["state"]) == (3, "diagnose", "running")
        assert (running["done"], running["total"]) == (100, 200) and running["eta_s"] is not None
        p.finish()
        assert json.loads((tmp_path / "progress.json").read_text())["state"] == "done"
    finally:
        console.set_run_dir(None)
    assert "\r" not in quiet_console.getvalue()


def test_progress_on_a_terminal_rewrites_one_line_and_log_lines_clear_it(monkeypatch, capsys):
    """On a terminal: the display is redrawn in place (\\r + erase line), and a log line printed meanwhile
    first clears it, so the two never share a line."""
    monkeypatch.setattr(console, "_state", {"quiet": True, "run_dir": None, "tty": True})
    monkeypatch.setattr(console, "TTY_EVERY_S", 0.0)
    p = console.Progress("refine: rewrite", 10, "rows", round_=1)
    p.update(4)
    handler = console._ProgressAwareHandler(__import__("sys").stdout)
    handler.emit(logging.LogRecord("middo", logging.INFO, __file__, 1, "a log line", None, None))
    p.update(10)
    p.finish()
    out = capsys.readouterr().out
    assert out.count("\r\033[K[round 1] refine: rewrite: 4/10 rows") >= 1
    assert "\r\033[Ka log line\n" in out
    assert out.endswith("\r\033[K")                    # the finished display leaves an empty line
