"""The walk prior: a held walk's frames start from the walk's first frame moved by the steps since.

Why: walking is the other motion the dream gets wrong. Standing still it holds the view; told to
walk it keeps *a* corridor but does not go down it (docs/evaluation.md, "Where the dream breaks").
A step of the first-person camera is a known motion of a 2.5D scene whose only unknown is the
wall depth of each screen column, and a small network reads that depth from the pixels to within
2% (``world_model.depth_probe``). So, as for turns (``world_model.view_warp``), the last frame
moved by the commanded motion is a good start for the next one, and the network only refines it
and paints what was not visible (``world_model.walk_warp``).

Unlike the turn prior, which rotates the newest frame by one tick, the walk prior warps the frame
made just before the walk began (the *anchor*) by the whole motion since (the accumulated pose,
``Pose``). A one-tick step moves most pixels by less than a pixel: chaining one-tick warps would
resample, blur and codec-round-trip the picture every tick; from the anchor each frame is one warp
and one round trip away from a frame the network drew in full. Depth is read once, from the
anchor.

A tick of the game turns first, then moves in the turned frame (``engine.classic_game``), so the
pose accumulates the same way, and a frame is the anchor translated to the pose's position (in the
anchor's heading, ``translate_view``) and then rotated by its heading (``rotate_view``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from world_model.depth_probe import ColumnDepthNet, estimate_column_depth
from world_model.view_warp import MOVE, RUN, STRAFE, TURN, Camera, TurnPrior, rotate_view
from world_model.walk_warp import translate_view


@dataclass
class Pose:
    """The camera relative to the anchor's: cells along the anchor's view, cells to its right,
    degrees turned right."""
    forward: float = 0.0
    right: float = 0.0
    deg: float = 0.0

    def advanced(self, fwd: float, side: float, turn_deg: float) -> "Pose":
        """This pose after one game tick: turn by ``turn_deg``, then move ``fwd`` along the new
        view and ``side`` to its right (the classic game's order)."""
        deg = self.deg + turn_deg
        a = math.radians(deg)
        return Pose(self.forward + fwd * math.cos(a) - side * math.sin(a),
                    self.right + fwd * math.sin(a) + side * math.cos(a), deg)

    @property
    def cells(self) -> float:
        """Distance from the anchor's position."""
        return math.hypot(self.forward, self.right)


@dataclass
class Anchor:
    """A held walk's first frame: decoded (1, 3, H, W) and its column depth (1, W)."""
    image: Tensor
    depth: Tensor


class WalkPrior(TurnPrior):
    """A ``TurnPrior`` (pure turns, unchanged) that also warps walking frames.

    ``walks(control)``: the control (4,) translates (|move| or |strafe| >= ``min_move``; it may also
    turn). ``anchor(z)``: the latent z (C, h, w) decoded, with its depth. ``step(control)``: one
    tick's (forward cells, right cells, degrees) from the camera's speeds. ``warp(anchor, pose)``:
    the anchor seen from ``pose``, encoded -> (C, h, w)."""

    def __init__(self, codec: torch.nn.Module, camera: Camera, depth_net: ColumnDepthNet,
                 min_turn: float = 0.1, min_move: float = 0.1) -> None:
        super().__init__(codec, camera, min_turn, min_move)
        self.depth_net = depth_net.eval()

    def walks(self, control: Tensor) -> bool:
        c = control.detach().float().cpu()                                  # (4,)
        return bool(c[MOVE].abs() >= self.min_move or c[STRAFE].abs() >= self.min_move)

    def step(self, control: Tensor) -> tuple[float, float, float]:
        """One tick of ``control`` (4,): (forward cells, right cells, degrees turned right)."""
        move, strafe, turn, run = (float(v) for v in control.detach().float().cpu()[[MOVE, STRAFE, TURN, RUN]])
        cam = self.camera
        mult = cam.run_multiplier if run > 0.5 else 1.0
        return move * cam.walk_speed * mult, strafe * cam.strafe_speed * mult, turn * cam.turn_deg

    @torch.no_grad()
    def anchor(self, z: Tensor) -> Anchor:
        return self.anchors(z[None])

    @torch.no_grad()
    def anchors(self, z: Tensor) -> Anchor:
        """Latents z (n, C, h, w) decoded (n, 3, H, W) in [-1, 1], with their depth (n, W)."""
        img = self.codec.decode(z)
        depth = estimate_column_depth(self.depth_net, img.float()).to(img.dtype)
        return Anchor(img, depth)

    def clamp(self, anchor: Anchor, pose: Pose) -> Pose:
        """``pose`` with its forward part held short of the wall ahead of the anchor (the game stops
        ``player_radius`` before a wall; a warp past the wall has nothing to show). The wall ahead
        is the nearest depth over the anchor's centre columns (a body's width)."""
        d = anchor.depth[0]
        w = d.shape[0]
        centre = d[w // 2 - max(1, w // 16):w // 2 + max(1, w // 16)]
        limit = max(0.0, float(centre.min()) - self.camera.player_radius)
        return Pose(min(pose.forward, limit), pose.right, pose.deg)

    @torch.no_grad()
    def warp(self, anchor: Anchor, pose: Pose, z_like: Tensor) -> Tensor:
        """The anchor seen from ``pose``: translated, rotated, encoded -> (C, h, w) like z_like."""
        one = torch.ones(1, device=anchor.image.device, dtype=anchor.image.dtype)
        moved = self.moved(anchor, one * pose.forward, one * pose.right, one * pose.deg)
        return self.codec.encode(moved)[0].to(z_like.dtype)

    @torch.no_grad()
    def moved(self, anchors: Anchor, forward: Tensor, right: Tensor, deg: Tensor) -> Tensor:
        """n anchors (images (n, 3, H, W)) seen from poses given as (n,) each: translated in the
        anchor's heading, then rotated (only those that turned) -> (n, 3, H, W)."""
        img, fov = anchors.image, self.camera.fov_deg
        out, _ = translate_view(img, anchors.depth, forward.to(img.dtype), right.to(img.dtype), fov)
        turned = deg != 0
        if bool(turned.any()):
            out[turned] = rotate_view(out[turned], deg[turned].to(img.dtype), fov)
        return out


class HeldWalk:
    """The sampler's record of the walk being held: its anchor and the pose reached."""

    def __init__(self, anchor: Anchor) -> None:
        self.anchor = anchor
        self.pose = Pose()
