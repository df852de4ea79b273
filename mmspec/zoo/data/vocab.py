"""Vocabulary of the procedural scenes: shapes, colours, sizes, positions, backgrounds, directions, caption words and label names."""

from __future__ import annotations

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "ring",
    "cross",
    "diamond",
    "ellipse",
)

#: Named colours and their nominal sRGB values (0..255). Used for objects and backgrounds.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 25),
    "yellow": (240, 215, 40),
    "green": (45, 165, 60),
    "blue": (35, 80, 215),
    "purple": (135, 55, 185),
    "white": (238, 238, 238),
    "gray": (128, 128, 128),
    "black": (22, 22, 22),
}
COLOURS: tuple[str, ...] = tuple(COLOUR_RGB)

SIZES: tuple[str, ...] = ("small", "medium", "large")
#: Object half-extent as a fraction of the image side, per size name.
_SIZE_RADIUS: dict[str, float] = {"small": 0.09, "medium": 0.125, "large": 0.162}

#: 3x3 grid positions, row-major; index ``r * 3 + c``.
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)

BACKGROUNDS: tuple[str, ...] = (
    "plain",
    "vertical stripes",
    "horizontal stripes",
    "diagonal stripes",
    "checkered",
    "gradient",
    "dotted",
    "cloudy",
)
#: Adjective phrase used in captions for each background kind.
BACKGROUND_PHRASES: dict[str, str] = {
    "plain": "plain",
    "vertical stripes": "vertically striped",
    "horizontal stripes": "horizontally striped",
    "diagonal stripes": "diagonally striped",
    "checkered": "checkered",
    "gradient": "gradient",
    "dotted": "dotted",
    "cloudy": "cloudy",
}
_PHRASE_TO_BACKGROUND = {v: k for k, v in BACKGROUND_PHRASES.items()}

#: Motion directions of moving scenes -> unit step (dx, dy) in image coordinates (y down).
DIRECTIONS: dict[str, tuple[int, int]] = {
    "right": (1, 0),
    "down right": (1, 1),
    "down": (0, 1),
    "down left": (-1, 1),
    "left": (-1, 0),
    "up left": (-1, -1),
    "up": (0, -1),
    "up right": (1, -1),
}

_FUNCTION_WORDS = ("a", "at", "the", "and", "on", "background", "moving")


def _build_vocab() -> list[str]:
    words: set[str] = set(_FUNCTION_WORDS)
    for group in (SHAPES, COLOURS, SIZES, POSITIONS, tuple(BACKGROUND_PHRASES.values()), tuple(DIRECTIONS)):
        for phrase in group:
            words.update(phrase.split())
    return sorted(words)


#: Sorted list of every word that can appear in a scene or moving-scene caption.
SCENE_VOCAB: list[str] = _build_vocab()

#: Class names for each label head of the evaluation classifier (see :func:`scene_labels`).
LABEL_NAMES: dict[str, list[str]] = {
    "shape": list(SHAPES),
    "colour": list(COLOURS),
    "position": list(POSITIONS),
    "size": list(SIZES),
    "background": list(BACKGROUNDS),
    "background_colour": list(COLOURS),
}

#: Minimum RGB distance between an object's nominal colour and the background's colours.
_MIN_CONTRAST = 115.0
