"""world_model.depth_probe: the ground truth is the game's own wall geometry, a tiny probe learns
something a constant cannot, and the files on disk round-trip or are refused in one line."""
from __future__ import annotations

import json
import math
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.classic_game import ClassicConfig, ClassicGame, ClassicState
from world_model.checkpoint import CheckpointError
from world_model.depth_probe import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    classic_column_depth,
    ColumnDepthNet,
    DepthProbeConfig,
    collect_depth,
    depth_errors,
    estimate_column_depth,
    load_depth_probe,
    main,
    param_count,
    save_depth_probe,
    train_depth_probe,
)

TINY = DepthProbeConfig(train_seeds=6, frames_per_seed=30, frame_stride=4, heldout_seeds=3, heldout_frames=20,
                        steps=150, batch=32, lr=4e-3, width=8, threads=1)


@pytest.fixture(scope="module")
def tiny() -> tuple[ColumnDepthNet, dict]:
    return train_depth_probe(replace(TINY))


def _corridor(game: ClassicGame) -> tuple[int, int, int]:
    """A free cell (x, y) with k >= 1 free cells after it along +x and then a wall: (x, y, k)."""
    grid = game.maze.grid
    for y in range(1, grid.shape[0] - 1):
        for x in range(1, grid.shape[1] - 3):
            k = 0
            while grid[y, x] == 0 and x + k + 1 < grid.shape[1] and grid[y, x + k + 1] == 0:
                k += 1
            if grid[y, x] == 0 and k >= 2:
                return x, y, k
    raise AssertionError("no corridor of 3 free cells along +x")


def test_depth_facing_a_wall_at_a_known_pose() -> None:
    game = ClassicGame(ClassicConfig())
    game.reset(3)
    x, y, k = _corridor(game)
    grid = game.maze.grid
    assert grid[y, x + k + 1] != 0
    game.set_state(ClassicState(3, x + 0.5, y + 0.5, 0.0, 0))                # centre of the cell, facing +x
    d = classic_column_depth(game)
    assert d.shape == (64,)
    # the wall plane x = x + k + 1 lies k + 0.5 cells ahead: the perpendicular distance of the centre columns
    assert d[31] == pytest.approx(k + 0.5) and d[32] == pytest.approx(k + 0.5)
    # one cell from a wall ahead, every column sees that face at the same perpendicular distance
    game.set_state(ClassicState(3, x + k + 0.5, y + 0.5, 0.0, 0))
    np.testing.assert_allclose(classic_column_depth(game), 0.5)
    # turned by pi/2 the same machinery looks along +y: the depth changes
    game.set_state(ClassicState(3, x + 0.5, y + 0.5, math.pi / 2, 0))
    assert not np.allclose(classic_column_depth(game)[31], k + 0.5)


def test_depth_matches_the_painted_wall_extent() -> None:
    """A column of depth d shows wall (not floor/ceiling background) exactly where |v| < 0.5 / d."""
    frames, depth = collect_depth(ClassicConfig(), [7, 100003], frames=12, stride=9)
    game = ClassicGame(ClassicConfig())
    game.reset(7)
    painter = game._painters[game.theme_index]
    v = np.abs(painter.row_v)[None, :, None]                                    # (1, H, 1)
    wall = v < 0.5 / depth[:, None, :]                                          # (N, H, W) predicted wall
    seen_wall, seen_bg = [], []
    for seed, fr, w in zip([7] * 12 + [100003] * 12, frames, wall):
        game.reset(seed)
        p = game._painters[game.theme_index]
        bg = np.all(fr == p.bg_light[:, 0][:, None], -1) | np.all(fr == p.bg_dark[:, 0][:, None], -1)  # (H, W)
        seen_wall.append(~bg[w])
        seen_bg.append(bg[~w])
    assert np.mean(np.concatenate(seen_wall)) > 0.97   # wall texels rarely equal a background colour
    assert np.mean(np.concatenate(seen_bg)) > 0.995    # off-wall pixels are background (edge rows round)
    assert depth.min() > 0.1 and np.isfinite(depth).all()


def test_net_shape_positivity_size_and_input_conventions() -> None:
    torch.manual_seed(0)
    net = ColumnDepthNet(16)
    assert param_count(net) < 200_000
    x = torch.rand(5, 3, 64, 64) * 2 - 1
    assert net(x).shape == (5, 64)
    d = estimate_column_depth(net, x)
    assert d.shape == (5, 64) and bool((d > 0).all())
    frames = np.random.default_rng(0).integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)
    assert estimate_column_depth(net, frames).shape == (2, 48)                 # uint8 frames, other width
    with pytest.raises(ValueError, match="depth probe input"):
        estimate_column_depth(net, torch.zeros(2, 64, 64, 3))


