"""Putting frames on screen: GLRenderer (moderngl), BlitRenderer (pygame), NullRenderer.

All renderers share ``present(frame, hud)``, ``set_smooth``, ``handle_events``
(window resizes), ``read_pixels`` and ``close``. ``make_renderer`` picks the
best one available: an OpenGL window, else a software window (with a one-line
warning), else a DisplayError; headless: an EGL offscreen framebuffer, else nothing.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Protocol

import numpy as np
import pygame

from engine.hud import Hud

VERTEX_SHADER = """
#version 330
in vec2 in_pos;       // unit-quad corner, (0,0) bottom-left .. (1,1) top-right
uniform vec4 u_rect;  // x0, y0, x1, y1 in normalised device coordinates
out vec2 v_uv;
void main() {
    gl_Position = vec4(mix(u_rect.xy, u_rect.zw, in_pos), 0.0, 1.0);
    // Images are uploaded row 0 first (= texture v 0) but row 0 is the top: flip v.
    v_uv = vec2(in_pos.x, 1.0 - in_pos.y);
}
"""
FRAGMENT_SHADER = """
#version 330
uniform sampler2D u_tex;
in vec2 v_uv;
out vec4 f_color;
void main() { f_color = texture(u_tex, v_uv); }
"""


class DisplayError(RuntimeError):
    """No way to open a window (one line, suggests headless=true)."""


def letterbox(frame_hw: tuple[int, int], window_wh: tuple[int, int]) -> tuple[int, int, int, int]:
    """Largest aspect-correct rect (x, y, w, h) for a frame inside a window, centred; y from the top."""
    fh, fw = frame_hw
    ww, wh = window_wh
    scale = min(ww / fw, wh / fh)
    w, h = max(1, round(fw * scale)), max(1, round(fh * scale))
    return (ww - w) // 2, (wh - h) // 2, w, h


class Renderer(Protocol):
    name: str

    def present(self, frame: np.ndarray, hud: Optional[Hud] = None) -> None: ...
    def set_smooth(self, smooth: bool) -> None: ...
    def handle_events(self, events: Iterable[Any]) -> None: ...
    def read_pixels(self) -> Optional[np.ndarray]: ...
    def close(self) -> None: ...


class GLRenderer:
    """One reused texture, one fullscreen quad, letterboxed; the HUD as a second blended quad.

    Use :meth:`window` for a pygame OPENGL window or :meth:`offscreen` for a
    standalone EGL context drawing into its own framebuffer (headless, tests).
    """

    name = "gl"

    def __init__(self, ctx: Any, size: tuple[int, int], smooth: bool = False,
                 windowed: bool = False) -> None:
        import moderngl
        self._mgl = moderngl
        self.ctx = ctx
        self.size = (int(size[0]), int(size[1]))  # window (width, height)
        self.windowed = windowed
        self.smooth = smooth
        self.prog = ctx.program(vertex_shader=VERTEX_SHADER, fragment_shader=FRAGMENT_SHADER)
        quad = np.array([0, 0, 1, 0, 0, 1, 1, 1], np.float32)
        self._vbo = ctx.buffer(quad.tobytes())
        self._vao = ctx.vertex_array(self.prog, [(self._vbo, "2f", "in_pos")])
        self._tex: Any = None
        self._hud_tex: Any = None
        self._hud_version = -1
        self._fbo: Any = None
        self._rb: Any = None
        self.pixel_ratio = 1.0
        if windowed:
            self._fbo = ctx.detect_framebuffer()
            # HiDPI: the drawable can have more pixels than the window has points.
            dw = self._fbo.viewport[2]
            if dw > 0 and dw != self.size[0]:
                self.pixel_ratio = dw / self.size[0]
                self.size = (dw, self._fbo.viewport[3])
        else:
            self._make_offscreen_fbo()

    @classmethod
    def window(cls, size: tuple[int, int], smooth: bool = False, title: str = "dreamengine") -> "GLRenderer":
        """Open a resizable pygame OpenGL 3.3 window (raises pygame.error / moderngl.Error)."""
        import moderngl
        pygame.display.init()
        pygame.display.gl_set_attribute(pygame.GL_CONTEXT_MAJOR_VERSION, 3)
        pygame.display.gl_set_attribute(pygame.GL_CONTEXT_MINOR_VERSION, 3)
        pygame.display.gl_set_attribute(pygame.GL_CONTEXT_PROFILE_MASK, pygame.GL_CONTEXT_PROFILE_CORE)
        if sys.platform == "darwin":  # macOS only grants 3.3 core to forward-compatible contexts
            pygame.display.gl_set_attribute(pygame.GL_CONTEXT_FORWARD_COMPATIBLE_FLAG, True)
        pygame.display.set_mode(size, pygame.OPENGL | pygame.DOUBLEBUF | pygame.RESIZABLE)
        pygame.display.set_caption(title)
        ctx = moderngl.create_context(require=330)
        return cls(ctx, size, smooth, windowed=True)

    @classmethod
    def offscreen(cls, size: tuple[int, int], smooth: bool = False) -> "GLRenderer":
        """A standalone EGL context rendering into an offscreen framebuffer."""
        import moderngl
        ctx = moderngl.create_standalone_context(require=330, backend="egl")
        return cls(ctx, size, smooth, windowed=False)

    def _make_offscreen_fbo(self) -> None:
        if self._fbo is not None:
            self._fbo.release()
            self._rb.release()
        self._rb = self.ctx.renderbuffer(self.size, 3)
        self._fbo = self.ctx.framebuffer(color_attachments=[self._rb])

    def _filter(self) -> tuple[int, int]:
        f = self._mgl.LINEAR if self.smooth else self._mgl.NEAREST
        return f, f

    def set_smooth(self, smooth: bool) -> None:
        self.smooth = smooth
        if self._tex is not None:
            self._tex.filter = self._filter()

    def resize(self, width: int, height: int) -> None:
        """New window size in points (VIDEORESIZE); the framebuffer follows in pixels."""
        r = self.pixel_ratio
        self.size = (max(1, round(width * r)), max(1, round(height * r)))
        if not self.windowed:
            self._make_offscreen_fbo()

    def handle_events(self, events: Iterable[Any]) -> None:
        for e in events:
            if e.type == pygame.VIDEORESIZE:
                self.resize(e.w, e.h)

    def _upload(self, frame: np.ndarray) -> None:
        h, w = frame.shape[:2]
        if self._tex is None or self._tex.size != (w, h):
            if self._tex is not None:
                self._tex.release()
            # alignment=1: rows of w*3 bytes are not 4-byte aligned for most widths.
            self._tex = self.ctx.texture((w, h), 3, alignment=1)
            self._tex.filter = self._filter()
            self._tex.repeat_x = self._tex.repeat_y = False
        self._tex.write(np.ascontiguousarray(frame, np.uint8))

    def _upload_hud(self, hud: Hud) -> bool:
        if hud.version != self._hud_version:
            img = hud.rgba()
            if img is None:
                return False
            h, w = img.shape[:2]
            if self._hud_tex is None or self._hud_tex.size != (w, h):
                if self._hud_tex is not None:
                    self._hud_tex.release()
                self._hud_tex = self.ctx.texture((w, h), 4)
                self._hud_tex.filter = (self._mgl.NEAREST, self._mgl.NEAREST)
            self._hud_tex.write(img)
            self._hud_version = hud.version
        return self._hud_tex is not None

    def present(self, frame: np.ndarray, hud: Optional[Hud] = None) -> None:
        ww, wh = self.size
        self._fbo.use()
        self.ctx.viewport = (0, 0, ww, wh)
        self.ctx.clear(0.0, 0.0, 0.0)
        self._upload(frame)
        x, y_top, w, h = letterbox(frame.shape[:2], self.size)
        self.ctx.viewport = (x, wh - y_top - h, w, h)  # GL's y grows upwards
        self.prog["u_rect"].value = (-1.0, -1.0, 1.0, 1.0)
        self._tex.use(0)
        self._vao.render(self._mgl.TRIANGLE_STRIP)
        if hud is not None and hud.visible and self._upload_hud(hud):
            hw, hh = self._hud_tex.size
            self.ctx.viewport = (0, 0, ww, wh)
            self.ctx.enable(self._mgl.BLEND)
            self.ctx.blend_func = self._mgl.SRC_ALPHA, self._mgl.ONE_MINUS_SRC_ALPHA
            self.prog["u_rect"].value = (-1.0, 1.0 - 2.0 * hh / wh, -1.0 + 2.0 * hw / ww, 1.0)
            self._hud_tex.use(0)
            self._vao.render(self._mgl.TRIANGLE_STRIP)
            self.ctx.disable(self._mgl.BLEND)
        if self.windowed:
            pygame.display.flip()

    def read_pixels(self) -> np.ndarray:
        """The framebuffer as (h, w, 3) uint8, row 0 at the top."""
        ww, wh = self.size
        data = self._fbo.read(viewport=(0, 0, ww, wh), components=3, alignment=1)
        return np.frombuffer(data, np.uint8).reshape(wh, ww, 3)[::-1].copy()

    def close(self) -> None:
        for obj in (self._tex, self._hud_tex, self._vao, self._vbo, self.prog):
            if obj is not None:
                obj.release()
        if not self.windowed:
            self._fbo.release()
            self._rb.release()
            self.ctx.release()
        self._tex = self._hud_tex = None


class BlitRenderer:
    """Software fallback: pygame.transform.scale (or smoothscale) into a plain window surface."""

    name = "blit"

    def __init__(self, size: tuple[int, int], smooth: bool = False, title: str = "dreamengine") -> None:
        pygame.display.init()
        self.screen = pygame.display.set_mode(size, pygame.RESIZABLE)
        pygame.display.set_caption(title)
        self.smooth = smooth

    def set_smooth(self, smooth: bool) -> None:
        self.smooth = smooth

    def handle_events(self, events: Iterable[Any]) -> None:
        # pygame 2 resizes the window surface itself; present() re-reads its size.
        pass

    def present(self, frame: np.ndarray, hud: Optional[Hud] = None) -> None:
        screen = pygame.display.get_surface()
        h, w = frame.shape[:2]
        img = pygame.image.frombuffer(np.ascontiguousarray(frame, np.uint8).tobytes(), (w, h), "RGB")
        x, y, sw, sh = letterbox((h, w), screen.get_size())
        scale = pygame.transform.smoothscale if self.smooth else pygame.transform.scale
        screen.fill((0, 0, 0))
        screen.blit(scale(img, (sw, sh)), (x, y))
        surf = hud.surface() if hud is not None else None
        if surf is not None:
            screen.blit(surf, (0, 0))
        pygame.display.flip()

    def read_pixels(self) -> np.ndarray:
        return pygame.surfarray.array3d(pygame.display.get_surface()).transpose(1, 0, 2).copy()

    def close(self) -> None:
        pygame.display.quit()


class NullRenderer:
    """Shows nothing (headless without EGL)."""

    name = "null"

    def present(self, frame: np.ndarray, hud: Optional[Hud] = None) -> None:
        pass

    def set_smooth(self, smooth: bool) -> None:
        pass

    def handle_events(self, events: Iterable[Any]) -> None:
        pass

    def read_pixels(self) -> Optional[np.ndarray]:
        return None

    def close(self) -> None:
        pass


def _reason(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def make_renderer(headless: bool, size: tuple[int, int], smooth: bool = False,
                  title: str = "dreamengine") -> Renderer:
    """Best available renderer; raises DisplayError when a window was wanted and none opens."""
    if headless:
        try:
            return GLRenderer.offscreen(size, smooth)
        except Exception:  # no EGL / no GL 3.3: headless runs fine without pixels on screen
            return NullRenderer()
    try:
        pygame.display.init()
    except pygame.error as e:
        raise DisplayError(f"cannot open a window ({_reason(e)}); run with headless=true") from None
    driver = pygame.display.get_driver()
    if driver in ("offscreen", "dummy") and not os.environ.get("SDL_VIDEODRIVER"):
        # SDL >= 2.26 silently falls back to an invisible driver when no display exists.
        pygame.display.quit()
        raise DisplayError(f"no display found (SDL fell back to its '{driver}' video driver); "
                           "run with headless=true")
    try:
        return GLRenderer.window(size, smooth, title)
    except Exception as e:
        print(f"warning: OpenGL unavailable ({_reason(e)}); falling back to software blit",
              file=sys.stderr)
    try:
        return BlitRenderer(size, smooth, title)
    except Exception as e:
        raise DisplayError(f"cannot open a window ({_reason(e)}); run with headless=true") from None


def save_screenshot(frame: np.ndarray, directory: str | os.PathLike[str], scale: int = 8,
                    tag: str = "") -> tuple[Path, Path]:
    """Save the frame as PNG twice: raw and upscaled ``scale``x with nearest neighbour."""
    from PIL import Image
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    stem = time.strftime("shot-%Y%m%d-%H%M%S") + (f"-{tag}" if tag else "")
    n = 0
    while (d / f"{stem}{'-' + str(n) if n else ''}.png").exists():
        n += 1
    stem = f"{stem}{'-' + str(n) if n else ''}"
    raw, big = d / f"{stem}.png", d / f"{stem}-x{scale}.png"
    frame = np.ascontiguousarray(frame, np.uint8)
    Image.fromarray(frame).save(raw)
    Image.fromarray(frame.repeat(scale, axis=0).repeat(scale, axis=1)).save(big)
    return raw, big
