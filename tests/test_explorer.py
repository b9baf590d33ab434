"""Explorer and random controllers: action balance in a real game, travel, determinism."""
from __future__ import annotations

import numpy as np
import pytest

from controllers.base import Controller, TickInput
from controllers.explorer import ExplorerConfig, ExplorerController
from controllers.random_controller import RandomConfig, RandomController
from engine.actions import Action
from engine.classic_game import ClassicConfig, ClassicGame


def play(seed: int, ticks: int, size: int = 32, cfg: ExplorerConfig | None = None
         ) -> tuple[list[Action], set[tuple[int, int]]]:
    """Run the explorer in a ClassicGame (small frames: the dynamics do not depend on resolution)."""
    game, ctrl = ClassicGame(ClassicConfig(width=size, height=size)), ExplorerController(cfg)
    game.reset(seed)
    ctrl.reset(seed)
    actions, cells = [], set()
    for t in range(ticks):
        a = ctrl.act(TickInput(sensors=game.sensors(), tick=t))
        game.step(a)
        actions.append(a)
        cells.add((int(game.state.x), int(game.state.y)))
    return actions, cells


@pytest.mark.parametrize("seed", [1, 6])
def test_explorer_action_distribution_and_travel(seed: int) -> None:
    actions, cells = play(seed, 3000)
    c = np.stack([a.controls() for a in actions])  # (T, 4): move, strafe, turn, run
    move, strafe, turn, run = c.T
    share = {
        "forward": (move > 0.1).mean(),
        "turning": (np.abs(turn) >= 0.1).mean(),
        "idle": (np.abs(c[:, :3]).max(axis=1) == 0).mean(),
        "run": ((run > 0.5) & (move > 0.1)).mean(),
        "strafe": (np.abs(strafe) > 0.1).mean(),
        "back": (move < -0.1).mean(),
        "analog": np.mean([any(abs(v) > 0 for v in a.axes.values()) for a in actions]),
    }
    msg = {k: round(float(v), 3) for k, v in share.items()}
    assert share["forward"] >= 0.35, msg
    assert 0.15 <= share["turning"] <= 0.45, msg
    assert 0.02 <= share["idle"] <= 0.15, msg
    assert 0.08 <= share["run"] <= 0.40, msg
    assert share["strafe"] > 0.002 and share["back"] > 0.005, msg
    assert 0.15 <= share["analog"] <= 0.50, msg
    assert len(cells) >= 15, len(cells)


def test_explorer_analog_values_vary_smoothly() -> None:
    actions, _ = play(3, 1500)
    moves = [a.axes.get("move") for a in actions]
    pairs = [(p, q) for p, q in zip(moves, moves[1:]) if p is not None and q is not None]
    assert len(pairs) > 100
    jumps = np.abs(np.diff(np.array(pairs), axis=1))
    assert (jumps < 0.3).mean() > 0.95
    assert len({round(p, 3) for p, _ in pairs}) > 20  # values change, not one constant stick position


def test_explorer_deterministic_per_seed() -> None:
    v1 = [a.to_vector() for a in play(4, 600)[0]]
    v2 = [a.to_vector() for a in play(4, 600)[0]]
    v3 = [a.to_vector() for a in play(5, 600)[0]]
    assert np.array_equal(np.stack(v1), np.stack(v2))
    assert not np.array_equal(np.stack(v1), np.stack(v3))


def test_explorer_without_sensors_wanders_open_loop() -> None:
    ctrl = ExplorerController()
    assert isinstance(ctrl, Controller) and ctrl.name == "explorer" and not ctrl.finished()
    runs = []
    for _ in range(2):
        ctrl.reset(11)
        runs.append(np.stack([ctrl.act(TickInput(tick=t)).controls() for t in range(600)]))
    assert np.array_equal(runs[0], runs[1])
    c = runs[0]
    assert (c[:, 0] > 0).mean() > 0.3 and (c[:, 2] != 0).mean() > 0.1


def test_explorer_config_rejects_bad_share() -> None:
    with pytest.raises(ValueError, match="analog_share"):
        ExplorerController(ExplorerConfig(analog_share=1.5))
    with pytest.raises(ValueError, match="burst_prob"):
        ExplorerController(ExplorerConfig(burst_prob=-0.1))
    with pytest.raises(ValueError, match="burst_min_ticks"):
        ExplorerController(ExplorerConfig(burst_min_ticks=5, burst_max_ticks=3))


def test_explorer_bursts_change_the_action_often_and_still_explore() -> None:
    from world_model.eval_probes import action_class
    from world_model.eval_streams import action_groups

    def onsets(actions: list[Action]) -> dict[str, int]:
        c = np.stack([a.controls() for a in actions])
        groups = action_groups(c[1:], c[:-1])
        return {g: int((groups == g).sum()) for g in ("turn (new)", "move (new)", "still (new)")}

    plain, plain_cells = play(2, 3000)
    bursty, cells = play(2, 3000, cfg=ExplorerConfig(burst_prob=0.06))
    before, after = onsets(plain), onsets(bursty)
    assert after["turn (new)"] >= 2.5 * before["turn (new)"], (before, after)
    assert after["still (new)"] > before["still (new)"] and sum(after.values()) >= 2 * sum(before.values())
    # interrupted segments resume where they were: it still travels, and a resumed turn does not
    # aim again from where the burst left it (which overshot to the next quarter: 52% turning)
    assert len(cells) >= 0.6 * len(plain_cells), (len(cells), len(plain_cells))
    turning = lambda acts: np.isin(action_class(np.stack([a.controls() for a in acts])), (3, 4)).mean()
    assert turning(bursty) <= turning(plain) + 0.08, (turning(bursty), turning(plain))
    analog_turns = {round(a.axes["turn"], 3) for a in bursty if "turn" in a.axes and not a.axes.get("move")}
    assert len(analog_turns) > 5                         # analog bursts at drawn amplitudes, not one value


def test_random_controller_holds_actions_deterministically() -> None:
    ctrl = RandomController(RandomConfig(min_hold=5, max_hold=10))
    assert isinstance(ctrl, Controller) and ctrl.name == "random"
    seqs = []
    for seed in (2, 2, 3):
        ctrl.reset(seed)
        seqs.append(np.stack([ctrl.act(TickInput(tick=t)).to_vector() for t in range(400)]))
    assert np.array_equal(seqs[0], seqs[1]) and not np.array_equal(seqs[0], seqs[2])
    changes = np.any(np.diff(seqs[0], axis=0) != 0, axis=1).sum()
    assert 400 / 10 - 5 <= changes <= 400 / 5  # held for 5..10 ticks each (equal draws may merge)
    assert (seqs[0][:, 7:] != 0).any() and (seqs[0][:, :7] != 0).any()  # both analog and buttons
    with pytest.raises(ValueError, match="min_hold"):
        RandomController(RandomConfig(min_hold=0))
