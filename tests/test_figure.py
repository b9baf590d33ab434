"""python -m world_model.figure: real-above-dream strips, same actions, one PNG."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_neural_world import _save
from world_model.figure import main


def test_figure_rows_are_the_classic_game_above_the_dream(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    ck = _save(tmp_path / "ck")
    out = tmp_path / "fig.png"
    args = [f"checkpoint={ck}", f"out={out}", "seeds=[100000,100001]", "frames=[0,3]", "scale=1",
            "threads=1", "sampler.steps=2"]
    assert main(args) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["frames"] == [0, 3] and info["sampler"]["steps"] == 2
    img = np.asarray(Image.open(out))
    # 2 worlds x (real, dream) rows of 64 px, 6 px between worlds; 2 frames + a 2 px gap
    assert img.shape == (4 * 64 + 6, 2 * 64 + 2, 3)
    # frame 0 is the real frame a stream starts from; frame 3 is dreamed
    assert np.array_equal(img[:64, :64], img[64:128, :64])
    assert not np.array_equal(img[:64, 66:], img[64:128, 66:])
    assert not np.array_equal(img[:64, :64], img[134:198, :64])   # two different worlds
    assert main([f"checkpoint={ck}", f"out={out}", "frames=[]"]) == 2
