"""Pod and container securityContext: what the node can honour, and how.

kubelet turns a pod's security context into the runtime's Linux security settings
(``determineEffectiveSecurityContext`` + cri-dockerd's translation to Docker). This
module owns the same translation for nodeagent:

* ``admit_pod`` refuses, once, a pod asking for something this node cannot honour:
  unsafe or non-namespaced sysctls (kubelet's ``SysctlForbidden``), SELinux labels,
  AppArmor profiles, Windows options, ``hostUsers: false``, ``supplementalGroupsPolicy:
  Strict``. The reason names the field; the pod goes to phase Failed.
* ``container_security`` merges pod and container level (the container wins) into a
  ``SecuritySettings`` for ``ContainerConfig``: user, groups (supplementalGroups +
  fsGroup), privileged, capabilities add/drop on top of Docker's default set (as
  cri-dockerd passes them), read-only rootfs, no_new_privs, the seccomp profile
  (``RuntimeDefault`` = Docker's default, ``Unconfined``, ``Localhost`` read from the
  configured ``seccomp-profile-root``; unset = kubelet's default, Unconfined unless
  ``seccomp-default``) and procMount (``Unmasked`` clears Docker's masked and
  read-only /proc paths).
* ``pod_sysctls`` gives the sandbox's sysctls (they are namespaced, so the pause
  container's namespaces carry them to every container of the pod).
* ``apply_fs_group`` gives a volume to the pod's fsGroup (group ownership, group
  read/write, setgid directories), as kubelet's SetVolumeOwnership.
"""

from __future__ import annotations

import fnmatch
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from nodeagent.kubelet.containerconfig import ConfigError

# kubelet's safe sysctls (pkg/kubelet/sysctl/safe_sysctls.go), each with the first
# kernel version where it is namespaced.
SAFE_SYSCTLS: dict[str, tuple[int, int]] = {
    "kernel.shm_rmid_forced": (0, 0),
    "net.ipv4.ip_local_port_range": (0, 0),
    "net.ipv4.tcp_syncookies": (0, 0),
    "net.ipv4.ping_group_range": (0, 0),
    "net.ipv4.ip_unprivileged_port_start": (0, 0),
    "net.ipv4.ip_local_reserved_ports": (3, 16),
    "net.ipv4.tcp_keepalive_time": (4, 5),
    "net.ipv4.tcp_fin_timeout": (4, 6),
    "net.ipv4.tcp_keepalive_intvl": (4, 5),
    "net.ipv4.tcp_keepalive_probes": (4, 5),
    "net.ipv4.tcp_rmem": (4, 15),
    "net.ipv4.tcp_wmem": (4, 15),
}
# Namespaced sysctl groups (kubelet's sysctl.NamespacedBy): only these can be allowed
# as unsafe; "ipc" ones need the pod's own IPC namespace, "net" ones its own network.
_IPC_PREFIXES = ("kernel.shm", "kernel.msg", "fs.mqueue.")
_IPC_NAMES = ("kernel.sem",)
_NET_PREFIX = "net."

# Docker's default capability set (what an unprivileged container starts with; the
# base on which capabilities.add/drop act, as with cri-dockerd).
DOCKER_DEFAULT_CAPABILITIES = (
    "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
    "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE",
)

SECCOMP_UNCONFINED = "unconfined"

# Fields of the pod spec this node has no way to honour, with why; a pod setting them
# (to anything but a trivially satisfiable value) is refused with the field's name.
_UNSUPPORTED_REASON = "UnsupportedPodSpec"
_APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"


@dataclass(frozen=True)
class SecurityPolicy:
    """Node settings that shape security contexts."""

    seccomp_profile_root: str = "/var/lib/nodeagent/seccomp"
    allowed_unsafe_sysctls: tuple[str, ...] = ()
    # kubelet's seccompDefault: RuntimeDefault for containers that set no profile.
    seccomp_default: bool = False


@dataclass
class SecuritySettings:
    """One container's effective Linux security settings (runtime-neutral)."""

    run_as_user: int | None = None
    run_as_group: int | None = None
    run_as_non_root: bool = False
    supplemental_groups: list[int] = field(default_factory=list)
    privileged: bool = False
    cap_add: list[str] = field(default_factory=list)
    cap_drop: list[str] = field(default_factory=list)
    read_only_rootfs: bool = False
    no_new_privileges: bool = False
    # None: the runtime's default profile; "unconfined"; else the profile's JSON text.
    seccomp: str | None = None
    # procMount Unmasked: no masked or read-only /proc paths.
    unmasked_proc: bool = False


