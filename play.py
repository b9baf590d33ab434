"""Play a frame source: ``python play.py`` dreams the maze with the shipped checkpoint;
``python play.py source=classic`` plays the hand-written reference game (conf/play.yaml has every key).

Headless runs print one JSON line of statistics on stdout::

    python play.py headless=true max_frames=600 controller=explorer record=true seed=7
    python play.py headless=true replay=runs/sessions/<session>   # adds "replay_equal"

Bad input (config, display, session, keymap) prints ``error: <one line>`` on
stderr and exits with status 2.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")  # stdout carries only the JSON line

import hydra
import numpy as np
import pygame
from omegaconf import DictConfig, OmegaConf

from controllers.base import Controller
from engine.actions import Action, ActionSchema
from engine.cli import USER_ERRORS, fail, run_hydra_main
from engine.clock import RealClock
from engine.config import ConfigError
from engine.input import Keymap, load_keymap
from engine.loop import GameLoop, LoopConfig, Recorder
from engine.renderer import make_renderer
from engine.source import FrameSource
from engine.sources import make_source, typed

ROOT = Path(__file__).resolve().parent


@dataclass
class PlayConfig:
    """Top-level keys of conf/play.yaml (the source and controller groups are validated by their builders)."""
    seed: int = 0
    headless: bool = False
    max_frames: int = 0
    record: bool = False
    record_dir: str = "runs/sessions"
    replay: Optional[str] = None
    target_fps: float = 30.0
    pace: Optional[bool] = None
    threaded: Optional[bool] = None  # None: on for the neural source (the loop never waits on a model)
    queue_size: int = 2
    keymap: str = "conf/keymap/default.yaml"
    window_scale: int = 8
    smooth: bool = False
    show_hud: bool = True
    screenshot_dir: str = "screenshots"
    checkpoint: Optional[str] = None


def _resolve_path(p: str) -> str:
    """Relative paths are tried in the working directory, then next to play.py."""
    if os.path.isabs(p) or os.path.exists(p):
        return p
    alt = ROOT / p
    return str(alt) if alt.exists() else p


def _params(node: Any) -> dict[str, Any]:
    d = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    return {k: v for k, v in d.items() if k != "_name_"}


# ---------------------------------------------------------------------- controllers
def build_controller(node: Any, keymap: Keymap, schema: ActionSchema) -> Controller:
    """controller group node -> Controller (imports only what the choice needs)."""
    name = node.get("_name_") if node is not None else None
    params = _params(node)
    if name == "keyboard":
        from controllers.keyboard import KeyboardController
        if params:
            raise ConfigError(f"invalid controller config: keyboard takes no keys, got {sorted(params)}")
        return KeyboardController(keymap, schema)
    if name in ("human", "gamepad"):
        from controllers.gamepad import CombinedController, GamepadConfig, GamepadController
        from controllers.keyboard import KeyboardController
        pad_cfg = typed(GamepadConfig, params, "controller")
        if name == "gamepad":
            return GamepadController(pad_cfg, schema, fallback=KeyboardController(keymap, schema))
        return CombinedController([KeyboardController(keymap, schema), GamepadController(pad_cfg, schema)],
                                  schema)
    if name == "explorer":
        from controllers.explorer import ExplorerConfig, ExplorerController
        return ExplorerController(typed(ExplorerConfig, params, "controller"), schema)
    if name == "random":
        import controllers.random_controller as rc
        cfg_cls = getattr(rc, "RandomConfig", None)
        if cfg_cls is not None:
            return rc.RandomController(typed(cfg_cls, params, "controller"), schema)
        return rc.RandomController()
    if name == "replay":
        from controllers.replay import ScriptedController
        path = params.get("path")
        if not path:
            raise ConfigError("controller=replay needs controller.path=<session dir or action file> "
                              "(or use replay=<session>)")
        if Path(path).is_dir():
            return ScriptedController.from_session(path, schema)
        return ScriptedController.from_file(path, schema)
    raise ConfigError(f"unknown controller {name!r} (human, keyboard, gamepad, explorer, random, replay)")


# ---------------------------------------------------------------------- recording / replay check
class ReplayCheck:
    """A recorder look-alike comparing every replayed frame with the recorded one."""

    path = None

    def __init__(self, recorded: np.ndarray, expected: int) -> None:
        self.recorded = recorded  # (N, H, W, 3)
        self.expected = expected
        self.compared = 0
        self.mismatches = 0

    def write(self, frame: np.ndarray, action: Action, t: float, tick: int) -> None:
        if tick >= len(self.recorded) or not np.array_equal(frame, self.recorded[tick]):
            self.mismatches += 1
        self.compared += 1

    def close(self) -> None:
        pass

    @property
    def equal(self) -> bool:
        return self.mismatches == 0 and self.compared == self.expected


class Tee:
    """Fans one frame stream out to several recorders; ``path`` is the first real session's."""

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts
        self.path = next((p.path for p in parts if getattr(p, "path", None) is not None), None)

    def write(self, frame: np.ndarray, action: Action, t: float, tick: int) -> None:
        for p in self.parts:
            p.write(frame, action, t, tick)

    def close(self) -> None:
        for p in self.parts:
            p.close()


