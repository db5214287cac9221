"""Settings: defaults < config file < flags; clear errors naming file and key."""

from __future__ import annotations

import re

import pytest

from nodeagent.cli import main
from nodeagent.config import ConfigError, build_settings


def test_flags_win_over_file_over_defaults(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("manifest-dir: /etc/m\npod-cidr: 10.250.0.0/24\nbackoff_base: 2\nrelist-period: 3\n")
    s = build_settings(str(cfg), {"pod_cidr": "10.251.0.0/24", "node_name": None})
    assert s.manifest_dir == "/etc/m"
    assert s.pod_cidr == "10.251.0.0/24"  # flag wins
    assert s.backoff_base == 2.0 and s.relist_period == 3.0  # file wins over defaults
    assert s.status_address == "127.0.0.1:10255" and s.root_dir == "/var/lib/nodeagent"


@pytest.mark.parametrize("text,needle", [
    ("manifest-dir: /m\nbogus-key: 1\n", "unknown setting 'bogus-key'"),
    ("manifest-dir: /m\nbackoff-base: fast\n", "backoff-base"),
    ("- a\n- b\n", "mapping"),
    ("manifest-dir: [unclosed\n", "not valid YAML"),
    ("manifest-dir: /m\npod-cidr: 10.0.0.1/24\n", "pod-cidr"),
    ("manifest-dir: /m\nstatus-address: nope\n", "status-address"),
])
def test_bad_config_names_file_and_key(tmp_path, text, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as exc:
        build_settings(str(cfg), {})
    assert needle in str(exc.value)
    if "unknown" in needle or "backoff" in needle or "mapping" in needle or "YAML" in needle:
        assert str(cfg) in str(exc.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        build_settings(str(tmp_path / "absent.yaml"), {})


def test_nothing_to_run_is_an_error():
    with pytest.raises(ConfigError, match="nothing to run"):
        build_settings(None, {})


def test_cli_exit_codes(tmp_path, capsys):
    assert main(["version"]) == 0
    assert "nodeagent 0.1.0" in capsys.readouterr().out
    assert main(["run", "--manifest-dir", str(tmp_path), "--pod-cidr", "banana"]) == 2
    assert "pod-cidr" in capsys.readouterr().err


@pytest.mark.parametrize("flags, needle", [
    ({"eviction_hard": "memory.free<1Gi"}, "eviction-hard: 'memory.free<1Gi': unknown signal"),
    ({"image_gc_high_threshold": 70, "image_gc_low_threshold": 80}, "image-gc-low-threshold"),
    ({"max_parallel_image_pulls": -1}, "max-parallel-image-pulls"),
    ({"eviction_monitoring_interval": 0}, "eviction-monitoring-interval"),
])
def test_image_and_eviction_settings_are_checked(flags, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        build_settings(None, {"manifest_dir": "/tmp", **flags})


def test_credential_file_is_checked_at_start(tmp_path):
    bad = tmp_path / "creds.json"
    bad.write_text('{"auths": {"r.example.com": {"auth": "%%%"}}}')
    with pytest.raises(ConfigError, match="image-credential-file: .*base64"):
        build_settings(None, {"manifest_dir": "/tmp", "image_credential_file": str(bad)})