# --- sysctls -------------------------------------------------------------------------


def normalize_sysctl(name: str) -> str:
    """``net/ipv4/ip_forward`` and ``net.ipv4.ip_forward`` are the same sysctl."""
    if "/" in name:
        return name.replace(".", "\0").replace("/", ".").replace("\0", "/")
    return name


def sysctl_namespace(name: str) -> str | None:
    """"ipc", "net", or None when the sysctl is not namespaced (node-wide)."""
    if name.startswith(_IPC_PREFIXES) or name in _IPC_NAMES:
        return "ipc"
    if name.startswith(_NET_PREFIX):
        return "net"
    return None


def _kernel_version() -> tuple[int, int]:
    try:
        major, minor = os.uname().release.split(".")[:2]
        return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)
    except (ValueError, IndexError):
        return (0, 0)


def is_safe_sysctl(name: str, kernel: tuple[int, int] | None = None) -> bool:
    need = SAFE_SYSCTLS.get(name)
    return need is not None and (kernel or _kernel_version()) >= need


def validate_allowed_unsafe_sysctls(patterns: list[str] | tuple[str, ...]) -> None:
    """kubelet's start-up check of allowedUnsafeSysctls: each entry is a namespaced
    sysctl or a namespaced prefix ending in ``*``. Raises ValueError."""
    for pattern in patterns:
        name = normalize_sysctl(pattern)
        base = name[:-1] if name.endswith("*") else name
        if not base or "*" in base:
            raise ValueError(f"{pattern!r}: only a trailing '*' is allowed")
        if sysctl_namespace(base) is None:
            raise ValueError(f"{pattern!r} is not a namespaced sysctl (kernel.shm*, kernel.msg*, "
                             "kernel.sem, fs.mqueue.*, net.*)")


def _allowed_unsafe(name: str, patterns: tuple[str, ...]) -> bool:
    for pattern in patterns:
        pattern = normalize_sysctl(pattern)
        if pattern.endswith("*") and name.startswith(pattern[:-1]):
            return True
        if name == pattern or fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def pod_sysctls(pod: dict) -> dict[str, str]:
    """The sysctls to set in the pod's sandbox (already admitted)."""
    sc = (pod.get("spec") or {}).get("securityContext") or {}
    out: dict[str, str] = {}
    for entry in sc.get("sysctls") or []:
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            out[normalize_sysctl(entry["name"])] = str(entry.get("value", ""))
    return out


# --- admission -----------------------------------------------------------------------


def _sysctl_refusal(pod: dict, policy: SecurityPolicy) -> tuple[str, str] | None:
    spec = pod.get("spec") or {}
    sc = spec.get("securityContext") or {}
    entries = sc.get("sysctls")
    if entries is None:
        return None
    if not isinstance(entries, list):
        return "SysctlForbidden", "spec.securityContext.sysctls must be a list of {name, value}"
    kernel = _kernel_version()
    for i, entry in enumerate(entries):
        field_name = f"spec.securityContext.sysctls[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            return "SysctlForbidden", f"{field_name}: a sysctl needs a name"
        if not isinstance(entry.get("value", ""), str):
            return "SysctlForbidden", f"{field_name}: the value of {entry['name']!r} must be a string"
        name = normalize_sysctl(entry["name"])
        namespace = sysctl_namespace(name)
        if not is_safe_sysctl(name, kernel) and not _allowed_unsafe(name, policy.allowed_unsafe_sysctls):
            return "SysctlForbidden", (f"forbidden sysctl: \"{name}\" not allowlisted "
                                       f"({field_name}; unsafe sysctls need the node's allowed-unsafe-sysctls)")
        if namespace is None:
            return "SysctlForbidden", f"forbidden sysctl: \"{name}\" is not namespaced ({field_name})"
        if namespace == "net" and spec.get("hostNetwork"):
            return "SysctlForbidden", f"sysctl \"{name}\" not allowed with hostNetwork enabled ({field_name})"
        if namespace == "ipc" and spec.get("hostIPC"):
            return "SysctlForbidden", f"sysctl \"{name}\" not allowed with hostIPC enabled ({field_name})"
    return None


