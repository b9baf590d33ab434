"""A geometric prior for walking: the last frame moved by the commanded step, using depth.

The counterpart of ``world_model.view_warp`` (turns). A turn needs no depth; a step does: near
things shift more than far ones, and a near wall edge sliding over a far wall uncovers what was
hidden. The classic game's scene is 2.5D (vertical walls 1 high, floor and ceiling 0.5 below and
above the eye), so one wall depth per screen column is all the geometry a frame has.

Geometry (``engine.classic_game``): column x looks along the camera-plane offset
c = xn tan(fov / 2), xn = (x + 0.5) 2 / W - 1 (grid_sample's normalised coordinate); row y at
height v = (y + 0.5 - H / 2) / focal = yn (H / W) tan(fov / 2), focal = (W / 2) / tan(fov / 2). A
point at perpendicular depth d in column x is at lateral u = c d, height v d. After a step of
``forward`` m and ``right`` s in the camera frame it is at depth d - m, lateral u - s, same height.
(The game turns, then walks in the turned frame: a tick that does both warps the turned view,
``rotate_view``, with that view's depth.)

* Walls: the old walls form a polyline in the (lateral, depth) plane, one vertex per column; each
  new column's ray is cut with it and the nearest cut wins (occlusion). Neighbouring columns are
  joined unless their depths jump (``JUMP``) and neither continues a straight run (``COLLINEAR``):
  a near edge is not bridged to the wall behind it, so the gap it leaves is uncovered
  (disocclusion). Wall rows sample the old column at v = v' d' / d.
* Floor and ceiling: exact backward warp of the plane point at depth 0.5 / |v'|.
* ``known``: the pixel's surface point was in the old view, and the new ray reaches it through
  space the old view saw empty (else a wall the old frame never showed, e.g. one beside the old
  camera entering at the edge after a strafe, may stand in front of it). Uncovered columns copy
  the nearest covered column on the farther side (a disocclusion reveals what is behind the
  occluder); other unknown pixels keep what sampling gives (the border, the occluder).

Not modelled, and measured against the game (tests/test_walk_warp.py): the renderer shades floor
and ceiling per screen row (fog and gradient by the row's distance), so the warp carries the old
row's shade a few rows; walls' fog changes with distance; textures are nearest-sampled, and the
bilinear resampling of sub-pixel motion costs about what copying gains there.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from engine.classic_game import ClassicGame, cast_rays

# Depth floor (cells) of every point, old and new: at depth <= 0 a point is beside or behind the
# camera, where the projection u / d blows up or flips sign (a step into or through a wall). The
# game keeps walls player_radius = 0.2 from the eye and a tick moves at most 0.099, so real steps
# stay far above it; it only guards extreme inputs.
MIN_DEPTH = 1e-3
MAX_DEPTH = 1e3       # depth of a column that sees nothing (inf or nan from an estimator)
# Neighbouring columns whose depths differ by more than this (relative) are different walls, unless
# one of them continues a straight run of the polyline. Measured on 300 random views of the game:
# steps within one face have median 1.3%, 99th percentile 16% (grazing faces near their vanishing
# point, which the straight-run test joins), across convex corners 99% < 8%, across occlusion edges
# median 45%; the 12% of those below 10% are far (parallax there is small) or grazing corners.
JUMP = 0.1
# |sin| of the angle between consecutive column-to-column steps below which they are one straight
# wall. Three columns on one face give at most 1.4e-5 from float32 depths (same 300 views); 0.002
# joined 1 of 368 occlusion edges there (0.01: 15).
COLLINEAR = 0.002
# Default distance from the eye (cells) within which space is assumed empty without the old view's
# word: the game keeps every wall player_radius = 0.2 away. A strafe moves the eye out of the old
# view's wedge, so without it no new ray would start in seen space.
CLEARANCE = 0.2
RAY_SAMPLES = 24      # points per new column ray tested against the old view's empty space


def classic_column_depth(game: ClassicGame) -> np.ndarray:
    """(W,) float64: perpendicular distance of the wall seen in each screen column of ``game``'s
    current view, as its renderer computes it (same rays, same floor of 1e-4)."""
    st = game.state                                                        # RuntimeError before reset
    cam = game._painters[game.theme_index].cam                             # (W,) camera-plane offsets
    c, s = math.cos(st.angle), math.sin(st.angle)
    t, _, _, _ = cast_rays(game.maze.grid, st.x, st.y, c - s * cam, s + c * cam)
    return np.maximum(t, 1e-4)


def _check(img: Tensor, depth: Tensor, forward: Tensor, right: Tensor, fov_deg: float) -> None:
    if img.ndim != 4 or img.shape[1] != 3 or min(img.shape[2:]) < 2 or not img.is_floating_point():
        raise ValueError(f"translate_view: img must be float (N, 3, H, W) with H, W >= 2, got "
                         f"{img.dtype} {tuple(img.shape)}")
    n, w = img.shape[0], img.shape[3]
    if tuple(depth.shape) != (n, w):
        raise ValueError(f"translate_view: depth must be (N, W) = {(n, w)}, got {tuple(depth.shape)}")
    if tuple(forward.shape) != (n,) or tuple(right.shape) != (n,):
        raise ValueError(f"translate_view: forward and right must be (N,) = ({n},), got "
                         f"{tuple(forward.shape)} and {tuple(right.shape)}")
    if not (1.0 <= fov_deg <= 170.0):
        raise ValueError(f"translate_view: fov_deg must be in [1, 170], got {fov_deg}")


def _wall_polyline(d: Tensor, xn: Tensor, half: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The old walls as 2W segments, two half-columns per column, in the old camera's (lateral,
    depth) plane: (start u, start d, end u, end d), each (N, 2W). A column's halves run from its
    left pixel border to its centre and on to its right border. Joined neighbours meet at the
    midpoint of their centres (on the wall between them); across a jump each column ends at its
    own depth; the frame's edge columns reach the frame edge at their depth."""
    w = d.shape[1]
    cu, cd = xn * half * d, d                                              # (N, W) column centres
    su, sd = cu[:, 1:] - cu[:, :-1], cd[:, 1:] - cd[:, :-1]                # (N, W-1) steps
    sin = (su[:, 1:] * sd[:, :-1] - sd[:, 1:] * su[:, :-1]) / (
        torch.hypot(su[:, 1:], sd[:, 1:]) * torch.hypot(su[:, :-1], sd[:, :-1])).clamp_min(1e-12)
    straight = sin.abs() < COLLINEAR                                       # (N, W-2) steps k, k+1 in line
    pad = torch.zeros_like(straight[:, :1])
    near, far = torch.minimum(cd[:, 1:], cd[:, :-1]), torch.maximum(cd[:, 1:], cd[:, :-1])
    joined = (far <= near * (1 + JUMP)) | torch.cat([pad, straight], 1) | torch.cat([straight, pad], 1)
    mid_u, mid_d = cu[:, :-1] + su / 2, cd[:, :-1] + sd / 2                # (N, W-1)
    border = xn[:-1] + 1.0 / w                                             # (W-1,) inner pixel borders
    one = torch.ones(1, dtype=d.dtype, device=d.device)
    lu, ld = torch.cat([-one, border]) * half * d, d.clone()               # (N, W) left ends, unjoined
    ru, rd = torch.cat([border, one]) * half * d, d.clone()                # (N, W) right ends, unjoined
    lu[:, 1:], ld[:, 1:] = torch.where(joined, mid_u, lu[:, 1:]), torch.where(joined, mid_d, ld[:, 1:])
    ru[:, :-1], rd[:, :-1] = torch.where(joined, mid_u, ru[:, :-1]), torch.where(joined, mid_d, rd[:, :-1])
    return torch.cat([lu, cu], 1), torch.cat([ld, cd], 1), torch.cat([cu, ru], 1), torch.cat([cd, rd], 1)


