"""SessionReader robustness, mp4 export, CLI, ScriptedController and classic replay equality."""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("SDL_AUDIODRIVER", "dummy")

import numpy as np
import pytest

from controllers.base import TickInput
from controllers.replay import ScriptedController, replay_session
from engine.actions import DEFAULT_SCHEMA, Action, ActionSchema, SchemaMismatchError
from engine.recorder import RecorderConfig, SessionWriter
from engine.session import RecordingError, SessionReader, export_mp4, list_sessions, main
from tests.test_recorder import H, W, fake_action, fake_frame, record


@pytest.fixture
def session(tmp_path: Path) -> Path:
    return record(tmp_path, 100, RecorderConfig(chunk_frames=30)).path  # chunks of 30,30,30,10


def test_truncated_final_chunk_and_stray_tmp_are_skipped(session: Path) -> None:
    last = session / "chunk_000003.npz"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # torn write
    (session / "chunk_000004.npz.tmp").write_bytes(b"partial")
    r = SessionReader(session)
    assert len(r) == 90 and r.closed and r.expected_frames == 100
    assert sorted(r.skipped) == ["chunk_000003.npz", "chunk_000004.npz.tmp"]
    assert "unreadable" in r.skip_reasons["chunk_000003.npz"]
    assert np.array_equal(r.frames(), np.stack([fake_frame(i) for i in range(90)]))


def test_reader_stops_at_first_gap(session: Path) -> None:
    (session / "chunk_000001.npz").unlink()
    r = SessionReader(session)
    assert len(r) == 30 and r.skipped == ["chunk_000002.npz", "chunk_000003.npz"]
    assert "missing chunk_000001.npz" in r.skip_reasons["chunk_000002.npz"]


def test_chunk_with_wrong_arrays_is_skipped(session: Path) -> None:
    np.savez(session / "chunk_000002.npz", frames=np.zeros((30, H, W, 3), np.float32),
             actions=np.zeros((30, 10), np.float32), t=np.zeros(30), tick=np.zeros(30, np.int64))
    r = SessionReader(session)
    assert len(r) == 60 and r.skipped == ["chunk_000002.npz", "chunk_000003.npz"]
    assert "bad arrays" in r.skip_reasons["chunk_000002.npz"]


@pytest.mark.parametrize("content", ['{"format": "dreamengine.session", ', "[1, 2]", '{"a": 1}',
                                     None])
def test_bad_meta_is_a_one_line_recording_error(session: Path, content: str | None) -> None:
    if content is None:
        (session / "meta.json").unlink()
    else:
        (session / "meta.json").write_text(content)
    with pytest.raises(RecordingError) as e:
        SessionReader(session)
    assert str(session) in str(e.value) and "\n" not in str(e.value)