def recorder_factory(cfg: PlayConfig, source: FrameSource, controller: Controller,
                     check: Optional[ReplayCheck]) -> Optional[Callable[[int], Recorder]]:
    if not cfg.record and check is None:
        return None
    calls = [0]

    def make(seed: int) -> Recorder:
        parts: list[Any] = []
        if check is not None and calls[0] == 0:  # only the replayed world, not worlds after a reset
            parts.append(check)
        calls[0] += 1
        if cfg.record:
            from engine.recorder import RecorderConfig, SessionWriter
            meta = {**source.describe(), "seed": seed, "controller": controller.name,
                    "target_fps": cfg.target_fps, "threaded": cfg.threaded}
            parts.append(SessionWriter(cfg.record_dir, meta, source.schema, tuple(source.resolution),
                                       # 0.8 s chunks: with the chunk being written in the background,
                                       # a kill -9 still loses under one second of play.
                                       RecorderConfig(fps=cfg.target_fps,
                                                      chunk_frames=max(1, int(cfg.target_fps * 0.8)))))
        return Tee(parts)

    return make


# ---------------------------------------------------------------------- main
def chosen_source(argv: list[str]) -> str:
    """The source group a command line selects: its ``source=`` override, else play.yaml's default."""
    for arg in reversed(argv):                 # hydra: the last override wins
        if arg.startswith("source="):
            return arg.split("=", 1)[1]
    import yaml
    defaults = yaml.safe_load((ROOT / "conf" / "play.yaml").read_text()).get("defaults", [])
    return next((d["source"] for d in defaults if isinstance(d, dict) and "source" in d), "classic")


def register_defaults() -> None:
    """Expose other components' dataclass defaults as hydra group configs (``*_defaults``).

    The group yamls list them under ``defaults:``, so every field is overridable
    from the command line and the defaults stay those of the dataclass itself.
    """
    from hydra.core.config_store import ConfigStore
    cs = ConfigStore.instance()
    wanted = [("source", "classic_defaults", "engine.classic_game", "ClassicConfig"),
              ("controller", "explorer_defaults", "controllers.explorer", "ExplorerConfig")]
    if chosen_source(sys.argv[1:]) == "neural":  # only then: importing it pulls in torch (~seconds)
        wanted.append(("source", "neural_defaults", "world_model.neural_world", "NeuralConfig"))
    else:  # neural.yaml still names it; empty, keys then need '+' on the command line
        cs.store(group="source", name="neural_defaults", node={})
    for group, name, module, cls_name in wanted:
        try:
            cls = getattr(importlib.import_module(module), cls_name)
        except (ImportError, AttributeError):
            continue  # the group yaml then fails with hydra's "could not find" error
        cs.store(group=group, name=name, node=dataclasses.asdict(cls()))


