"""Secrets kept out of what vlmtune writes and prints: credentials inside URLs, tokens in a recipe's text.

A URL is reported with its user name and password (``user:pass@``) and every query value replaced
by ``***``: a presigned URL's signature (``X-Amz-Signature=...``, ``sig=...``) is a credential, and
what identifies the image for a reader is its host and path. ``redact_text`` does the same to every
URL inside a longer text (an error message), and ``redact_secrets`` also blanks the tokens a
recipe's comments tend to hold (``hf_...``, ``sk-...``, ``Bearer ...``, ``password: ...``).
"""

from __future__ import annotations

import re

MASK = "***"
URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>`]+")
_USERINFO = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/?#@]*)@")
_QUERY_VALUE = re.compile(r"(?P<key>[?&;][^=&;#]*)=(?P<value>[^&;#]*)")
# Tokens recognisable by their shape, and values of keys that name a secret.
TOKENS = (
    ("Hugging Face token", re.compile(r"(?<![\w/.-])hf_[A-Za-z0-9]{20,}")),
    ("API key", re.compile(r"(?<![\w/.-])sk-[A-Za-z0-9_-]{20,}")),
    ("GitHub token", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}")),
    ("AWS access key", re.compile(r"\bAKIA[0-9A-Z]{16}\b")),
    ("bearer token", re.compile(r"(?i)(?<=\bbearer )[A-Za-z0-9._~+/=-]{8,}")),
)
SECRET_KEY = re.compile(
    r"(?i)(?P<key>\b[\w-]*(?:password|passwd|secret|token|api[_-]?key|access[_-]?key)(?:[_-]?(?:key|id))?"
    r"[\"']?\s*[:=]\s*)(?P<value>[\"']?[^\s\"',}#]{4,}[\"']?)"
)

_PLAIN = re.compile(r"(?i)[-+]?[0-9._]+(?:e[-+]?[0-9]+)?|true|false|yes|no|on|off|null|none|~")


def redact_url(url: str) -> str:
    """The URL with its credentials (user info, query values) replaced by ***."""
    url = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", url, count=1)
    head, sep, fragment = url.partition("#")
    head = _QUERY_VALUE.sub(lambda m: f"{m['key']}={MASK}" if m["value"] else m[0], head)
    return head + (sep + MASK if fragment else sep)


def redact_text(text: str) -> str:
    """Every URL inside ``text`` redacted (an error message that quotes one)."""
    return URL.sub(lambda m: redact_url(m[0]), text) if "://" in text else text


def redact_secrets(text: str) -> tuple[str, list[str]]:
    """``text`` with URL credentials and recognisable secrets replaced by ***, and what was replaced."""
    found: list[str] = []

    def url(match: re.Match) -> str:
        redacted = redact_url(match[0])
        if redacted != match[0]:
            found.append("URL credentials")
        return redacted

    text = URL.sub(url, text)
    for what, pattern in TOKENS:
        text, count = pattern.subn(MASK, text)
        found += [what] * count

    def keyed(match: re.Match) -> str:
        value = match["value"].strip("\"'")
        if MASK in value or _PLAIN.fullmatch(value):  # max_tokens: 128 is no secret
            return match[0]
        found.append(f"`{match['key'].split(':')[0].split('=')[0].strip()}` value")
        return match["key"] + MASK

    text = SECRET_KEY.sub(keyed, text)
    return text, found
