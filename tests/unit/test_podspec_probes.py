"""Probe and lifecycle-handler validation: the node accepts what the prober honours."""

from __future__ import annotations

import pytest

from nodeagent.api.podspec import apply_defaults, validate_pod


def pod_with(**container_fields) -> dict:
    c = {"name": "c", "image": "busybox:1.35", **container_fields}
    return apply_defaults({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                           "spec": {"containers": [c], "terminationGracePeriodSeconds": 20}})


def errors(pod: dict) -> dict[str, str]:
    return {e.field: e.message for e in validate_pod(pod)}


P = "spec.containers[0]"


def test_defaults_fill_unset_and_zero_timing_fields():
    pod = pod_with(readinessProbe={"httpGet": {"port": 80}, "timeoutSeconds": 0, "periodSeconds": 0},
                   livenessProbe={"tcpSocket": {"port": "http"}})
    c = pod["spec"]["containers"][0]
    assert c["readinessProbe"]["timeoutSeconds"] == 1 and c["readinessProbe"]["periodSeconds"] == 10
    assert c["readinessProbe"]["httpGet"] == {"port": 80, "path": "/", "scheme": "HTTP"}
    assert (c["livenessProbe"]["successThreshold"], c["livenessProbe"]["failureThreshold"]) == (1, 3)
    assert "initialDelaySeconds" not in c["livenessProbe"]  # 0 by meaning
    assert errors(pod) == {}


@pytest.mark.parametrize("probe, field, text", [
    ({}, "livenessProbe", "exactly one handler"),
    ({"exec": {"command": ["true"]}, "tcpSocket": {"port": 1}}, "livenessProbe", "exactly one handler"),
    ({"exec": {}}, "livenessProbe.exec.command", "Required"),
    ({"httpGet": {"port": 0}}, "livenessProbe.httpGet.port", "between 1 and 65535"),
    ({"httpGet": {"port": 70000}}, "livenessProbe.httpGet.port", "between 1 and 65535"),
    ({"httpGet": {"port": "Not_A_Name"}}, "livenessProbe.httpGet.port", "port name"),
    ({"httpGet": {"port": 80, "scheme": "FTP"}}, "livenessProbe.httpGet.scheme", "HTTPS"),
    ({"httpGet": {"port": 80, "httpHeaders": [{"name": "Bad Header", "value": "x"}]}},
     "livenessProbe.httpGet.httpHeaders[0].name", "header name"),
    ({"tcpSocket": {"port": 80, "host": 5}}, "livenessProbe.tcpSocket.host", "string"),
    ({"grpc": {"port": "grpc"}}, "livenessProbe.grpc.port", "between 1 and 65535"),
    ({"grpc": {"port": 9, "service": 3}}, "livenessProbe.grpc.service", "string"),
    ({"exec": {"command": ["true"]}, "successThreshold": 2}, "livenessProbe.successThreshold", "must be 1"),
    ({"exec": {"command": ["true"]}, "failureThreshold": -1}, "livenessProbe.failureThreshold", "greater than"),
    ({"exec": {"command": ["true"]}, "initialDelaySeconds": -1}, "livenessProbe.initialDelaySeconds", "greater"),
    ({"exec": {"command": ["true"]}, "terminationGracePeriodSeconds": 0},
     "livenessProbe.terminationGracePeriodSeconds", "greater"),
])
def test_probe_rules(probe, field, text):
    found = errors(pod_with(livenessProbe=probe))
    assert list(found) == [f"{P}.{field}"], found
    assert text in found[f"{P}.{field}"]


def test_readiness_may_need_several_successes_but_has_no_grace():
    assert errors(pod_with(readinessProbe={"exec": {"command": ["true"]}, "successThreshold": 3})) == {}
    found = errors(pod_with(readinessProbe={"exec": {"command": ["true"]}, "terminationGracePeriodSeconds": 5}))
    assert found == {f"{P}.readinessProbe.terminationGracePeriodSeconds": "must not be set for readinessProbes"}
    found = errors(pod_with(startupProbe={"exec": {"command": ["true"]}, "successThreshold": 2}))
    assert list(found) == [f"{P}.startupProbe.successThreshold"]


def test_lifecycle_handlers():
    ok = {"postStart": {"exec": {"command": ["true"]}},
          "preStop": {"httpGet": {"port": 8080, "path": "/quit"}}}
    assert errors(pod_with(lifecycle=ok)) == {}
    assert errors(pod_with(lifecycle={"preStop": {"sleep": {"seconds": 20}}})) == {}
    found = errors(pod_with(lifecycle={"preStop": {"sleep": {"seconds": 21}}}))
    assert list(found) == [f"{P}.lifecycle.preStop.sleep.seconds"]
    assert "terminationGracePeriodSeconds (20)" in found[f"{P}.lifecycle.preStop.sleep.seconds"]
    found = errors(pod_with(lifecycle={"postStart": {"tcpSocket": {"port": 80}}}))
    assert list(found) == [f"{P}.lifecycle.postStart.tcpSocket"]
    assert "not supported" in found[f"{P}.lifecycle.postStart.tcpSocket"]
    found = errors(pod_with(lifecycle={"postStart": {"grpc": {"port": 80}}}))
    assert list(found) == [f"{P}.lifecycle.postStart"]
    found = errors(pod_with(lifecycle={"postStart": {"exec": {"command": ["a"]}, "sleep": {"seconds": 1}}}))
    assert list(found) == [f"{P}.lifecycle.postStart"]