def _context_refusal(sc: object, where: str, *, container: bool) -> str | None:
    """The first field of one securityContext this node cannot honour."""
    if not isinstance(sc, dict):
        return None
    se_linux = sc.get("seLinuxOptions")
    if se_linux:
        return f"{where}.seLinuxOptions: SELinux is not available on this node"
    apparmor = sc.get("appArmorProfile")
    if isinstance(apparmor, dict) and apparmor.get("type") not in (None, "Unconfined"):
        return (f"{where}.appArmorProfile: type {apparmor.get('type')!r} needs AppArmor, which this node "
                "does not enforce (only 'Unconfined' can be honoured)")
    windows = sc.get("windowsOptions")
    if isinstance(windows, dict) and any(
        windows.get(k) for k in ("gmsaCredentialSpecName", "gmsaCredentialSpec", "runAsUserName", "hostProcess")
    ):
        return f"{where}.windowsOptions: this is a Linux node"
    seccomp = sc.get("seccompProfile")
    if isinstance(seccomp, dict):
        kind = seccomp.get("type")
        if kind not in ("RuntimeDefault", "Unconfined", "Localhost"):
            return f"{where}.seccompProfile.type: unsupported value {kind!r}"
        if kind == "Localhost" and not isinstance(seccomp.get("localhostProfile"), str):
            return f"{where}.seccompProfile.localhostProfile: Required value for type 'Localhost'"
    if container:
        proc_mount = sc.get("procMount")
        if proc_mount not in (None, "Default", "Unmasked"):
            return f"{where}.procMount: unsupported value {proc_mount!r}: must be 'Default' or 'Unmasked'"
    else:
        policy = sc.get("supplementalGroupsPolicy")
        if policy not in (None, "Merge"):
            return (f"{where}.supplementalGroupsPolicy: {policy!r} cannot be honoured: Docker always merges "
                    "the groups of the image's /etc/group")
        change = sc.get("fsGroupChangePolicy")
        if change not in (None, "Always", "OnRootMismatch"):
            return f"{where}.fsGroupChangePolicy: unsupported value {change!r}"
        if sc.get("seLinuxChangePolicy") not in (None, "MountOption", "Recursive"):
            return f"{where}.seLinuxChangePolicy: unsupported value {sc.get('seLinuxChangePolicy')!r}"
    return None


def admit_pod(pod: dict, policy: SecurityPolicy) -> tuple[str, str] | None:
    """``(reason, message)`` when the node refuses ``pod``, else None."""
    refusal = _sysctl_refusal(pod, policy)
    if refusal is not None:
        return refusal
    spec = pod.get("spec") or {}
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    for key, value in annotations.items():
        # The deprecated per-container AppArmor annotation kubelet still honours.
        if str(key).startswith(_APPARMOR_ANNOTATION) and value != "unconfined":
            return _UNSUPPORTED_REASON, (f"metadata.annotations[{key}]: AppArmor profile {value!r} needs AppArmor, "
                                         "which this node does not enforce (only 'unconfined' can be honoured)")
    if spec.get("hostUsers") is False:
        return _UNSUPPORTED_REASON, ("spec.hostUsers: false needs per-pod user namespaces, which this node "
                                     "(Docker) cannot give")
    problem = _context_refusal(spec.get("securityContext"), "spec.securityContext", container=False)
    if problem:
        return _UNSUPPORTED_REASON, problem
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for i, c in enumerate(spec.get(key) or []):
            if not isinstance(c, dict):
                continue
            problem = _context_refusal(c.get("securityContext"), f"spec.{key}[{i}].securityContext", container=True)
            if problem:
                return _UNSUPPORTED_REASON, problem
    return None


# --- the effective context of one container ------------------------------------------


def _capability(name: object, where: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}: invalid capability {name!r}")
    cap = name.strip().upper()
    if cap == "ALL":
        return cap
    return cap if cap.startswith("CAP_") else "CAP_" + cap


def load_seccomp_profile(root: str | os.PathLike, relative: str, where: str) -> str:
    """The JSON text of a Localhost profile under ``root``; ConfigError naming it."""
    if relative.startswith("/") or ".." in relative.split("/"):
        raise ConfigError(f"{where}: localhostProfile {relative!r} must be a path relative to the node's "
                          f"seccomp profile root ({root}) without '..'")
    path = Path(root) / relative
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except FileNotFoundError:
        raise ConfigError(f"{where}: seccomp profile {str(path)!r} not found on this node "
                          f"(localhostProfile {relative!r})") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read seccomp profile {str(path)!r}: {exc.strerror}") from None
    try:
        json.loads(data)
    except ValueError as exc:
        raise ConfigError(f"{where}: seccomp profile {str(path)!r} is not valid JSON: {exc}") from None
    return data.decode("utf-8", errors="replace")


