"""The classic reference game: a first-person maze drawn by a numpy raycaster.

``ClassicGame`` implements the FrameSource protocol (engine/source.py). It is
a fixed-step simulation: one ``step`` = one tick, no wall clock, so a seed and
an action sequence reproduce the frames bit for bit.

State: (seed, x, y, angle, tick). The maze and theme are functions of the
seed (and config), so ``state``/``set_state`` are all a clone needs.

Coordinates: cells of the maze grid, x to the right, y down, ``grid[y, x]``.
Angle 0 looks along +x; increasing angle turns right (clockwise on the map).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np

from engine.actions import DEFAULT_SCHEMA, Action, ActionSchema
from engine.config import ConfigError, to_plain
from engine.maze import Maze, MazeConfig, generate_maze
from engine.source import Sensors
from engine.textures import TEX, THEMES, Theme, theme_for_seed, theme_index


@dataclass
class ClassicConfig:
    """Classic game: resolution, maze, movement (per tick) and shading."""
    width: int = 64
    height: int = 64
    maze_size: int = 15
    maze_loop_chance: float = 0.12
    maze_rooms: int = 2
    theme: str = ""               # "" = derived from the seed (seed % number of themes)
    fov_deg: float = 66.0         # horizontal field of view
    walk_speed: float = 0.055     # cells per tick at move = 1
    strafe_speed: float = 0.055   # cells per tick at strafe = 1
    run_multiplier: float = 1.8   # applies to walking and strafing, not turning
    turn_deg: float = 4.0         # degrees per tick at turn = 1
    player_radius: float = 0.2    # radius of the collision circle, in cells
    fog_density: float = 0.12     # fog = fog_max * (1 - exp(-fog_density * distance))
    fog_max: float = 0.85
    side_shade: float = 0.7       # brightness of faces hit on y grid lines (x faces stay 1.0)
    floor_gradient: float = 0.45  # floor darkening towards the horizon, before fog (0 = flat)
    ceiling_gradient: float = 0.3
    floor_tiles: float = 0.12     # contrast of the per-cell floor checker (0 = plain floor)


@dataclass(frozen=True)
class ClassicState:
    """Everything that defines the game at one tick (the maze follows from the seed)."""
    seed: int
    x: float
    y: float
    angle: float  # radians in [0, 2 pi)
    tick: int


def check_config(cfg: ClassicConfig) -> None:
    """Raise ConfigError (one line) on values the game cannot run with."""
    checks = [
        (cfg.width >= 8 and cfg.height >= 8, f"width/height must be >= 8, got {cfg.width}x{cfg.height}"),
        (5 <= cfg.maze_size <= 255, f"maze_size must be in [5, 255], got {cfg.maze_size}"),
        (10.0 <= cfg.fov_deg <= 150.0, f"fov_deg must be in [10, 150], got {cfg.fov_deg}"),
        (0.0 < cfg.player_radius < 0.5, f"player_radius must be in (0, 0.5), got {cfg.player_radius}"),
        (min(cfg.walk_speed, cfg.strafe_speed, cfg.turn_deg) >= 0.0, "speeds must be >= 0"),
        (cfg.run_multiplier >= 1.0, f"run_multiplier must be >= 1, got {cfg.run_multiplier}"),
        (0.0 <= cfg.fog_max <= 1.0 and cfg.fog_density >= 0.0, "fog_max must be in [0, 1], fog_density >= 0"),
        (0.0 <= cfg.side_shade <= 1.0, f"side_shade must be in [0, 1], got {cfg.side_shade}"),
        (0.0 <= min(cfg.floor_gradient, cfg.ceiling_gradient, cfg.floor_tiles)
         and max(cfg.floor_gradient, cfg.ceiling_gradient, cfg.floor_tiles) <= 1.0,
         "floor_gradient, ceiling_gradient, floor_tiles must be in [0, 1]"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(f"invalid classic config: {msg}")
    if cfg.theme:
        try:
            theme_index(cfg.theme)
        except ValueError as e:
            raise ConfigError(f"invalid classic config: {e}") from None


def cast_rays(grid: np.ndarray, px: float, py: float, dx: np.ndarray, dy: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised grid raycast from (px, py) along n directions (dx, dy) (n,).

    Instead of a per-ray DDA loop, every ray is intersected with its next K
    vertical and K horizontal grid lines at once ((n, K) arrays, K = grid side
    + 1, enough to leave the grid); the first crossing into a wall cell wins.
    Returns (t, side, material, u), each (n,): ``t`` the ray parameter of the
    hit (distance in units of |(dx, dy)|, so the perpendicular distance for
    camera-plane rays), ``side`` True if a y grid line (a north/south face) was
    hit, ``material`` the wall cell value (out of grid counts as 1), ``u`` in
    [0, 1) the texture coordinate along the face, left to right as seen.
    """
    n_h, n_w = grid.shape
    flat = grid.ravel()
    ks = np.arange(max(n_h, n_w) + 1, dtype=np.float64)[None, :]      # (1, K)
    out = []
    for d_a, d_b, p_a, p_b, n_a, n_b, a_is_x in ((dx, dy, px, py, n_w, n_h, True),
                                                 (dy, dx, py, px, n_h, n_w, False)):
        # a zero component would divide by zero: a tiny one pushes its hits beyond the other axis'
        d_a = np.where(np.abs(d_a) < 1e-12, np.where(d_a < 0, -1e-12, 1e-12), d_a)
        pos = d_a > 0
        step = np.where(pos, 1.0, -1.0)[:, None]
        line = np.where(pos, math.floor(p_a) + 1.0, math.floor(p_a))[:, None] + step * ks  # (n, K)
        t = (line - p_a) / d_a[:, None]                                      # (n, K), increasing in k
        cell_a = (line - (~pos)[:, None]).astype(np.int64)                   # cell entered at that line
        b = p_b + t * d_b[:, None]
        cell_b = np.floor(np.clip(b, -1.0, n_b)).astype(np.int64)
        inside = (cell_a >= 0) & (cell_a < n_a) & (cell_b >= 0) & (cell_b < n_b)
        idx = (np.clip(cell_b, 0, n_b - 1) * n_w + np.clip(cell_a, 0, n_a - 1)) if a_is_x else \
              (np.clip(cell_a, 0, n_a - 1) * n_w + np.clip(cell_b, 0, n_b - 1))
        val = np.where(inside, flat[idx], 1)
        first = np.argmax(val != 0, axis=1)                                  # every row hits (sealed/outside)
        rows = np.arange(len(first))
        u = b[rows, first] - np.floor(b[rows, first])
        flip = ~pos if a_is_x else pos  # so u runs left to right on screen
        out.append((t[rows, first], val[rows, first], np.where(flip, 1.0 - u, u)))
    (tx, mx, ux), (ty, my, uy) = out
    side = ty < tx
    return np.where(side, ty, tx), side, np.where(side, my, mx), np.where(side, uy, ux)


