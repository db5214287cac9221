"""securityContext translation and refusals (nodeagent.kubelet.security)."""

from __future__ import annotations

import json
import os
import stat

import pytest

from nodeagent.kubelet.containerconfig import ConfigError, NodeResources, build_container_config
from nodeagent.kubelet.security import (
    SECCOMP_UNCONFINED,
    SecurityPolicy,
    admit_pod,
    apply_fs_group,
    container_security,
    normalize_sysctl,
    pod_sysctls,
    validate_allowed_unsafe_sysctls,
)

NODE = NodeResources(cpu_millicores=1000, memory_bytes=2**30, ephemeral_storage_bytes=2**30)


def pod(containers=None, **sc):
    return {"metadata": {"name": "p", "namespace": "ns", "uid": "u1"},
            "spec": {"containers": containers or [{"name": "c", "image": "busybox:1.35"}],
                     "securityContext": sc}}


def test_container_level_wins_and_groups_merge():
    p = pod([{"name": "c", "image": "i", "securityContext": {"runAsUser": 5, "seccompProfile": {"type": "Unconfined"}}}],
            runAsUser=1, runAsGroup=2, supplementalGroups=[7, 8], fsGroup=9, seccompProfile={"type": "RuntimeDefault"})
    s = container_security(p, p["spec"]["containers"][0])
    assert (s.run_as_user, s.run_as_group) == (5, 2)
    assert s.supplemental_groups == [7, 8, 9]
    assert s.seccomp == SECCOMP_UNCONFINED
    other = container_security(p, {"name": "d", "image": "i"})
    assert other.run_as_user == 1 and other.seccomp is None  # pod's RuntimeDefault = Docker's profile


def test_seccomp_default_and_privileged():
    p = pod()
    assert container_security(p, {"name": "c"}).seccomp == SECCOMP_UNCONFINED  # kubelet's default
    assert container_security(p, {"name": "c"}, SecurityPolicy(seccomp_default=True)).seccomp is None
    priv = {"name": "c", "securityContext": {"privileged": True, "seccompProfile": {"type": "RuntimeDefault"}}}
    assert container_security(p, priv).seccomp == SECCOMP_UNCONFINED
    with pytest.raises(ConfigError, match="allowPrivilegeEscalation"):
        container_security(p, {"name": "c", "securityContext": {"privileged": True, "allowPrivilegeEscalation": False}})


