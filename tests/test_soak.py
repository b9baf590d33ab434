"""python -m world_model.soak: RSS samples over a stream, one JSON line, bad input refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_neural_world import _save
from world_model.soak import main


def test_soak_samples_rss_over_the_stream(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ck = _save(tmp_path / "ck")
    assert main([f"checkpoint={ck}", "minutes=0.05", "fps=20", "every=25", "threads=1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["frames"] == 60 and [s[0] for s in out["samples"]] == [25, 50, 60]
    assert all(s[1] > 10 for s in out["samples"]) and out["rss_max_mb"] >= out["rss_first_mb"]
    assert out["growth_mb"] == pytest.approx(out["rss_last_mb"] - out["rss_first_mb"], abs=0.011)


def test_soak_refuses_bad_ranges(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["minutes=0"]) == 2
    assert "minutes" in capsys.readouterr().err
