"""world_model.eval_onsets: turn onsets are found exactly, and the recorded-vs-mirrored comparison
differs only in the turn (same context, same noise), so a dream that ignores the command scores 0 dB."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import world_model.eval_onsets as eo
from world_model.codec import CodecConfig, FrameCodec
from world_model.dit import ModelConfig, WorldDiT
from world_model.eval_report import _held_section, _onset_section, held_columns
from world_model.eval_streams import Session, decode_frames
from world_model.samplers import SamplerConfig, make_sampler
from world_model.view_warp import Camera


def _controls(turns: list[float]) -> np.ndarray:
    u = np.zeros((len(turns), 4), np.float32)
    u[:, 2] = turns
    return u


def test_find_onsets_needs_a_still_frame_then_one_held_direction() -> None:
    u = _controls([0, 0, 0, 1, 1, 1, 0, 0, -1, -1, 0.2, 0, 0, 1, 1])
    assert eo.find_onsets(u, n_ctx=2, horizon=2, min_turn=0.5) == [3, 8, 13]
    assert eo.find_onsets(u, n_ctx=4, horizon=2, min_turn=0.5) == [8, 13]      # room for the context
    assert eo.find_onsets(u, n_ctx=2, horizon=3, min_turn=0.5) == [3]          # 8 and 13 turn for 2 frames only
    assert eo.find_onsets(_controls([0, 1, -1]), 1, 2, 0.5) == []              # the direction flips
    assert eo.find_onsets(_controls([0, 0.4, 0.4]), 1, 2, 0.5) == []           # too gentle


def test_mirrored_flips_only_the_horizon() -> None:
    u = torch.from_numpy(_controls([0, 0, 1, 1, 1, 1]))
    m = eo.mirrored(u, 2, 2)
    assert m[:, 2].tolist() == [0, 0, -1, -1, 1, 1] and u[:, 2].tolist() == [0, 0, 1, 1, 1, 1]
    assert torch.equal(m[:, :2], u[:, :2])


@pytest.fixture(scope="module")
def parts() -> tuple[FrameCodec, WorldDiT, Session]:
    torch.manual_seed(0)
    codec = FrameCodec(CodecConfig(resolution=64, latent_channels=4, downsample=8, base_channels=8)).eval()
    dit = WorldDiT(ModelConfig(latent_channels=4, latent_res=8, patch=2, d_model=32, depth=1, heads=2)).eval()
    with torch.no_grad():                       # wake the zero-initialised gates so controls matter
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    frames = (np.random.default_rng(0).random((40, 64, 64, 3)) * 255).astype(np.uint8)
    turns = [0.0] * 40
    turns[10:14] = [1.0] * 4                    # onset at 10
    turns[25:29] = [-1.0] * 4                   # onset at 25
    with torch.no_grad():
        z = codec.encode(codec.frames_to_tensor(frames))
    s = Session(100000, 0, frames, _controls(turns), z, decode_frames(codec, z), False)
    return codec, dit, s


def test_onset_metrics_compare_like_with_like(parts: tuple[FrameCodec, WorldDiT, Session],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    codec, dit, s = parts
    samplers = {"rolling": make_sampler(dit, SamplerConfig(name="rolling", steps=2)),
                "causal": make_sampler(dit, SamplerConfig(name="causal", steps=2))}
    cfg = eo.OnsetConfig(positions=8, horizon=3)
    out = eo.onset_metrics(codec, samplers, [s], cfg)
    assert out["positions"] == 2 and set(out["copy_last"]) == {1, 2, 3}
    for v in out["configs"].values():
        assert v["response_db"][1] == pytest.approx(v["recorded"][1] - v["mirrored"][1])
    # this model reads its controls: the mirrored turn changes the dream
    assert any(abs(d) > 1e-6 for v in out["configs"].values() for d in v["response_db"].values())
    # a "mirror" that changes nothing: same context, same noise -> exactly 0 dB, no response
    monkeypatch.setattr(eo, "mirrored", lambda u, start, horizon: u.clone())
    same = eo.onset_metrics(codec, samplers, [s], cfg)
    for v in same["configs"].values():
        assert all(d == 0.0 for d in v["response_db"].values()) and v["first_response_frame"] is None
    assert eo.onset_metrics(codec, samplers, [s], eo.OnsetConfig(positions=1, horizon=3))["positions"] == 1
    assert eo.onset_metrics(codec, samplers, [s], eo.OnsetConfig(positions=0))["configs"] == {}


def test_onset_section_in_markdown() -> None:
    on = {"horizon": 2, "positions": 5, "margin_db": 1.0, "copy_last": {"1": 20.0, "2": 18.0},
          "codec_ceiling": {"1": 29.0, "2": 29.0},
          "configs": {"rolling": {"recorded": {"1": 20.5, "2": 19.5}, "mirrored": {"1": 20.3, "2": 18.0},
                                  "response_db": {"1": 0.2, "2": 1.5}, "first_response_frame": 2},
                      "blind": {"recorded": {"1": 20.0, "2": 18.0}, "mirrored": {"1": 20.0, "2": 18.0},
                                "response_db": {"1": 0.0, "2": 0.0}, "first_response_frame": None}}}
    text = "\n".join(_onset_section(on))
    assert "## Response to a turn" in text and "| rolling | 20.50 | 19.50 | 0.20 | 1.50 | 2 |" in text
    assert "| blind | 20.00 | 18.00 | 0.00 | 0.00 | > 2 |" in text
    assert "| copy-last | 20.00 | 18.00 | - | - | - |" in text
    assert _onset_section(None) == []                                  # reports written before the section
    assert "No turn onsets" in "\n".join(_onset_section({**on, "positions": 0, "configs": {}}))


def test_held_turns_score_against_a_frozen_picture_and_the_codec(parts: tuple[FrameCodec, WorldDiT, Session],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    codec, dit, s = parts
    samplers = {"rolling": make_sampler(dit, SamplerConfig(name="rolling", steps=2))}
    out = eo.held_turn_metrics(codec, samplers, [s], eo.OnsetConfig(positions=8, held=3))
    assert out["positions"] == 2 and set(out["copy_last"]) == {1, 2, 3}
    v = out["configs"]["rolling"]
    assert set(v["psnr"]) == {1, 2, 3} and all(np.isfinite(x) for x in v["share_of_reachable"].values())
    # a dream that freezes the frame before the onset scores exactly copy-last (share 0); one that
    # returns the codec's round trip of the truth scores the ceiling (share 1)
    monkeypatch.setattr(eo, "_dream", lambda codec, sampler, s, u, p, h, seed: np.broadcast_to(
        s.frames[p - 1], (h, *s.frames.shape[1:])).copy())
    frozen = eo.held_turn_metrics(codec, samplers, [s], eo.OnsetConfig(positions=8, held=3))["configs"]["rolling"]
    assert frozen["psnr"] == pytest.approx(out["copy_last"])
    assert all(x == 0 for x in frozen["share_of_reachable"].values())
    monkeypatch.setattr(eo, "_dream", lambda codec, sampler, s, u, p, h, seed: s.recon[p:p + h])
    best = eo.held_turn_metrics(codec, samplers, [s], eo.OnsetConfig(positions=8, held=3))["configs"]["rolling"]
    assert best["psnr"] == pytest.approx(out["codec_ceiling"])
    assert all(x == pytest.approx(1.0) for x in best["share_of_reachable"].values())
    # the visible region (with a camera): the same two dreams score its copy-last and ceiling, and a
    # dream that is the frame before the onset rotated by the recorded turn scores rotated-last
    cam = Camera(fov_deg=66.0, turn_deg=4.0)
    vis = eo.held_turn_metrics(codec, samplers, [s], eo.OnsetConfig(positions=8, held=3), camera=cam)
    assert vis["configs"]["rolling"]["psnr_visible"] == pytest.approx(vis["codec_ceiling_visible"])
    assert vis["codec_ceiling_visible"] != pytest.approx(vis["copy_last_visible"])
    monkeypatch.setattr(eo, "_dream", lambda codec, sampler, s, u, p, h, seed: np.broadcast_to(
        s.frames[p - 1], (h, *s.frames.shape[1:])).copy())
    vis = eo.held_turn_metrics(codec, samplers, [s], eo.OnsetConfig(positions=8, held=3), camera=cam)
    assert vis["configs"]["rolling"]["psnr_visible"] == pytest.approx(vis["copy_last_visible"])
    share = [vis["visible_share"][h] for h in (1, 2, 3)]
    assert 1.0 > share[0] > share[1] > share[2] > 0.7                    # 4 degrees of 66 per frame
    monkeypatch.setattr(eo, "_dream", lambda codec, sampler, s, u, p, h, seed: eo._rotated_last(
        s.frames[p - 1], np.cumsum(s.controls[p:p + h, eo.TURN]) * 4.0, cam))
    rot = eo.held_turn_metrics(codec, samplers, [s], eo.OnsetConfig(positions=8, held=3), camera=cam)
    assert rot["configs"]["rolling"]["psnr_visible"] == pytest.approx(rot["rotated_last_visible"])
    assert rot["configs"]["rolling"]["psnr"] == pytest.approx(rot["rotated_last"])
    # the turns last 4 frames: none is held 5; held=0 switches the section off
    assert eo.held_turn_metrics(codec, samplers, [s], eo.OnsetConfig(positions=8, held=5))["positions"] == 0
    assert eo.held_turn_metrics(codec, samplers, [s], eo.OnsetConfig(positions=8, held=0))["configs"] == {}
    with pytest.raises(ValueError, match="held"):
        eo.held_turn_metrics(codec, samplers, [s], eo.OnsetConfig(held=-1))


def test_held_section_in_markdown() -> None:
    ht = {"horizon": 3, "positions": 4, "copy_last": {"1": 20.0, "2": 18.0, "3": 17.0},
          "codec_ceiling": {"1": 30.0, "2": 30.0, "3": 30.0},
          "configs": {"rolling": {"psnr": {"1": 21.0, "2": 19.0, "3": 17.5},
                                  "share_of_reachable": {"1": 0.2, "2": 0.1, "3": 0.05}}}}
    text = "\n".join(_held_section(ht))
    assert "## Held turns" in text and "| rolling | 21.00 | 19.00 | 17.50 | 0.20 | 0.10 | 0.05 |" in text
    assert "| copy-last | 20.00 | 18.00 | 17.00 | - | - | - |" in text
    assert _held_section(None) == [] and _held_section({**ht, "horizon": 0}) == []
    assert "No held turns" in "\n".join(_held_section({**ht, "positions": 0, "configs": {}}))
    assert held_columns(16) == [1, 2, 4, 8, 12, 16] and held_columns(6) == [1, 2, 4, 6]
    assert "visible region" not in text
    hv = {**ht, "rotated_last": {"1": 25.0, "2": 23.0, "3": 21.0}, "visible_share": {"1": 0.9, "2": 0.8, "3": 0.7},
          **{k: {"1": 22.0, "2": 21.0, "3": 20.0} for k in
             ("copy_last_visible", "codec_ceiling_visible", "rotated_last_visible")}}
    hv["configs"] = {"rolling": {**ht["configs"]["rolling"], "psnr_visible": {"1": 24.0, "2": 23.5, "3": 23.0}}}
    text = "\n".join(_held_section(hv))
    assert "| rotated-last | 25.00 | 23.00 | 21.00 | - | - | - |" in text and "visible region" in text
    assert "| visible share | 0.90 | 0.80 | 0.70 |" in text and "| rolling | 24.00 | 23.50 | 23.00 |" in text
