"""Unknown query parameters and form fields are refused, as unknown JSON keys are.

A parameter name from another API (CompreFace's ``det_prob_threshold``, deepface's ``enforce_detection``)
or a typo (``topk``) would otherwise fall back to the default without a word, and so would a second
``file`` part, of which only one would be answered.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, get_args, get_origin

from fastapi import Request
from fastapi.routing import APIRoute

from service.api.errors import ApiError

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


@dataclass(frozen=True)
class Declared:
    query: frozenset[str]
    form: frozenset[str]
    repeatable: frozenset[str]  # list-typed: may come several times


def _dependants(dependant: Any) -> list[Any]:
    return [dependant, *(d for sub in dependant.dependencies for d in _dependants(sub))]


def _is_list(field: Any) -> bool:
    """``list[str] | None`` and the like: a parameter that may be repeated."""
    annotation = field.field_info.annotation
    return any(get_origin(arg) in (list, tuple, set) or arg in (list, tuple, set) for arg in (annotation, *get_args(annotation)))


def declared(route: APIRoute) -> Declared:
    """What ``route`` reads from the query string and the form, over all its dependencies (computed once, kept
    on the route: routes are not hashable)."""
    found: Declared | None = getattr(route, "_ocellus_declared", None)
    if found is None:
        query = [field for d in _dependants(route.dependant) for field in d.query_params]
        form = [field for d in _dependants(route.dependant) for field in d.body_params]
        found = Declared(
            frozenset(f.alias for f in query),
            frozenset(f.alias for f in form),
            frozenset(f.alias for f in (*query, *form) if _is_list(f)),
        )
        route._ocellus_declared = found  # type: ignore[attr-defined]
    return found


def _check(kind: str, values: Any, known: frozenset[str], elsewhere: frozenset[str], repeatable: frozenset[str]) -> None:
    """``values`` (query parameters or form fields, a multi-dict) against the names the operation takes."""
    for name in values:
        if name in known:
            if name not in repeatable and len(values.getlist(name)) > 1:
                raise ApiError(422, "repeated_parameter", f"{kind} {name!r} came more than once; send one per request")
        elif name in elsewhere:  # a query parameter sent as a form field, or the other way round
            where = f"in the query string (?{name}=...)" if kind == "form field" else "in the multipart form"
            raise ApiError(422, "unknown_parameter", f"{name!r} goes {where}, not as a {kind}")
        else:
            message = f"unknown {kind} {name!r}; this operation takes {', '.join(sorted(known)) or 'none'}"
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)  # typos, not other APIs' names
            raise ApiError(422, "unknown_parameter", message + (f" (did you mean {close[0]!r}?)" if close else ""))


async def known_fields_only(request: Request) -> None:
    """A route dependency: 422 ``unknown_parameter`` for a query parameter or form field the route does not read,
    ``repeated_parameter`` for one it reads once but that came several times."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    spec = declared(route)
    _check("query parameter", request.query_params, spec.query, spec.form, spec.repeatable)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if spec.form and content_type in FORM_TYPES:
        form = await request.form()  # already parsed for the route's own form parameters (cached)
        _check("form field", form, spec.form, spec.query, spec.repeatable)
