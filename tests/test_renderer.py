"""Renderers read back pixel-exact: GL (EGL offscreen) and software blit; HUD caching; screenshots."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pygame
import pytest
from PIL import Image

from engine.hud import Hud, HudConfig, HudState
from engine.renderer import BlitRenderer, GLRenderer, letterbox, make_renderer, save_screenshot


def _egl_ok() -> str:
    try:
        import moderngl
        moderngl.create_standalone_context(require=330, backend="egl").release()
        return ""
    except Exception as e:  # any failure means: no EGL here
        return str(e).splitlines()[0] if str(e) else type(e).__name__


EGL_REASON = _egl_ok()
needs_egl = pytest.mark.skipif(bool(EGL_REASON), reason=f"no EGL OpenGL 3.3 context: {EGL_REASON}")

FRAME = np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8)


def up(frame: np.ndarray, k: int) -> np.ndarray:
    return np.kron(frame, np.ones((k, k, 1), np.uint8))


def test_letterbox_math() -> None:
    assert letterbox((8, 8), (64, 64)) == (0, 0, 64, 64)
    assert letterbox((8, 8), (128, 64)) == (32, 0, 64, 64)     # pillarbox
    assert letterbox((64, 128), (100, 100)) == (0, 25, 100, 50)  # letterbox


@pytest.fixture
def gl() -> GLRenderer:
    r = GLRenderer.offscreen((64, 64))
    yield r
    r.close()


@pytest.mark.gl
@needs_egl
def test_gl_nearest_upscale_is_exact_and_texture_reused(gl: GLRenderer) -> None:
    gl.present(FRAME)
    assert np.array_equal(gl.read_pixels(), up(FRAME, 8))
    tex = gl._tex
    other = FRAME[::-1].copy()
    gl.present(other)
    assert gl._tex is tex                                   # written in place, not re-created
    assert np.array_equal(gl.read_pixels(), up(other, 8))


@pytest.mark.gl
@needs_egl
def test_gl_letterbox_non_square_window_via_resize_event(gl: GLRenderer) -> None:
    gl.handle_events([pygame.event.Event(pygame.VIDEORESIZE, w=128, h=64, size=(128, 64))])
    gl.present(FRAME)
    px = gl.read_pixels()
    assert px.shape == (64, 128, 3)
    assert not px[:, :32].any() and not px[:, 96:].any()    # black bars left and right
    assert np.array_equal(px[:, 32:96], up(FRAME, 8))
    gl.resize(40, 120)                                      # tall window: bars top and bottom
    gl.present(FRAME)
    px = gl.read_pixels()
    assert not px[:40].any() and not px[80:].any()
    assert np.array_equal(px[40:80], up(FRAME, 5))


@pytest.mark.gl
@needs_egl
def test_gl_smooth_toggle_interpolates(gl: GLRenderer) -> None:
    frame = np.zeros((8, 8, 3), np.uint8)
    frame[:, 4:] = 255
    gl.set_smooth(True)
    gl.present(frame)
    row = gl.read_pixels()[32, :, 0]
    assert 0 < row[31] < 255 or 0 < row[32] < 255           # a ramp across the edge
    gl.set_smooth(False)
    gl.present(frame)
    row = gl.read_pixels()[32, :, 0]
    assert set(row.tolist()) == {0, 255}


@pytest.mark.gl
@needs_egl
def test_gl_hud_quad_drawn_top_left_and_toggles(gl: GLRenderer) -> None:
    gl.resize(256, 256)
    black = np.zeros((8, 8, 3), np.uint8)
    hud = Hud()
    hud.update(HudState(fps=30.0, recording=True), now=0.0)
    gl.present(black, hud)
    px = gl.read_pixels()
    top_left, bottom_right = px[:60, :150], px[200:, 150:]
    assert top_left.max() > 150 and not bottom_right.any()
    assert (top_left[..., 0].astype(int) - top_left[..., 1] > 100).any()  # the red REC
    hud.toggle()
    gl.present(black, hud)
    assert not gl.read_pixels().any()


def test_hud_rerenders_only_on_change_at_most_refresh_hz() -> None:
    hud = Hud(HudConfig(refresh_hz=4.0))
    assert hud.update(HudState(fps=30.0), now=0.0)
    assert not hud.update(HudState(fps=30.0), now=0.01)                 # unchanged
    assert not hud.update(HudState(fps=29.0), now=0.1)                  # numbers: wait for 0.25 s
    assert hud.update(HudState(fps=29.0, paused=True), now=0.12)        # PAUSED shows at once
    assert hud.update(HudState(fps=28.0, paused=True), now=0.4)
    assert hud.renders == 3 and hud.version == 3
    assert [t for t, _ in Hud.lines(HudState(action="fwd", recording=True, paused=True))][1:] == \
        ["fwd", "REC", "PAUSED"]
    hud.toggle()
    assert hud.rgba() is None and not hud.update(HudState(fps=1.0), now=9.0)


def test_blit_renderer_scales_and_letterboxes(pygame_events: None) -> None:
    r = BlitRenderer((96, 64))
    r.present(FRAME)
    px = r.read_pixels()
    assert px.shape == (64, 96, 3)
    assert not px[:, :16].any() and not px[:, 80:].any()
    assert np.array_equal(px[:, 16:80], up(FRAME, 8))


def test_make_renderer_headless_never_opens_a_window() -> None:
    r = make_renderer(headless=True, size=(64, 64))
    try:
        assert r.name == ("null" if EGL_REASON else "gl")
        r.present(FRAME)
    finally:
        r.close()


def test_window_without_display_suggests_headless(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.renderer import DisplayError
    pygame.display.quit()
    monkeypatch.setenv("SDL_VIDEODRIVER", "x11")
    monkeypatch.delenv("DISPLAY", raising=False)
    with pytest.raises(DisplayError, match="headless=true"):
        make_renderer(headless=False, size=(64, 64))


def test_screenshot_saves_raw_and_upscaled(tmp_path: Path) -> None:
    raw, big = save_screenshot(FRAME, tmp_path / "shots", scale=4, tag="t1")
    raw2, _ = save_screenshot(FRAME, tmp_path / "shots", scale=4, tag="t1")
    assert raw2 != raw                                          # never overwrites
    assert np.array_equal(np.asarray(Image.open(raw)), FRAME)
    assert np.array_equal(np.asarray(Image.open(big)), up(FRAME, 4))
