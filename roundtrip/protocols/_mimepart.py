"""The parsed form of a stored message: a tree of byte offsets (see ``_mime``)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Field", "Part"]

# One header field: (lower-case name, unfolded raw value, offset of the field, offset past it).
Field = tuple[str, bytes, int, int]


@dataclass(eq=False, slots=True)
class Part:
    """One MIME entity of a parsed message, as byte offsets into the raw message.

    ``raw[start:body_start]`` is the entity's header block (including the empty line, when there
    is one) and ``raw[body_start:end]`` its body. The top-level message is the root; a multipart
    has ``children``; a ``message/rfc822`` part has ``message``, the encapsulated message.
    """

    start: int
    body_start: int
    end: int
    depth: int
    fields: list[Field] = field(default_factory=list)
    #: Effective media type, lower case (after defaults and degradation).
    maintype: str = "text"
    subtype: str = "plain"
    #: Decoded parameters (RFC 2231 merged), names lower case, in order of appearance.
    params: list[tuple[str, str]] = field(default_factory=list)
    children: list[Part] = field(default_factory=list)
    message: Part | None = None
    _first: dict[str, bytes] | None = field(default=None, repr=False)

    def header(self, name: str) -> bytes | None:
        """The unfolded raw value of the first field called ``name``, or None."""
        if self._first is None:
            self._first = {}
            for fname, value, _, _ in reversed(self.fields):
                self._first[fname] = value
        return self._first.get(name.lower())

    @property
    def content_type(self) -> str:
        """``maintype/subtype``, lower case."""
        return f"{self.maintype}/{self.subtype}"

    def param(self, name: str) -> str | None:
        """The decoded value of Content-Type parameter ``name``, or None."""
        name = name.lower()
        for pname, value in self.params:
            if pname == name:
                return value
        return None
