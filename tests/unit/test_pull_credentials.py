"""Registry credentials: parsing pull secrets and credential files, kubelet's keyring
matching, and the order credentials are tried in."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from nodeagent.images import PullCredentials, pull_with_credentials
from nodeagent.images.credentials import CredentialError, Keyring, load_credential_file
from runtime.images import RegistryAuth
from runtime.types import ImagePullError, PullPolicy


def _auth(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def _config(auths: dict) -> bytes:
    return json.dumps({"auths": auths}).encode()


def test_dockerconfigjson_auth_and_username_password():
    ring = Keyring.from_docker_config("f", _config({
        "reg.example.com:5000": {"auth": _auth("alice", "pw:with:colons")},
        "other.example.com": {"username": "bob", "password": "x"},
    }))
    assert ring.lookup("reg.example.com:5000/app:1") == [RegistryAuth("alice", "pw:with:colons")]
    assert ring.lookup("other.example.com/app") == [RegistryAuth("bob", "x")]
    assert ring.lookup("reg.example.com/app") == []  # the port is part of the key
    assert ring.lookup("busybox") == []


def test_docker_hub_spellings_and_path_prefixes():
    ring = Keyring.from_auths("f", {
        "https://index.docker.io/v1/": {"auth": _auth("hub", "1")},
        "quay.example.com/team": {"auth": _auth("team", "2")},
        "quay.example.com/team/app": {"auth": _auth("app", "3")},
        "*.example.org": {"auth": _auth("glob", "4")},
    })
    assert ring.lookup("busybox:1.35") == [RegistryAuth("hub", "1")]
    assert ring.lookup("docker.io/library/nginx") == [RegistryAuth("hub", "1")]
    # Most specific first, then the broader match (kubelet tries each).
    assert ring.lookup("quay.example.com/team/app:v1") == [RegistryAuth("app", "3"), RegistryAuth("team", "2")]
    assert ring.lookup("quay.example.com/team/other") == [RegistryAuth("team", "2")]
    assert ring.lookup("quay.example.com/teamx/app") == []  # a prefix of path segments only
    assert ring.lookup("a.example.org/x") == [RegistryAuth("glob", "4")]
    assert ring.lookup("a.b.example.org/x") == []  # '*' is one label


def test_dockercfg_secret_and_identity_token():
    data = {".dockercfg": json.dumps({"r.example.com": {"identitytoken": "tok"}}).encode()}
    ring = Keyring.from_secret("secret", None, data)
    assert ring.lookup("r.example.com/x") == [RegistryAuth(identity_token="tok")]
    assert RegistryAuth(identity_token="tok").header("r.example.com")  # encodes


@pytest.mark.parametrize("doc, message", [
    (b"not json", "not valid JSON"),
    (b"[]", '"auths"'),
    (_config({"r": "x"}), "must be an object"),
    (_config({"r": {"auth": "%%%"}}), "base64"),
    (_config({"r": {"auth": base64.b64encode(b"nocolon").decode()}}), "user:password"),
    (_config({"r": {"password": "only"}}), "neither"),
    (_config({"r": {"username": 5}}), "must be a string"),
    (b" " * (1024 * 1024 + 1), "larger than"),
])
def test_malformed_documents_name_what_is_wrong(doc, message):
    with pytest.raises(CredentialError, match=message):
        Keyring.from_docker_config("secret \"ns/pull\"", doc)


def test_secret_without_pull_keys_is_refused():
    with pytest.raises(CredentialError, match="not a pull secret"):
        Keyring.from_secret("secret \"ns/x\"", None, {"token": b"abc"})


def test_credential_file(tmp_path):
    assert len(load_credential_file(tmp_path / "missing.json")) == 0
    path = tmp_path / "config.json"
    path.write_bytes(_config({"r.example.com": {"auth": _auth("u", "p")}}))
    assert load_credential_file(path).lookup("r.example.com/a") == [RegistryAuth("u", "p")]
    path.write_text("{")
    with pytest.raises(CredentialError, match=str(path)):
        load_credential_file(path)


class _Secrets:
    def __init__(self, objects: dict[tuple[str, str], dict]) -> None:
        self.objects = objects

    def secret(self, namespace: str, name: str):
        if name == "broken-cache":
            raise RuntimeError("failed to sync secret cache")
        return self.objects.get((namespace, name))


def _pod(*secrets: str) -> dict:
    return {"metadata": {"name": "p", "namespace": "ns", "uid": "u"},
            "spec": {"imagePullSecrets": [{"name": s} for s in secrets]}}


def test_pod_secrets_come_before_the_node_file_and_problems_are_reported(tmp_path):
    node_file = tmp_path / "config.json"
    node_file.write_bytes(_config({"r.example.com": {"auth": _auth("node", "n")}}))
    secrets = _Secrets({
        ("ns", "good"): {".dockerconfigjson": _config({"r.example.com": {"auth": _auth("pod", "p")}})},
        ("ns", "garbled"): {".dockerconfigjson": b"{"},
    })
    creds = PullCredentials(str(node_file), secrets)
    ring, problems = creds.for_pod(_pod("good", "missing", "garbled", "broken-cache"))
    assert ring.lookup("r.example.com/app") == [RegistryAuth("pod", "p"), RegistryAuth("node", "n")]
    assert len(problems) == 3
    assert any('"ns/missing" not found' in p for p in problems)
    assert any("garbled" in p and "JSON" in p for p in problems)
    assert any("broken-cache" in p for p in problems)


def test_standalone_pod_with_pull_secrets_is_told_to_use_the_node_file():
    ring, problems = PullCredentials(None, None).for_pod(_pod("regcred"))
    assert len(ring) == 0
    assert problems and "image-credential-file" in problems[0]


class _FakeImages:
    def __init__(self, accept: RegistryAuth | None) -> None:
        self.accept = accept
        self.tried: list[RegistryAuth | None] = []

    async def ensure_image(self, image, policy, auth=None):
        self.tried.append(auth)
        if auth == self.accept:
            return "sha256:ok"
        raise ImagePullError(f"denied for {auth.username if auth else 'anonymous'}")


async def test_each_matching_credential_is_tried_in_order():
    a, b = RegistryAuth("a", "1"), RegistryAuth("b", "2")
    ring = Keyring.from_auths("f", {"r.example.com/x/y": {"auth": _auth("a", "1")},
                                    "r.example.com": {"auth": _auth("b", "2")}})
    images = _FakeImages(accept=b)
    assert await pull_with_credentials(images, "r.example.com/x/y:1", PullPolicy.ALWAYS, ring) == "sha256:ok"
    assert images.tried == [a, b]
    # No credential works: every error is reported; there is no anonymous retry.
    images = _FakeImages(accept=None)
    with pytest.raises(ImagePullError, match="denied for a; .*denied for b"):
        await pull_with_credentials(images, "r.example.com/x/y:1", PullPolicy.ALWAYS, ring)
    assert images.tried == [a, b]
    # No match at all: one anonymous pull.
    images = _FakeImages(accept=None)
    assert await pull_with_credentials(images, "elsewhere.example.com/z", PullPolicy.ALWAYS, ring) == "sha256:ok"
    assert images.tried == [None]
