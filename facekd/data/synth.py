"""Synthetic face identities written in the formats facekd reads (RecordIO, image folder, verification bins).

No face data set can be downloaded where facekd is developed and tested, so every path runs end to end on
procedurally drawn faces. An identity is a latent vector of shape, colour and texture parameters drawn from its own
seeded generator (face oval, skin tone, hair, eyes, brows, nose, mouth, beard, glasses, moles, freckles and a
low-frequency colour field). Each latent vector is partly pulled towards one of a few shared prototypes, so
look-alike identities exist. A sample is the identity's canonical face with this sample's expression (gaze, blink,
brow raise, mouth curvature and opening), then perturbed: background clutter, sunglasses or a face mask, pose
(rotation, shear, scale, shift and a perspective squash that imitates yaw and pitch), a rectangle or hand in front,
illumination (greyscale, gamma, colour cast, contrast, gain, directional gradient), blur, noise and JPEG coding.

Verification numbers measured on these images describe a synthetic task, not face recognition on photographs;
``synth.json`` records the raw-pixel baseline beside the generator's parameters so that reports can say so.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from facekd.data.recordio import write_insightface_rec
from facekd.data.verification import write_bin
from facekd.errors import ConfigError, DataError

__all__ = [
    "FaceParams",
    "FaceRenderer",
    "best_threshold_accuracy",
    "encode_jpeg",
    "face_params",
    "identity_name",
    "raw_pixel_scores",
    "synthesize",
    "verification_pairs",
]

JPEG_QUALITY = 90
RENDER_SCALE = 2  # drawn at twice the output size, then box-filtered down: cheap anti-aliasing
NUM_LATENTS = 48  # one uniform per drawn face parameter, so that latent distance means look-alike
NUM_PROTOTYPES = 24  # shared "population" prototypes that make look-alike identities
NUM_TEXTURE_WAVES = 3  # cosine waves per colour channel in an identity's low-frequency colour field

# Seed-sequence stream tags: every random draw is keyed by (seed, stream, ...), so any image can be regenerated on
# its own and no two streams share draws.
_STREAM_IDENTITY = 0
_STREAM_PROTOTYPE = 1
_STREAM_TRAIN_SAMPLE = 2
_STREAM_PAIRS = 3
_STREAM_PAIR_SAMPLE = 4

_SKIN_TONES = np.array(
    [[255, 226, 200], [236, 194, 160], [210, 160, 120], [176, 120, 84], [132, 84, 56], [90, 58, 40]], np.float64
)
_HAIR_COLOURS = np.array(
    [[22, 18, 16], [58, 38, 26], [100, 66, 42], [140, 74, 40], [196, 160, 98], [150, 146, 142], [214, 206, 196]],
    np.float64,
)
_IRIS_COLOURS = np.array(
    [[40, 26, 16], [92, 56, 30], [134, 102, 52], [76, 118, 72], [70, 110, 170], [118, 128, 140]], np.float64
)

RGB = tuple[int, int, int]
Spot = tuple[float, float, float]  # (x, y, radius)


@dataclass(frozen=True)
class FaceParams:
    """One identity's appearance, in canonical-canvas fractions (x right, y down, canvas side 1)."""

    latent: tuple[float, ...]  # the uniform latent vector the fields below are drawn from (look-alike distance)
    skin: RGB
    hair: RGB
    iris: RGB
    lips: RGB
    face_cy: float  # face centre height
    face_w: float  # half width of the face oval
    face_h: float  # half height of the face oval
    face_power: float  # superellipse exponent of the oval: 2 is an ellipse, larger is squarer
    chin_taper: float  # chin width relative to the cheeks, in (0, 1]
    ear_size: float  # ear half height
    neck_w: float  # neck half width
    hair_style: int  # 0 bald, 1 short, 2 long, 3 voluminous
    hair_volume: float  # how far the hair stands off the head
    hair_length: float  # how far long hair falls below the face centre, in face half heights
    hairline: float  # hairline height below the face top, in face half heights
    hair_part: float  # horizontal position of the parting, in face half widths
    temple_drop: float  # how far the hairline falls at the temples, in face half heights
    fringe: bool  # jagged fringe across the forehead
    eye_y: float  # eye line height
    eye_spacing: float  # half distance between the eye centres
    eye_w: float  # eye half width
    eye_h: float  # eye half height
    eye_tilt: float  # outer-corner tilt, radians
    iris_r: float  # iris radius relative to the eye half width
    brow_gap: float  # brow height above the eye
    brow_thickness: float
    brow_length: float  # relative to the eye width
    brow_arch: float  # arch height relative to the brow thickness
    brow_slant: float  # outer end raised when positive
    nose_length: float  # nose tip distance below the eye line
    nose_w: float  # nose half width
    nostril: float  # nostril size relative to the nose width
    mouth_y: float  # mouth line height
    mouth_w: float  # mouth half width
    mouth_curve: float  # resting smile: corners up when positive
    lip_thickness: float  # lower lip thickness; the upper lip is 0.7 of it
    beard: int  # 0 none, 1 stubble, 2 full beard
    moustache: bool
    glasses: int  # 0 none, 1 round, 2 rectangular
    glasses_colour: RGB
    moles: tuple[Spot, ...]
    freckles: tuple[Spot, ...]
    texture: tuple[tuple[int, float, float, float, float], ...]  # (channel, fx, fy, phase, amplitude) waves


def identity_name(index: int) -> str:
    """Folder name of identity ``index`` (``id_00042``)."""
    return f"id_{index:05d}"