class _Painter:
    """Per (resolution, fov, theme) tables: column rays, row heights, backgrounds."""

    def __init__(self, cfg: ClassicConfig, theme: Theme) -> None:
        h, w = cfg.height, cfg.width
        half = math.tan(math.radians(cfg.fov_deg) / 2)
        self.cam = ((np.arange(w) + 0.5) * 2.0 / w - 1.0) * half          # (W,) camera-plane offset
        self.focal = (w / 2) / half                                          # pixels per unit at distance 1
        self.row_v = (np.arange(h) + 0.5 - h / 2) / self.focal              # (H,) height/distance per row
        self.h2 = h // 2
        self.tex = theme.textures                                            # (M, T, T, 3)
        self.fog_rgb = np.asarray(theme.fog, np.float32)
        self.cfg = cfg
        # Floor/ceiling: a row at height v sees the plane 0.5 below/above the eye at distance 0.5/|v|.
        v = np.abs(self.row_v)
        closeness = v / v.max()                                              # 1 at screen edge, ->0 at horizon
        fog = self.fog(0.5 / v)                                              # (H,)
        grad = np.where(np.arange(h) < self.h2, cfg.ceiling_gradient, cfg.floor_gradient)
        base = np.where((np.arange(h) < self.h2)[:, None], np.asarray(theme.ceiling, np.float32),
                        np.asarray(theme.floor, np.float32))                 # (H, 3)
        lit = base * (1.0 - grad * (1.0 - closeness))[:, None]
        dark = lit * (1.0 - cfg.floor_tiles)
        mix = lambda c: (c * (1 - fog)[:, None] + self.fog_rgb * fog[:, None]).round().astype(np.uint8)
        self.bg_light, self.bg_dark = mix(lit)[:, None, :], mix(dark)[:, None, :]  # (H, 1, 3)
        self.floor_dist = (0.5 / v)[self.h2:, None]                          # (H - h2, 1)
        self.cols = np.arange(w)[None, :]                                    # (1, W)

    def fog(self, dist: np.ndarray) -> np.ndarray:
        c = self.cfg
        return (c.fog_max * (1.0 - np.exp(-c.fog_density * dist))).astype(np.float32)

    def paint(self, grid: np.ndarray, x: float, y: float, angle: float) -> np.ndarray:
        """The (H, W, 3) uint8 view from (x, y) looking along ``angle``."""
        c, s = math.cos(angle), math.sin(angle)
        rdx, rdy = c - s * self.cam, s + c * self.cam                        # (W,) dir + right * cam
        t, side, mat, u = cast_rays(grid, x, y, rdx, rdy)
        dist = np.maximum(t, 1e-4)                                           # perpendicular distance
        frame = np.empty((self.cfg.height, self.cfg.width, 3), np.uint8)
        frame[:self.h2] = self.bg_light[:self.h2]
        if self.cfg.floor_tiles > 0:
            fx = np.floor(x + rdx[None, :] * self.floor_dist).astype(np.int64)  # (Hf, W) floor cell hit
            fy = np.floor(y + rdy[None, :] * self.floor_dist).astype(np.int64)
            odd = ((fx + fy) & 1).astype(bool)[..., None]
            frame[self.h2:] = np.where(odd, self.bg_dark[self.h2:], self.bg_light[self.h2:])
        else:
            frame[self.h2:] = self.bg_light[self.h2:]
        # Walls: texture columns shaded per screen column first (W*T texels), then gathered per pixel.
        tu = np.minimum((u * TEX).astype(np.int64), TEX - 1)
        strip = self.tex[mat.astype(np.int64) - 1, :, tu].astype(np.float32)    # (W, T, 3)
        fog = self.fog(dist)
        shade = np.where(side, self.cfg.side_shade, 1.0).astype(np.float32) * (1.0 - fog)
        strip = (strip * shade[:, None, None] + self.fog_rgb * fog[:, None, None]).astype(np.uint8)
        tv = self.row_v[:, None] * dist[None, :] + 0.5                       # (H, W) height on the wall
        wall = (tv >= 0.0) & (tv < 1.0)
        tv_i = np.clip((tv * TEX).astype(np.int64), 0, TEX - 1)
        return np.where(wall[..., None], strip[self.cols, tv_i], frame)


