"""Input checks shared by ``mmspec.generate`` and the pipelines: one message per mistake, naming the argument and
the accepted values."""

from __future__ import annotations

from dataclasses import dataclass

from . import acceptance as _acceptance
from .drafting import INIT_STRATEGIES, MethodSpec, available_methods, method_spec

__all__ = ["Decoding", "check_choice", "check_decoding", "check_generator", "check_int", "resolve_method"]


def check_int(value, name: str, minimum: int) -> None:
    """``value`` must be an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")


def check_choice(value, name: str, choices) -> None:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")


def check_generator(generator, batch: int, unit: str = "rows") -> None:
    """A list of generators must have one per row (``unit`` names the rows: "images", "videos", ...)."""
    if isinstance(generator, (list, tuple)) and len(generator) != batch:
        raise ValueError(f"got {len(generator)} generators for a batch of {batch} {unit}; pass one torch.Generator "
                         f"(`generator=`), or exactly one per row.")


def resolve_method(method: str | None, decoding: str | None, default: str) -> tuple[str, str]:
    """The decoding method from ``method=`` or its alias ``decoding=`` (pipelines and the CLI accept both):
    returns ``(name, argument used)``."""
    if method is not None and decoding is not None and method != decoding:
        raise ValueError(f"pass the decoding method once: got method={method!r} and its alias decoding={decoding!r}.")
    if decoding is not None:
        return decoding, "decoding"
    return (default if method is None else method), "method"


@dataclass
class Decoding:
    """A checked decoding choice: the method's registry entry, the window to use and the criterion object."""

    spec: MethodSpec
    window: int
    criterion: _acceptance.Criterion


def check_decoding(method: str, *, window: int | None = None, draft_model=None, acceptance="exact",
                   do_sample: bool = True, init: str | None = None, kind: str = "tokens",
                   arg: str = "method") -> Decoding:
    """Check a decoding choice before any model runs.

    Args:
        method: a registered method name (``mmspec.drafting.available_methods(kind)``); ``arg`` is the name the
            user passed it under (``"method"`` or ``"decoding"``).
        window: tokens per target forward (>= 1); None for the method's default. Methods with a fixed window
            (plain AR) use it whatever is given.
        draft_model: required by draft methods, refused by the others.
        acceptance: a criterion name or object, of ``kind``; criteria that need sampling refuse ``do_sample=False``.
        init: a Jacobi init strategy name, or None when not applicable.
    """
    spec = method_spec(method, kind, arg)
    if window is None:
        window = spec.default_window
    check_int(window, "window", 1)
    window = spec.fixed_window or window
    if spec.needs_draft and draft_model is None:
        raise ValueError(f"`{arg}={method!r}` needs a `draft_model` (a smaller model with the target's tokens).")
    if not spec.needs_draft and draft_model is not None:
        drafting = [m for m in available_methods(kind) if method_spec(m, kind).needs_draft]
        raise ValueError(f"`draft_model` is only used with {arg}={drafting[0]!r}, not {arg}={method!r}."
                         if len(drafting) == 1 else f"`draft_model` is only used with {arg} in {drafting}.")
    if init is not None and init not in INIT_STRATEGIES:
        raise ValueError(f"unknown Jacobi `init` {init!r}; available: {sorted(INIT_STRATEGIES)}.")
    criterion = _acceptance.get(acceptance, kind=kind)
    if not do_sample and criterion.requires_sampling:
        raise ValueError(f"acceptance={criterion.name!r} needs sampling; pass do_sample=True or use "
                         "acceptance='exact'.")
    return Decoding(spec, window, criterion)

