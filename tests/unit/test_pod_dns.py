"""Pod resolv.conf, /etc/hosts and hostname (nodeagent.kubelet.dns)."""

from __future__ import annotations

import pytest

from nodeagent.kubelet.dns import (
    DNSError,
    DNSSettings,
    ResolvConf,
    admit_pod,
    kernel_hostname,
    parse_resolv_conf,
    pod_resolv_conf,
    render_hosts,
    write_pod_files,
)

HOST = parse_resolv_conf("# comment\nnameserver 10.0.0.2\nnameserver 10.0.0.3\nsearch a.example b.example\n"
                         "options timeout:1 rotate\n")
SETTINGS = DNSSettings(cluster_dns=("10.96.0.10",), cluster_domain="cluster.local")


def pod(**spec):
    return {"metadata": {"name": "web-0", "namespace": "team", "uid": "u"},
            "spec": {"containers": [{"name": "c"}], **spec}}


def test_cluster_first():
    conf, warnings = pod_resolv_conf(pod(), SETTINGS, HOST)
    assert conf.nameservers == ["10.96.0.10"]
    assert conf.searches == ["team.svc.cluster.local", "svc.cluster.local", "cluster.local", "a.example", "b.example"]
    assert conf.options == ["ndots:5"] and warnings == []
    assert conf.render() == ("search team.svc.cluster.local svc.cluster.local cluster.local a.example b.example\n"
                             "nameserver 10.96.0.10\noptions ndots:5\n")


def test_cluster_first_without_cluster_dns_falls_back_to_default():
    conf, warnings = pod_resolv_conf(pod(), DNSSettings(), HOST)
    assert conf.nameservers == ["10.0.0.2", "10.0.0.3"] and conf.searches == ["a.example", "b.example"]
    assert warnings[0][0] == "MissingClusterDNS" and "Falling back" in warnings[0][1]


def test_host_network_policies():
    conf, _ = pod_resolv_conf(pod(hostNetwork=True), SETTINGS, HOST)
    assert conf.nameservers == ["10.0.0.2", "10.0.0.3"]  # ClusterFirst + hostNetwork = Default
    conf, _ = pod_resolv_conf(pod(hostNetwork=True, dnsPolicy="ClusterFirstWithHostNet"), SETTINGS, HOST)
    assert conf.nameservers == ["10.96.0.10"]


def test_none_and_dns_config_merge():
    conf, _ = pod_resolv_conf(pod(dnsPolicy="None", dnsConfig={"nameservers": ["1.2.3.4"]}), SETTINGS, HOST)
    assert conf == ResolvConf(["1.2.3.4"], [], [])
    conf, _ = pod_resolv_conf(pod(dnsPolicy="Default", dnsConfig={
        "nameservers": ["10.0.0.2", "10.0.0.9"], "searches": ["a.example", "c.example"],
        "options": [{"name": "timeout", "value": "5"}, {"name": "edns0"}]}), SETTINGS, HOST)
    assert conf.nameservers == ["10.0.0.2", "10.0.0.3", "10.0.0.9"]
    assert conf.searches == ["a.example", "b.example", "c.example"]
    assert conf.options == ["timeout:5", "rotate", "edns0"]


def test_limits_trim_with_warning():
    conf, warnings = pod_resolv_conf(pod(dnsConfig={"nameservers": ["10.1.1.1", "10.1.1.2", "10.1.1.3"]}),
                                     SETTINGS, HOST)
    assert conf.nameservers == ["10.96.0.10", "10.1.1.1", "10.1.1.2"]
    assert any(w[0] == "DNSConfigForming" for w in warnings)
    long_searches = [f"s{i}.example" for i in range(40)]
    conf, warnings = pod_resolv_conf(pod(dnsPolicy="None", dnsConfig={"nameservers": ["1.1.1.1"],
                                                                      "searches": long_searches}), SETTINGS, HOST)
    assert len(conf.searches) == 32 and warnings


@pytest.mark.parametrize("spec,field", [
    ({"dnsPolicy": "None"}, "spec.dnsConfig"),
    ({"dnsPolicy": "None", "dnsConfig": {}}, "spec.dnsConfig.nameservers"),
    ({"dnsConfig": {"nameservers": ["a.b.c.d"]}}, "spec.dnsConfig.nameservers[0]"),
    ({"dnsConfig": {"nameservers": ["1.1.1.1"] * 4}}, "spec.dnsConfig.nameservers"),
    ({"dnsConfig": {"searches": ["Bad_Name"]}}, "spec.dnsConfig.searches[0]"),
    ({"dnsConfig": {"options": [{"value": "1"}]}}, "spec.dnsConfig.options[0].name"),
    ({"hostAliases": [{"ip": "nope", "hostnames": ["a"]}]}, "spec.hostAliases[0].ip"),
    ({"hostAliases": [{"ip": "1.2.3.4", "hostnames": ["UPPER"]}]}, "spec.hostAliases[0].hostnames[0]"),
])
def test_invalid_dns_settings_refused(spec, field):
    reason, message = admit_pod(pod(**spec))
    assert reason == "InvalidDNSConfig" and field in message


def test_hostnames_and_hosts_file():
    p = pod(hostname="db", subdomain="sub", hostAliases=[{"ip": "10.1.2.3", "hostnames": ["foo", "bar"]}])
    assert kernel_hostname(p, "cluster.local") == "db"
    text = render_hosts(p, ["10.244.0.5"], SETTINGS)
    assert text.splitlines()[0] == "# Kubernetes-managed hosts file."
    assert "10.244.0.5\tdb.sub.team.svc.cluster.local\tdb" in text.splitlines()
    assert text.endswith("\n# Entries added by HostAliases.\n10.1.2.3\tfoo\tbar\n")
    p["spec"]["setHostnameAsFQDN"] = True
    assert kernel_hostname(p, "cluster.local") == "db.sub.team.svc.cluster.local"
    p["spec"]["hostname"] = "x" * 40
    with pytest.raises(DNSError, match="too long"):
        kernel_hostname(p, "cluster.local")
    assert render_hosts(pod(), ["10.0.0.1"], SETTINGS).splitlines()[-1] == "10.0.0.1\tweb-0"
    host = render_hosts(pod(hostNetwork=True), [], SETTINGS, "127.0.0.1 localhost\n")
    assert host == "# Kubernetes-managed hosts file (host network).\n127.0.0.1 localhost\n"


def test_write_pod_files_rewrites_in_place(tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 10.0.0.2\n")
    settings = DNSSettings(resolv_conf=str(resolv))
    mounts, warnings = write_pod_files(tmp_path / "pod", pod(), ["10.0.0.7"], settings)
    assert [m.container_path for m in mounts] == ["/etc/resolv.conf", "/etc/hosts", "/etc/hostname"]
    hosts = tmp_path / "pod" / "etc-hosts"
    inode = hosts.stat().st_ino
    write_pod_files(tmp_path / "pod", pod(), ["10.0.0.8"], settings)
    assert hosts.stat().st_ino == inode  # bind mounts keep seeing the file
    assert "10.0.0.8\tweb-0" in hosts.read_text()
    assert (tmp_path / "pod" / "resolv.conf").read_text() == "nameserver 10.0.0.2\n"
