"""Synthetic media of known properties, and checks of what was decoded.

- `PatternVideo`: a video track of a chosen size, frame rate and colour (a constant U/V chroma
  with a moving luma bar, so the encoder has motion to code; or luma noise, for a realistic
  bitrate). `resize()` changes the size on the
  next frame; aiortc's encoders restart on a new size, so the change arrives on a keyframe.
- `ToneAudio`: a sine tone at a chosen frequency, 48 kHz mono, 20 ms frames.
- `chroma_of(frame)` and `tone_of(frame)` read back what a decoded frame carries, so a receiver can
  tell whose media it got: every sender in a test uses its own colour and tone.
"""

from __future__ import annotations

import asyncio
import fractions
import time

import av
import numpy as np
from aiortc.mediastreams import MediaStreamTrack

VIDEO_CLOCK = 90_000
AUDIO_RATE = 48_000
AUDIO_SAMPLES = 960  # 20 ms


class PatternVideo(MediaStreamTrack):
    kind = "video"

    def __init__(self, width: int, height: int, fps: float = 15, chroma=(90, 200),
                 texture: bool = False):
        """`texture`: luma noise that changes every frame, so the encoder spends its whole
        bitrate, as with a camera (a plain pattern codes to a few packets a second)."""
        super().__init__()
        self.fps = fps
        self.texture = texture
        self.chroma = chroma
        self.sent = 0
        self.sizes_sent: list[tuple[float, int, int]] = []  # (time of first frame, w, h)
        self._start = None
        self._resize(width, height)

    def _resize(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        u, v = self.chroma
        base = np.empty((height * 3 // 2, width), np.uint8)
        base[:height] = 100
        base[height:height + height // 4] = u
        base[height + height // 4:] = v
        self._base = base
        if self.texture:
            rng = np.random.default_rng(width * height)
            self._noise = [rng.integers(40, 200, (height, width), np.uint8) for _ in range(6)]

    def resize(self, width: int, height: int) -> None:
        self._pending = (width, height)

    async def recv(self) -> av.VideoFrame:
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self.sent / self.fps
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        pending = getattr(self, "_pending", None)
        if pending:
            self._pending = None
            self._resize(*pending)
        if not self.sizes_sent or self.sizes_sent[-1][1:] != (self.width, self.height):
            self.sizes_sent.append((time.time(), self.width, self.height))
        img = self._base.copy()
        if self.texture:
            img[: self.height] = self._noise[self.sent % len(self._noise)]
        bar = (self.sent * 8) % max(1, self.width - 16)
        img[: self.height, bar:bar + 16] = 235
        frame = av.VideoFrame.from_ndarray(img, format="yuv420p")
        frame.pts = int(self.sent * VIDEO_CLOCK / self.fps)
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        self.sent += 1
        return frame


class ToneAudio(MediaStreamTrack):
    kind = "audio"

    def __init__(self, hz: float = 440.0, amplitude: float = 0.3):
        super().__init__()
        self.hz = hz
        self.amplitude = amplitude
        self.sent = 0
        self._start = None

    async def recv(self) -> av.AudioFrame:
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self.sent * AUDIO_SAMPLES / AUDIO_RATE
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        n0 = self.sent * AUDIO_SAMPLES
        t = (np.arange(n0, n0 + AUDIO_SAMPLES) / AUDIO_RATE).astype(np.float64)
        pcm = (self.amplitude * 32767 * np.sin(2 * np.pi * self.hz * t)).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts = n0
        frame.time_base = fractions.Fraction(1, AUDIO_RATE)
        self.sent += 1
        return frame


def chroma_of(frame: av.VideoFrame) -> tuple[float, float]:
    """Mean U and V of a decoded frame."""
    yuv = frame.to_ndarray(format="yuv420p")
    h = frame.height
    u = yuv[h:h + h // 4]
    v = yuv[h + h // 4:]
    return float(u.mean()), float(v.mean())


def tone_of(frames: list[av.AudioFrame]) -> tuple[float, float]:
    """The dominant frequency (Hz) and RMS (of full scale) of decoded audio frames, first channel."""
    chunks = []
    rate = AUDIO_RATE
    for f in frames:
        a = f.to_ndarray()
        rate = f.sample_rate
        channels = len(f.layout.channels)
        ch0 = a[0] if f.format.is_planar else a[0][::channels]
        chunks.append(ch0.astype(np.float64))
    x = np.concatenate(chunks) / 32768.0
    rms = float(np.sqrt(np.mean(x * x)))
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    freqs = np.fft.rfftfreq(len(x), 1 / rate)
    return float(freqs[int(np.argmax(spectrum[1:]) + 1)]), rms
