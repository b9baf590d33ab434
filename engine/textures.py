"""Themes: a palette (floor, ceiling, fog) plus procedural wall textures.

Every world is drawn in one theme, picked from its seed (``theme_for_seed``:
``seed % len(THEMES)``, so consecutive seeds cycle through all themes). A
theme has ``MATERIALS`` wall textures, one per maze material id (1..MATERIALS,
the last one is the rare "accent" landmark material). Textures are coarse
(16x16 texels) so they stay readable at 64x64, and deterministic: each is
drawn from its own seeded Generator, never the global RNG.

Texture arrays are uint8 RGB, shape (T, T, 3), indexed ``[v, u]``: v runs
down the wall (row 0 at the top), u along it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

TEX: int = 16        # texels per wall side
MATERIALS: int = 4   # wall textures per theme (maze material ids 1..4)

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Theme:
    """A world's look. ``textures`` is (MATERIALS, TEX, TEX, 3) uint8, index = material id - 1."""
    name: str
    floor: RGB
    ceiling: RGB
    fog: RGB              # colour far things fade to (distance fog)
    textures: np.ndarray

    def wall_colors(self) -> np.ndarray:
        """(MATERIALS, 3) uint8 mean colour of each wall texture (for maps and docs)."""
        return self.textures.reshape(MATERIALS, -1, 3).mean(axis=1).round().astype(np.uint8)


# ---- texel generators: each returns (T, T, 3) float32 in 0..255 ---------------------------

def _fill(c: RGB) -> np.ndarray:
    return np.broadcast_to(np.asarray(c, np.float32), (TEX, TEX, 3)).copy()


def _jitter(rng: np.random.Generator, c: Sequence[float], amp: float) -> np.ndarray:
    return np.asarray(c, np.float32) * (1.0 + rng.uniform(-amp, amp))


def _grain(rng: np.random.Generator, tex: np.ndarray, amp: float) -> np.ndarray:
    """Per-texel brightness noise so flat areas do not look plastic."""
    return tex * (1.0 + rng.uniform(-amp, amp, size=(TEX, TEX, 1))).astype(np.float32)


