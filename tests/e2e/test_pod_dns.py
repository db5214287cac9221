"""Pod DNS per policy, read from inside the containers (issue 8, item 5).

Only files are checked: nothing here sends a DNS query.
"""

from __future__ import annotations

import socket

from tests.e2e.conftest import busybox, docker, pod_manifest

HOST_RESOLV = "nameserver 10.123.0.53\nsearch host.example corp.example\noptions timeout:2\n"
SHOW = "cat /etc/resolv.conf; echo ==; cat /etc/hosts; echo ==; hostname; echo ==; cat /etc/hostname; echo DONE; sleep 3600"


def _sections(agent, pod: str, container: str) -> list[str]:
    def read():
        out = docker("logs", agent.container_of(pod, container)["Id"])
        return "DONE" in out and out
    out = agent.wait_for(f"{pod}/{container} output", read)
    return [part.strip("\n") for part in out.split("DONE")[0].split("==\n")]


def test_resolv_conf_hosts_and_hostname_per_policy(agent_factory, tmp_path):
    resolv = tmp_path / "host-resolv.conf"
    resolv.write_text(HOST_RESOLV)
    agent = agent_factory(extra_config={"cluster-dns": ["10.96.0.10"], "cluster-domain": "example.test",
                                        "resolv-conf": str(resolv)})
    cluster = pod_manifest(
        "cf", [busybox("a", SHOW), busybox("b", SHOW)],
        hostname="web", subdomain="sub",
        hostAliases=[{"ip": "10.1.2.3", "hostnames": ["foo.local", "bar.local"]}],
        dnsConfig={"searches": ["extra.example"], "options": [{"name": "ndots", "value": "2"}, {"name": "edns0"}]},
    )
    default = pod_manifest("dflt", [busybox("a", SHOW)], dnsPolicy="Default")
    none = pod_manifest("none", [busybox("a", SHOW)], dnsPolicy="None",
                        dnsConfig={"nameservers": ["10.0.0.53"], "searches": ["only.example"]})
    fqdn = pod_manifest("fqdn", [busybox("a", SHOW)], subdomain="svc1", setHostnameAsFQDN=True)
    hostnet = pod_manifest("hostnet", [busybox("a", SHOW)], hostNetwork=True,
                           hostAliases=[{"ip": "10.9.9.9", "hostnames": ["alias.local"]}])
    bad = pod_manifest("bad", [busybox("a", "sleep 3600")], dnsPolicy="None",
                       dnsConfig={"nameservers": ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]})
    agent.write("dns.yaml", cluster, default, none, fqdn, hostnet, bad)

    a = _sections(agent, "cf", "a")
    assert a == _sections(agent, "cf", "b")  # one set of files per pod, shared
    resolv_a, hosts_a, hostname_a, etc_hostname_a = a
    assert resolv_a.splitlines() == [
        "search default.svc.example.test svc.example.test example.test host.example corp.example extra.example",
        "nameserver 10.96.0.10",
        "options ndots:2 edns0",
    ]
    pod_ip = agent.pod("cf")["status"]["podIP"]
    assert hosts_a.startswith("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n")
    assert f"{pod_ip}\tweb.sub.default.svc.example.test\tweb" in hosts_a.splitlines()
    assert "10.1.2.3\tfoo.local\tbar.local" in hosts_a.splitlines()
    assert hostname_a == "web" and etc_hostname_a == "web"

    resolv_d = _sections(agent, "dflt", "a")[0]
    assert resolv_d.splitlines() == ["search host.example corp.example", "nameserver 10.123.0.53", "options timeout:2"]

    resolv_n = _sections(agent, "none", "a")[0]
    assert resolv_n.splitlines() == ["search only.example", "nameserver 10.0.0.53"]

    full = f"fqdn-{agent.node_name}.svc1.default.svc.example.test"
    _resolv, hosts_f, hostname_f, _ = _sections(agent, "fqdn", "a")
    assert hostname_f == full
    assert f"\t{full}\tfqdn-{agent.node_name}" in hosts_f

    resolv_h, hosts_h, hostname_h, _ = _sections(agent, "hostnet", "a")
    assert "nameserver 10.123.0.53" in resolv_h.splitlines()  # ClusterFirst + hostNetwork = Default
    assert hosts_h.startswith("# Kubernetes-managed hosts file (host network).")
    assert "10.9.9.9\talias.local" in hosts_h.splitlines()
    assert hostname_h == socket.gethostname()

    pod = agent.wait_phase("bad", "Failed")
    assert "spec.dnsConfig.nameservers" in pod["status"]["message"]