def run(root: DictConfig) -> dict[str, Any]:
    top = {k: v for k, v in OmegaConf.to_container(root, resolve=True).items()
           if k not in ("source", "controller", "sampler")}
    cfg = typed(PlayConfig, top, "play", prefix="")
    check: Optional[ReplayCheck] = None
    seed = cfg.seed
    if cfg.replay:
        from controllers.replay import ScriptedController, make_source_from_meta
        from engine.session import RecordingError, SessionReader
        reader = SessionReader(cfg.replay)
        seed = reader.meta.get("seed")
        if not isinstance(seed, int):
            raise RecordingError(f"{cfg.replay}: session meta has no integer seed, so it cannot be replayed")
        kind = reader.meta.get("source")
        if kind == "classic":
            source = make_source_from_meta(reader.meta, cfg.replay)
        else:  # e.g. neural: its config if selected, with the recorded checkpoint and sampler
            node = _params(root.source) if root.source.get("_name_") == kind else {}
            for key in ("checkpoint", "sampler"):
                if reader.meta.get(key) is not None:
                    node[key] = reader.meta[key]
            source = make_source(node, str(kind))
        source.schema.check_compatible(reader.schema, f"recording {cfg.replay}")
        controller: Controller = ScriptedController.from_reader(reader, source.schema)
        # every source is deterministic given its seed: compare the replay frame by frame
        recorded = reader.frames()
        expected = len(recorded) if not cfg.max_frames else min(len(recorded), cfg.max_frames + 1)
        check = ReplayCheck(recorded, expected)
    else:
        source = make_source(root.source)
    # The keymap is read against the schema of the world it will drive.
    keymap = load_keymap(_resolve_path(cfg.keymap), source.schema)
    if not cfg.replay:
        controller = build_controller(root.controller, keymap, source.schema)

    if cfg.threaded is None:
        cfg.threaded = source.describe().get("source") == "neural"
    loop_cfg = LoopConfig(target_fps=cfg.target_fps, max_frames=cfg.max_frames, headless=cfg.headless,
                          window_scale=cfg.window_scale, smooth=cfg.smooth, show_hud=cfg.show_hud,
                          pace=cfg.pace, threaded=cfg.threaded, seed=seed, queue_size=cfg.queue_size,
                          screenshot_dir=cfg.screenshot_dir)
    loop_cfg.validate()  # before a window opens
    h, w = source.resolution
    renderer = make_renderer(cfg.headless, (w * cfg.window_scale, h * cfg.window_scale), cfg.smooth,
                             title=f"dreamengine - {source.describe().get('source', '?')}")
    try:
        loop = GameLoop(source, controller, loop_cfg, RealClock(), renderer,
                        recorder_factory(cfg, source, controller, check), keymap=keymap)
        stats = loop.run()
    finally:
        renderer.close()
    out = {"frames": stats.frames, "produced": stats.produced, "seconds": round(stats.seconds, 3),
           "fps": round(stats.fps, 2), "frame_ms_p50": round(stats.frame_ms_p50, 3),
           "frame_ms_p95": round(stats.frame_ms_p95, 3), "late_frames": stats.late_frames,
           "session": stats.session, "source": source.describe().get("source"), "seed": seed,
           "controller": controller.name, "renderer": renderer.name, "threaded": cfg.threaded,
           "producer": stats.producer}
    desc = source.describe()
    if desc.get("checkpoint_id") is not None:       # which dream was played
        out["checkpoint_id"] = desc["checkpoint_id"]
        out["sampler"] = (desc.get("sampler") or {}).get("name")
    if len(stats.sessions) > 1:
        out["sessions"] = stats.sessions
    if check is not None:
        out["replay_equal"] = check.equal
        out["replay_compared"] = check.compared
    return out


@hydra.main(version_base="1.3", config_path="conf", config_name="play")
def main(root: DictConfig) -> None:
    try:
        out = run(root)
    except (*USER_ERRORS, pygame.error) as e:
        # SystemExit passes through hydra untouched (it only catches Exception).
        fail(e)
    except KeyboardInterrupt:
        sys.exit(130)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    register_defaults()
    run_hydra_main(main)