def _identity_latent(seed: int, index: int) -> np.ndarray:
    """Uniform latent vector of identity ``index``: its own Gaussian draw pulled towards a shared prototype."""
    rng = np.random.default_rng([seed, _STREAM_IDENTITY, index])
    own = rng.standard_normal(NUM_LATENTS)
    prototype_index = int(rng.integers(NUM_PROTOTYPES))
    pull = rng.uniform(0.0, 0.85)  # 0: an independent face; near 1: a close look-alike of the prototype
    prototype = np.random.default_rng([seed, _STREAM_PROTOTYPE, prototype_index]).standard_normal(NUM_LATENTS)
    mixed = pull * prototype + math.sqrt(1.0 - pull * pull) * own  # still standard normal per coordinate
    return np.array([0.5 * (1.0 + math.erf(value / math.sqrt(2.0))) for value in mixed])


def _colour(palette: np.ndarray, position: float, jitter: np.ndarray) -> RGB:
    """Interpolate along a palette (``position`` in [0, 1]) and add a per-channel jitter."""
    x = position * (len(palette) - 1)
    low = min(int(x), len(palette) - 2)
    rgb = palette[low] + (x - low) * (palette[low + 1] - palette[low]) + jitter
    red, green, blue = (int(v) for v in np.clip(rgb, 0, 255))
    return red, green, blue


def face_params(seed: int, index: int) -> FaceParams:
    """The appearance of identity ``index`` under ``seed``; a pure function of both."""
    latent = _identity_latent(seed, index)
    used = 0

    def u(low: float = 0.0, high: float = 1.0) -> float:
        """The next latent coordinate mapped to [low, high]; the fields below consume them in a fixed order."""
        nonlocal used
        if used == NUM_LATENTS:
            raise RuntimeError(f"NUM_LATENTS={NUM_LATENTS} is too small for the face parameters")
        used += 1
        return low + (high - low) * float(latent[used - 1])

    # positions of small marks do not need look-alike structure: they come from the identity's own generator
    extra = np.random.default_rng([seed, _STREAM_IDENTITY, index, 1])
    skin = _colour(_SKIN_TONES, u(), (np.array([u(), u(), u()]) - 0.5) * 24)
    hair = _colour(_HAIR_COLOURS, u(), (np.array([u(), u(), u()]) - 0.5) * 20)
    iris = _colour(_IRIS_COLOURS, u(), np.zeros(3))
    lips = _colour(np.array([skin, (170, 60, 70)], np.float64), u(0.15, 0.45), np.zeros(3))
    face_cy, face_w, face_h = u(0.52, 0.57), u(0.22, 0.31), u(0.29, 0.37)
    style_draw, beard_draw, glasses_draw = u(), u(), u()
    hair_style = 0 if style_draw < 0.08 else 1 if style_draw < 0.55 else 2 if style_draw < 0.85 else 3
    fringe = u() < 0.25 and hair_style != 0
    eye_y = face_cy - face_h * u(0.02, 0.22)
    eye_w = face_w * u(0.17, 0.27)
    brow_thickness = u(0.008, 0.022)
    nose_length = face_h * u(0.24, 0.42)
    nose_tip, chin = eye_y + nose_length, face_cy + face_h
    num_moles = int(u() * 3.99)
    freckles_per_cheek = int(extra.integers(8, 30)) if u() < 0.2 else 0
    return FaceParams(
        latent=tuple(latent.tolist()),
        skin=skin,
        hair=hair,
        iris=iris,
        lips=lips,
        face_cy=face_cy,
        face_w=face_w,
        face_h=face_h,
        face_power=u(1.9, 3.2),
        chin_taper=u(0.5, 0.95),
        ear_size=u(0.035, 0.06),
        neck_w=face_w * u(0.45, 0.65),
        hair_style=hair_style,
        hair_volume=u(0.02, 0.1) + (0.1 if hair_style == 3 else 0.0),
        hair_length=u(0.3, 1.6),
        hairline=u(0.15, 0.45) + (0.15 if fringe else 0.0),
        hair_part=u(-0.6, 0.6),
        temple_drop=u(0.05, 0.35),
        fringe=fringe,
        eye_y=eye_y,
        eye_spacing=face_w * u(0.34, 0.5),
        eye_w=eye_w,
        eye_h=eye_w * u(0.32, 0.6),
        eye_tilt=u(-0.18, 0.18),
        iris_r=u(0.38, 0.55),
        brow_gap=u(0.012, 0.035) + brow_thickness,
        brow_thickness=brow_thickness,
        brow_length=u(1.0, 1.5),
        brow_arch=u(0.0, 1.2),
        brow_slant=u(-0.012, 0.012),
        nose_length=nose_length,
        nose_w=face_w * u(0.14, 0.28),
        nostril=u(0.2, 0.45),
        mouth_y=nose_tip + (chin - nose_tip) * u(0.28, 0.45),
        mouth_w=face_w * u(0.28, 0.48),
        mouth_curve=u(-0.25, 0.45),
        lip_thickness=u(0.008, 0.022),
        beard=0 if beard_draw < 0.8 else 1 if beard_draw < 0.9 else 2,
        moustache=u() < 0.12,
        glasses=0 if glasses_draw < 0.85 else 1 if glasses_draw < 0.93 else 2,
        glasses_colour=_colour(np.array([[0, 0, 0], [120, 120, 120]], np.float64), u(), extra.uniform(-20, 20, 3)),
        moles=tuple(
            (0.5 + face_w * float(extra.uniform(-0.7, 0.7)), face_cy + face_h * float(extra.uniform(-0.4, 0.7)),
             float(extra.uniform(0.003, 0.007)))
            for _ in range(num_moles)
        ),
        freckles=tuple(
            (0.5 + side * face_w * float(extra.uniform(0.15, 0.75)), eye_y + face_h * float(extra.uniform(0.08, 0.4)),
             float(extra.uniform(0.002, 0.004)))
            for side in (-1.0, 1.0)
            for _ in range(freckles_per_cheek)
        ),
        texture=tuple(
            (channel, float(extra.uniform(-2, 2)), float(extra.uniform(-2, 2)), float(extra.uniform(0, 2 * math.pi)),
             float(extra.uniform(0, 0.03)))
            for channel in range(3)
            for _ in range(NUM_TEXTURE_WAVES)
        ),
    )


