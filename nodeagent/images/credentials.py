"""Registry credentials for image pulls, matched to an image the way kubelet's keyring
does (``pkg/credentialprovider``).

Sources, in the order they are tried:

1. the pod's ``imagePullSecrets`` (Secrets of type ``kubernetes.io/dockerconfigjson``
   with key ``.dockerconfigjson``, or ``kubernetes.io/dockercfg`` with ``.dockercfg``),
2. the node's credential file (setting ``image-credential-file``: a Docker
   ``config.json``, ``{"auths": {...}}``),
3. no credentials.

A key such as ``registry.example.com:5000/team`` matches an image when the host
matches (``*`` globs one dot-separated label, as kubelet allows), the port is the same
and the key's path is a prefix of the image's repository path. Matches are tried most
specific first. Docker Hub is ``docker.io`` whichever of its spellings a key uses.

A malformed secret or file never stops a pod on its own: it is reported (the caller
turns ``CredentialError`` into an event) and pulls go on with the credentials that did
parse.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path

from runtime.imageref import DEFAULT_REGISTRY, LEGACY_DEFAULT_REGISTRY, parse_image_ref
from runtime.images import RegistryAuth

DOCKERCONFIGJSON_TYPE = "kubernetes.io/dockerconfigjson"
DOCKERCFG_TYPE = "kubernetes.io/dockercfg"
DOCKERCONFIGJSON_KEY = ".dockerconfigjson"
DOCKERCFG_KEY = ".dockercfg"

# A credential document larger than this is not a credential document.
MAX_CONFIG_BYTES = 1024 * 1024

_HUB_ALIASES = {
    "index.docker.io", "registry-1.docker.io", "docker.io", LEGACY_DEFAULT_REGISTRY,
    DEFAULT_REGISTRY,
}


class CredentialError(ValueError):
    """A credential document that cannot be used; the message names what is wrong."""


@dataclass(frozen=True)
class _Key:
    host: str  # lowercase, may contain '*' labels
    port: str
    path: str  # without leading/trailing '/'
    text: str

    def specificity(self) -> tuple[int, int]:
        return (len(self.host.split(".")) - self.host.count("*"), len(self.path))


def _parse_key(raw: str) -> _Key:
    text = raw.strip()
    for scheme in ("https://", "http://"):
        if text.lower().startswith(scheme):
            text = text[len(scheme):]
    hostport, _, path = text.partition("/")
    host, _, port = hostport.partition(":")
    host = host.lower()
    path = path.strip("/")
    if host in _HUB_ALIASES:
        host = DEFAULT_REGISTRY
        # "https://index.docker.io/v1/" is the legacy spelling of all of Docker Hub.
        if path in ("v1", "v2"):
            path = ""
    return _Key(host=host, port=port, path=path, text=raw)


def _host_matches(pattern: str, host: str) -> bool:
    pattern_labels, host_labels = pattern.split("."), host.split(".")
    if len(pattern_labels) != len(host_labels):
        return False
    return all(fnmatch.fnmatchcase(h, p) for p, h in zip(pattern_labels, host_labels))


def _auth_entry(where: str, registry: str, entry: object) -> RegistryAuth:
    if not isinstance(entry, dict):
        raise CredentialError(f"{where}: entry for {registry!r} must be an object")
    username = entry.get("username") or ""
    password = entry.get("password") or ""
    token = entry.get("identitytoken") or entry.get("identityToken") or ""
    for name, value in (("username", username), ("password", password), ("identitytoken", token)):
        if not isinstance(value, str):
            raise CredentialError(f"{where}: {registry!r}.{name} must be a string")
    auth = entry.get("auth")
    if auth:
        if not isinstance(auth, str):
            raise CredentialError(f"{where}: {registry!r}.auth must be a string")
        try:
            decoded = base64.b64decode(auth, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise CredentialError(f"{where}: {registry!r}.auth is not base64 of 'user:password'") from None
        user, sep, secret = decoded.partition(":")
        if not sep:
            raise CredentialError(f"{where}: {registry!r}.auth is not base64 of 'user:password'")
        username, password = user, secret
    if not (username or token):
        raise CredentialError(f"{where}: {registry!r} has neither auth, username nor identitytoken")
    return RegistryAuth(username=username, password=password, identity_token=token)


class Keyring:
    """Credentials by registry key; ``lookup(image)`` gives the matches, best first."""

    def __init__(self, entries: list[tuple[_Key, RegistryAuth]] | None = None) -> None:
        self._entries = list(entries or [])

    def __len__(self) -> int:
        return len(self._entries)

    def __add__(self, other: Keyring) -> Keyring:
        return Keyring(self._entries + other._entries)

    @classmethod
    def from_auths(cls, where: str, auths: object) -> Keyring:
        """``auths`` is the map ``{registry: {auth|username/password|identitytoken}}``."""
        if not isinstance(auths, dict):
            raise CredentialError(f"{where}: expected a map of registry to credentials")
        entries = []
        for registry, entry in auths.items():
            if not isinstance(registry, str) or not registry.strip():
                raise CredentialError(f"{where}: registry keys must be non-empty strings")
            entries.append((_parse_key(registry), _auth_entry(where, registry, entry)))
        return cls(entries)

    @classmethod
    def from_docker_config(cls, where: str, data: bytes | str) -> Keyring:
        """A Docker ``config.json`` / ``.dockerconfigjson``: ``{"auths": {...}}``."""
        doc = _load_json(where, data)
        if not isinstance(doc, dict) or not isinstance(doc.get("auths"), dict):
            raise CredentialError(f'{where}: expected an object with an "auths" map')
        return cls.from_auths(where, doc["auths"])

    @classmethod
    def from_secret(cls, where: str, secret_type: str | None, data: dict[str, str | bytes]) -> Keyring:
        """A pull Secret's decoded data; the type may be unknown (a node reads data only)."""
        if DOCKERCONFIGJSON_KEY in data and secret_type in (None, DOCKERCONFIGJSON_TYPE):
            return cls.from_docker_config(f"{where}[{DOCKERCONFIGJSON_KEY}]", data[DOCKERCONFIGJSON_KEY])
        if DOCKERCFG_KEY in data and secret_type in (None, DOCKERCFG_TYPE):
            return cls.from_auths(f"{where}[{DOCKERCFG_KEY}]",
                                  _load_json(f"{where}[{DOCKERCFG_KEY}]", data[DOCKERCFG_KEY]))
        raise CredentialError(
            f"{where}: not a pull secret (needs key {DOCKERCONFIGJSON_KEY!r} or {DOCKERCFG_KEY!r})")

    def lookup(self, image: str) -> list[RegistryAuth]:
        ref = parse_image_ref(image).normalized()
        registry = ref.registry or DEFAULT_REGISTRY
        host, _, port = registry.partition(":")
        host = host.lower()
        if host in _HUB_ALIASES:
            host = DEFAULT_REGISTRY
        path = ref.repository
        matches = []
        for key, auth in self._entries:
            if key.port != port or not _host_matches(key.host, host):
                continue
            if key.path and not (path == key.path or path.startswith(key.path + "/")):
                continue
            matches.append((key, auth))
        matches.sort(key=lambda m: m[0].specificity(), reverse=True)
        seen: list[RegistryAuth] = []
        for _, auth in matches:
            if auth not in seen:
                seen.append(auth)
        return seen


def _load_json(where: str, data: bytes | str) -> object:
    if isinstance(data, str):
        data = data.encode()
    if len(data) > MAX_CONFIG_BYTES:
        raise CredentialError(f"{where}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CredentialError(f"{where}: not valid JSON ({exc.__class__.__name__})") from None


def load_credential_file(path: str | Path) -> Keyring:
    """The node's credential file; a missing file is an empty keyring."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return Keyring()
    except OSError as exc:
        raise CredentialError(f"{p}: cannot read ({exc.strerror})") from None
    return Keyring.from_docker_config(str(p), data)


__all__ = [
    "CredentialError", "Keyring", "load_credential_file",
    "DOCKERCONFIGJSON_TYPE", "DOCKERCFG_TYPE", "DOCKERCONFIGJSON_KEY", "DOCKERCFG_KEY",
]