class ClassicGame:
    """FrameSource: the seeded raycast maze. ``reset(seed)`` -> frame 0, ``step(a)`` -> next frame."""

    def __init__(self, cfg: Optional[ClassicConfig] = None, schema: ActionSchema = DEFAULT_SCHEMA) -> None:
        self.cfg = cfg or ClassicConfig()
        check_config(self.cfg)
        self.schema = schema
        self.resolution = (self.cfg.height, self.cfg.width)
        self.maze_cfg = MazeConfig(size=self.cfg.maze_size, loop_chance=self.cfg.maze_loop_chance,
                                   rooms=self.cfg.maze_rooms)
        self._painters: dict[int, _Painter] = {}
        self._maze: Optional[Maze] = None
        self._state: Optional[ClassicState] = None
        self.theme_index = -1

    # ---- FrameSource ------------------------------------------------------------------------
    def reset(self, seed: int) -> np.ndarray:
        """Build world ``seed`` and return frame 0 at its start pose."""
        self._load(seed)
        m = self._maze
        self._state = ClassicState(int(seed), m.start[0], m.start[1], m.start_angle % (2 * math.pi), 0)
        return self.render()

    def step(self, action: Action) -> np.ndarray:
        """Apply one tick of ``action``: turn, then translate with collision sliding; return the frame."""
        st = self._need()
        if action.schema is not self.schema:
            self.schema.check_compatible(action.schema, "action")
        move, strafe, turn, run = (float(v) for v in action.controls())
        c = self.cfg
        angle = (st.angle + math.radians(turn * c.turn_deg)) % (2 * math.pi)
        mult = c.run_multiplier if run > 0.5 else 1.0
        fwd, side = move * c.walk_speed * mult, strafe * c.strafe_speed * mult
        ca, sa = math.cos(angle), math.sin(angle)
        x, y = self._slide(st.x, st.y, fwd * ca - side * sa, fwd * sa + side * ca)  # right = (-sin, cos)
        self._state = ClassicState(st.seed, x, y, angle, st.tick + 1)
        return self.render()

    def describe(self) -> dict[str, Any]:
        seed = self._state.seed if self._state else None
        theme = THEMES[self.theme_index].name if self.theme_index >= 0 else None
        return {"source": "classic", "seed": seed, "theme": theme, "config": to_plain(self.cfg)}

    def sensors(self) -> Sensors:
        """Ray distances (cells, from the player's centre) at 0, -45, +45, -90, +90 degrees (left < 0)."""
        st = self._need()
        offs = np.radians([0.0, -45.0, 45.0, -90.0, 90.0]) + st.angle
        t, _, _, _ = cast_rays(self._maze.grid, st.x, st.y, np.cos(offs), np.sin(offs))
        f, fl, fr, l, r = (float(v) for v in t)
        return Sensors(front=f, front_left=fl, front_right=fr, left=l, right=r,
                       position=(st.x, st.y), angle=st.angle, theme=self.theme_index)

    # ---- state, cloning -----------------------------------------------------------------------
    @property
    def state(self) -> ClassicState:
        return self._need()

    @property
    def maze(self) -> Maze:
        self._need()
        return self._maze

    def set_state(self, state: ClassicState) -> None:
        """Jump to ``state`` (rebuilding the maze if the seed differs); ValueError if inside a wall."""
        self._load(state.seed)
        if not self._free(state.x, state.y):
            raise ValueError(f"state position ({state.x:.3f}, {state.y:.3f}) overlaps a wall in world {state.seed}")
        self._state = replace(state, angle=state.angle % (2 * math.pi))

    def render(self) -> np.ndarray:
        """The current (H, W, 3) uint8 frame (no state change)."""
        st = self._need()
        return self._painters[self.theme_index].paint(self._maze.grid, st.x, st.y, st.angle)

    # ---- internals ----------------------------------------------------------------------------
    def _need(self) -> ClassicState:
        if self._state is None:
            raise RuntimeError("ClassicGame: call reset(seed) before step/render/sensors/state")
        return self._state

    def _load(self, seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if self._maze is None or self._maze.seed != int(seed):
            self._maze = generate_maze(int(seed), self.maze_cfg)
        self.theme_index = theme_index(self.cfg.theme) if self.cfg.theme else theme_for_seed(seed)
        if self.theme_index not in self._painters:
            self._painters[self.theme_index] = _Painter(self.cfg, THEMES[self.theme_index])

    def _free(self, x: float, y: float) -> bool:
        """True if the collision circle at (x, y) overlaps no wall cell."""
        return self._push_out(x, y) == (0.0, 0.0)

    def _push_out(self, x: float, y: float) -> tuple[float, float]:
        """Smallest move taking the circle at (x, y) off the wall cells it overlaps (one pass)."""
        r, g = self.cfg.player_radius, self._maze.grid
        n_h, n_w = g.shape
        ox = oy = 0.0
        for cy in range(math.floor(y - r), math.floor(y + r) + 1):
            for cx in range(math.floor(x - r), math.floor(x + r) + 1):
                if 0 <= cx < n_w and 0 <= cy < n_h and g[cy, cx] == 0:
                    continue
                # nearest point of the wall square to the centre; push along centre - point
                dx, dy = x - min(max(x, cx), cx + 1), y - min(max(y, cy), cy + 1)
                d2 = dx * dx + dy * dy
                if d2 >= r * r:
                    continue
                d = math.sqrt(d2)
                if d < 1e-9:  # centre on the square itself: cannot resolve along a normal
                    return (math.inf, math.inf)
                k = (r - d) / d + 1e-9
                ox, oy = ox + dx * k, oy + dy * k
                x, y = x + dx * k, y + dy * k
        return ox, oy

    def _slide(self, x: float, y: float, dx: float, dy: float) -> tuple[float, float]:
        """Move the circle by (dx, dy), pushing it out of walls after each sub-step.

        Pushing out along the wall normal removes only the component into the
        wall, so the player slides along walls and rounds corners instead of
        sticking on them. Sub-steps are shorter than r/2 so nothing tunnels.
        """
        r = self.cfg.player_radius
        n = max(1, math.ceil(max(abs(dx), abs(dy)) / (0.5 * r)))
        dx, dy = dx / n, dy / n
        for _ in range(n):
            nx, ny = x + dx, y + dy
            for _ in range(4):  # a concave corner needs one push per wall, the last pass verifies
                ox, oy = self._push_out(nx, ny)
                if (ox == 0.0 and oy == 0.0) or math.isinf(ox):
                    break
                nx, ny = nx + ox, ny + oy
            if ox == 0.0 and oy == 0.0:  # otherwise (never seen) stay put for this sub-step
                x, y = nx, ny
        return x, y