def test_depth_errors() -> None:
    true = np.array([[1.0, 2.0, 4.0, 10.0]])
    e = depth_errors(true * np.array([1.05, 1.2, 0.5, 1.0]), true)
    assert e["within_10pct"] == 0.5 and e["within_25pct"] == 0.75
    assert e["median_rel_err"] == pytest.approx(0.125)
    assert e["by_depth"]["3-8"] == pytest.approx(0.5)


def test_tiny_training_lowers_loss_and_beats_the_mean(tiny) -> None:
    net, m = tiny
    assert m["train"]["loss_last50"] < 0.75 * m["train"]["loss_first50"]
    raw, base = m["heldout"]["raw"], m["heldout"]["mean_baseline"]
    assert m["heldout"]["seeds"][0] >= 100000 and m["train"]["seeds"][1] < 100000
    assert raw["median_rel_err"] < 0.8 * base["median_rel_err"]
    assert raw["within_25pct"] > base["within_25pct"]
    assert m["heldout"]["roundtrip"] is None and m["params"] == param_count(net)


def test_training_is_deterministic(tiny) -> None:
    net, _ = tiny
    again, _ = train_depth_probe(replace(TINY))
    for (k, a), b in zip(net.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_save_load_round_trip(tiny, tmp_path: Path) -> None:
    net, m = tiny
    out = save_depth_probe(net, TINY, tmp_path / "probe", m)
    loaded, doc = load_depth_probe(out)
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    assert torch.equal(estimate_column_depth(net, x), estimate_column_depth(loaded, x))
    assert doc["config"]["width"] == 8 and doc["metrics"]["classic"]["fov_deg"] == 66.0


def test_refuses_truncated_pickled_and_modified_files(tiny, tmp_path: Path) -> None:
    net, _ = tiny
    good = save_depth_probe(net, TINY, tmp_path / "good")
    blob = (good / WEIGHTS_FILE).read_bytes()
    cases = {}
    for name in ("truncated", "pickled", "flipped", "pickle_file"):
        d = tmp_path / name
        save_depth_probe(net, TINY, d)
        cases[name] = d
    (cases["truncated"] / WEIGHTS_FILE).write_bytes(blob[:len(blob) // 2])
    (cases["pickled"] / WEIGHTS_FILE).write_bytes(pickle.dumps({"w": [1.0]}))
    flipped = bytearray(blob)
    flipped[-5] ^= 0x01
    (cases["flipped"] / WEIGHTS_FILE).write_bytes(bytes(flipped))
    pk = tmp_path / "probe.pkl"
    pk.write_bytes(pickle.dumps(net.state_dict()))
    for path, msg in ((cases["truncated"], "truncated or corrupt"),
                      (cases["pickled"], "refusing to load a pickle"),
                      (cases["flipped"], "sha256 does not match"),
                      (pk, "refusing to load a pickle"),
                      (tmp_path / "nowhere", "no such depth probe directory")):
        with pytest.raises(CheckpointError, match=msg) as e:
            load_depth_probe(path)
        assert "\n" not in str(e.value)
    (cases["truncated"] / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_depth_probe(cases["truncated"])


def test_cli_trains_saves_and_reports(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    assert main([f"out={out}", "train_seeds=2", "frames_per_seed=8", "heldout_seeds=1", "heldout_frames=4",
                 "steps=3", "batch=4", "width=4"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    res = json.loads(line)
    assert res["out"] == str(out) and "median_rel_err" in res["heldout"]["raw"]
    load_depth_probe(out)
    assert main(["train_seeds=2"]) == 2                                         # no out=
    assert main([f"out={out}", "train_seed0=99999", "train_seeds=5"]) == 2      # would train on held-out worlds
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("error: ") for e in err) and "train_seeds" in err[1]


def test_codec_round_trips_are_used_and_scored(tmp_path: Path) -> None:
    codec = Path("assets/default")
    if not (codec / "model.safetensors").is_file():
        pytest.skip("no shipped checkpoint")
    cfg = DepthProbeConfig(codec=str(codec), train_seeds=2, frames_per_seed=6, heldout_seeds=1, heldout_frames=4,
                           steps=4, batch=8, width=4)
    net, m = train_depth_probe(cfg)
    assert m["train"]["roundtrip_frames"] == 6 and m["codec_id"]
    rt, raw = m["heldout"]["roundtrip"], m["heldout"]["raw"]
    assert rt is not None and rt != raw                                         # other inputs, other errors
