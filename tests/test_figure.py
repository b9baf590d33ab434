"""python -m world_model.figure: real-above-dream strips, same actions, one PNG."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import torch_threads
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


def test_figure_held_action_scripts_and_codec_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ck = _save(tmp_path / "ck")
    out = tmp_path / "fig.png"
    args = [f"checkpoint={ck}", f"out={out}", "seeds=[100000]", "frames=[0,3]", "scale=1", "threads=1",
            "sampler.steps=2", "actions=[noop,turn_right]", "codec_row=true"]
    assert main(args) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["actions"] == ["noop", "turn_right"] and info["codec_row"] is True
    table = info["psnr_db"]
    assert set(table) == {"noop", "turn_right"} and all(len(v) == 2 for r in table.values() for v in r.values())
    # frame 0 is the real frame in every row; standing still, the held first frame is exact,
    # turning, it is not
    assert table["noop"]["dream"][0] == table["noop"]["frozen"][0] == table["noop"]["frozen"][1] == 99.0
    assert table["turn_right"]["frozen"][1] < 99.0 and table["turn_right"]["dream"][1] < 99.0
    img = np.asarray(Image.open(out)).astype(int)
    # one world, two scripts x (real, dream, codec) rows of 64 px, 6 px between the scripts
    assert img.shape == (6 * 64 + 6, 2 * 64 + 2, 3)
    noop_real, turn_real, turn_codec = img[:64], img[198:262], img[326:390]
    assert np.array_equal(noop_real[:, :64], noop_real[:, 66:])       # standing still: the view stays
    assert not np.array_equal(turn_real[:, :64], turn_real[:, 66:])   # turning right: it moves
    assert np.array_equal(turn_real[:, :64], img[:64, :64])           # both start from the same frame
    # the codec row is the real row through a (lossy, here untrained) round trip: same shape, not equal
    assert not np.array_equal(turn_codec, turn_real)
    for bad in ("actions=[jump]", "actions=[]"):
        assert main([f"checkpoint={ck}", f"out={out}", bad]) == 2
        assert "error: figure:" in capsys.readouterr().err


def test_figure_leaves_the_callers_thread_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # an in-process caller (this test suite) keeps its torch thread count, on success and on
    # bad input alike: a leaked count once broke a later bit-exact test
    import torch

    ck = _save(tmp_path / "ck")
    out = tmp_path / "fig.png"
    with torch_threads(3):
        ok = [f"checkpoint={ck}", f"out={out}", "seeds=[100000]", "frames=[0,1]", "scale=1", "threads=1",
              "sampler.steps=2"]
        assert main(ok) == 0
        assert torch.get_num_threads() == 3
        assert main(ok[:-2] + ["threads=2", "actions=[jump]"]) == 2
        assert torch.get_num_threads() == 3
    capsys.readouterr()
