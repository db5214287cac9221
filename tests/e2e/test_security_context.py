"""securityContext observed from inside the containers (issue 8, item 3).

One agent, several pods started together: what a process sees in /proc/self/status,
`id`, a write to `/`, /proc/sys and the volume's ownership; and the refusals (unsafe
sysctl, SELinux, missing seccomp profile, runAsNonRoot with a root image).
"""

from __future__ import annotations

import json

from tests.e2e.conftest import busybox, docker, pod_manifest

SECCOMP_DENY_MKDIR = {
    "defaultAction": "SCMP_ACT_ALLOW",
    "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}],
}


def _logs(agent, pod: str, container: str) -> str:
    return docker("logs", agent.container_of(pod, container)["Id"])


def _wait_done(agent, pod: str, container: str) -> str:
    return agent.wait_for(f"{pod}/{container} output", lambda: "DONE" in (out := _logs(agent, pod, container)) and out)


def _status_line(output: str, key: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in output.splitlines() if line.startswith(key + ":"))


def test_security_context_seen_from_inside(agent_factory, tmp_path):
    profiles = tmp_path / "seccomp"
    (profiles / "profiles").mkdir(parents=True)
    (profiles / "profiles" / "deny-mkdir.json").write_text(json.dumps(SECCOMP_DENY_MKDIR))
    agent = agent_factory(extra_config={"seccomp-profile-root": str(profiles),
                                        "allowed-unsafe-sysctls": ["kernel.msg*"]})

    user_script = (
        "id; grep -E '^(NoNewPrivs|Seccomp|CapEff):' /proc/self/status; "
        "touch /rootfile 2>/dev/null && echo ROOT-WRITABLE || echo ROOT-READONLY; "
        "touch /data/f && stat -c 'file %g' /data/f; stat -c 'dir %g %A' /data; "
        "stat -L -c 'info %g %a' /info/labels; "
        "echo port $(cat /proc/sys/net/ipv4/ip_unprivileged_port_start); "
        "echo msgmax $(cat /proc/sys/kernel/msgmax); echo DONE; sleep 3600"
    )
    caps_script = (
        "grep -E '^(CapEff|CapBnd|Seccomp|NoNewPrivs):' /proc/self/status; "
        "echo masked $(grep -cE ' /proc/(sys|keys|timer_list) ' /proc/self/mountinfo); echo DONE; sleep 3600"
    )
    local_script = (
        "grep -E '^Seccomp:' /proc/self/status; "
        "mkdir /tmp/x 2>/dev/null && echo MKDIR-OK || echo MKDIR-DENIED; echo DONE; sleep 3600"
    )
    secure = pod_manifest(
        "secure",
        [
            busybox("user", user_script, volumeMounts=[{"name": "data", "mountPath": "/data"},
                                                        {"name": "info", "mountPath": "/info"}],
                    securityContext={"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False}),
            busybox("caps", caps_script, securityContext={
                "runAsUser": 0, "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
                "seccompProfile": {"type": "Unconfined"}, "procMount": "Unmasked"}),
            busybox("plain", caps_script, securityContext={"runAsUser": 0}),
            busybox("local", local_script, securityContext={
                "runAsUser": 0,
                "seccompProfile": {"type": "Localhost", "localhostProfile": "profiles/deny-mkdir.json"}}),
        ],
        securityContext={
            "runAsUser": 1000, "runAsGroup": 3000, "supplementalGroups": [4000], "fsGroup": 2000,
            "seccompProfile": {"type": "RuntimeDefault"},
            "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "100"},
                        {"name": "kernel.msgmax", "value": "12345"}],
        },
        volumes=[{"name": "data", "emptyDir": {}},
                 {"name": "info", "downwardAPI": {"defaultMode": 0o400, "items": [
                     {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}}],
    )
    unsafe = pod_manifest("unsafe", [busybox("c", "sleep 3600")],
                          securityContext={"sysctls": [{"name": "kernel.sem", "value": "250 32000 32 128"}]})
    selinux = pod_manifest("selinux", [busybox("c", "sleep 3600", securityContext={
        "seLinuxOptions": {"level": "s0:c1,c2"}})])
    missing = pod_manifest("missing", [busybox("c", "sleep 3600", securityContext={
        "seccompProfile": {"type": "Localhost", "localhostProfile": "nope.json"}})])
    nonroot = pod_manifest("nonroot", [busybox("c", "sleep 3600", securityContext={"runAsNonRoot": True})])
    agent.write("secure.yaml", secure)
    agent.write("refused.yaml", unsafe, selinux, missing, nonroot)

    user = _wait_done(agent, "secure", "user")
    assert "uid=1000 gid=3000" in user
    groups = user.split("groups=", 1)[1].splitlines()[0]
    assert "2000" in groups and "4000" in groups, user
    assert _status_line(user, "NoNewPrivs") == "1"
    assert _status_line(user, "Seccomp") == "2"  # RuntimeDefault: Docker's filter
    assert _status_line(user, "CapEff") == "0000000000000000"  # non-root: no effective caps
    assert "ROOT-READONLY" in user
    assert "file 2000" in user  # setgid directory: new files take the fsGroup
    assert "dir 2000 drwxrwsrwx" in user
    assert "info 2000 440" in user  # content volumes: the group may read, even a 0400 file
    assert "port 100" in user and "msgmax 12345" in user

    caps = _wait_done(agent, "secure", "caps")
    assert _status_line(caps, "CapEff") == "0000000000000400"  # only CAP_NET_BIND_SERVICE
    assert _status_line(caps, "CapBnd") == "0000000000000400"
    assert _status_line(caps, "Seccomp") == "0"  # container's Unconfined beats the pod's RuntimeDefault
    assert "masked 0" in caps  # procMount Unmasked: nothing masked or read-only in /proc

    plain = _wait_done(agent, "secure", "plain")
    assert _status_line(plain, "CapEff") == "00000000a80425fb"  # Docker's default set
    assert _status_line(plain, "NoNewPrivs") == "0"
    assert "masked 3" in plain

    local = _wait_done(agent, "secure", "local")
    assert _status_line(local, "Seccomp") == "2"
    assert "MKDIR-DENIED" in local

    pod = agent.wait_phase("unsafe", "Failed")
    assert pod["status"]["reason"] == "SysctlForbidden"
    assert "kernel.sem" in pod["status"]["message"]
    pod = agent.wait_phase("selinux", "Failed")
    assert "seLinuxOptions" in pod["status"]["message"]

    def waiting(name):
        p = agent.pod(name)
        state = p["status"]["containerStatuses"][0]["state"] if p and p["status"].get("containerStatuses") else {}
        return state.get("waiting", {}).get("reason") == "CreateContainerConfigError" and state["waiting"]

    message = agent.wait_for("missing profile refused", lambda: waiting("missing"))["message"]
    assert "nope.json" in message and "not found" in message
    message = agent.wait_for("runAsNonRoot refused", lambda: waiting("nonroot"))["message"]
    assert "runAsNonRoot" in message and "root" in message
