"""The ``drt-peft`` command line: errors that name what is wrong."""

from __future__ import annotations

from drt_peft.apps.cli import main


def test_bench_refuses_unknown_suites(capsys) -> None:
    assert main(["bench", "nope"]) == 2
    assert "unknown suite(s) ['nope']" in capsys.readouterr().out


def test_bench_outside_a_checkout_says_how_to_get_one(tmp_path, capsys) -> None:
    assert main(["bench", "text", "--benchmarks-dir", str(tmp_path)]) == 1
    assert "run from a source checkout" in capsys.readouterr().out
