"""world_model.codec_probe: a shift of whole latent cells is a shift of the picture only when the
picture moved by whole cells; the probe must see that difference."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from world_model.codec import frames_to_tensor, tensor_to_frames
from world_model.codec_probe import (
    centre_psnr,
    chains,
    main,
    probe,
    shift_latents,
    shift_pixels,
    turn_pairs,
)
from world_model.eval_metrics import PSNR_CAP


class BlockCodec:
    """A stand-in codec: 4 x 4 average pooling to encode, nearest upsampling to decode (exact on
    pictures made of 4 x 4 blocks)."""
    frames_to_tensor = staticmethod(frames_to_tensor)
    tensor_to_frames = staticmethod(tensor_to_frames)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 4)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(z, scale_factor=4, mode="nearest")


def _blocks(n: int) -> np.ndarray:
    """(n, 64, 64, 3) uint8 pictures of random 4 x 4 blocks."""
    small = np.random.default_rng(0).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    return small.repeat(4, axis=1).repeat(4, axis=2)


def test_shifts_move_content_and_repeat_edges() -> None:
    x = np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1).repeat(3, axis=3)
    assert shift_pixels(x, 2)[0, 0, :, 0].tolist() == [0, 0, 0, 1, 2, 3, 4, 5]
    z = torch.arange(4.0).view(1, 1, 1, 4)
    assert shift_latents(z, 1.0).flatten().tolist() == [0, 0, 1, 2]
    assert shift_latents(z, 0.5).flatten().tolist() == [0, 0.5, 1.5, 2.5]
    assert shift_latents(z, -1.0).flatten().tolist() == [1, 2, 3, 3]


def test_whole_cell_turns_are_latent_shifts_half_cell_turns_are_not() -> None:
    a = _blocks(6)
    whole = probe(BlockCodec(), a, shift_pixels(a, 4), max_shift_px=8)       # one 4-pixel cell
    assert whole["latent_grid"] == [16, 16] and whole["pixels_per_cell"] == 4
    assert whole["best_pixel_shift"] == whole["best_latent_shift_cells"] == PSNR_CAP   # exact: MSE ~0
    assert whole["latent_shift_share"] == pytest.approx(1.0, abs=1e-6)
    half = probe(BlockCodec(), a, shift_pixels(a, 2), max_shift_px=8)        # half a cell
    assert half["best_pixel_shift"] == PSNR_CAP                               # the picture did shift
    assert half["best_latent_shift_quarter_cells"] < 40 and half["latent_shift_share"] < 0.5
    assert half["copy_last"] < half["best_latent_shift_quarter_cells"]       # interpolation still helps


def test_turn_pairs_and_centre_crop() -> None:
    frames = _blocks(5)
    frames[3] = frames[2]                                                     # a turn that changed nothing
    u = np.zeros((5, 4), np.float32)
    u[[1, 3, 4], 2] = [1.0, 1.0, -0.95]
    u[4, 0] = 0.5                                                             # walking too: not pure
    assert turn_pairs(frames, u) == [0]
    c = centre_psnr(BlockCodec(), frames)
    assert c["frames"] == 5 and c["full"] == c["centre16"] == PSNR_CAP        # exact on block pictures


def test_chains_separate_round_trips_from_rotation() -> None:
    """An idempotent codec (block means, then nearest upsampling) loses its one round trip and no
    more; rotating the picture tick by tick follows the game's turn at first (better than holding
    the first frame) and loses to the turn as the entering strip grows."""
    from engine.classic_game import ClassicConfig

    out = chains(BlockCodec(), ClassicConfig(), [100000, 100001], frames=8)
    assert out["ticks"] == [1, 2, 4, 8] and out["worlds"] == 2
    trips = out["round_trips"]
    assert trips[0] < 40 and trips == pytest.approx([trips[0]] * 4, abs=1e-6)
    rot, copy = out["rotation"], out["copy"]
    assert rot[0] > copy[0] + 3 and rot[0] > rot[-1]
    assert out["rotation_round_trips"][0] < rot[0]                           # the round trip costs


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["heldout=" + str(tmp_path)]) == 2
    assert "codec=PATH" in capsys.readouterr().err
    assert main(["codec=x", f"heldout={tmp_path / 'missing'}"]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["codec=x", "pairs=0"]) == 2
    assert main(["codec=x", "chain_frames=0"]) == 2


def test_end_to_end_on_a_recorded_session(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from engine.datagen import record_explorer_session
    from tests.test_neural_world import _save

    ck = _save(tmp_path / "ck")                                               # tiny random codec, 8 x 8 latents
    record_explorer_session(tmp_path / "heldout", 100000, 300)
    assert main([f"codec={ck}", f"heldout={tmp_path / 'heldout'}", "pairs=20", "chain_worlds=1",
                 "chain_frames=4"]) == 0
    out = json.loads(capsys.readouterr().out)
    t = out["turns"]
    assert 0 < t["pairs"] <= 20 and t["latent_grid"] == [8, 8] and t["pixels_per_cell"] == 8
    assert t["best_pixel_shift"] > t["copy_last"]                             # a turn is nearly a shift
    assert out["corridor_ends"]["frames"] > 0 and out["codec_id"]
    assert out["chains"]["ticks"] == [1, 2, 4] and len(out["chains"]["rotation_round_trips"]) == 3