def _old_wall_depth(d: Tensor, gx: Tensor) -> Tensor:
    """Old wall depth (linear between column centres) along normalised old columns gx (N, ...)."""
    n, w = d.shape
    pos = ((gx + 1) * (w / 2) - 0.5).clamp(0, w - 1).reshape(n, -1)        # (N, P) fractional column
    lo = pos.floor().clamp(max=w - 2)
    d_lo, d_hi = d.gather(1, lo.long()), d.gather(1, lo.long() + 1)
    return (d_lo + (pos - lo) * (d_hi - d_lo)).view_as(gx)


def _seen_empty(d: Tensor, gx: Tensor, dd: Tensor, wall: Tensor | None = None) -> Tensor:
    """Whether old-camera points at normalised old column gx and depth dd, each (N, ...), lie in
    the old view and not behind its walls (``wall``: their columns' old wall depth if known; 0.1%
    slack for points on a wall)."""
    wall = _old_wall_depth(d, gx) if wall is None else wall
    return (dd >= MIN_DEPTH) & (gx.abs() <= 1.0) & (dd <= wall * 1.001)


def _wall_rows(depth: Tensor, h: int, v_per_yn: float) -> Tensor:
    """yn (< 0) of the topmost row centre that a wall at ``depth`` covers as the renderer decides
    it (texture height v d + 0.5 in [0, 1), v = yn v_per_yn); same shape as ``depth``. The bottom
    row mirrors it."""
    lim = 0.5 / (depth * v_per_yn)                                         # wall half-height, yn units
    return (torch.ceil((1 - lim) * (h / 2) - 0.5) + 0.5) * (2 / h) - 1


