"""Classic game: maze generation, dynamics, collisions, rendering, themes, sensors, cloning."""
from __future__ import annotations

import math

import numpy as np
import pytest

from engine.actions import Action, ActionSchema, SchemaMismatchError
from engine.classic_game import ClassicConfig, ClassicGame, ClassicState, cast_rays
from engine.config import ConfigError, to_dataclass
from engine.maze import MazeConfig, generate_maze
from engine.source import FrameSource
from engine.textures import THEMES, theme_for_seed


def scripted(n: int) -> list[Action]:
    """A fixed mix of digital and analog actions (same list every call)."""
    pattern = [Action.make(["forward"]), Action.make(["forward", "run", "turn_left"]),
               Action.make(["turn_right"]), Action.make([], move=0.7, turn=-0.4),
               Action.make(["strafe_left"]), Action.make(["back"]), Action.make([], strafe=0.5, turn=0.9),
               Action.make()]
    return [pattern[(i // 7) % len(pattern)] for i in range(n)]


def circle_overlaps_wall(grid: np.ndarray, x: float, y: float, r: float) -> bool:
    for cy in range(int(math.floor(y - r)), int(math.floor(y + r)) + 1):
        for cx in range(int(math.floor(x - r)), int(math.floor(x + r)) + 1):
            if grid[cy, cx] == 0:
                continue
            dx, dy = x - min(max(x, cx), cx + 1), y - min(max(y, cy), cy + 1)
            if dx * dx + dy * dy < (r - 1e-6) ** 2:
                return True
    return False


def test_maze_deterministic_connected_and_sealed() -> None:
    a, b, c = generate_maze(11), generate_maze(11), generate_maze(12)
    assert np.array_equal(a.grid, b.grid) and a.start == b.start and a.start_angle == b.start_angle
    assert not np.array_equal(a.grid, c.grid)
    g = a.grid
    assert g.shape == (15, 15) and g.dtype == np.uint8 and g.max() <= 4
    assert g[0].all() and g[-1].all() and g[:, 0].all() and g[:, -1].all()
    sx, sy = int(a.start[0]), int(a.start[1])
    assert g[sy, sx] == 0
    # flood fill from the start reaches every free cell (perfect maze + loops + rooms stays connected)
    seen, todo = {(sx, sy)}, [(sx, sy)]
    while todo:
        x, y = todo.pop()
        for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            if g[y + dy, x + dx] == 0 and (x + dx, y + dy) not in seen:
                seen.add((x + dx, y + dy))
                todo.append((x + dx, y + dy))
    assert len(seen) == int((g == 0).sum()) > 40
    assert generate_maze(3, MazeConfig(size=21)).grid.shape == (21, 21)
    with pytest.raises(ValueError, match="size"):
        generate_maze(0, MazeConfig(size=3))


def test_frames_deterministic_over_200_steps_and_seeds_differ() -> None:
    frames = []
    for _ in range(2):
        g = ClassicGame()
        fs = [g.reset(7)] + [g.step(a) for a in scripted(200)]
        frames.append(np.stack(fs))
        final = g.state
    assert np.array_equal(frames[0], frames[1])
    assert final.tick == 200
    moved = np.abs(frames[0][1:].astype(int) - frames[0][:-1].astype(int)).mean(axis=(1, 2, 3))
    assert (moved > 0).mean() > 0.6  # the script really moves the view
    other = ClassicGame()
    assert not np.array_equal(other.reset(8), frames[0][0])


def test_frames_are_uint8_at_configured_resolution() -> None:
    g = ClassicGame(ClassicConfig(width=80, height=48))
    assert isinstance(g, FrameSource) and g.resolution == (48, 80)
    for f in (g.reset(1), g.step(Action.make(["forward", "turn_left"]))):
        assert f.dtype == np.uint8 and f.shape == (48, 80, 3)
        assert f.std() > 5  # not a blank image


def test_walking_into_walls_never_enters_them_and_slides() -> None:
    for seed in range(4):
        g = ClassicGame()
        g.reset(seed)
        grid, r = g.maze.grid, g.cfg.player_radius
        seq = [Action.make(["forward", "run"])] * 150 + [Action.make(["forward", "strafe_right"])] * 150
        xs = []
        for a in seq:  # 300 ticks pushing into walls, then diagonally along them
            g.step(a)
            st = g.state
            assert grid[int(st.y), int(st.x)] == 0
            assert not circle_overlaps_wall(grid, st.x, st.y, r)
            xs.append((st.x, st.y))
        assert xs[0] != xs[-1]


def test_slides_along_wall_when_walking_at_an_angle() -> None:
    g = ClassicGame()
    g.reset(0)
    grid = g.maze.grid
    # find a free cell with a wall to the east and free cells north or south: face 30 deg off the wall
    ys, xs = np.nonzero(grid == 0)
    x, y = next((x, y) for x, y in zip(xs, ys)
                if grid[y, x + 1] != 0 and grid[y + 1, x] == 0 and grid[y + 1, x + 1] != 0)
    g.set_state(ClassicState(0, x + 0.5, y + 0.5, math.radians(30), 0))
    for _ in range(40):
        g.step(Action.make(["forward"]))
    st = g.state
    assert st.x == pytest.approx(x + 1 - g.cfg.player_radius, abs=1e-3)  # flush against the wall
    assert st.y > y + 0.5 + 0.5  # ...and still moving along it


def test_turning_changes_image_and_full_circle_returns() -> None:
    g = ClassicGame()
    f0 = g.reset(4)
    f1 = g.step(Action.make(["turn_right"]))
    assert np.abs(f1.astype(int) - f0.astype(int)).mean() > 1.0
    for _ in range(89):  # 90 ticks x 4 degrees = 360 degrees
        f = g.step(Action.make(["turn_right"]))
    assert (np.abs(f.astype(int) - f0.astype(int)).max(axis=2) > 2).mean() < 0.02
    assert g.state.x == g.maze.start[0] and g.state.y == g.maze.start[1]


def test_run_is_faster_than_walk() -> None:
    dist = {}
    for run in (False, True):
        g = ClassicGame()
        g.reset(2)
        g.set_state(replace_pose(g, 0))
        g.step(Action.make(["forward"] + (["run"] if run else [])))
        dist[run] = math.hypot(g.state.x - g.maze.start[0], g.state.y - g.maze.start[1])
    assert dist[False] == pytest.approx(0.055, abs=1e-9)
    assert dist[True] == pytest.approx(0.055 * 1.8, abs=1e-9)


def replace_pose(g: ClassicGame, tick: int) -> ClassicState:
    m = g.maze
    return ClassicState(m.seed, m.start[0], m.start[1], m.start_angle, tick)


def test_themes_have_distinct_global_looks() -> None:
    means = []
    for seed in range(len(THEMES)):
        assert theme_for_seed(seed) == seed
        g = ClassicGame()
        fs = [g.reset(seed)] + [g.step(Action.make(["turn_right"])) for _ in range(90)]
        means.append(np.stack(fs[::10]).reshape(-1, 3).mean(axis=0))
        assert g.describe()["theme"] == THEMES[seed].name
    means = np.array(means)
    d = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert d[~np.eye(len(means), dtype=bool)].min() > 20.0, d.round(1)
    forced = ClassicGame(ClassicConfig(theme="ice_tech"))
    forced.reset(0)
    assert forced.describe()["theme"] == "ice tech"
    assert ClassicGame(ClassicConfig(theme="sand")).cfg.theme == "sand"  # unique prefixes are accepted


def test_sensors_match_grid_distances() -> None:
    g = ClassicGame()
    g.reset(5)
    grid = g.maze.grid
    ys, xs = np.nonzero(grid == 0)
    for x, y in list(zip(xs, ys))[::7]:
        for k, (dx, dy) in enumerate(((1, 0), (0, 1), (-1, 0), (0, -1))):
            g.set_state(ClassicState(5, x + 0.5, y + 0.5, k * math.pi / 2, 0))
            s = g.sensors()
            free = lambda ddx, ddy: next(n for n in range(1, 99) if grid[y + n * ddy, x + n * ddx] != 0) - 0.5
            assert s.front == pytest.approx(free(dx, dy), abs=1e-6)
            assert s.right == pytest.approx(free(-dy, dx), abs=1e-6)   # right of +x is +y
            assert s.left == pytest.approx(free(dy, -dx), abs=1e-6)
            assert s.position == (x + 0.5, y + 0.5) and s.theme == theme_for_seed(5)


def test_cast_rays_axis_aligned_and_zero_components() -> None:
    grid = np.ones((5, 5), np.uint8)
    grid[1:4, 1:4] = 0
    t, side, mat, _ = cast_rays(grid, 2.5, 2.5, np.array([1.0, 0.0, -1.0, 0.0]), np.array([0.0, 1.0, 0.0, -1.0]))
    assert np.allclose(t, 1.5) and side.tolist() == [False, True, False, True] and (mat == 1).all()


def test_state_clone_reproduces_future() -> None:
    a = ClassicGame()
    a.reset(9)
    for act in scripted(60):
        a.step(act)
    b = ClassicGame()
    b.set_state(a.state)
    assert np.array_equal(a.render(), b.render())
    for act in scripted(120)[60:]:
        assert np.array_equal(a.step(act), b.step(act))
    assert a.state == b.state


def test_describe_and_bad_input() -> None:
    g = ClassicGame()
    with pytest.raises(RuntimeError, match="reset"):
        g.step(Action.make())
    g.reset(3)
    d = g.describe()
    assert d["source"] == "classic" and d["seed"] == 3 and d["config"]["width"] == 64
    with pytest.raises(ValueError, match="seed"):
        g.reset(-1)
    with pytest.raises(ConfigError, match="fov_deg"):
        ClassicGame(ClassicConfig(fov_deg=0.0))
    with pytest.raises(ConfigError, match="theme"):
        ClassicGame(ClassicConfig(theme="lava"))
    with pytest.raises(ValueError, match="wall"):
        g.set_state(ClassicState(3, 0.5, 0.5, 0.0, 0))
    other = ActionSchema(name="other", buttons=("forward", "run"), axes=("move",))
    with pytest.raises(SchemaMismatchError):
        g.step(Action.make(["forward"], schema=other))
    assert to_dataclass(ClassicConfig, {"width": 32, "turn_deg": 3.0}).width == 32
