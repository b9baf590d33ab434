"""Deterministic procedural mazes: a grid of cells from a seed.

The grid is a block maze: ``grid[y, x]`` is 0 for an empty cell and
``1..materials`` for a wall cell of that material. Passages live on odd
coordinates and walls in between (the usual "thick wall" layout a raycaster
wants), so a 15x15 grid holds a 7x7 maze of 1-cell-wide corridors.

Generation, all drawn from one ``numpy.random.Generator`` seeded by ``seed``
(never the global RNG, so the same seed gives the same grid everywhere):

1. a perfect maze carved by an iterative randomized depth-first search
   (long winding corridors, every cell reachable);
2. loops: some walls between two passages are knocked out, so there are
   junctions and more than one way around;
3. a few open rooms: rectangles cleared to the floor, larger ones keep a
   central pillar so they are not empty squares;
4. wall materials: regions (nearest of a few random centres) share a main
   material, with scattered "accent" cells of the last material as landmarks.

The player starts at the centre of a free cell, facing the cardinal direction
with the longest free run.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Cardinal directions as (dx, dy) on the grid, in angle order: 0 = +x, 90 deg = +y
# (y grows downward on the map, so increasing angle turns right / clockwise).
CARDINALS: tuple[tuple[int, int], ...] = ((1, 0), (0, 1), (-1, 0), (0, -1))


@dataclass
class MazeConfig:
    """Maze shape. ``size`` is the grid side in cells (odd sizes use every cell)."""
    size: int = 15
    straightness: float = 0.5    # chance the carver keeps its direction (longer straight corridors)
    loop_chance: float = 0.12    # probability of removing each inner wall between two passages
    rooms: int = 2               # attempts at clearing an open room
    room_max: int = 5            # largest room side in cells (odd, >= 3)
    materials: int = 4           # wall material ids are 1..materials; the last one is the accent
    regions: int = 5             # material regions (nearest-centre partition)
    accent_chance: float = 0.05  # share of wall cells drawn with the accent material


@dataclass(frozen=True)
class Maze:
    """A generated maze. ``grid`` is (size, size) uint8, indexed ``[y, x]``."""
    seed: int
    grid: np.ndarray
    start: tuple[float, float]   # (x, y) centre of the start cell, in cells
    start_angle: float           # radians, a multiple of pi/2

    @property
    def size(self) -> int:
        return int(self.grid.shape[0])

    def is_wall(self, x: int, y: int) -> bool:
        """True for wall cells and for anything outside the grid."""
        if not (0 <= x < self.grid.shape[1] and 0 <= y < self.grid.shape[0]):
            return True
        return bool(self.grid[y, x] != 0)

    def free_cells(self) -> np.ndarray:
        """(n, 2) int array of (x, y) of every empty cell."""
        ys, xs = np.nonzero(self.grid == 0)
        return np.stack([xs, ys], axis=1)


def _check(cfg: MazeConfig) -> None:
    if cfg.size < 5:
        raise ValueError(f"maze size must be >= 5, got {cfg.size}")
    if not 0.0 <= cfg.straightness <= 1.0:
        raise ValueError(f"maze straightness must be in [0, 1], got {cfg.straightness}")
    if not 0.0 <= cfg.loop_chance <= 1.0:
        raise ValueError(f"maze loop_chance must be in [0, 1], got {cfg.loop_chance}")
    if cfg.materials < 2 or cfg.materials > 255:
        raise ValueError(f"maze materials must be in [2, 255], got {cfg.materials}")
    if cfg.rooms < 0 or cfg.room_max < 3 or cfg.regions < 1:
        raise ValueError(f"maze rooms/room_max/regions out of range: {cfg.rooms}/{cfg.room_max}/{cfg.regions}")
    if not 0.0 <= cfg.accent_chance <= 1.0:
        raise ValueError(f"maze accent_chance must be in [0, 1], got {cfg.accent_chance}")


def _carve_perfect(open_: np.ndarray, n: int, straightness: float, rng: np.random.Generator) -> None:
    """Randomized DFS over the odd-coordinate cells (1..n-2), carving in place.

    With probability ``straightness`` the carver continues straight when it can,
    which trades some twistiness for longer corridors to walk down.
    """
    cells = n // 2 - (1 if n % 2 == 0 else 0)  # passage cells per side; even sizes leave a wall band
    if cells < 1:
        return
    cx, cy = int(rng.integers(cells)), int(rng.integers(cells))
    seen = np.zeros((cells, cells), dtype=bool)
    seen[cy, cx] = True
    open_[2 * cy + 1, 2 * cx + 1] = True
    stack = [(cx, cy, -1, -1)]  # cell and the direction we came in with
    while stack:
        x, y, pdx, pdy = stack[-1]
        nbrs = [(x + dx, y + dy, dx, dy) for dx, dy in CARDINALS
                if 0 <= x + dx < cells and 0 <= y + dy < cells and not seen[y + dy, x + dx]]
        if not nbrs:
            stack.pop()
            continue
        straight = [nb for nb in nbrs if (nb[2], nb[3]) == (pdx, pdy)]
        keep = rng.random() < straightness  # always drawn: the stream must not depend on the branch
        pick = int(rng.integers(len(nbrs)))
        nx, ny, dx, dy = straight[0] if (keep and straight) else nbrs[pick]
        seen[ny, nx] = True
        open_[2 * ny + 1, 2 * nx + 1] = True
        open_[y + ny + 1, x + nx + 1] = True  # the wall cell between the two passages
        stack.append((nx, ny, dx, dy))


def _add_loops(open_: np.ndarray, chance: float, rng: np.random.Generator) -> None:
    """Open inner walls that separate two passages (one odd and one even coordinate)."""
    n = open_.shape[0]
    for y in range(1, n - 1):
        for x in range(1, n - 1):
            if open_[y, x] or (x + y) % 2 == 0:
                continue
            horiz = open_[y, x - 1] and open_[y, x + 1]
            vert = open_[y - 1, x] and open_[y + 1, x]
            # draw for every candidate so the stream does not depend on earlier outcomes
            if rng.random() < chance and (horiz != vert):
                open_[y, x] = True


def _add_rooms(open_: np.ndarray, cfg: MazeConfig, rng: np.random.Generator) -> None:
    """Clear a few odd-aligned rectangles; rooms of side >= 5 keep a central pillar."""
    n = open_.shape[0]
    hi = max(3, min(cfg.room_max, n - 2))
    sides = [s for s in range(3, hi + 1, 2)]
    for _ in range(cfg.rooms):
        w, h = int(rng.choice(sides)), int(rng.choice(sides))
        if w > n - 2 or h > n - 2:
            continue
        x0 = 1 + 2 * int(rng.integers((n - 2 - w) // 2 + 1))
        y0 = 1 + 2 * int(rng.integers((n - 2 - h) // 2 + 1))
        open_[y0:y0 + h, x0:x0 + w] = True
        if w >= 5 and h >= 5:
            open_[y0 + h // 2, x0 + w // 2] = False


def _materials(open_: np.ndarray, cfg: MazeConfig, rng: np.random.Generator) -> np.ndarray:
    """Assign wall materials: regional main materials 1..m-1 plus accent material m."""
    n = open_.shape[0]
    centres = rng.uniform(0, n, size=(cfg.regions, 2))                 # (R, 2) as (x, y)
    region_mat = 1 + rng.integers(cfg.materials - 1, size=cfg.regions)  # (R,) in 1..m-1
    ys, xs = np.mgrid[0:n, 0:n]
    d2 = (xs[..., None] + 0.5 - centres[:, 0]) ** 2 + (ys[..., None] + 0.5 - centres[:, 1]) ** 2
    mat = region_mat[np.argmin(d2, axis=-1)]                           # (n, n)
    accent = rng.random((n, n)) < cfg.accent_chance
    mat = np.where(accent, cfg.materials, mat)
    return np.where(open_, 0, mat).astype(np.uint8)


def _start(open_: np.ndarray, rng: np.random.Generator) -> tuple[tuple[float, float], float]:
    ys, xs = np.nonzero(open_)
    i = int(rng.integers(len(xs)))
    x, y = int(xs[i]), int(ys[i])
    runs = []
    for dx, dy in CARDINALS:
        k = 0
        while open_[y + dy * (k + 1), x + dx * (k + 1)]:
            k += 1
        runs.append(k)
    best = int(np.argmax(runs))  # ties: first in angle order, deterministic
    return (x + 0.5, y + 0.5), best * np.pi / 2


def generate_maze(seed: int, cfg: MazeConfig | None = None) -> Maze:
    """The maze for ``seed``: same seed and config -> identical grid and start."""
    cfg = cfg or MazeConfig()
    _check(cfg)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"maze seed must be a non-negative int, got {seed!r}")
    rng = np.random.default_rng([int(seed), 0x3A2E])  # salted: the maze stream is its own
    n = cfg.size
    open_ = np.zeros((n, n), dtype=bool)
    _carve_perfect(open_, n, cfg.straightness, rng)
    _add_loops(open_, cfg.loop_chance, rng)
    _add_rooms(open_, cfg, rng)
    open_[0, :] = open_[-1, :] = open_[:, 0] = open_[:, -1] = False  # sealed border
    grid = _materials(open_, cfg, rng)
    start, angle = _start(open_, rng)
    grid.setflags(write=False)
    return Maze(seed=int(seed), grid=grid, start=start, start_angle=float(angle))
