"""The walk warp: with the game's true depth, the last frame moved by the commanded step matches
the game's next frame where the old frame had the content, and the mask says where it had not."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Iterator

import numpy as np
import pytest
import torch

import engine.classic_game as classic
from engine.actions import Action
from engine.classic_game import ClassicConfig, ClassicGame
from world_model.codec import frames_to_tensor, tensor_to_frames
from world_model.eval_metrics import pooled_psnr
from world_model.walk_warp import classic_column_depth, translate_view

CFG = ClassicConfig()
# The game without its view-dependent shading (fog, floor and ceiling gradients by screen row) and
# with contrasted floor tiles: every surface looks the same from anywhere, as the warp assumes.
FLAT = ClassicConfig(fog_max=0.0, floor_gradient=0.0, ceiling_gradient=0.0, floor_tiles=0.5)
SEEDS = (0, 2, 5, 7, 1, 3, 4, 6, 8, 9)   # the first four whose step is not blocked are used
STEPS = {"forward": (1, 0), "back": (-1, 0), "strafe_right": (0, 1), "strafe_left": (0, -1)}  # (move, strafe)


def _pose(seed: int, cfg: ClassicConfig = CFG) -> ClassicGame:
    """World ``seed`` at its start pose nudged 0.07 right, 0.03 forward and turned 0.06 rad: at the
    exact start pose the corridor's edges run through pixel centres, ties that the renderer breaks
    by float64 rounding and no float32 warp can reproduce."""
    g = ClassicGame(cfg)
    g.reset(seed)
    st = g.state
    ca, sa = math.cos(st.angle), math.sin(st.angle)
    g.set_state(replace(st, x=st.x + 0.03 * ca - 0.07 * sa, y=st.y + 0.03 * sa + 0.07 * ca,
                        angle=st.angle + 0.06))
    return g


def _walks(button: str, ticks: int, n: int = 4, cfg: ClassicConfig = CFG
           ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, float, float]]:
    """(seed, frame before (H, W, 3), frame after, true depth before (W,), forward, right) for the
    first ``n`` seeds where ``ticks`` of ``button`` move the player by exactly the commanded step."""
    found = 0
    for seed in SEEDS:
        g = _pose(seed, cfg)
        f0, depth, st0 = g.render(), classic_column_depth(g), g.state
        for _ in range(ticks):
            f1 = g.step(Action.make([button]))
        fwd, side = STEPS[button]
        m, s = fwd * ticks * cfg.walk_speed, side * ticks * cfg.strafe_speed
        ca, sa = math.cos(st0.angle), math.sin(st0.angle)
        dx, dy = g.state.x - st0.x, g.state.y - st0.y
        if abs(dx - (m * ca - s * sa)) + abs(dy - (m * sa + s * ca)) > 1e-9:
            continue                                                    # blocked: a wall slid the player
        yield seed, f0, f1, depth, m, s
        found += 1
        if found == n:
            return
    pytest.fail(f"fewer than {n} unblocked poses for {ticks} x {button}")


def _warp(f0: np.ndarray, depth: np.ndarray, m: float, s: float) -> tuple[np.ndarray, np.ndarray]:
    depth_t = torch.tensor(depth[None], dtype=torch.float32)          # (1, W)
    out, known = translate_view(frames_to_tensor(f0[None]), depth_t, torch.tensor([m]), torch.tensor([s]),
                                CFG.fov_deg)
    return tensor_to_frames(out)[0], known[0].numpy()                  # (H, W, 3) uint8, (H, W) bool


def test_zero_motion_is_the_identity() -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 16, 24, generator=g) * 2 - 1
    depth = 0.3 + 5 * torch.rand(2, 24, generator=g)                   # jumps between most columns
    out, known = translate_view(img, depth, torch.zeros(2), torch.zeros(2), 66.0)
    assert out.shape == img.shape and known.shape == (2, 16, 24) and known.dtype == torch.bool
    assert torch.allclose(out, img, atol=1e-5) and bool(known.all())
    f0 = _pose(5).render()
    same, known = _warp(f0, classic_column_depth(_pose(5)), 0.0, 0.0)
    assert np.array_equal(same, f0) and known.all()


def test_classic_column_depth_is_what_the_renderer_used(monkeypatch: pytest.MonkeyPatch) -> None:
    real, seen = classic.cast_rays, []

    def spy(*args: object) -> tuple[np.ndarray, ...]:                 # records the painter's rays
        out = real(*args)
        seen.append(out[0])
        return out

    monkeypatch.setattr(classic, "cast_rays", spy)
    g = _pose(2)
    g.render()
    depth = classic_column_depth(g)
    assert depth.shape == (CFG.width,) and np.array_equal(depth, np.maximum(seen[-1], 1e-4))


# Measured on these poses (dB over the known pixels; warp / copy / wrong direction):
#                seed 0          seed 2          seed 5          seed 7          pooled
#   forward x1   30.2/27.4/27.0  34.4/35.1/33.8  32.0/29.9/29.4  30.0/29.9/28.8  31.3/29.8/29.1
#   forward x3   28.2/22.4/21.2  29.2/28.4/26.5  30.6/26.1/24.6  29.2/26.0/23.2  29.2/25.1/23.4
#   strafe  x1   30.9/24.2/23.5  42.5/32.1/30.1  32.8/27.7/27.0  29.3/21.1/20.2  32.0/24.7/23.8
#   strafe  x3   29.6/22.5/22.2  36.6/28.4/25.8  32.8/25.5/24.3  29.1/21.0/18.8  31.3/23.6/22.1
# A forward tick moves most pixels by less than one: nearest-texel walls resampled bilinearly lose
# about what copying gains there, and floor and ceiling are shaded per screen row, so the warp
# carries the old row's shade (world 2: its plain ceiling and large floor tiles make copying hard
# to beat). Hence small per-seed bars for walking forward, and the pooled bars.
# (absolute floor, per seed over copy, per seed over wrong, pooled over copy, pooled over wrong)
BARS = {("forward", 1): (28.0, None, 0.0, 1.0, 1.5), ("forward", 3): (27.0, 0.0, 2.0, 3.0, 4.0),
        ("strafe_right", 1): (28.0, 4.0, 4.0, 5.0, 6.0), ("strafe_right", 3): (27.0, 4.0, 4.0, 5.0, 6.0)}


@pytest.mark.parametrize("button,ticks", list(BARS))
def test_warp_reproduces_the_classic_games_step(button: str, ticks: int) -> None:
    """With the true depth, the warped frame beats copying the old frame and the opposite step
    over the pixels it calls known, per seed and pooled over the seeds."""
    floor, vs_copy, vs_wrong, pooled_copy, pooled_wrong = BARS[(button, ticks)]
    kept: dict[str, list[np.ndarray]] = {"warp": [], "copy": [], "wrong": [], "truth": []}
    for seed, f0, f1, depth, m, s in _walks(button, ticks):
        right, known = _warp(f0, depth, m, s)
        wrong, _ = _warp(f0, depth, -m, -s)
        truth = f1[known][None, None]                                   # (1, 1, P, 3)
        p_right, p_copy, p_wrong = (pooled_psnr(a[known][None, None], truth) for a in (right, f0, wrong))
        assert p_right > floor and p_right > p_wrong + vs_wrong, (seed, p_right, p_copy, p_wrong)
        assert vs_copy is None or p_right > p_copy + vs_copy, (seed, p_right, p_copy, p_wrong)
        for key, frame in (("warp", right), ("copy", f0), ("wrong", wrong), ("truth", f1)):
            kept[key].append(frame[known])                              # (P, 3)
    truth = np.concatenate(kept.pop("truth"))[None, None]
    p = {k: pooled_psnr(np.concatenate(v)[None, None], truth) for k, v in kept.items()}
    assert p["warp"] > p["copy"] + pooled_copy and p["warp"] > p["wrong"] + pooled_wrong, p


@pytest.mark.parametrize("button,ticks,vs_copy", [("forward", 1, 1.0), ("forward", 3, 5.0),
                                                  ("strafe_right", 3, 4.0)])
def test_floor_and_ceiling_follow_the_world_when_shading_does(button: str, ticks: int,
                                                              vs_copy: float) -> None:
    """Without the row shading, the plane's backward warp beats copying on every seed, even for one
    forward tick (measured over floor and ceiling pixels, dB, warp / copy: forward x1 36.0/29.6,
    31.0/27.8, 34.8/32.7, 29.3/27.4; x3 34.8/22.6, 30.1/22.3, 32.5/25.8, 29.0/21.9; strafe x3
    40.1/28.4, 35.8/23.5, 36.7/25.7, 31.0/25.3)."""
    h, w = FLAT.height, FLAT.width
    half = math.tan(math.radians(FLAT.fov_deg) / 2)
    v = np.abs((np.arange(h) + 0.5 - h / 2) / ((w / 2) / half))        # (H,) row heights
    for seed, f0, f1, depth, m, s in _walks(button, ticks, cfg=FLAT):
        right, known = _warp(f0, depth, m, s)
        plane = known & (v[:, None] >= 0.5 / depth[None, :])            # (H, W) old floor and ceiling
        assert plane.mean() > 0.2
        p_right, p_copy = (pooled_psnr(a[plane][None, None], f1[plane][None, None]) for a in (right, f0))
        assert p_right > 28.0 and p_right > p_copy + vs_copy, (seed, p_right, p_copy)


def test_known_mask_covers_a_step_and_excludes_the_new() -> None:
    for _, f0, _, depth, m, s in _walks("forward", 1):
        assert _warp(f0, depth, m, s)[1].mean() > 0.95                # everything ahead was seen
    for _, f0, _, depth, m, s in _walks("strafe_right", 1):
        known = _warp(f0, depth, m, s)[1]
        # new at the right: the edge column, and rays passing the space beside the old camera
        assert 0.7 < known.mean() < 0.95 and not known[:, -1].any() and known[:, :8].all()
    for _, f0, _, depth, m, s in _walks("strafe_left", 1):
        known = _warp(f0, depth, m, s)[1]
        assert 0.7 < known.mean() < 0.95 and not known[:, 0].any() and known[:, -8:].all()
    for _, f0, _, depth, m, s in _walks("back", 1):                   # stepping back: new at both edges
        known = _warp(f0, depth, m, s)[1]
        assert 0.6 < known.mean() < 0.95 and not known[:, [0, -1]].any() and known[4:-4, 24:40].all()
    # world 3 nudged: three strafe ticks bring a wall the old view never showed in at the right edge
    g = _pose(3)
    f0, depth = g.render(), classic_column_depth(g)
    for _ in range(3):
        g.step(Action.make(["strafe_right"]))
    new = classic_column_depth(g) < 0.6                                 # (W,) the near wall
    known = _warp(f0, depth, 0.0, 3 * CFG.strafe_speed)[1]
    assert new.sum() >= 4 and new[-1] and not known[:, new].any()


def test_occlusion_and_disocclusion_around_a_near_pillar() -> None:
    """A near red pillar (depth 1, columns 12..19) before a far blue wall (depth 4). A step to one
    side slides the pillar over the wall on that side (the nearest surface wins) and uncovers wall
    it hid on the other, which is unknown and filled from the far side, not bridged."""
    h, w = 16, 32
    depth = torch.full((1, w), 4.0)
    depth[0, 12:20] = 1.0
    img = torch.zeros(1, 3, h, w)
    img[:, 2] = 1.0                                                     # blue everywhere ...
    img[:, :, :, 12:20] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]   # ... but the red pillar
    row = h // 2                                                        # a wall row of every column
    for step in (-0.2, 0.2):                                            # left, right
        move = (torch.zeros(1), torch.tensor([step]))
        # nothing stands within 0.9 of the eye here; the default 0.2 only knows less
        out, known = translate_view(img, depth, *move, 66.0, clearance=0.9)
        assert bool((translate_view(img, depth, *move, 66.0)[1] <= known).all())
        red, kn = (out[0, 0, row] > 0.5).numpy(), known[0, row].numpy()             # (W,) each
        cols = np.nonzero(red)[0]
        assert len(cols) == 8 and cols[-1] - cols[0] == 7 and kn[cols].all()        # the pillar, moved
        if step < 0:                                                    # right, over the wall
            assert cols[0] >= 16 and not kn[:3].any()                   # new at the left edge
            gap = np.arange(8, cols[0])[~kn[8:cols[0]]]                 # uncovered, left of the pillar
        else:
            assert cols[-1] <= 15 and not kn[-3:].any()
            gap = np.arange(cols[-1] + 1, 24)[~kn[cols[-1] + 1:24]]
        assert 3 <= len(gap) <= 5 and np.abs(gap - (cols[0] if step < 0 else cols[-1])).min() == 1
        assert bool((out[0, 2][:, gap] > 0.99).all()) and not known[0][:, gap].any()   # blue, unknown
        assert kn[np.setdiff1d(np.arange(8, 24), gap)].all()           # the rest of the middle is known


def test_a_batch_matches_single_frames_and_float64() -> None:
    g = torch.Generator().manual_seed(3)
    img = torch.rand(3, 3, 12, 20, generator=g) * 2 - 1
    depth = 0.5 + 3 * torch.rand(3, 20, generator=g)
    fwd, right = torch.tensor([0.1, 0.0, -0.05]), torch.tensor([0.0, 0.08, -0.03])
    out, known = translate_view(img, depth, fwd, right, 70.0)
    for i in range(3):
        o, k = translate_view(img[i:i + 1], depth[i:i + 1], fwd[i:i + 1], right[i:i + 1], 70.0)
        assert torch.allclose(o[0], out[i], atol=1e-6) and torch.equal(k[0], known[i])
    o64, k64 = translate_view(img.double(), depth.double(), fwd.double(), right.double(), 70.0)
    assert o64.dtype == torch.float64 and (k64 == known).float().mean() > 0.99
    both = (k64 & known)[:, None].expand_as(out)                        # edge pixels may flip
    assert torch.allclose(o64.float()[both], out[both], atol=1e-3)
    bad_depth = depth.clone()
    bad_depth[:, 0] = math.inf                                          # a column that sees nothing
    assert torch.isfinite(translate_view(img, bad_depth, fwd, right, 70.0)[0]).all()


def test_bad_inputs_raise_one_line_errors() -> None:
    img, depth, z = torch.zeros(2, 3, 8, 10), torch.ones(2, 10), torch.zeros(2)
    cases = [((img[0], depth, z, z, 66.0), "img must be"),                      # no batch
             ((torch.zeros(2, 4, 8, 10), depth, z, z, 66.0), "img must be"),    # 4 channels
             ((img.long(), depth, z, z, 66.0), "img must be"),                  # integer frames
             ((img, torch.ones(2, 8), z, z, 66.0), "depth must be"),           # one depth per row
             ((img, depth, torch.zeros(3), z, 66.0), "forward and right"),
             ((img, depth, z, torch.zeros(2, 1), 66.0), "forward and right"),
             ((img, depth, z, z, 0.0), "fov_deg")]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            translate_view(*args)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="clearance"):
        translate_view(img, depth, z, z, 66.0, clearance=-1.0)
