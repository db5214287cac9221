"""Join inputs and the detached JWS check, without a network."""

from __future__ import annotations

import base64
import json

import pytest

from nodeagent.join.discovery import verify_detached_jws
from nodeagent.join.flow import parse_duration
from nodeagent.join.token import UsageError, normalise_server, parse_pins, parse_token
from tests.controlplane.tokens import detached_jws


def test_token_parsing_hides_the_secret():
    token = parse_token("abcdef.0123456789abcdef")
    assert token.token_id == "abcdef" and token.username == "system:bootstrap:abcdef"
    assert "0123456789abcdef" not in repr(token) and "0123456789abcdef" not in str(token)
    for bad in ("abcdef.0123456789abcde", "abcdeF.0123456789abcdef", "abcdef0123456789abcdef", ""):
        with pytest.raises(UsageError):
            parse_token(bad)


def test_pins_and_server():
    assert parse_pins(["sha256:" + "AB" * 32]) == ["ab" * 32]
    for bad in ("sha256:abc", "sha1:" + "ab" * 20, "ab" * 32):
        with pytest.raises(UsageError):
            parse_pins([bad])
    assert normalise_server("10.0.0.1:6443") == "https://10.0.0.1:6443"
    assert normalise_server("https://h:6443/") == "https://h:6443"
    with pytest.raises(UsageError):
        normalise_server("http://h:6443")


def test_durations():
    assert parse_duration("90") == 90 and parse_duration("5m") == 300 and parse_duration("1h30m") == 5400
    assert parse_duration("1.5s") == 1.5
    with pytest.raises(UsageError):
        parse_duration("5 minutes")


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_detached_jws_verification():
    token = parse_token("abcdef.0123456789abcdef")
    payload = "apiVersion: v1\nkind: Config\n"
    jws = detached_jws(payload, "abcdef", "0123456789abcdef")
    assert jws.count(".") == 2 and jws.split(".")[1] == ""
    assert verify_detached_jws(jws, payload, token) is None
    assert "does not match" in verify_detached_jws(jws, payload + " ", token)
    assert "does not match" in verify_detached_jws(jws, payload, parse_token("abcdef.zzzzzzzzzzzzzzzz"))
    header, _, sig = jws.split(".")
    assert "not a detached JWS" in verify_detached_jws(f"{header}.{_b64({'x': 1})}.{sig}", payload, token)
    none_alg = f"{_b64({'alg': 'none', 'kid': 'abcdef'})}..{sig}"
    assert "not HS256" in verify_detached_jws(none_alg, payload, token)
    other_kid = detached_jws(payload, "zzzzzz", "0123456789abcdef")
    assert "key id" in verify_detached_jws(other_kid, payload, token)
