"""Container image references, validated like Docker's reference grammar.

    reference := name [":" tag] ["@" digest]
    name      := [domain "/"] path-component ["/" path-component]*
    domain    := host [":" port]   (host: DNS-ish components or a bracketed IPv6)
    path-component := [a-z0-9]+ ((separator) [a-z0-9]+)*   separator: "." "_" "__" "-"+
    tag       := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
    digest    := "sha256:" 64 lowercase hex digits

The first component counts as a registry when it contains "." or ":", is
"localhost", or has an uppercase letter (Docker's rule); otherwise the image lives on
Docker Hub and a one-component path gets the "library/" prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from runtime.types import InvalidImageName

DEFAULT_REGISTRY = "docker.io"
LEGACY_DEFAULT_REGISTRY = "index.docker.io"
DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 255

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_IPV6 = r"\[[a-fA-F0-9:]+\]"
_DOMAIN_RE = re.compile(
    rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|{_IPV6})(?::[0-9]+)?$"
)
_PATH_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
_HEX64_RE = re.compile(r"^[a-f0-9]{64}$")


@dataclass(frozen=True)
class ImageRef:
    """A parsed reference, fields as written (``registry`` None when omitted)."""

    registry: str | None
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}" if self.registry else self.repository

    def normalized(self) -> ImageRef:
        """Registry, ``library/`` prefix and ``latest`` tag filled in like Docker does."""
        registry = self.registry or DEFAULT_REGISTRY
        if registry == LEGACY_DEFAULT_REGISTRY:
            registry = DEFAULT_REGISTRY
        repository = self.repository
        if registry == DEFAULT_REGISTRY and "/" not in repository:
            repository = f"library/{repository}"
        tag = self.tag
        if tag is None and self.digest is None:
            tag = DEFAULT_TAG
        return ImageRef(registry, repository, tag, self.digest)

    def normalize(self) -> str:
        """``busybox`` -> ``docker.io/library/busybox:latest``."""
        return str(self.normalized())

    def pull_reference(self) -> str:
        """What to pull: by digest when one is given (the tag is then informational)."""
        ref = self.normalized()
        if ref.digest:
            return f"{ref.name}@{ref.digest}"
        return f"{ref.name}:{ref.tag}"

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_image_ref(text: str) -> ImageRef:
    """Parse and validate ``text``; raises InvalidImageName saying what is wrong."""
    if not isinstance(text, str) or not text:
        raise InvalidImageName("invalid image reference: image name is empty")
    if text != text.strip() or any(c.isspace() for c in text):
        raise InvalidImageName(f"invalid image reference {text!r}: contains whitespace")

    remainder, digest = text, None
    if "@" in remainder:
        remainder, _, digest = remainder.partition("@")
        if not _DIGEST_RE.match(digest):
            raise InvalidImageName(
                f"invalid image reference {text!r}: digest {digest!r} is not "
                "sha256:<64 lowercase hex digits>"
            )

    name, tag = remainder, None
    last_slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon > last_slash:
        name, tag = remainder[:colon], remainder[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise InvalidImageName(
                f"invalid image reference {text!r}: tag {tag!r} must match "
                "[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
            )

    if not name:
        raise InvalidImageName(f"invalid image reference {text!r}: repository name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidImageName(
            f"invalid image reference {text!r}: repository name longer than "
            f"{MAX_NAME_LENGTH} characters"
        )

    registry: str | None = None
    path = name
    first, sep, rest = name.partition("/")
    if sep and (
        any(c in first for c in ".:") or first == "localhost" or first.lower() != first
    ):
        registry, path = first, rest
        if not _DOMAIN_RE.match(registry):
            raise InvalidImageName(
                f"invalid image reference {text!r}: registry {registry!r} is not a valid "
                "host[:port]"
            )

    if not path:
        raise InvalidImageName(f"invalid image reference {text!r}: repository path is empty")
    for component in path.split("/"):
        if component.lower() != component and _PATH_COMPONENT_RE.match(component.lower()):
            raise InvalidImageName(
                f"invalid image reference {text!r}: repository name must be lowercase"
            )
        if not _PATH_COMPONENT_RE.match(component):
            raise InvalidImageName(
                f"invalid image reference {text!r}: repository path component "
                f"{component!r} must be lowercase letters/digits separated by '.', '_', "
                "'__' or '-'"
            )
    if registry is None and tag is None and digest is None and _HEX64_RE.match(path):
        raise InvalidImageName(
            f"invalid image reference {text!r}: a 64-character hex string is an image ID, "
            "not a repository name"
        )
    return ImageRef(registry, path, tag, digest)


def normalize_image(text: str) -> str:
    """Shorthand for ``parse_image_ref(text).normalize()``."""
    return parse_image_ref(text).normalize()


def normalize(text: str) -> str:
    """``busybox`` -> ``docker.io/library/busybox:latest``; raises InvalidImageName."""
    return normalize_image(text)
