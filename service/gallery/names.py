"""Subject names: one spelling for names that look alike, and none that could hide or reorder text."""

from __future__ import annotations

import re
import unicodedata

MAX_NAME = 200
MAX_SENT_NAME = 4 * MAX_NAME  # characters of a name as sent: NFKC shrinks few names, and none by 4
# Control characters (C0 and C1), lone surrogates and line/paragraph separators: no person's name has them
# (and PostgreSQL text cannot hold NUL). Of the invisible format characters (Cf) only ZWNJ and ZWJ stay
# allowed, which spell Persian and Indic names: the others (zero-width space, bidi overrides, BOM...) let
# two subjects' names look the same, or one read backwards.
FORBIDDEN_IN_NAMES = {"Cc", "Cs", "Zl", "Zp"}
ALLOWED_FORMAT_CHARACTERS = {"\u200c", "\u200d"}
SPACE_RUNS = re.compile(r" {2,}")
# Invisible characters that are not Cf (Unicode's Default_Ignorable_Code_Point): variation selectors only choose a
# glyph's look, so they are dropped ("Alice\ufe0f" is "Alice"); the others (the combining grapheme joiner, Hangul
# fillers, Khmer inherent vowels, tag characters) are refused: each made a second "Colin Powell", or a blank name.
VARIATION_SELECTORS = re.compile("[\u180b-\u180d\u180f\ufe00-\ufe0f\U000e0100-\U000e01ef]")
# (With the code points Unicode reserves as invisible: U+2065, U+FFF0-FFF8, U+E0000-E0FFF. Other unassigned ones are
# allowed: Python's Unicode tables lag, and names use new CJK characters.)
INVISIBLE = re.compile("[\u034f\u115f\u1160\u17b4\u17b5\u2065\u3164\uffa0\ufff0-\ufff8\U000e0000-\U000e0fff]")
# ZWNJ and ZWJ join letters of scripts that need them; elsewhere ("Al\u200cice") they only make a look-alike.
LOOKALIKE_SCRIPTS = ("LATIN", "GREEK", "CYRILLIC")
VIRAMA = 9  # the canonical combining class of Indic viramas


class InvalidName(ValueError):
    pass


def normal_name(raw: str, prefix: bool = False) -> str:
    """``raw`` in Unicode NFKC with every space character made one plain space and runs of them one (so that
    composed and decomposed spellings, full-width letters and doubled or no-break spaces do not make
    look-alike names, as in PRECIS's Nickname profile, RFC 8266, but keeping case) and, unless it is a search
    prefix, without surrounding whitespace. ``InvalidName`` for control characters, line breaks, more than
    MAX_NAME characters or (a name) nothing visible."""
    if len(raw) > MAX_SENT_NAME:  # before the work on it
        raise InvalidName(f"at most {MAX_NAME} characters (got {len(raw)})")
    name = "".join(" " if unicodedata.category(c) == "Zs" else c for c in unicodedata.normalize("NFKC", raw))
    name = VARIATION_SELECTORS.sub("", name)
    name = SPACE_RUNS.sub(" ", name)
    name = name if prefix else name.strip()
    if any(unicodedata.category(c) in FORBIDDEN_IN_NAMES for c in name):
        raise InvalidName("control characters and line breaks are not allowed")
    if "\ufffd" in name:  # what decoding put for bytes that were not UTF-8 ('Jos%E9', Latin-1): not the name sent
        raise InvalidName("holds U+FFFD, the replacement character: send the name in UTF-8")
    if INVISIBLE.search(name) or any(unicodedata.category(c) == "Cf" and c not in ALLOWED_FORMAT_CHARACTERS for c in name):
        raise InvalidName("invisible formatting characters (but ZWNJ/ZWJ) are not allowed")
    if _misplaced_joiner(name):
        raise InvalidName("ZWNJ/ZWJ only between letters of scripts that join them (not in Latin, Greek or Cyrillic)")
    if len(name) > MAX_NAME:
        raise InvalidName(f"at most {MAX_NAME} characters (got {len(name)})")
    if not prefix and not any(unicodedata.category(c)[0] in "LN" for c in name):
        raise InvalidName("must hold a letter or a digit")
    return name


def _misplaced_joiner(name: str) -> bool:
    """A ZWNJ/ZWJ not between two letters (or marks) of scripts that join: beside a space, a digit or a
    punctuation mark, at an end, or touching Latin, Greek or Cyrillic, where it is invisible. After a virama it
    always counts (RFC 5892's rule): Malayalam's older spelling ends words in one."""
    for index, c in enumerate(name):
        if c in ALLOWED_FORMAT_CHARACTERS:
            if index and unicodedata.combining(name[index - 1]) == VIRAMA:
                continue
            neighbours = name[index - 1 : index] if index else ""
            neighbours += name[index + 1 : index + 2]
            if len(neighbours) < 2 or any(_not_joining(n) for n in neighbours):
                return True
    return False


def _not_joining(c: str) -> bool:
    return unicodedata.category(c)[0] not in "LM" or unicodedata.name(c, "").startswith(LOOKALIKE_SCRIPTS)