def container_security(pod: dict, container: dict, policy: SecurityPolicy | None = None) -> SecuritySettings:
    """Pod-level settings with the container's on top (the container wins)."""
    policy = policy or SecurityPolicy()
    spec = pod.get("spec") or {}
    pod_sc = spec.get("securityContext") or {}
    sc = container.get("securityContext") or {}
    cname = container.get("name", "?")
    where = f"container {cname!r} securityContext"

    def pick(key: str):
        return sc[key] if sc.get(key) is not None else pod_sc.get(key)

    out = SecuritySettings(
        run_as_user=pick("runAsUser"),
        run_as_group=pick("runAsGroup"),
        run_as_non_root=bool(pick("runAsNonRoot")),
        privileged=bool(sc.get("privileged")),
        read_only_rootfs=bool(sc.get("readOnlyRootFilesystem")),
        # kubelet's AddNoNewPrivileges: only an explicit false asks for it.
        no_new_privileges=sc.get("allowPrivilegeEscalation") is False,
        unmasked_proc=sc.get("procMount") == "Unmasked",
    )
    if out.run_as_non_root and out.run_as_user == 0:
        raise ConfigError(f"container {cname!r} has runAsNonRoot and runAsUser 0: it would run as root")
    if out.privileged and sc.get("allowPrivilegeEscalation") is False:
        raise ConfigError(f"{where}: allowPrivilegeEscalation false cannot be set together with privileged")
    groups: list[int] = []
    for gid in list(pod_sc.get("supplementalGroups") or []) + (
        [pod_sc["fsGroup"]] if pod_sc.get("fsGroup") is not None else []
    ):
        if int(gid) not in groups:
            groups.append(int(gid))
    out.supplemental_groups = groups
    caps = sc.get("capabilities") or {}
    out.cap_add = [_capability(c, f"{where}.capabilities.add") for c in caps.get("add") or []]
    out.cap_drop = [_capability(c, f"{where}.capabilities.drop") for c in caps.get("drop") or []]

    profile = sc.get("seccompProfile") if sc.get("seccompProfile") is not None else pod_sc.get("seccompProfile")
    level = f"{where}.seccompProfile" if sc.get("seccompProfile") is not None else "pod securityContext.seccompProfile"
    if out.privileged:
        out.seccomp = SECCOMP_UNCONFINED  # privileged containers are never filtered
    elif not isinstance(profile, dict):
        out.seccomp = None if policy.seccomp_default else SECCOMP_UNCONFINED
    elif profile.get("type") == "RuntimeDefault":
        out.seccomp = None
    elif profile.get("type") == "Unconfined":
        out.seccomp = SECCOMP_UNCONFINED
    elif profile.get("type") == "Localhost":
        out.seccomp = load_seccomp_profile(policy.seccomp_profile_root, str(profile.get("localhostProfile") or ""),
                                           level)
    else:
        raise ConfigError(f"{level}.type: unsupported value {profile.get('type')!r}")
    return out


# --- fsGroup on volumes ----------------------------------------------------------------

_RW_MASK = 0o660
_RO_MASK = 0o440
_EXEC_MASK = 0o110


def apply_fs_group(path: str | os.PathLike, gid: int, *, read_only: bool, change_policy: str | None = None) -> None:
    """kubelet's SetVolumeOwnership: group ``gid`` on everything under ``path``, group
    read (and write unless ``read_only``), setgid directories so new files inherit the
    group. ``OnRootMismatch`` skips the walk when the root already fits. Symlinks are
    left alone (the atomic writer's links point inside the volume)."""
    root = Path(path)
    if change_policy == "OnRootMismatch":
        st = root.stat()
        want = _RO_MASK if read_only else _RW_MASK
        if st.st_gid == gid and st.st_mode & stat.S_ISGID and (st.st_mode & want) == want:
            return
    mask = _RO_MASK if read_only else _RW_MASK
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [None, *filenames]:
            full = dirpath if name is None else os.path.join(dirpath, name)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                continue
            if st.st_gid != gid:
                os.lchown(full, -1, gid)
            mode = stat.S_IMODE(st.st_mode) | mask
            if stat.S_ISDIR(st.st_mode):
                mode |= stat.S_ISGID | _EXEC_MASK
            if mode != stat.S_IMODE(st.st_mode):
                os.chmod(full, mode)
