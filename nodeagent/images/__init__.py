"""Image pulls as the kubelet sees them: which registry credentials a pod's image is
pulled with (``imagePullSecrets``, the node's credential file) and trying them in
kubelet's order. The Docker side (one pull per image, parallel-pull limit, deadlines)
is ``runtime.images``."""

from __future__ import annotations

from typing import Protocol

import structlog

from nodeagent.images.credentials import CredentialError, Keyring, load_credential_file
from runtime.images import RegistryAuth
from runtime.types import ImagePullError, PullPolicy

log = structlog.get_logger(__name__)


class SecretSource(Protocol):
    def secret(self, namespace: str, name: str) -> dict[str, str | bytes] | None: ...


class ImageService(Protocol):
    async def ensure_image(self, image: str, policy: PullPolicy,
                           auth: RegistryAuth | None = None) -> str: ...


class PullCredentials:
    """The keyring for one pod: its pull secrets first, then the node's file.

    ``problems`` lists what could not be used (missing or malformed secrets, a bad
    credential file) so the kubelet can say so in an event, as kubelet's
    ``FailedToRetrieveImagePullSecret`` does; the pull goes on without them.
    """

    def __init__(self, credential_file: str | None = None,
                 secrets: SecretSource | None = None) -> None:
        self.credential_file = credential_file
        self.secrets = secrets

    def _node_keyring(self) -> tuple[Keyring, list[str]]:
        if not self.credential_file:
            return Keyring(), []
        try:
            # Read on each pull (pulls are rare): an edited file applies at once.
            return load_credential_file(self.credential_file), []
        except CredentialError as exc:
            return Keyring(), [str(exc)]

    def for_pod(self, pod: dict) -> tuple[Keyring, list[str]]:
        meta = pod.get("metadata") or {}
        namespace = meta.get("namespace") or "default"
        keyring, problems = Keyring(), []
        for ref in (pod.get("spec") or {}).get("imagePullSecrets") or []:
            name = ref.get("name") if isinstance(ref, dict) else None
            if not name:
                continue
            if self.secrets is None:
                problems.append(f'secret "{name}": this node has no API server to read Secrets '
                                "from (standalone mode); use the image-credential-file setting")
                continue
            try:
                data = self.secrets.secret(namespace, name)
            except Exception as exc:  # the cache could not answer; pull without it
                problems.append(f'secret "{namespace}/{name}": {exc}')
                continue
            if data is None:
                problems.append(f'secret "{namespace}/{name}" not found')
                continue
            try:
                keyring = keyring + Keyring.from_secret(f'secret "{namespace}/{name}"', None, data)
            except CredentialError as exc:
                problems.append(str(exc))
        node, node_problems = self._node_keyring()
        return keyring + node, problems + node_problems


async def pull_with_credentials(images: ImageService, image: str, policy: PullPolicy,
                                keyring: Keyring) -> str:
    """kubelet's order: every matching credential in turn, the first success wins; with
    no match, an anonymous pull. Errors of all attempts are reported together."""
    candidates = keyring.lookup(image)
    if not candidates:
        return await images.ensure_image(image, policy)
    errors = []
    for auth in candidates:
        try:
            return await images.ensure_image(image, policy, auth=auth)
        except ImagePullError as exc:
            errors.append(str(exc))
    raise ImagePullError("; ".join(errors) if len(errors) > 1 else errors[0])


__all__ = ["PullCredentials", "pull_with_credentials", "CredentialError", "Keyring"]
