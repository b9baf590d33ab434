"""A geometric prior for turning: the last frame rotated by the commanded turn.

Why: held turns are where the dream fails (docs/evaluation.md, "Held turns"). A turn of the
first-person camera moves every pixel, and the network's one-step error compounds over a
turn; but a pure rotation of a pinhole (or ray-cast) camera needs no learning: the part of
the new view that was already visible is the old frame resampled. This is the "render,
refine, repeat" idea of view-synthesis models (Infinite Nature, Liu et al. 2021): warp the
last frame by the known camera motion, let the generator refine it and fill in what was
not visible (the strip entering at the edge). ``TurnPrior`` makes the warped frame; every
sampler can start a pure-turn frame's denoising from it at a low noise level
(``SamplerConfig.prior_t``) instead of from pure noise, or inpaint around it
(``prior_inpaint``). Off by default: held turns follow the game far better, but long streams
lose the world's look sooner, over 3 minutes unbounded and over 10 minutes even with
``prior_max_deg`` (docs/world_model.md, "The turn prior, measured" and "Why the turn prior
drifts, and a bound on it"). ``world_model.walk_prior`` extends it to steps.

Geometry (the classic game's camera, ``engine.classic_game``): column x of a W-wide frame
looks along angle ``atan(c_x)`` off the view direction, c_x = ((x + 0.5) 2 / W - 1) tan(fov / 2).
Turning right by d makes new column x' see the ray the old frame had at angle
``atan(c_x') + d``. Wall and floor heights scale with 1 / (perpendicular distance), which
changes by cos(old angle) / cos(new angle), so each column is also stretched vertically about
the horizon. Translation is not modelled (walking needs depth): frames that also walk or
strafe are left to the network.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

MOVE, STRAFE, TURN, RUN = 0, 1, 2, 3  # columns of the (4,) control: move, strafe, turn, run


@dataclass
class Camera:
    fov_deg: float = 66.0     # horizontal field of view
    turn_deg: float = 4.0     # degrees turned per tick at turn = 1 (positive: right)
    # the walk prior's (world_model/walk_prior.py): cells per tick at move / strafe = 1, the run
    # button's factor, and how close the game lets the eye come to a wall
    walk_speed: float = 0.055
    strafe_speed: float = 0.055
    run_multiplier: float = 1.8
    player_radius: float = 0.2

    def validate(self) -> None:
        if not (1.0 <= self.fov_deg <= 170.0) or not math.isfinite(self.turn_deg):
            raise ValueError(f"camera: fov_deg must be in [1, 170] and turn_deg finite, got "
                             f"{self.fov_deg}, {self.turn_deg}")
        speeds = (self.walk_speed, self.strafe_speed, self.run_multiplier, self.player_radius)
        if not all(math.isfinite(v) and v >= 0 for v in speeds):
            raise ValueError(f"camera: walk_speed, strafe_speed, run_multiplier and player_radius must be "
                             f"finite and >= 0, got {speeds}")


def _source_columns(deg: Tensor, width: int, fov_deg: float) -> tuple[Tensor, Tensor]:
    """For a turn of ``deg`` (N,) degrees: (old column in normalised [-1, 1] coordinates (N, W),
    cos(new angle) / cos(old angle) (N, W)) of every new column."""
    half = math.tan(math.radians(fov_deg) / 2)
    xn = (torch.arange(width, device=deg.device, dtype=deg.dtype) + 0.5) * 2 / width - 1   # (W,)
    a_new = torch.atan(xn * half)[None]                                                    # (1, W)
    a_old = (a_new + torch.deg2rad(deg)[:, None]).clamp(-1.5, 1.5)                         # (N, W) < 90 deg
    return torch.tan(a_old) / half, torch.cos(a_new) / torch.cos(a_old)


def rotate_view(img: Tensor, deg: Tensor, fov_deg: float) -> Tensor:
    """Frames img (N, 3, H, W) seen after turning right by ``deg`` (N,) degrees. Columns that come
    from outside the old view repeat its edge (``visible_columns`` tells which)."""
    N, _, H, W = img.shape
    gx, scale = _source_columns(deg.to(img.dtype), W, fov_deg)                             # (N, W) each
    yn = (torch.arange(H, device=img.device, dtype=img.dtype) + 0.5) * 2 / H - 1           # (H,)
    gy = yn[None, :, None] * scale[:, None, :]                                             # (N, H, W)
    grid = torch.stack([gx[:, None, :].expand(N, H, W), gy], dim=-1)                       # (N, H, W, 2)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)


def visible_columns(deg: Tensor, width: int, fov_deg: float) -> Tensor:
    """(N, W) bool: columns of the turned view whose rays the old view also had (``deg`` (N,))."""
    gx, _ = _source_columns(deg.to(torch.float64), width, fov_deg)
    return gx.abs() <= 1.0 - 1.0 / width       # within the centres of the old edge columns


class TurnPrior:
    """``prior(z, control)``: the latent frame z (C, h, w) decoded, rotated by the control's turn,
    encoded again -> (C, h, w). ``applies(control)``: whether the control is a pure turn (no
    translation above ``min_move``, a turn of at least ``min_turn``)."""

    def __init__(self, codec: torch.nn.Module, camera: Camera, min_turn: float = 0.1,
                 min_move: float = 0.1) -> None:
        camera.validate()
        self.codec, self.camera = codec, camera
        self.min_turn, self.min_move = min_turn, min_move

    def applies(self, control: Tensor) -> bool:
        c = control.detach().float().cpu()                        # (4,): one sync per frame at most
        return bool(c[TURN].abs() >= self.min_turn and c[MOVE].abs() < self.min_move
                    and c[STRAFE].abs() < self.min_move)

    def degrees(self, control: Tensor) -> float:
        """How many degrees the control (4,) turns the camera (either direction)."""
        return abs(float(control[TURN])) * self.camera.turn_deg

    def known_columns(self, control: Tensor, latent_width: int) -> Tensor:
        """(latent_width,) bool: latent columns whose pixels, and half a latent column beyond them
        on each side (the encoder sees that far), the old view already had."""
        codec_cfg = getattr(self.codec, "cfg", None)                  # frame width: the codec's resolution
        pixel_width = int(getattr(codec_cfg, "resolution", 8 * latent_width))
        deg = (control[TURN:TURN + 1].detach().float().cpu() * self.camera.turn_deg)
        vis = visible_columns(deg, pixel_width, self.camera.fov_deg)[0]                    # (W_px,)
        s = pixel_width // latent_width
        return torch.tensor([bool(vis[max(0, j * s - s // 2):(j + 1) * s + s // 2].all())
                             for j in range(latent_width)])

    @torch.no_grad()
    def __call__(self, z: Tensor, control: Tensor) -> Tensor:
        img = self.codec.decode(z[None])                                       # (1, 3, H, W)
        return self.codec.encode(self.rotated(img, control[None]))[0].to(z.dtype)

    def rotated(self, img: Tensor, controls: Tensor) -> Tensor:
        """Frames img (n, 3, H, W) turned by the turn of controls (n, 4)."""
        deg = (controls[:, TURN] * self.camera.turn_deg).to(img.dtype)         # (n,)
        return rotate_view(img, deg, self.camera.fov_deg)