def test_capabilities_no_new_privs_rootfs_procmount():
    c = {"name": "c", "securityContext": {"capabilities": {"add": ["net_admin", "CAP_SYS_TIME"], "drop": ["ALL"]},
                                          "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                          "procMount": "Unmasked"}}
    s = container_security(pod(), c)
    assert s.cap_add == ["CAP_NET_ADMIN", "CAP_SYS_TIME"] and s.cap_drop == ["ALL"]
    assert s.no_new_privileges and s.read_only_rootfs and s.unmasked_proc
    plain = container_security(pod(), {"name": "c", "securityContext": {"allowPrivilegeEscalation": True}})
    assert not plain.no_new_privileges and not plain.unmasked_proc


def test_localhost_profile(tmp_path):
    (tmp_path / "ok.json").write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW"}))
    (tmp_path / "bad.json").write_text("{not json")
    policy = SecurityPolicy(seccomp_profile_root=str(tmp_path))

    def with_profile(name):
        return {"name": "c", "securityContext": {"seccompProfile": {"type": "Localhost", "localhostProfile": name}}}

    assert json.loads(container_security(pod(), with_profile("ok.json"), policy).seccomp)["defaultAction"]
    with pytest.raises(ConfigError, match=r"missing\.json.*not found"):
        container_security(pod(), with_profile("missing.json"), policy)
    with pytest.raises(ConfigError, match="not valid JSON"):
        container_security(pod(), with_profile("bad.json"), policy)
    with pytest.raises(ConfigError, match="without '..'"):
        container_security(pod(), with_profile("../etc/passwd"), policy)


def test_config_carries_security_fields(tmp_path):
    p = pod([{"name": "c", "image": "busybox:1.35", "securityContext": {
        "runAsNonRoot": True, "runAsUser": 1000, "capabilities": {"drop": ["NET_RAW"]}}}], fsGroup=3)
    config = build_container_config(p, p["spec"]["containers"][0], kind="app", attempt=0, pod_ip=None,
                                    host_ip=None, node_name="n", volume_paths={}, node=NODE)
    assert config.run_as_non_root and config.run_as_user == 1000
    assert config.cap_drop == ["CAP_NET_RAW"] and config.supplemental_groups == [3]
    p["spec"]["containers"][0]["securityContext"]["runAsUser"] = 0
    with pytest.raises(ConfigError, match="runAsNonRoot"):
        build_container_config(p, p["spec"]["containers"][0], kind="app", attempt=0, pod_ip=None,
                               host_ip=None, node_name="n", volume_paths={}, node=NODE)


@pytest.mark.parametrize("sysctls,allowed,host_network,reason_part", [
    ([{"name": "net.ipv4.ip_local_port_range", "value": "1024 65000"}], (), False, None),
    ([{"name": "net/ipv4/tcp_syncookies", "value": "1"}], (), False, None),
    ([{"name": "net.core.somaxconn", "value": "1024"}], (), False, '"net.core.somaxconn" not allowlisted'),
    ([{"name": "net.core.somaxconn", "value": "1024"}], ("net.core.*",), False, None),
    ([{"name": "kernel.msgmax", "value": "1"}], ("kernel.msg*",), False, None),
    ([{"name": "vm.swappiness", "value": "1"}], ("vm.swappiness",), False, "not namespaced"),
    ([{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}], (), True, "hostNetwork"),
])
def test_sysctl_admission(sysctls, allowed, host_network, reason_part):
    p = pod(sysctls=sysctls)
    p["spec"]["hostNetwork"] = host_network
    refusal = admit_pod(p, SecurityPolicy(allowed_unsafe_sysctls=allowed))
    if reason_part is None:
        assert refusal is None
        assert pod_sysctls(p) == {normalize_sysctl(s["name"]): s["value"] for s in sysctls}
    else:
        assert refusal[0] == "SysctlForbidden" and reason_part in refusal[1]


@pytest.mark.parametrize("spec_patch,field", [
    ({"securityContext": {"seLinuxOptions": {"level": "s0"}}}, "spec.securityContext.seLinuxOptions"),
    ({"containers": [{"name": "c", "securityContext": {"appArmorProfile": {"type": "RuntimeDefault"}}}]},
     "spec.containers[0].securityContext.appArmorProfile"),
    ({"containers": [{"name": "c", "securityContext": {"windowsOptions": {"runAsUserName": "x"}}}]},
     "spec.containers[0].securityContext.windowsOptions"),
    ({"securityContext": {"supplementalGroupsPolicy": "Strict"}}, "supplementalGroupsPolicy"),
    ({"hostUsers": False}, "spec.hostUsers"),
    ({"initContainers": [{"name": "i", "securityContext": {"procMount": "Weird"}}]},
     "spec.initContainers[0].securityContext.procMount"),
])
def test_unsupported_fields_are_refused_by_name(spec_patch, field):
    p = pod()
    p["spec"].update(spec_patch)
    reason, message = admit_pod(p, SecurityPolicy())
    assert reason == "UnsupportedPodSpec" and field in message


def test_apparmor_annotation():
    p = pod()
    p["metadata"]["annotations"] = {"container.apparmor.security.beta.kubernetes.io/c": "runtime/default"}
    reason, message = admit_pod(p, SecurityPolicy())
    assert "container.apparmor.security.beta.kubernetes.io/c" in message
    p["metadata"]["annotations"] = {"container.apparmor.security.beta.kubernetes.io/c": "unconfined"}
    assert admit_pod(p, SecurityPolicy()) is None


def test_trivially_satisfiable_fields_are_accepted():
    p = pod([{"name": "c", "securityContext": {"appArmorProfile": {"type": "Unconfined"},
                                               "windowsOptions": {"hostProcess": False}}}],
            supplementalGroupsPolicy="Merge", fsGroupChangePolicy="OnRootMismatch")
    assert admit_pod(p, SecurityPolicy()) is None


def test_allowed_unsafe_sysctls_must_be_namespaced():
    validate_allowed_unsafe_sysctls(["net.*", "kernel.shm*", "kernel.sem", "fs.mqueue.*", "net.core.somaxconn"])
    for bad in (["vm.swappiness"], ["kernel.*"], ["net.*.x"]):
        with pytest.raises(ValueError):
            validate_allowed_unsafe_sysctls(bad)


def test_apply_fs_group(tmp_path):
    root = tmp_path / "vol"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "f").write_text("x")
    os.chmod(root / "sub" / "f", 0o600)
    os.symlink("sub/f", root / "link")
    apply_fs_group(root, 4321, read_only=False)
    for path, want in ((root, 0o2770), (root / "sub", 0o2770), (root / "sub" / "f", 0o660)):
        st = os.stat(path)
        assert st.st_gid == 4321 and stat.S_IMODE(st.st_mode) & want == want, path
    assert os.lstat(root / "link").st_gid != 4321 or os.lstat(root / "link").st_gid == os.getgid()
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "f").write_text("x")
    os.chmod(ro / "f", 0o400)
    apply_fs_group(ro, 4321, read_only=True)
    assert stat.S_IMODE(os.stat(ro / "f").st_mode) == 0o440
