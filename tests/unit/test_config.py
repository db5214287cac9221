"""Settings: defaults < config file < flags; clear errors naming file and key."""

from __future__ import annotations

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
