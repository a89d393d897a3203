"""How a run is held against the pinned results: signals within TOL, everything else identical."""

from __future__ import annotations

TOL = 1e-6


def assert_signals_match(got: dict, want: dict, what: str) -> None:
    """Every sample's signals equal the pinned ones within TOL (a missing value stays missing)."""
    assert set(got) == set(want), f"{what}: the diagnosed samples differ"
    worst = 0.0
    for sid, sig in want.items():
        for key, value in sig.items():
            other = got[sid][key]
            if value is None or isinstance(value, bool):
                assert other == value, (what, sid, key, other, value)
            else:
                assert other is not None, (what, sid, key)
                worst = max(worst, abs(other - value))
    assert worst <= TOL, f"{what}: signals differ by up to {worst:.2e} (tolerance {TOL:g})"


def assert_same_as_golden(got: dict, want: dict) -> None:
    assert got["data"] == want["data"], "the data split differs"
    assert got["sizes"] == want["sizes"]
    for k, (g, w) in enumerate(zip(got["rounds"], want["rounds"]), start=1):
        assert_signals_match(g["signals"], w["signals"], f"round {k}")
        assert g["flags"] == w["flags"], f"round {k}: flags differ"
        assert g["refine"] == w["refine"], f"round {k}: refine results differ"
        assert g["dataset"] == w["dataset"] and g["size"] == w["size"], f"round {k}: merged dataset differs"
    assert got["final_sha256"] == want["final_sha256"], "the final optimized file differs"
