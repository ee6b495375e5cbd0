"""Unknown query parameters and form fields are refused, as unknown JSON keys are.

A parameter name from another API (CompreFace's ``det_prob_threshold``, deepface's ``enforce_detection``)
or a typo (``topk``) would otherwise fall back to the default without a word, and so would a second
``file`` part, of which only one would be answered.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, get_args, get_origin

from fastapi import Request, params
from fastapi.routing import APIRoute
from starlette import formparsers
from starlette.datastructures import ImmutableMultiDict

from service.api.deps import JSON_TYPE, ROLE_CHECK, content_type, json_body, key_refusal
from service.api.errors import ApiError
from service.settings import ROLE_RANK

# Only multipart forms are checked: a raw upload sent without a content type arrives as a urlencoded "form"
# whose field name is the image's bytes (upload_bytes answers it with 415 and what to send instead).
FORM_TYPE = "multipart/form-data"
SHOWN_NAME = 40  # characters of an unknown name quoted back


def _decode_form_text(src: bytes | bytearray, codec: str) -> str:
    """A form field's text (and a part's name or filename) in the form's charset (UTF-8 unless it names another),
    bytes that are not of it as U+FFFD, as in a query string, which the name checks refuse. Starlette read the whole
    field as Latin-1 instead: a subject enrolled as "Иван" in cp1251 was stored as "Èâàí" (black-box hunt)."""
    try:
        return src.decode(codec or "utf-8", errors="replace")
    except (LookupError, UnicodeError):  # a codec without "replace" (idna, punycode): a 400 "error parsing the body"
        return src.decode("utf-8", errors="replace")


formparsers._user_safe_decode = _decode_form_text  # the one function its multipart parser decodes text with


@dataclass(frozen=True)
class Declared:
    query: frozenset[str]
    form: frozenset[str]  # multipart fields (Form and File parameters; a JSON body is not a form)
    files: frozenset[str]  # of which File parameters
    repeatable: frozenset[str]  # list-typed: may come several times
    role: str | None  # the API key role the route needs: a caller without it gets the role check's 403 first


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
        dependants = _dependants(route.dependant)
        query = [field for d in dependants for field in d.query_params]
        form = [field for d in dependants for field in d.body_params if isinstance(field.field_info, params.Form)]
        roles = [  # FastAPI names a Security dependency's scopes own_oauth_scopes (security_scopes before 0.120)
            scope
            for d in dependants
            if d.call is ROLE_CHECK
            for scope in (getattr(d, "own_oauth_scopes", None) or getattr(d, "security_scopes", None) or [])
            if scope in ROLE_RANK
        ]
        found = Declared(
            frozenset(f.alias for f in query),
            frozenset(f.alias for f in form),
            frozenset(f.alias for f in form if isinstance(f.field_info, params.File)),
            frozenset(f.alias for f in (*query, *form) if _is_list(f)),
            max(roles, key=ROLE_RANK.__getitem__) if roles else None,
        )
        route._ocellus_declared = found  # type: ignore[attr-defined]
    return found


def _check(kind: str, values: Any, known: frozenset[str], elsewhere: frozenset[str], repeatable: frozenset[str]) -> None:
    """``values`` (query parameters or form fields, a multi-dict) against the names the operation takes."""
    for name in values:
        if name in known:
            if name not in repeatable and len(values.getlist(name)) > 1:
                raise ApiError(422, "repeated_parameter", f"{kind} {name!r} came more than once; send one per request")
        elif name in elsewhere:  # a query parameter sent in the body, or the other way round
            where = "in the multipart form" if kind == "query parameter" else f"in the query string (?{name}=...)"
            raise ApiError(422, "unknown_parameter", f"{name!r} goes {where}, not as a {kind}")
        else:
            shown = name if len(name) <= SHOWN_NAME else name[:SHOWN_NAME] + "..."
            message = f"unknown {kind} {shown!r}; this operation takes {', '.join(sorted(known)) or 'none'}"
            # Typos, not other APIs' names; only for short names: difflib indexes every character in Python, on the
            # event loop (a 5 MB JSON key took 0.44 s of it).
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8) if len(name) <= SHOWN_NAME else []
            raise ApiError(422, "unknown_parameter", message + (f" (did you mean {close[0]!r}?)" if close else ""))


async def known_fields_only(request: Request) -> None:
    """A route dependency: 422 ``unknown_parameter`` for a query parameter, form field or key of a JSON image body
    the route does not read, ``repeated_parameter`` for one it reads once but that came several times."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    spec = declared(route)
    if key_refusal(request, spec.role) is not None:  # its 401 or 403 comes before any parameter check
        return
    _check("query parameter", request.query_params, spec.query, spec.form, spec.repeatable)
    sent = content_type(request)
    if spec.form and sent == FORM_TYPE:
        form = await request.form()  # already parsed for the route's own form parameters (cached)
        _misnamed_file(form, spec)
        _check("form field", form, spec.form, spec.query, spec.repeatable)
    elif spec.files and sent == JSON_TYPE:  # images in base64: {"file": "..."}; other parameters stay in the query
        check_json_keys(await json_body(request, sorted(spec.files)), spec.files, spec.query)


def check_json_keys(body: dict[str, Any], known: frozenset[str], elsewhere: frozenset[str] = frozenset()) -> None:
    """422 ``unknown_parameter`` for a key of a JSON object body that the operation does not read."""
    _check("JSON key", ImmutableMultiDict(dict.fromkeys(body, "")), known, elsewhere, frozenset())


def _misnamed_file(form: Any, spec: Declared) -> None:
    """A photo sent under another part name: ``missing_file``, the code every route gives a form without its photo."""
    missing = sorted(name for name in spec.files if name not in form)
    stray = [name for name in form if name not in spec.form and not isinstance(form[name], str)]
    if missing and stray:
        shown = stray[0][:SHOWN_NAME]
        raise ApiError(
            422,
            "missing_file",
            f"the multipart form has no {missing[0]!r} part but a file part {shown!r}: name it {missing[0]!r} "
            f"(curl -F {missing[0]}=@photo.jpg)",
        )