def _fill_from_farther_neighbour(covered: Tensor, depth: Tensor) -> Tensor:
    """(N, W) long: each covered column itself; an uncovered one the nearest covered column on the
    side whose depth is larger (or the only side that has one; itself if none has)."""
    n, w = covered.shape
    idx = torch.arange(w, device=covered.device).expand(n, w)
    left = torch.where(covered, idx, -1).cummax(1).values                  # (N, W), -1: none
    right = torch.where(covered, idx, w).flip(1).cummin(1).values.flip(1)  # (N, W), W: none
    d_left, d_right = depth.gather(1, left.clamp(0, w - 1)), depth.gather(1, right.clamp(0, w - 1))
    pick = torch.where((left >= 0) & ((right >= w) | (d_left >= d_right)), left, right)
    return torch.where(covered | (pick < 0) | (pick >= w), idx, pick)


def translate_view(img: Tensor, depth: Tensor, forward: Tensor, right: Tensor, fov_deg: float, *,
                   clearance: float = CLEARANCE) -> tuple[Tensor, Tensor]:
    """Frames img (N, 3, H, W) seen after the camera steps ``forward`` (N,) cells along its view
    and ``right`` (N,) cells to its right, given the old wall depth of each column ``depth`` (N, W).
    ``depth`` is the perpendicular distance, in cells, of the wall each column sees (the game's
    ``classic_column_depth`` or an estimate). Returns (frames (N, 3, H, W), known (N, H, W) bool:
    pixels whose content the old frame had). ``clearance``: distance from the new eye assumed empty
    of walls (larger: more pixels known, and a wall entering from beside the old view missed)."""
    _check(img, depth, forward, right, fov_deg)
    if not clearance >= 0.0:
        raise ValueError(f"translate_view: clearance must be >= 0, got {clearance}")
    n, _, h, w = img.shape
    dev, dt = img.device, torch.promote_types(img.dtype, torch.float32)    # geometry in >= float32
    half, v_per_yn = math.tan(math.radians(fov_deg) / 2), (h / w) * math.tan(math.radians(fov_deg) / 2)
    d = torch.nan_to_num(depth.to(dev, dt), nan=MAX_DEPTH, posinf=MAX_DEPTH).clamp(MIN_DEPTH, MAX_DEPTH)
    m, s = forward.to(dev, dt)[:, None, None], right.to(dev, dt)[:, None, None]   # (N, 1, 1) each
    xn = (torch.arange(w, device=dev, dtype=dt) + 0.5) * 2 / w - 1         # (W,)
    yn = (torch.arange(h, device=dev, dtype=dt) + 0.5) * 2 / h - 1         # (H,)
    c_new = (xn * half)[None, :, None]                                     # (1, W, 1) new column rays

    # Walls: cut every new column's ray u = c' d with every moved old segment; the nearest cut wins.
    au, ad, bu, bd = (a[:, None, :] for a in _wall_polyline(d, xn, half))  # (N, 1, 2W) each
    au, bu, ad, bd = au - s, bu - s, ad - m, bd - m                        # in the new camera
    den = (bu - au) - c_new * (bd - ad)                                    # (N, W, 2W)
    ok = den.abs() > 1e-12                                                 # else the ray runs along it
    t = (c_new * ad - au) / torch.where(ok, den, torch.ones_like(den))     # position on the segment
    # a segment reaching depth <= MIN_DEPTH in the new view (stepped into or past) is dropped, not
    # clamped: clamping would project a wall beside or behind the new eye onto the screen
    ok &= (t >= -1e-5) & (t <= 1 + 1e-5) & (torch.minimum(ad, bd) >= MIN_DEPTH)
    cut = torch.where(ok, ad + t.clamp(0, 1) * (bd - ad), torch.full_like(t, math.inf))
    wall_d = cut.min(-1).values                                            # (N, W) new wall depth
    covered = torch.isfinite(wall_d)
    src_col = _fill_from_farther_neighbour(covered, torch.where(covered, wall_d, 0.0))   # (N, W)
    wall_d = torch.where(covered, wall_d, d).gather(1, src_col)           # uncovered: a neighbour's

    # How deep each new column's ray is known to be empty: up to its first sample the old view did
    # not see empty, beyond the clearance around the eye (stops short of the wall it ends on).
    frac = torch.arange(1, RAY_SAMPLES + 1, device=dev, dtype=dt) / (RAY_SAMPLES + 1)   # (K,)
    near = torch.minimum(clearance / torch.sqrt(1 + c_new[..., 0] ** 2), wall_d)        # (N, W) depth
    ray_t = near[..., None] + (wall_d - near)[..., None] * frac            # (N, W, K)
    ray_d = ray_t + m                                                      # (N, W, K) old depth
    empty = _seen_empty(d, (c_new * ray_t + s) / ray_d.clamp_min(MIN_DEPTH) / half, ray_d)
    first_bad = torch.where(empty, torch.full_like(ray_t, math.inf), ray_t).min(-1).values
    step = (wall_d - near) / (RAY_SAMPLES + 1)
    clear_to = torch.where(torch.isinf(first_bad), first_bad, (first_bad - step).clamp_min(0))  # (N, W)

    # Every pixel: its depth in the new view, then the same point in the old view (normalised).
    plane_d = 0.5 / (yn.abs() * v_per_yn).clamp_min(1e-6)                 # (H,) floor/ceiling per row
    is_wall = plane_d[None, :, None] > wall_d[:, None, :]                  # (N, H, W)
    new_d = torch.where(is_wall, wall_d[:, None, :], plane_d[None, :, None])  # (N, H, W)
    old_d = new_d + m                                                      # (N, H, W)
    old_safe = old_d.clamp_min(MIN_DEPTH)
    gx = (xn * half * new_d + s) / old_safe / half                         # (N, H, W)
    gy = yn[:, None] * new_d / old_safe                                    # (N, H, W)
    old_wall = _old_wall_depth(d, gx)                                      # (N, H, W) in that old column
    # a plane point must have been in front of the old wall (the ray test samples; this is exact)
    seen = is_wall | _seen_empty(d, gx, old_d, old_wall)
    known = seen & (gy.abs() <= 1.0) & (new_d <= clear_to[:, None, :]) & covered[:, None, :]

    # The renderer draws a pixel as wall or plane by its centre; an edge pixel's point can fall
    # between an old wall row and an old plane row, and blending the two smears the edge. So wall
    # points sample only their old column's wall rows, plane points only its plane rows.
    wall_top = _wall_rows(old_safe, h, v_per_yn)                           # (N, H, W)
    plane_top = _wall_rows(old_wall, h, v_per_yn) - 2.0 / h                # last plane row above it
    gy = torch.where(is_wall, torch.minimum(torch.maximum(gy, wall_top), -wall_top),
                     torch.sign(gy) * torch.maximum(gy.abs(), -plane_top))

    grid = torch.stack([gx, gy], -1).to(img.dtype)                         # (N, H, W, 2)
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = out.gather(3, src_col[:, None, None, :].expand(n, 3, h, w))      # uncovered <- neighbour
    return out, known