def test_meta_with_bad_resolution_is_rejected(session: Path) -> None:
    meta = json.loads((session / "meta.json").read_text())
    meta["resolution"] = [16]
    (session / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(RecordingError, match="resolution"):
        SessionReader(session)


def test_schema_mismatch_is_readable(session: Path) -> None:
    other = ActionSchema(name="maze-actions", version=2, axes=("move", "turn"))
    with pytest.raises(SchemaMismatchError) as e:
        SessionReader(session, other)
    msg = str(e.value)
    assert str(session) in msg and "v1" in msg and "v2" in msg and "\n" not in msg
    with pytest.raises(SchemaMismatchError):
        ScriptedController.from_session(session, other)


def test_list_sessions(tmp_path: Path) -> None:
    a = record(tmp_path, 3, RecorderConfig(), name="a").path
    b = record(tmp_path, 3, RecorderConfig(), name="b").path
    (tmp_path / "not_a_session").mkdir()
    assert list_sessions(tmp_path) == [a, b]
    with pytest.raises(RecordingError):
        list_sessions(tmp_path / "missing")


def test_export_mp4_decodes_with_right_frame_count(session: Path, tmp_path: Path) -> None:
    import av

    out = tmp_path / "out.mp4"
    assert export_mp4(session, out, fps=30, scale=4) == 100
    with av.open(str(out)) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(decoded) == 100 and decoded[0].shape == (H * 4, W * 4, 3)
    # Lossy codec, but nearest-upscaled content must still match the recording closely.
    want = np.repeat(np.repeat(fake_frame(50), 4, 0), 4, 1).astype(np.int16)
    assert np.abs(decoded[50].astype(np.int16) - want).mean() < 12


def test_cli_info_and_errors(session: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(session)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["frames"] == 100 and info["closed"] and info["meta"]["seed"] == 7
    assert main(["info", str(session / "nope")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_scripted_controller_from_session_alignment(session: Path) -> None:
    ctrl = ScriptedController.from_session(session, DEFAULT_SCHEMA)
    assert len(ctrl) == 99 and not ctrl.finished()
    got = np.stack([ctrl.act(TickInput(tick=i)).to_vector() for i in range(1, 100)])
    assert ctrl.finished()
    # step i gets the action recorded with frame i (frame 0's no-op is not replayed)
    assert np.array_equal(got, np.stack([fake_action(i).to_vector() for i in range(1, 100)]))
    assert ctrl.act(TickInput()).is_noop()
    ctrl.reset(0)
    assert not ctrl.finished()
    assert np.array_equal(ctrl.act(TickInput()).to_vector(), fake_action(1).to_vector())


def test_from_session_refuses_non_replayable_ticks(tmp_path: Path) -> None:
    w = SessionWriter(tmp_path, {}, DEFAULT_SCHEMA, (H, W), name="mid")
    for i in range(5):
        w.write(fake_frame(i), fake_action(i), i / 30, 100 + i)  # recording began mid-game
    w.close()
    with pytest.raises(RecordingError, match="ticks"):
        ScriptedController.from_session(w.path)


def test_action_files(tmp_path: Path) -> None:
    vecs = np.stack([fake_action(i).to_vector() for i in range(1, 6)])
    np.save(tmp_path / "a.npy", vecs)
    c = ScriptedController.from_file(tmp_path / "a.npy")
    assert np.array_equal(np.stack([c.act(TickInput()).to_vector() for _ in range(5)]), vecs)
    assert c.finished()

    (tmp_path / "a.jsonl").write_text(
        '{"buttons": ["forward", "run"]}\n\n{"axes": {"turn": -0.5}}\n{}\n')
    c = ScriptedController.from_file(tmp_path / "a.jsonl")
    got = [c.act(TickInput()).to_vector() for _ in range(3)]
    want = [Action.make(["forward", "run"]), Action.make(turn=-0.5), DEFAULT_SCHEMA.noop()]
    assert all(np.array_equal(g, w.to_vector()) for g, w in zip(got, want)) and c.finished()

    np.save(tmp_path / "wide.npy", np.zeros((4, 11), np.float32))
    with pytest.raises(SchemaMismatchError, match=r"needs \(N, 10\)"):
        ScriptedController.from_file(tmp_path / "wide.npy")
    (tmp_path / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    (tmp_path / "bad.jsonl").write_text('{"buttons": ["forward"]}\n{"buttons": ["jump"]}\n')
    (tmp_path / "syntax.jsonl").write_text("{not json\n")
    for name, pat in [("broken.npy", "unreadable"), ("bad.jsonl", r"bad\.jsonl:2: .*jump"),
                      ("syntax.jsonl", r"syntax\.jsonl:1:"), ("missing.npy", "no such"),
                      ("a.txt", "unknown action file type")]:
        if name == "a.txt":
            (tmp_path / name).write_text("x")
        with pytest.raises(RecordingError, match=pat) as e:
            ScriptedController.from_file(tmp_path / name)
        assert "\n" not in str(e.value)


def test_replay_refuses_non_classic_source(session: Path) -> None:
    with pytest.raises(RecordingError, match="cannot rebuild source 'fake'"):
        replay_session(session)


def test_classic_replay_is_bit_exact(tmp_path: Path) -> None:
    """An explorer-driven classic session, replayed from its actions, reproduces every frame."""
    import controllers.explorer as explorer
    import engine.classic_game as classic
    from engine.datagen import record_explorer_session

    path = record_explorer_session(tmp_path, seed=11, frames=150,
                                   classic_cfg=classic.ClassicConfig(),
                                   explorer_cfg=explorer.ExplorerConfig(), name="replay")["path"]
    recorded = SessionReader(path).frames()
    assert recorded.shape == (150, 64, 64, 3)
    assert len(np.unique(recorded.reshape(150, -1), axis=0)) > 30  # the explorer really moved

    # Explicitly: a fresh game + ScriptedController.from_session, until the script ends.
    ctrl = ScriptedController.from_session(path, DEFAULT_SCHEMA)
    game = classic.ClassicGame(classic.ClassicConfig())
    frames = [game.reset(11)]
    while not ctrl.finished():
        frames.append(game.step(ctrl.act(TickInput(tick=len(frames) - 1))))
    assert np.array_equal(np.stack(frames), recorded)

    replayed, rec2 = replay_session(path)  # the helper rebuilds game + seed from meta.json
    assert np.array_equal(replayed, rec2) and np.array_equal(rec2, recorded)

    # The alignment matters: feeding frame i's action at step i+1 does not reproduce the run.
    shifted = ScriptedController(SessionReader(path).actions()[:-1], DEFAULT_SCHEMA)
    game.reset(11)
    off = np.stack([game.step(shifted.act(TickInput())) for _ in range(149)])
    assert not np.array_equal(off, recorded[1:])
