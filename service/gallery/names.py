"""Subject names: one spelling for names that look alike, and none that could hide or reorder text."""

from __future__ import annotations

import re
import unicodedata

MAX_NAME = 200
# Control characters (C0 and C1), lone surrogates and line/paragraph separators: no person's name has them
# (and PostgreSQL text cannot hold NUL). Of the invisible format characters (Cf) only ZWNJ and ZWJ stay
# allowed, which spell Persian and Indic names: the others (zero-width space, bidi overrides, BOM...) let
# two subjects' names look the same, or one read backwards.
FORBIDDEN_IN_NAMES = {"Cc", "Cs", "Zl", "Zp"}
ALLOWED_FORMAT_CHARACTERS = {"\u200c", "\u200d"}
SPACE_RUNS = re.compile(r" {2,}")


class InvalidName(ValueError):
    pass


def normal_name(raw: str, prefix: bool = False) -> str:
    """``raw`` in Unicode NFKC with every space character made one plain space and runs of them one (so that
    composed and decomposed spellings, full-width letters and doubled or no-break spaces do not make
    look-alike names, as in PRECIS's Nickname profile, RFC 8266, but keeping case) and, unless it is a search
    prefix, without surrounding whitespace. ``InvalidName`` for control characters, line breaks, more than
    MAX_NAME characters or (a name) nothing visible."""
    name = "".join(" " if unicodedata.category(c) == "Zs" else c for c in unicodedata.normalize("NFKC", raw))
    name = SPACE_RUNS.sub(" ", name)
    name = name if prefix else name.strip()
    if any(unicodedata.category(c) in FORBIDDEN_IN_NAMES for c in name):
        raise InvalidName("control characters and line breaks are not allowed")
    if any(unicodedata.category(c) == "Cf" and c not in ALLOWED_FORMAT_CHARACTERS for c in name):
        raise InvalidName("invisible formatting characters (but ZWNJ/ZWJ) are not allowed")
    if len(name) > MAX_NAME:
        raise InvalidName(f"at most {MAX_NAME} characters (got {len(name)})")
    if not prefix and not any(unicodedata.category(c)[0] in "LN" for c in name):
        raise InvalidName("must hold a letter or a digit")
    return name