def bricks(rng: np.random.Generator, brick: RGB, mortar: RGB, rows: int = 4, per_row: int = 2) -> np.ndarray:
    """Running-bond bricks: ``rows`` courses, every other one offset by half a brick."""
    t = _fill(mortar)
    bh, bw = TEX // rows, TEX // per_row
    for r in range(rows):
        off = (bw // 2) * (r % 2)
        for b in range(-1, per_row + 1):
            x0, x1 = b * bw + off + 1, (b + 1) * bw + off  # 1-texel mortar on the left
            x0, x1 = max(x0, 0), min(x1, TEX)
            if x1 > x0:
                t[r * bh + 1:(r + 1) * bh, x0:x1] = _jitter(rng, brick, 0.15)
    return _grain(rng, t, 0.08)


def blocks(rng: np.random.Generator, stone: RGB, line: RGB, rows: int = 2, per_row: int = 2) -> np.ndarray:
    """Large dressed stone blocks with per-block shade."""
    return bricks(rng, stone, line, rows=rows, per_row=per_row)


def stripes(colors: Sequence[RGB], width: int, horizontal: bool = True) -> np.ndarray:
    """Bands of ``width`` texels cycling through ``colors``."""
    idx = (np.arange(TEX) // width) % len(colors)
    band = np.asarray(colors, np.float32)[idx]           # (T, 3)
    return np.broadcast_to(band[:, None] if horizontal else band[None, :], (TEX, TEX, 3)).copy()


def panels(base: RGB, seam: RGB, light: RGB | None = None) -> np.ndarray:
    """A tech panel: dark 1-texel seams on the border and middle, optional light strip."""
    t = _fill(base)
    t[0, :] = t[:, 0] = t[TEX // 2, :] = seam
    t[1, 1:] = np.asarray(base, np.float32) * 1.15     # bevel highlight
    if light is not None:
        t[TEX // 4 - 1:TEX // 4 + 1, 3:TEX - 3] = light
    return np.clip(t, 0, 255)


def checker(c1: RGB, c2: RGB, n: int = 4) -> np.ndarray:
    """n x n checkerboard."""
    ij = np.add.outer(np.arange(TEX) * n // TEX, np.arange(TEX) * n // TEX) % 2
    return np.where(ij[..., None] == 0, np.asarray(c1, np.float32), np.asarray(c2, np.float32))


def diamonds(c1: RGB, c2: RGB) -> np.ndarray:
    """Two rows of diamonds (harlequin)."""
    h = TEX // 2
    y, x = np.mgrid[0:TEX, 0:TEX]
    d = np.abs((y % h) - h / 2 + 0.5) + np.abs((x % h) - h / 2 + 0.5)
    return np.where((d < h / 2)[..., None], np.asarray(c1, np.float32), np.asarray(c2, np.float32))


def planks(rng: np.random.Generator, wood: RGB, gap: RGB, n: int = 4) -> np.ndarray:
    """Vertical wooden planks with dark gaps and a few knots."""
    t = _fill(gap)
    w = TEX // n
    for i in range(n):
        t[:, i * w + 1:(i + 1) * w] = _jitter(rng, wood, 0.12)
    ky, kx = rng.integers(2, TEX - 2, size=2)
    t[ky, kx] = gap
    return _grain(rng, t, 0.06)


def spots(rng: np.random.Generator, t: np.ndarray, color: RGB, share: float) -> np.ndarray:
    """Overlay random 2x2 patches of ``color`` (moss, stains) on ``share`` of the texels."""
    m = rng.random((TEX // 2, TEX // 2)) < share
    m = np.repeat(np.repeat(m, 2, axis=0), 2, axis=1)
    return np.where(m[..., None], np.asarray(color, np.float32), t)


# ---- themes ----------------------------------------------------------------------------------

Maker = Callable[[np.random.Generator], np.ndarray]

_SPECS: tuple[tuple[str, RGB, RGB, RGB, tuple[Maker, ...]], ...] = (
    ("brick", (96, 72, 58), (60, 45, 40), (30, 20, 16), (
        lambda r: bricks(r, (168, 62, 44), (190, 170, 150)),
        lambda r: bricks(r, (112, 52, 38), (150, 130, 115)),
        lambda r: planks(r, (140, 92, 52), (60, 38, 24)),
        lambda r: stripes(((220, 150, 40), (120, 30, 25)), 4, horizontal=False),   # banner
    )),
    ("moss stone", (66, 84, 60), (112, 120, 114), (50, 62, 52), (
        lambda r: spots(r, blocks(r, (128, 132, 126), (70, 74, 70)), (70, 120, 50), 0.2),
        lambda r: spots(r, bricks(r, (96, 118, 84), (60, 70, 58)), (52, 100, 40), 0.3),
        lambda r: _grain(r, blocks(r, (84, 88, 86), (46, 50, 48), rows=4, per_row=1), 0.1),
        lambda r: stripes(((40, 110, 40), (80, 150, 60), (30, 80, 30)), 2, horizontal=False),  # vines
    )),
    ("ice tech", (122, 150, 168), (214, 232, 240), (186, 214, 228), (
        lambda r: panels((226, 236, 242), (60, 170, 200), (120, 230, 250)),
        lambda r: panels((90, 190, 215), (30, 100, 130)),
        lambda r: stripes(((150, 170, 185), (70, 85, 100)), 2),                       # grill
        lambda r: panels((40, 230, 250), (250, 255, 255), (255, 255, 255)),           # light
    )),
    ("sandstone", (198, 152, 92), (236, 204, 148), (226, 186, 126), (
        lambda r: stripes(((232, 190, 90), (214, 130, 50), (240, 210, 120)), 3),
        lambda r: blocks(r, (218, 172, 104), (160, 112, 60)),
        lambda r: stripes(((200, 110, 40), (236, 170, 70)), 4),
        lambda r: checker((150, 70, 30), (240, 200, 110), 4),                          # glyph tiles
    )),
    ("violet checker", (64, 44, 88), (34, 22, 52), (22, 12, 34), (
        lambda r: checker((150, 70, 200), (70, 30, 110), 4),
        lambda r: diamonds((200, 90, 200), (90, 40, 130)),
        lambda r: panels((96, 60, 140), (40, 20, 60)),
        lambda r: stripes(((240, 120, 200), (120, 40, 140)), 2, horizontal=False),
    )),
)


def _build(index: int) -> Theme:
    name, floor, ceiling, fog, makers = _SPECS[index]
    assert len(makers) == MATERIALS
    texs = [np.clip(mk(np.random.default_rng([index, m, 0x7E47])), 0, 255).round().astype(np.uint8)
            for m, mk in enumerate(makers)]
    textures = np.stack(texs)  # (MATERIALS, T, T, 3)
    textures.setflags(write=False)
    return Theme(name=name, floor=floor, ceiling=ceiling, fog=fog, textures=textures)


THEMES: tuple[Theme, ...] = tuple(_build(i) for i in range(len(_SPECS)))
THEME_NAMES: tuple[str, ...] = tuple(t.name for t in THEMES)


def theme_for_seed(seed: int) -> int:
    """Index of the theme of world ``seed`` (cycles through all themes)."""
    return int(seed) % len(THEMES)


def theme_index(name: str) -> int:
    """Index of the theme called ``name``: spaces or underscores, or a unique prefix ("ice", "sand")."""
    key = name.strip().lower().replace("_", " ")
    if key in THEME_NAMES:
        return THEME_NAMES.index(key)
    hits = [i for i, n in enumerate(THEME_NAMES) if key and n.startswith(key)]
    if len(hits) != 1:
        raise ValueError(f"unknown theme {name!r}; known: {', '.join(THEME_NAMES)}")
    return hits[0]
