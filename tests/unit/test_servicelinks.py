"""Service environment variables: kubelet's names and values, which Services count,
and precedence against the container's own env."""

from __future__ import annotations

import pytest

from nodeagent.kubelet.containerconfig import ConfigError, make_environment
from nodeagent.kubelet.servicelinks import ServiceEnv, env_for_services


def svc(name, ns="default", ip="10.96.0.20", ports=({"name": "http", "port": 80, "protocol": "TCP"},)):
    return {"metadata": {"name": name, "namespace": ns}, "spec": {"clusterIP": ip, "ports": list(ports)}}


def test_variable_names_and_values():
    env = env_for_services([svc("my-web", ports=({"port": 8080}, {"name": "metrics", "port": 9100, "protocol": "UDP"}))])
    assert env == {
        "MY_WEB_SERVICE_HOST": "10.96.0.20",
        "MY_WEB_SERVICE_PORT": "8080",
        "MY_WEB_SERVICE_PORT_METRICS": "9100",
        "MY_WEB_PORT": "tcp://10.96.0.20:8080",
        "MY_WEB_PORT_8080_TCP": "tcp://10.96.0.20:8080",
        "MY_WEB_PORT_8080_TCP_PROTO": "tcp",
        "MY_WEB_PORT_8080_TCP_PORT": "8080",
        "MY_WEB_PORT_8080_TCP_ADDR": "10.96.0.20",
        "MY_WEB_PORT_9100_UDP": "udp://10.96.0.20:9100",
        "MY_WEB_PORT_9100_UDP_PROTO": "udp",
        "MY_WEB_PORT_9100_UDP_PORT": "9100",
        "MY_WEB_PORT_9100_UDP_ADDR": "10.96.0.20",
    }


def pod(ns="apps", links=True):
    return {"metadata": {"name": "p", "namespace": ns, "uid": "u"},
            "spec": {"enableServiceLinks": links, "containers": [{"name": "c"}]}}


def test_which_services_count():
    services = [svc("kubernetes", ip="10.96.0.1", ports=({"name": "https", "port": 443},)),
                svc("web", "apps"), svc("other", "elsewhere"), svc("headless", "apps", ip="None"),
                svc("noip", "apps", ip="")]
    env = ServiceEnv(lambda: services).for_pod(pod())
    assert env["KUBERNETES_SERVICE_HOST"] == "10.96.0.1" and env["KUBERNETES_SERVICE_PORT"] == "443"
    assert env["WEB_SERVICE_HOST"] == "10.96.0.20"
    assert not any(k.startswith(("OTHER_", "HEADLESS_", "NOIP_")) for k in env)
    # enableServiceLinks: false keeps only the master service.
    env = ServiceEnv(lambda: services).for_pod(pod(links=False))
    assert "KUBERNETES_SERVICE_HOST" in env and not any(k.startswith("WEB_") for k in env)
    # A pod in default sees the master service once.
    assert ServiceEnv(lambda: services).for_pod(pod("default"))["KUBERNETES_PORT"] == "tcp://10.96.0.1:443"


def test_not_yet_read_is_a_config_error():
    with pytest.raises(ConfigError, match="services have not yet been read") as info:
        ServiceEnv(lambda: None).for_pod(pod())
    assert info.value.reason == "CreateContainerConfigError"
    # A static pod does not wait for the API (kubelet's exception).
    static = pod()
    static["metadata"]["annotations"] = {"kubernetes.io/config.source": "file"}
    assert ServiceEnv(lambda: None).for_pod(static) == {}


def test_container_env_wins_and_may_refer_to_service_variables():
    container = {"name": "c", "env": [{"name": "WEB_SERVICE_PORT", "value": "1234"},
                                      {"name": "URL", "value": "http://$(WEB_SERVICE_HOST):$(WEB_SERVICE_PORT)"}]}
    env = make_environment(pod(), container, pod_ip="10.1.0.2", host_ip="192.0.2.2", node_name="n",
                           service_env={"WEB_SERVICE_HOST": "10.96.0.20", "WEB_SERVICE_PORT": "80"})
    assert env["WEB_SERVICE_PORT"] == "1234"
    assert env["WEB_SERVICE_HOST"] == "10.96.0.20"
    assert env["URL"] == "http://10.96.0.20:1234"
