"""Light shapes: surface brightness in arbitrary units (every rendered map is normalised afterwards).

Sersic profiles, star-forming knots, clumpy sources, spiral arms, star-forming rings (and tidal arcs),
point sources (stars), and
``LightPart``: one shape with its VIS magnitude and colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
from lenstronomy.LightModel.light_model import LightModel
from lenstronomy.Util import param_util

from lensray.simulate.instrument import COLOR_WEIGHT


@cache
def _light_model(profile: str) -> LightModel:
    return LightModel([profile])


@dataclass(frozen=True)
class Sersic:
    """An elliptical Sersic profile (lenstronomy SERSIC_ELLIPSE)."""

    r_eff: float
    n: float
    q: float
    phi: float
    center: tuple[float, float]

    @property
    def kwargs(self) -> dict[str, float]:
        e1, e2 = param_util.phi_q2_ellipticity(self.phi, self.q)
        return dict(
            R_sersic=self.r_eff, n_sersic=self.n, e1=e1, e2=e2, center_x=self.center[0], center_y=self.center[1]
        )

    def surface_brightness(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return _light_model("SERSIC_ELLIPSE").surface_brightness(x, y, [dict(amp=1.0, **self.kwargs)])


@dataclass(frozen=True)
class Knots:
    """Small Gaussian star-forming knots carrying ``fractions`` of the light each."""

    centers: tuple[tuple[float, float], ...]
    sigmas: tuple[float, ...]
    fractions: tuple[float, ...]

    @property
    def center(self) -> tuple[float, float]:
        return tuple(np.mean(self.centers, axis=0)) if self.centers else (0.0, 0.0)

    @property
    def extent(self) -> float:
        return max(
            (
                math.hypot(cx - self.center[0], cy - self.center[1]) + 5 * s
                for (cx, cy), s in zip(self.centers, self.sigmas, strict=False)
            ),
            default=0.0,
        )

    def surface_brightness(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        gauss = _light_model("GAUSSIAN")  # lenstronomy's GAUSSIAN amp is the total flux
        sb = np.zeros(np.shape(x))
        for (cx, cy), sigma, fraction in zip(self.centers, self.sigmas, self.fractions, strict=False):
            sb += gauss.surface_brightness(x, y, [dict(amp=fraction, sigma=sigma, center_x=cx, center_y=cy)])
        return sb


@dataclass(frozen=True)
class ClumpySource:
    """A Sersic source plus knots carrying part of its flux."""

    body: Sersic
    knots: Knots = Knots((), (), ())

    @property
    def center(self) -> tuple[float, float]:
        return self.body.center

    @property
    def extent(self) -> float:
        """Radius (arcsec) beyond which the unlensed source is negligible."""
        (kx, ky), (cx, cy) = self.knots.center, self.center
        knots = math.hypot(kx - cx, ky - cy) + self.knots.extent
        return max(8 * self.body.r_eff + 0.5, knots if self.knots.centers else 0.0)

    def surface_brightness(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        body_model = _light_model("SERSIC_ELLIPSE")
        body_kwargs = dict(amp=1.0, **self.body.kwargs)
        # Flux fractions: lenstronomy's total_flux turns the body's into an amplitude.
        body_fraction = 1.0 - sum(self.knots.fractions)
        amplitude = body_fraction / body_model.total_flux([body_kwargs])[0]
        body = amplitude * body_model.surface_brightness(x, y, [body_kwargs])
        return body + self.knots.surface_brightness(x, y) if self.knots.centers else body


@dataclass(frozen=True)
class SpiralArms:
    """The arm light of an exponential disc: the disc modulated by m logarithmic spiral arms, fading
    into a smooth centre."""

    disc: Sersic
    arms: int
    pitch: float  # radians
    phase: float
    sharpness: float  # power of the (1 + cos)/2 modulation: larger -> narrower arms

    @property
    def center(self) -> tuple[float, float]:
        return self.disc.center

    def winding(self, radius: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(radius, 0.05) / self.disc.r_eff) / math.tan(self.pitch)

    def surface_brightness(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        radius, angle = _disc_polar(x, y, self.disc.center, self.disc.phi, self.disc.q)
        modulation = (0.5 * (1.0 + np.cos(self.arms * (angle - self.winding(radius)) + self.phase))) ** self.sharpness
        onset = 1.0 - np.exp(-((radius / (0.6 * self.disc.r_eff)) ** 2))  # no arms inside the bulge
        return self.disc.surface_brightness(x, y) * modulation * onset

    def crest(self, radius: np.ndarray, arm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sky positions on arm number ``arm``'s crest at (deprojected) ``radius``."""
        angle = self.winding(radius) + (2 * math.pi * arm - self.phase) / self.arms
        disc = self.disc
        return _disc_to_sky(radius * np.cos(angle), radius * np.sin(angle), disc.center, disc.phi, disc.q)


@dataclass(frozen=True)
class Ring:
    """A (partial) ring of star formation around a galaxy: the hard non-lens that looks like an
    Einstein ring or an arc."""

    center: tuple[float, float]
    radius: float
    width: float
    q: float
    phi: float
    arc_power: float  # 0: a full ring; larger: a shorter arc centred on arc_angle
    arc_angle: float

    def arc(self, angle: np.ndarray) -> np.ndarray:
        return (0.5 * (1.0 + np.cos(angle - self.arc_angle))) ** self.arc_power

    def surface_brightness(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        radius, angle = _disc_polar(x, y, self.center, self.phi, self.q)
        return np.exp(-0.5 * ((radius - self.radius) / self.width) ** 2) * self.arc(angle)

    def on_ring(self, angle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sky positions on the ring's crest at (deprojected) position angle ``angle``."""
        return _disc_to_sky(self.radius * np.cos(angle), self.radius * np.sin(angle), self.center, self.phi, self.q)


def _disc_polar(x: np.ndarray, y: np.ndarray, center: tuple[float, float], phi: float, q: float):
    """Radius and angle in the deprojected frame of an inclined disc (axis ratio q, major axis at phi)."""
    dx, dy = x - center[0], y - center[1]
    major = math.cos(phi) * dx + math.sin(phi) * dy
    minor = (-math.sin(phi) * dx + math.cos(phi) * dy) / q
    return np.hypot(major, minor), np.arctan2(minor, major)


def _disc_to_sky(major, minor, center: tuple[float, float], phi: float, q: float):
    """The inverse of ``_disc_polar``'s projection: disc-frame (major, deprojected minor) -> sky x, y."""
    minor = minor * q
    return (
        center[0] + math.cos(phi) * major - math.sin(phi) * minor,
        center[1] + math.sin(phi) * major + math.cos(phi) * minor,
    )


@dataclass(frozen=True)
class PointSource:
    """A star: all its light in one point (rendered by sharing it between the four nearest pixels)."""

    center: tuple[float, float]


Shape = Sersic | Knots | ClumpySource | SpiralArms | Ring | PointSource


@dataclass(frozen=True)
class LightPart:
    """One light component with its VIS magnitude and VIS - H colour (AB)."""

    group: str  # "lens" (the central galaxy), "companion" or "source" (lensed)
    shape: Shape
    mag_vis: float
    vis_minus_h: float
    window: float | None = None  # render only within this radius (arcsec) of the centre; None = everywhere
    core: float = 0.0  # supersample within this radius of the centre

    def magnitude(self, band: str) -> float:
        return self.mag_vis - COLOR_WEIGHT[band] * self.vis_minus_h
