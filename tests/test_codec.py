"""FrameCodec: shapes, dtypes, normalisation, frame conversion."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from world_model.codec import CodecConfig, FrameCodec, frames_to_tensor, tensor_to_frames


def test_default_size_and_shapes() -> None:
    codec = FrameCodec().eval()
    n = sum(p.numel() for p in codec.parameters())
    assert 0.5e6 < n < 1.5e6  # ~1M parameters at the default config
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = codec.encode(x)
        y = codec.decode(z)
    assert z.shape == (2, 16, 8, 8) == (2, *codec.latent_shape)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert y.abs().max() <= 1.0
    assert y.is_contiguous() and z.is_contiguous()


def test_small_config_and_bad_downsample() -> None:
    codec = FrameCodec(CodecConfig(resolution=32, latent_channels=4, downsample=4, base_channels=8))
    assert codec.encode_raw(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="downsample 6 must be a power of two"):
        FrameCodec(CodecConfig(downsample=6))


def test_latent_stats_normalise_and_invert() -> None:
    codec = FrameCodec(CodecConfig(resolution=16, latent_channels=4, downsample=4, base_channels=8)).eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        raw = codec.encode_raw(x)
        mean, std = raw.mean(dim=(0, 2, 3)), raw.std(dim=(0, 2, 3))
        codec.set_latent_stats(mean, std)
        z = codec.encode(x)
        torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(codec.decode(z), codec.decode_raw(raw), atol=1e-5, rtol=0)
    assert "latent_mean" in codec.state_dict() and "latent_std" in codec.state_dict()
    assert all(t.is_contiguous() for t in codec.state_dict().values())  # safetensors-ready


def test_frame_conversion_roundtrip() -> None:
    frames = np.random.default_rng(0).integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    t = frames_to_tensor(frames)
    assert t.shape == (2, 3, 8, 8) and t.dtype == torch.float32
    assert t.min() >= -1 and t.max() <= 1
    back = tensor_to_frames(t)
    assert back.dtype == np.uint8 and np.array_equal(back, frames)
    assert FrameCodec.tensor_to_frames(torch.full((1, 3, 2, 2), 5.0))[0, 0, 0].tolist() == [255] * 3
    with pytest.raises(ValueError, match="expected uint8 frames"):
        frames_to_tensor(frames.astype(np.float32))


def test_training_mode_gradients_flow() -> None:
    codec = FrameCodec(CodecConfig(resolution=16, latent_channels=4, downsample=4, base_channels=8)).train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    loss = (codec.decode_raw(codec.encode_raw(x)) - x).abs().mean()
    loss.backward()
    assert all(p.grad is not None for p in codec.parameters())