def _scaled(rgb: Sequence[int], factor: float) -> RGB:
    red, green, blue = (int(min(255.0, max(0.0, c * factor))) for c in rgb)
    return red, green, blue


def _mix(a: Sequence[int], b: Sequence[int], weight_b: float) -> RGB:
    red, green, blue = (int(x * (1.0 - weight_b) + y * weight_b) for x, y in zip(a, b))
    return red, green, blue


def _superellipse(
    cx: float,
    cy: float,
    rx: float,
    ry: float,
    power: float,
    taper: float = 1.0,
    arc: tuple[float, float] = (0.0, 2 * math.pi),
) -> np.ndarray:
    """Points (64, 2) of a superellipse along the angles ``arc``; its lower half narrows to ``taper``."""
    t = np.linspace(arc[0], arc[1], 64)
    c, s = np.cos(t), np.sin(t)
    x = np.sign(c) * np.abs(c) ** (2.0 / power)
    y = np.sign(s) * np.abs(s) ** (2.0 / power)
    x = x * (1.0 - (1.0 - taper) * np.clip(y, 0.0, None) ** 1.5)
    return np.stack([cx + rx * x, cy + ry * y], axis=1)


def _ellipse(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0) -> np.ndarray:
    """Points (28, 2) of an ellipse turned by ``angle`` radians."""
    t = np.linspace(0.0, 2 * math.pi, 28, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    ca, sa = math.cos(angle), math.sin(angle)
    return np.stack([cx + ca * x - sa * y, cy + sa * x + ca * y], axis=1)


def _band(x: np.ndarray, top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """Polygon between two curves sampled at the same ``x``."""
    return np.concatenate([np.stack([x, top], axis=1), np.stack([x, bottom], axis=1)[::-1]])


def _box(x: float, y: float, half_w: float, half_h: float) -> np.ndarray:
    return np.array([[x - half_w, y - half_h], [x + half_w, y + half_h]])


def _perspective_coefficients(dst: np.ndarray, src: np.ndarray) -> tuple[float, ...]:
    """PIL PERSPECTIVE coefficients that map output points ``dst`` (4, 2) back to input points ``src`` (4, 2)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst.tolist(), src.tolist()):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    return tuple(np.linalg.solve(np.array(rows, np.float64), np.array(rhs, np.float64)).tolist())


class FaceRenderer:
    """Draws canonical faces and nuisance-perturbed samples of them as uint8 (image_size, image_size, 3) arrays.

    Everything is drawn on a canvas ``RENDER_SCALE`` times the output size and box-filtered down. The canonical face
    (hair, neck, ears, face, colour field, beard, nose, moles, freckles, moustache) is drawn once per identity with
    an alpha mask; a sample pastes it on a random background, draws what an expression moves (eyes, brows, glasses,
    mouth), warps the whole canvas and changes its photometry. About 2.6 ms a 112-pixel sample on one CPU core.
    """

    def __init__(self, image_size: int = 112) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32:
            raise ConfigError(f"image_size must be an integer of at least 32 pixels, got {image_size!r}")
        self.image_size = image_size
        self.canvas = image_size * RENDER_SCALE
        grid = (np.arange(self.canvas, dtype=np.float32) + 0.5) / self.canvas
        self._canvas_x, self._canvas_y = grid[None, :], grid[:, None]
        out = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size - 0.5
        self._out_x, self._out_y = out[None, :], out[:, None]

    def _xy(self, points: np.ndarray) -> list[tuple[float, float]]:
        return [(float(x), float(y)) for x, y in points * self.canvas]

    def _width(self, fraction: float) -> int:
        return max(1, round(fraction * self.canvas))

    def canonical(self, face: FaceParams) -> Image.Image:
        """The identity's face without its expression parts, as an RGBA canvas (alpha 0 off the head)."""
        S = self.canvas
        image = Image.new("RGBA", (S, S), (0, 0, 0, 0))
        draw = ImageDraw.Draw(image)
        cx, cy, fw, fh, volume = 0.5, face.face_cy, face.face_w, face.face_h, face.hair_volume
        skin, hair = face.skin, face.hair
        # back hair, behind neck, ears and face
        if face.hair_style != 0:
            top = _superellipse(cx, cy, fw + volume, fh + volume, face.face_power, arc=(math.pi, 2 * math.pi))
            bottom = cy + fh * (face.hair_length if face.hair_style == 2 else 0.15)
            side = (fw + volume) * (1.05 if face.hair_style == 2 else 1.0)
            draw.polygon(self._xy(np.concatenate([top, [[cx + side, bottom], [cx - side, bottom]]])), fill=hair)
        draw.rectangle(self._xy(np.array([[cx - face.neck_w, cy], [cx + face.neck_w, 1.0]])), fill=_scaled(skin, 0.86))
        for sign in (-1.0, 1.0):
            ear = _ellipse(cx + sign * fw * 0.97, face.eye_y + 0.02, face.ear_size * 0.55, face.ear_size)
            draw.polygon(self._xy(ear), fill=_scaled(skin, 0.92))
        outline = _superellipse(cx, cy, fw, fh, face.face_power, face.chin_taper)
        draw.polygon(self._xy(outline), fill=skin)
        # the identity's low-frequency colour field, on skin and hair alike
        rgba = np.asarray(image, dtype=np.float32).copy()
        field = np.ones((S, S, 3), np.float32)
        for channel, fx, fy, phase, amplitude in face.texture:
            field[..., channel] += amplitude * np.cos(2 * math.pi * (fx * self._canvas_x + fy * self._canvas_y) + phase)
        rgba[..., :3] = np.clip(rgba[..., :3] * field, 0, 255)
        image = Image.fromarray(rgba.astype(np.uint8), "RGBA")
        draw = ImageDraw.Draw(image)
        tip_y, nose_w = face.eye_y + face.nose_length, face.nose_w
        if face.beard:
            beard_top = face.mouth_y - 0.03 if face.beard == 2 else tip_y + 0.01
            skin_share = 0.6 if face.beard == 1 else 0.25  # stubble lets the skin show through
            draw.polygon(self._xy(outline[outline[:, 1] > beard_top]), fill=_mix(hair, skin, skin_share))
        # nose: wings, tip, nostrils and the shadow of its bridge
        for sign in (-1.0, 1.0):
            wing = _ellipse(cx + sign * nose_w * 0.6, tip_y - nose_w * 0.05, nose_w * 0.4, nose_w * 0.35)
            draw.polygon(self._xy(wing), fill=_scaled(skin, 0.9))
        tip = _ellipse(cx, tip_y - nose_w * 0.15, nose_w * 0.55, nose_w * 0.4)
        draw.polygon(self._xy(tip), fill=_scaled(skin, 1.04))
        for sign in (-1.0, 1.0):
            size = nose_w * face.nostril
            nostril = _ellipse(cx + sign * nose_w * 0.45, tip_y + nose_w * 0.1, size, size * 0.55)
            draw.polygon(self._xy(nostril), fill=_scaled(skin, 0.5))
        bridge = np.array([[cx + nose_w * 0.35, face.eye_y + 0.02], [cx + nose_w * 0.6, tip_y - nose_w * 0.3]])
        draw.line(self._xy(bridge), fill=_scaled(skin, 0.82), width=self._width(0.006))
        for x, y, radius in face.moles:
            draw.ellipse(self._xy(_box(x, y, radius, radius)), fill=_mix(skin, (70, 42, 30), 0.7))
        for x, y, radius in face.freckles:
            draw.ellipse(self._xy(_box(x, y, radius, radius)), fill=_scaled(skin, 0.8))
        if face.moustache:
            lip_top, w = face.mouth_y - face.lip_thickness * 0.7, face.mouth_w
            moustache = np.array([
                [cx - w * 1.05, face.mouth_y], [cx, lip_top - 0.004], [cx + w * 1.05, face.mouth_y],
                [cx + w * 0.8, lip_top - 0.022], [cx, tip_y + nose_w * 0.45], [cx - w * 0.8, lip_top - 0.022],
            ])
            draw.polygon(self._xy(moustache), fill=_mix(hair, skin, 0.1))
        # front hair down to a hairline that stays above the brows
        if face.hair_style != 0:
            brow_top = face.eye_y - face.eye_h - face.brow_gap - face.brow_thickness * (1.0 + face.brow_arch)
            xn = np.linspace(-1.05, 1.05, 22)
            notch = 0.12 * np.exp(-(((xn - face.hair_part) / 0.12) ** 2))
            line_y = cy - fh + fh * (face.hairline + face.temple_drop * xn**2 - notch)
            line_y = np.minimum(line_y, brow_top - 0.015 + fh * face.temple_drop * xn**2)
            if face.fringe:
                line_y = line_y + fh * 0.07 * (np.arange(len(xn)) % 2)
            cap_w, cap_h = fw + volume * 0.6, fh + volume * 0.6
            cap = _superellipse(cx, cy, cap_w, cap_h, face.face_power, arc=(2 * math.pi, math.pi))
            cap = cap[cap[:, 1] < line_y[-1]]
            draw.polygon(self._xy(np.concatenate([np.stack([cx + fw * xn, line_y], axis=1), cap])), fill=hair)
        return image

    def _draw_expression(self, draw: ImageDraw.ImageDraw, face: FaceParams, rng: np.random.Generator) -> dict[str, Any]:
        """Eyes, brows, glasses and mouth under this sample's gaze, blink, brow raise and mouth movement.

        Returns the drawn outlines in canonical-canvas fractions (what dense landmarks are read from): ``eyes`` and
        ``brows``, image-left first, the (28, 2) eye polygons and (10, 2) brow centre lines (inner end first);
        ``mouth``: sample ``x`` (17) and the ``upper`` lip edge, the lip ``line``, the ``open`` edge and the ``lower``
        lip edge heights at them."""
        shapes: dict[str, Any] = {"eyes": [], "brows": []}
        cx, ey = 0.5, face.eye_y
        gaze_x, gaze_y = rng.uniform(-1, 1) * 0.35, rng.uniform(-1, 1) * 0.2
        eye_h = face.eye_h * (0.15 if rng.random() < 0.04 else rng.uniform(0.75, 1.1))
        brow_raise = rng.normal(0.0, 0.004)
        t = np.linspace(0.0, 2 * math.pi, 28, endpoint=False)
        lower = np.sin(t) > 0
        almond_x = face.eye_w * np.cos(t)
        almond_y = eye_h * np.sin(t) * np.where(lower, 0.8, 1.15)  # the upper lid arches more
        along = np.linspace(0.0, 1.0, 10)  # brow from its inner to its outer end
        frame = self._width(0.008)
        for sign in (-1.0, 1.0):
            ex = cx + sign * face.eye_spacing
            angle = -sign * face.eye_tilt  # outer corner up on both eyes for a positive tilt
            ca, sa = math.cos(angle), math.sin(angle)
            almond = np.stack([ex + ca * almond_x - sa * almond_y, ey + sa * almond_x + ca * almond_y], axis=1)
            draw.polygon(self._xy(almond), fill=(236, 232, 226))
            shapes["eyes"].append(almond)
            # the iris stays inside the eye, so no clipping is needed
            ix, iy = ex + gaze_x * face.eye_w, ey + gaze_y * eye_h
            radius = min(face.iris_r * face.eye_w, 0.8 * eye_h * math.sqrt(1.0 - gaze_x**2) - abs(gaze_y) * eye_h)
            if radius > 0.002:
                draw.ellipse(self._xy(_box(ix, iy, radius, radius)), fill=face.iris)
                draw.ellipse(self._xy(_box(ix, iy, radius * 0.45, radius * 0.45)), fill=(14, 10, 10))
            upper = almond[~lower]
            draw.line(self._xy(upper[np.argsort(upper[:, 0])]), fill=_scaled(face.skin, 0.3), width=self._width(0.006))
            length = 2 * face.eye_w * face.brow_length
            bx = ex + sign * (-0.45 * length + along * length)
            arch = face.brow_arch * face.brow_thickness * np.sin(math.pi * along**0.8)
            by = ey - face.eye_h - face.brow_gap - brow_raise - arch - face.brow_slant * along
            half = face.brow_thickness * (1.0 - 0.55 * along) / 2
            draw.polygon(self._xy(_band(bx, by - half, by + half)), fill=_scaled(face.hair, 0.75))
            shapes["brows"].append(np.stack([bx, by], axis=1))
            if face.glasses:
                half_w, half_h = face.eye_w * 1.45, max(face.eye_h * 2.0, face.eye_w * 0.9)
                box = self._xy(_box(ex, ey, half_w, half_h))
                shape = draw.ellipse if face.glasses == 1 else draw.rectangle
                shape(box, outline=face.glasses_colour, width=frame)
                arm = np.array([[ex + sign * half_w, ey - half_h * 0.4], [cx + sign * face.face_w, ey - half_h * 0.5]])
                draw.line(self._xy(arm), fill=face.glasses_colour, width=frame)
        if face.glasses:
            inner = face.eye_spacing - face.eye_w * 1.45
            bridge = np.array([[cx - inner, ey - face.eye_h * 0.5], [cx + inner, ey - face.eye_h * 0.5]])
            draw.line(self._xy(bridge), fill=face.glasses_colour, width=frame)
        # mouth: the lip line bent by the resting smile plus this sample's expression, sometimes open
        width = face.mouth_w * rng.uniform(0.92, 1.08)
        curve = face.mouth_curve + rng.normal(0.0, 0.18)
        opening = rng.uniform(0.004, 0.02) if rng.random() < 0.2 else 0.0
        xn = np.linspace(-1.0, 1.0, 17)
        mx = cx + width * xn
        line = face.mouth_y - curve * width * 0.35 * (xn**2 - 0.35)
        bulge = np.sqrt(1.0 - xn**2)
        upper_edge = line - 0.7 * face.lip_thickness * bulge * (1.0 - 0.35 * np.exp(-((xn / 0.18) ** 2)))
        open_edge = line + opening * bulge
        lower_edge = open_edge + face.lip_thickness * bulge**1.2
        if opening:
            draw.polygon(self._xy(_band(mx, line, open_edge)), fill=(60, 20, 24))
        draw.polygon(self._xy(_band(mx, upper_edge, line)), fill=face.lips)
        draw.polygon(self._xy(_band(mx, open_edge, lower_edge)), fill=face.lips)
        draw.line(self._xy(np.stack([mx, line], axis=1)), fill=_scaled(face.lips, 0.5), width=self._width(0.004))
        shapes["mouth"] = {"x": mx, "upper": upper_edge, "line": line, "open": open_edge, "lower": lower_edge}
        return shapes

    def _draw_face_occluder(self, draw: ImageDraw.ImageDraw, face: FaceParams, rng: np.random.Generator) -> None:
        """Sunglasses (6 %) or a face mask (4 %), drawn before the pose so that they turn with the face."""
        kind = rng.random()
        if kind < 0.06:
            colour = _colour(np.array([[5, 5, 5], [60, 60, 60]], np.float64), rng.random(), rng.uniform(-5, 5, 3))
            for sign in (-1.0, 1.0):
                lens = _ellipse(0.5 + sign * face.eye_spacing, face.eye_y, face.eye_w * 1.5, face.eye_w * 1.05)
                draw.polygon(self._xy(lens), fill=colour)
            bar = np.array([[0.5 - face.eye_spacing, face.eye_y - 0.01], [0.5 + face.eye_spacing, face.eye_y - 0.01]])
            draw.line(self._xy(bar), fill=colour, width=self._width(0.012))
        elif kind < 0.1:
            colour = [(232, 232, 236), (118, 160, 212), (30, 30, 36)][int(rng.integers(3))]
            outline = _superellipse(0.5, face.face_cy, face.face_w, face.face_h, face.face_power, face.chin_taper)
            draw.polygon(self._xy(outline[outline[:, 1] > face.eye_y + face.nose_length * 0.55]), fill=colour)

    def _pose_coefficients(self, rng: np.random.Generator) -> tuple[float, ...]:
        """Perspective warp of the canvas: yaw and pitch squash, shear, rotation, scale and shift."""
        corners = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
        x, y = corners[:, 0], corners[:, 1]
        yaw, pitch = rng.uniform(-1, 1), rng.uniform(-1, 1) * 0.6
        # a turned head looks narrower and its far side shorter
        x_posed = x * (1.0 - 0.22 * abs(yaw)) * (1.0 + 0.2 * pitch * y)
        y_posed = y * (1.0 - 0.15 * abs(pitch)) * (1.0 + 0.24 * yaw * x)
        x_posed = x_posed + rng.uniform(-0.08, 0.08) * y_posed
        angle = math.radians(float(np.clip(rng.normal(0.0, 7.0), -18.0, 18.0)))
        scale = rng.uniform(0.88, 1.12)
        ca, sa = math.cos(angle) * scale, math.sin(angle) * scale
        shift = rng.normal(0.0, 0.035, 2)
        dst = np.stack([ca * x_posed - sa * y_posed + shift[0], sa * x_posed + ca * y_posed + shift[1]], axis=1)
        return _perspective_coefficients((dst + 0.5) * self.canvas, (corners + 0.5) * self.canvas)

    @staticmethod
    def _scene_colour(rng: np.random.Generator) -> RGB:
        """A background colour: any grey level with a moderate tint."""
        red, green, blue = (int(v) for v in np.clip(rng.uniform(20, 235) + rng.normal(0.0, 30.0, 3), 0, 255))
        return red, green, blue

    def _background(self, rng: np.random.Generator) -> tuple[Image.Image, RGB]:
        """A flat colour with up to four shapes of other colours (clutter); also returns the flat colour."""
        S = self.canvas
        base = self._scene_colour(rng)
        image = Image.new("RGB", (S, S), base)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(0, 5))):
            x0, y0 = rng.uniform(-0.2, 1.0, 2) * S
            w, h = rng.uniform(0.1, 0.6, 2) * S
            shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
            shape([x0, y0, x0 + w, y0 + h], fill=self._scene_colour(rng))
        return image, base

    def _draw_image_occluder(self, draw: ImageDraw.ImageDraw, rng: np.random.Generator) -> None:
        """A rectangle (8 %) or a hand-like blob (6 %) in front of the posed face."""
        kind = rng.random()
        if kind < 0.08:
            x0, y0 = rng.uniform(0.0, 0.8, 2)
            w, h = rng.uniform(0.15, 0.4, 2)
            colour = _colour(np.array([[0, 0, 0], [255, 255, 255]], np.float64), rng.random(), rng.normal(0, 40, 3))
            draw.rectangle(self._xy(np.array([[x0, y0], [x0 + w, y0 + h]])), fill=colour)
        elif kind < 0.14:
            colour = _colour(_SKIN_TONES, rng.random(), rng.uniform(-12, 12, 3))
            px, py = rng.uniform(0.25, 0.75), rng.uniform(0.55, 0.95)
            direction = rng.uniform(-math.pi, 0.0)  # fingers point upwards, into the face
            palm = rng.uniform(0.1, 0.15)
            draw.polygon(self._xy(_ellipse(px, py, palm, palm * 0.8, direction)), fill=colour)
            for finger in range(4):
                offset = (finger - 1.5) * palm * 0.45
                fx = px + math.cos(direction) * palm * 1.4 - math.sin(direction) * offset
                fy = py + math.sin(direction) * palm * 1.4 + math.cos(direction) * offset
                draw.polygon(self._xy(_ellipse(fx, fy, palm * 0.6, palm * 0.17, direction)), fill=colour)

    def _photometric(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
        """Greyscale, gamma, colour cast, contrast, directional light, blur and sensor noise; uint8 (H, W, 3)."""
        if rng.random() < 0.08:
            image = image.convert("L").convert("RGB")
        # gamma and colour cast act on each value alone: one lookup table per channel
        levels = (np.arange(256, dtype=np.float64) / 255.0) ** math.exp(rng.normal(0.0, 0.2))
        cast = np.exp(rng.normal(0.0, 0.07, 3))
        image = image.point(np.clip(np.outer(cast, levels) * 255.0 + 0.5, 0, 255).astype(np.uint8).ravel().tolist())
        x = np.asarray(image, dtype=np.float32)
        mean = x.mean()
        contrast, gain, strength = rng.uniform(0.6, 1.25), rng.uniform(0.6, 1.3), rng.uniform(0.0, 0.9)
        light_angle = rng.uniform(0.0, 2 * math.pi)
        gradient = math.cos(light_angle) * self._out_x + math.sin(light_angle) * self._out_y
        light = np.float32(gain) * (1.0 + np.float32(strength) * gradient)
        x = ((x - mean) * np.float32(contrast) + mean) * light[..., None]
        image = Image.fromarray(np.clip(x + 0.5, 0.0, 255.0).astype(np.uint8), "RGB")
        if rng.random() < 0.6:
            image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.4) * self.image_size / 112))
        noise = rng.standard_normal(x.shape, dtype=np.float32) * np.float32(rng.uniform(0.0, 9.0))
        return np.clip(np.asarray(image, dtype=np.float32) + noise + 0.5, 0, 255).astype(np.uint8)

    def render(self, face: FaceParams, canonical: Image.Image, rng: np.random.Generator) -> np.ndarray:
        """One sample of ``face``, given its ``canonical`` image, as a uint8 (H, W, 3) array."""
        return self.render_with_landmarks(face, canonical, rng)[0]

    def landmarks(self, face: FaceParams, pose: tuple[float, ...]) -> np.ndarray:
        """Where a sample posed by ``pose`` shows the face's left eye, right eye, nose tip, left and right mouth
        corner (image left first, as detectors list them), [5, 2] in output pixel-centre coordinates.

        The eyes and the nose tip are where :meth:`canonical` and :meth:`_draw_expression` centre them; a mouth
        corner is where the lip line ends before this sample's smile bends it (within a pixel at 112)."""
        tip_y = face.eye_y + face.nose_length
        canonical = np.array([[0.5 - face.eye_spacing, face.eye_y], [0.5 + face.eye_spacing, face.eye_y],
                              [0.5, tip_y], [0.5 - face.mouth_w, face.mouth_y], [0.5 + face.mouth_w, face.mouth_y]])
        return self.posed_points(canonical, pose)

    def posed_points(self, canonical: np.ndarray, pose: tuple[float, ...]) -> np.ndarray:
        """Canonical-canvas points [N, 2] (fractions) where a sample posed by ``pose`` shows them, [N, 2] in output
        pixel-centre coordinates."""
        # the pose maps output canvas edge coordinates to canonical ones (PIL's PERSPECTIVE): invert it
        a, b, c, d, e, f, g, h = pose
        to_canonical = np.array([[a, b, c], [d, e, f], [g, h, 1.0]])
        points = np.linalg.solve(to_canonical, np.vstack([canonical.T * self.canvas, np.ones(len(canonical))]))
        posed = (points[:2] / points[2]).T
        return posed / RENDER_SCALE - 0.5  # reduce() box-filters RENDER_SCALE canvas pixels into one

    def render_with_landmarks(
        self, face: FaceParams, canonical: Image.Image, rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`render` and the sample's 5 landmarks (:meth:`landmarks`): the same pixels from the same ``rng``."""
        pixels, pose, _ = self.render_sample(face, canonical, rng)
        return pixels, self.landmarks(face, pose)

    def render_sample(
        self, face: FaceParams, canonical: Image.Image, rng: np.random.Generator,
    ) -> tuple[np.ndarray, tuple[float, ...], dict[str, Any]]:
        """:meth:`render`'s pixels from the same ``rng``, its pose coefficients (see :meth:`posed_points`) and the
        outlines of its expression (see :meth:`_draw_expression`)."""
        # background, then the identity's face, this sample's expression and a worn occluder
        image, base = self._background(rng)
        image.paste(canonical, (0, 0), canonical)
        draw = ImageDraw.Draw(image)
        shapes = self._draw_expression(draw, face, rng)
        self._draw_face_occluder(draw, face, rng)
        # pose: nearest sampling at twice the size then a 2x2 box filter (4 samples a pixel, 5x cheaper than
        # bilinear); then an occluder in front of the posed face and the photometric changes
        pose = self._pose_coefficients(rng)
        image = image.transform(image.size, Image.Transform.PERSPECTIVE, pose, Image.Resampling.NEAREST, fillcolor=base)
        self._draw_image_occluder(ImageDraw.Draw(image), rng)
        return self._photometric(image.reduce(RENDER_SCALE), rng), pose, shapes


def encode_jpeg(pixels: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of a uint8 (H, W, 3) array."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def raw_pixel_scores(pixels: np.ndarray) -> np.ndarray:
    """Cosine similarity of each pair's raw pixels: the cheapest verification baseline.

    ``pixels``: uint8 (2P, H, W, 3), pair i = (pixels[2i], pixels[2i+1]). Only the central half of each side is
    compared (mostly face: the background is random per image), normalised as networks see it, (x - 127.5) / 128.
    Returns P float64 scores.
    """
    if pixels.ndim != 4 or pixels.shape[0] % 2 or pixels.shape[-1] != 3:
        raise ValueError(f"pixels must be (2P, H, W, 3) with an even count, got shape {pixels.shape}")
    height, width = pixels.shape[1:3]
    crop = pixels[:, height // 4 : height - height // 4, width // 4 : width - width // 4]
    vectors = (crop.reshape(len(crop), -1).astype(np.float64) - 127.5) / 128.0
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return np.einsum("ij,ij->i", vectors[0::2], vectors[1::2])


def best_threshold_accuracy(scores: np.ndarray, issame: np.ndarray) -> float:
    """Verification accuracy at the best single threshold chosen on these same pairs (an optimistic estimate)."""
    scores, issame = np.asarray(scores, np.float64), np.asarray(issame, bool)
    if scores.ndim != 1 or scores.shape != issame.shape or len(scores) == 0:
        raise ValueError(f"scores and issame must be equal-length vectors, got shapes {scores.shape}, {issame.shape}")
    order = np.argsort(-scores, kind="stable")
    ranked, same = scores[order], issame[order]
    # predict "same" for the k best-scoring pairs, k = 0..P; a cut may only fall between different scores
    true_accepts = np.concatenate([[0], np.cumsum(same)])
    false_accepts = np.concatenate([[0], np.cumsum(~same)])
    correct = true_accepts + (~same).sum() - false_accepts
    allowed = np.concatenate([[True], ranked[:-1] > ranked[1:], [True]])
    return float(correct[allowed].max() / len(scores))


def verification_pairs(
    seed: int, num_identities: int, num_val_identities: int, num_pairs: int, hard: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Identity indices (P, 2) and same flags (P,) of a validation pair set; exactly half the flags are true.

    Validation identities are ``num_identities .. num_identities + num_val_identities - 1``, after the training
    ones, so the two sets never share an identity. A different pair joins two random validation identities, or in
    a ``hard`` set an identity and one of its three nearest neighbours in latent space (a look-alike).
    """
    rng = np.random.default_rng([seed, _STREAM_PAIRS, int(hard)])
    latents = np.array([face_params(seed, num_identities + index).latent for index in range(num_val_identities)])
    issame = np.arange(num_pairs) < num_pairs // 2
    rng.shuffle(issame)
    distance = ((latents[:, None, :] - latents[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(distance, np.inf)
    neighbours = np.argsort(distance, axis=1)[:, : min(3, num_val_identities - 1)]
    pairs = np.zeros((num_pairs, 2), np.int64)
    for index, same in enumerate(issame):
        first = int(rng.integers(num_val_identities))
        if same:
            second = first
        elif hard:
            second = int(neighbours[first, rng.integers(neighbours.shape[1])])
        else:
            second = int(rng.integers(num_val_identities - 1))
            second += second >= first
        pairs[index] = first, second
    return pairs + num_identities, issame


def _training_samples(
    renderer: FaceRenderer, seed: int, num_identities: int, images_per_identity: int, images_dir: Path, progress: tqdm
) -> Iterator[tuple[int, bytes]]:
    """Renders the training set identity by identity, writes the image folder and yields (label, JPEG bytes)."""
    for label in range(num_identities):
        face = face_params(seed, label)
        canonical = renderer.canonical(face)
        folder = images_dir / identity_name(label)
        folder.mkdir(parents=True, exist_ok=True)
        for sample in range(images_per_identity):
            rng = np.random.default_rng([seed, _STREAM_TRAIN_SAMPLE, label, sample])
            jpeg = encode_jpeg(renderer.render(face, canonical, rng))
            (folder / f"{sample}.jpg").write_bytes(jpeg)
            progress.update()
            yield label, jpeg


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def synthesize(
    out_dir: str | os.PathLike[str],
    *,
    num_identities: int = 300,
    images_per_identity: int = 20,
    num_val_identities: int = 100,
    num_pairs: int = 600,
    image_size: int = 112,
    seed: int = 0,
    show_progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Writes a synthetic face-recognition data set under ``out_dir`` and returns its summary.

    Outputs: ``rec/train.rec``, ``rec/train.idx``, ``rec/property`` (insightface RecordIO, labels
    0..num_identities-1); ``images/<identity>/<n>.jpg``, the same training JPEGs as an image folder; ``val.bin``
    and ``val_hard.bin``, ``num_pairs`` verification pairs each (half same-identity) of ``num_val_identities``
    identities disjoint from the training ones, ``val_hard.bin`` pairing look-alikes as its different pairs;
    ``synth.json``, the returned summary. The same arguments give byte-identical files (with the same NumPy and
    Pillow builds: JPEG bytes depend on libjpeg). Existing outputs are a DataError unless ``overwrite``, which deletes
    them first (stale identity folders would corrupt the counts).
    """
    _check_count("num_identities", num_identities, 1)
    _check_count("images_per_identity", images_per_identity, 1)
    _check_count("num_val_identities", num_val_identities, 2)
    _check_count("num_pairs", num_pairs, 2)
    _check_count("seed", seed, 0)
    if num_pairs % 2:
        raise ConfigError(f"num_pairs must be even (half same, half different pairs), got {num_pairs}")
    from facekd.data.synth_attributes import AttributeRenderer, write_attributes

    renderer = AttributeRenderer(image_size)  # the FaceRenderer's pixels, and each image's attributes noted
    out = Path(out_dir)
    pair_sets = {"val": False, "val_hard": True}
    outputs = [out / "rec" / name for name in ("train.rec", "train.idx", "property")]
    outputs += [out / "images", out / "synth.json", out / "attributes.csv"]
    outputs += [out / f"{name}.bin" for name in pair_sets]
    existing = [path for path in outputs if path.exists()]
    if existing and not overwrite:
        raise DataError(f"{out} already holds generated data ({', '.join(map(str, existing))}); use overwrite")
    for path in existing:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    num_train_images = num_identities * images_per_identity
    summary: dict[str, Any] = {
        "generator": "facekd.data.synth",
        "note": "procedurally drawn synthetic faces: accuracies measured on them are not face-recognition results",
        "seed": seed,
        "image_size": image_size,
        "jpeg_quality": JPEG_QUALITY,
        "num_identities": num_identities,
        "images_per_identity": images_per_identity,
        "num_train_images": num_train_images,
        "train_identity_range": [0, num_identities],
        "num_val_identities": num_val_identities,
        "val_identity_range": [num_identities, num_identities + num_val_identities],
        "num_pairs": num_pairs,
        "files": {
            "rec": "rec/train.rec",
            "idx": "rec/train.idx",
            "property": "rec/property",
            "images": "images",
            **{name: f"{name}.bin" for name in pair_sets},
        },
        "raw_pixel_baseline": {},
    }
    total = num_train_images + 2 * num_pairs * len(pair_sets)
    with tqdm(total=total, unit="img", desc="synth", disable=not show_progress) as progress:
        # training identities: the RecordIO file and the image folder from one stream of JPEGs
        (out / "rec").mkdir(parents=True, exist_ok=True)
        samples = _training_samples(renderer, seed, num_identities, images_per_identity, out / "images", progress)
        rec_path, idx_path = out / "rec" / "train.rec", out / "rec" / "train.idx"
        written = write_insightface_rec(rec_path, idx_path, samples, num_identities, (image_size, image_size))
        if written != num_train_images:
            raise RuntimeError(f"wrote {written} training records, expected {num_train_images}")
        # validation pairs, from identities disjoint from the training ones
        faces = [face_params(seed, num_identities + index) for index in range(num_val_identities)]
        canonicals = [renderer.canonical(face) for face in faces]
        for name, hard in pair_sets.items():
            pairs, issame = verification_pairs(seed, num_identities, num_val_identities, num_pairs, hard)
            pixels = np.empty((2 * num_pairs, image_size, image_size, 3), np.uint8)
            for index, identities in enumerate((pairs - num_identities).tolist()):
                for member, identity in enumerate(identities):
                    rng = np.random.default_rng([seed, _STREAM_PAIR_SAMPLE, int(hard), index, member])
                    pixels[2 * index + member] = renderer.render(faces[identity], canonicals[identity], rng)
                    progress.update()
            write_bin(out / f"{name}.bin", [encode_jpeg(image) for image in pixels], issame.tolist())
            scores = raw_pixel_scores(pixels)
            summary["raw_pixel_baseline"][name] = {
                "best_threshold_accuracy": round(best_threshold_accuracy(scores, issame), 4),
                "mean_cosine_same": round(float(scores[issame].mean()), 4),
                "mean_cosine_different": round(float(scores[~issame].mean()), 4),
            }
    (out / "synth.json").write_text(json.dumps(summary, indent=2) + "\n")
    # per-image attribute labels (pose, light, occluders, identity traits) for the routing analysis
    write_attributes(out / "attributes.csv", renderer.records, seed=seed, num_identities=num_identities,
                     images_per_identity=images_per_identity, num_val_identities=num_val_identities,
                     num_pairs=num_pairs, pair_sets=pair_sets)
    return summary
