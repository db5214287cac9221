"""Log options, the logs command's helpers, and the new settings."""

from __future__ import annotations

import pytest

from nodeagent.config import ConfigError, build_settings, container_log_max_bytes
from nodeagent.kubelet.logs import LogsError, parse_log_options, read_termination_file
from nodeagent.logscmd import _pick_container, parse_duration


def test_parse_log_options():
    o = parse_log_options({"follow": "true", "tailLines": "10", "sinceSeconds": "60", "timestamps": "1",
                           "limitBytes": "100", "previous": "false"}, now=1000.0)
    assert (o.follow, o.tail, o.since, o.timestamps, o.limit_bytes, o.previous) == (True, 10, 940.0, True, 100, False)
    assert parse_log_options({"sinceTime": "1970-01-01T00:01:40Z"}).since == 100.0
    for bad in ({"tailLines": "x"}, {"limitBytes": "0"}, {"sinceSeconds": "1", "sinceTime": "1970-01-01T00:00:00Z"},
                {"sinceTime": "yesterday"}):
        with pytest.raises(LogsError) as info:
            parse_log_options(bad)
        assert info.value.status == 400


def test_termination_file_keeps_the_last_4096_bytes(tmp_path):
    path = tmp_path / "msg"
    path.write_bytes(b"a" * 5000 + b"END")
    text = read_termination_file(str(path))
    assert len(text) == 4096 and text.endswith("aEND")
    assert read_termination_file(str(tmp_path / "missing")) == ""


def test_parse_duration():
    assert parse_duration("5s") == 5 and parse_duration("2m30s") == 150 and parse_duration("1.5h") == 5400
    assert parse_duration("0") == 0
    for bad in ("", "5", "5x", "s5"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_default_container_like_kubectl():
    spec = {"containers": [{"name": "a"}, {"name": "b"}], "initContainers": [{"name": "i"}]}
    assert _pick_container({"spec": spec}, None) == ("a", 'Defaulted container "a" out of: a, b, i (init)')
    assert _pick_container({"spec": {"containers": [{"name": "only"}]}}, None) == ("only", None)
    annotated = {"metadata": {"annotations": {"kubectl.kubernetes.io/default-container": "b"}}, "spec": spec}
    assert _pick_container(annotated, None) == ("b", None)
    assert _pick_container({"spec": spec}, "x") == ("x", None)


def test_new_settings(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("manifest-dir: /m\ncluster-dns: [10.96.0.10, 10.96.0.11]\nallowed-unsafe-sysctls: net.core.*\n"
                   "container-log-max-size: 20Mi\ncontainer-log-max-files: 3\n")
    s = build_settings(str(cfg), {})
    assert s.cluster_dns == ["10.96.0.10", "10.96.0.11"] and s.allowed_unsafe_sysctls == ["net.core.*"]
    assert container_log_max_bytes(s) == 20 * 2**20 and s.container_log_max_files == 3
    assert s.cluster_domain == "cluster.local"
    for text, needle in (("cluster-dns: [nope]", "cluster-dns"), ("allowed-unsafe-sysctls: [vm.swappiness]",
                                                                 "allowed-unsafe-sysctls"),
                         ("container-log-max-size: 1k", "container-log-max-size"),
                         ("container-log-max-files: 1", "container-log-max-files"),
                         ("cluster-dns: 5", "cluster-dns")):
        cfg.write_text("manifest-dir: /m\n" + text + "\n")
        with pytest.raises(ConfigError, match=needle):
            build_settings(str(cfg), {})
