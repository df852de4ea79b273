"""Scene containers and captions: :class:`Scene`, :class:`MovingScene`, caption making and parsing, label dictionaries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .vocab import (
    _PHRASE_TO_BACKGROUND,
    BACKGROUND_PHRASES,
    BACKGROUNDS,
    COLOUR_RGB,
    COLOURS,
    DIRECTIONS,
    POSITIONS,
    SHAPES,
    SIZES,
)


@dataclass
class Scene:
    """One procedural scene.

    Attributes:
        image: ``np.uint8`` array ``[size, size, 3]``.
        caption: e.g. ``"a small red triangle at the top left on a checkered gray background"``.
        attributes: ``{"objects": [per-object dict], "background": kind, "background_colour":
            name, ...}``. Each object dict has the caption-level keys ``shape``, ``colour``,
            ``size``, ``position`` plus render details (``center`` (x, y) in pixels, ``radius``,
            ``rotation`` in degrees, ``shading``). Object 0 is drawn on top.
        clean: the same render without the per-pixel sensor noise (``np.uint8``, same shape), when
            asked for (``make_scene(..., clean=True)``), else None.
    """

    image: np.ndarray
    caption: str
    attributes: dict[str, Any] = field(default_factory=dict)
    clean: np.ndarray | None = None

    @property
    def labels(self) -> dict[str, int]:
        return scene_labels(self)


class MovingScene(NamedTuple):
    """A short clip: ``frames`` is ``np.uint8 [T, size, size, 3]``; caption and attributes as in
    :class:`Scene`, with ``direction``/``velocity``/``start``/``end`` per object instead of a
    grid position. ``clean``: the same frames without sensor noise (``make_moving_scene(..., clean=True)``), or
    None."""

    frames: np.ndarray
    caption: str
    attributes: dict[str, Any]
    clean: np.ndarray | None = None


def _object_phrase(obj: dict[str, Any]) -> str:
    head = f"a {obj['size']} {obj['colour']} {obj['shape']}"
    if "position" in obj:
        head = f"{head} at the {obj['position']}"
    if "direction" in obj:
        return f"{head} moving {obj['direction']}"
    return head


def make_caption(attributes: dict[str, Any]) -> str:
    """Caption for a scene's attributes (inverse of :func:`parse_caption`)."""
    objects = " and ".join(_object_phrase(o) for o in attributes["objects"])
    bg = BACKGROUND_PHRASES[attributes["background"]]
    return f"{objects} on a {bg} {attributes['background_colour']} background"


def caption_words(caption: str) -> list[str]:
    """Split a caption into vocabulary words (lower-cased, whitespace separated)."""
    return caption.lower().split()


def parse_caption(caption: str) -> dict[str, Any]:
    """Parse a scene (or moving-scene) caption back into attributes.

    Returns ``{"objects": [{"shape", "colour", "size", "position"} or {..., "direction"} or both (a clip that
    names where it starts)],
    "background": kind, "background_colour": name}``. Raises ``ValueError`` on anything that
    :func:`make_caption` could not have produced.
    """
    words = caption_words(caption)
    try:
        on = len(words) - 1 - words[::-1].index("on")
    except ValueError:
        raise ValueError(f"no background clause in caption {caption!r}") from None
    obj_words, bg_words = words[:on], words[on + 1 :]
    if len(bg_words) < 4 or bg_words[0] != "a" or bg_words[-1] != "background":
        raise ValueError(f"malformed background clause in {caption!r}")
    bg_colour = bg_words[-2]
    bg_phrase = " ".join(bg_words[1:-2])
    if bg_colour not in COLOUR_RGB or bg_phrase not in _PHRASE_TO_BACKGROUND:
        raise ValueError(f"unknown background {bg_phrase!r} {bg_colour!r} in {caption!r}")

    objects: list[dict[str, Any]] = []
    # split object clauses on "and"
    clauses: list[list[str]] = [[]]
    for w in obj_words:
        if w == "and":
            clauses.append([])
        else:
            clauses[-1].append(w)
    for cl in clauses:
        if len(cl) < 5 or cl[0] != "a":
            raise ValueError(f"malformed object clause {' '.join(cl)!r} in {caption!r}")
        size, colour, shape = cl[1], cl[2], cl[3]
        if size not in SIZES or colour not in COLOUR_RGB or shape not in SHAPES:
            raise ValueError(f"unknown object words {cl[1:4]} in {caption!r}")
        obj: dict[str, Any] = {"shape": shape, "colour": colour, "size": size}
        moving = cl.index("moving") if "moving" in cl else len(cl)
        if cl[4] == "at" and moving >= 7 and cl[5] == "the":  # a still scene's place, or a clip's start
            pos = " ".join(cl[6:moving])
            if pos not in POSITIONS:
                raise ValueError(f"unknown position {pos!r} in {caption!r}")
            obj["position"] = pos
        elif moving != 4:
            raise ValueError(f"malformed object clause {' '.join(cl)!r} in {caption!r}")
        if moving < len(cl):
            direction = " ".join(cl[moving + 1 :])
            if direction not in DIRECTIONS:
                raise ValueError(f"unknown direction {direction!r} in {caption!r}")
            obj["direction"] = direction
        objects.append(obj)
    return {"objects": objects, "background": _PHRASE_TO_BACKGROUND[bg_phrase], "background_colour": bg_colour}


def labels_from_attributes(attributes: dict[str, Any]) -> dict[str, int]:
    """Integer labels (indices into :data:`LABEL_NAMES`) of the FIRST object and the background.

    Keys: ``shape``, ``colour``, ``position``, ``size``, ``background``, ``background_colour``.
    For moving scenes (no grid position) ``position`` is ``-1``.
    """
    o = attributes["objects"][0]
    return {
        "shape": SHAPES.index(o["shape"]),
        "colour": COLOURS.index(o["colour"]),
        "position": POSITIONS.index(o["position"]) if "position" in o else -1,
        "size": SIZES.index(o["size"]),
        "background": BACKGROUNDS.index(attributes["background"]),
        "background_colour": COLOURS.index(attributes["background_colour"]),
    }


def scene_labels(scene: Scene) -> dict[str, int]:
    """Labels of a scene for the evaluation classifier (see :func:`labels_from_attributes`)."""
    return labels_from_attributes(scene.attributes)


def caption_labels(caption: str) -> dict[str, int]:
    """Labels a generated image should have if it follows ``caption`` (prompt adherence)."""
    return labels_from_attributes(parse_caption(caption))
