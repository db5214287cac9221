import os
import stat

import pytest

from nodeagent.kubelet.containerconfig import (
    ConfigError,
    NodeResources,
    build_container_config,
    command_and_args,
    container_resources,
    expand,
    make_environment,
    milli_cpu_to_quota,
    milli_cpu_to_shares,
    oom_score_adj,
    prepare_sub_path,
)
from nodeagent.kubelet.hashing import container_hash
from nodeagent.api.podspec import apply_defaults
from runtime.types import Mount

GiB = 2**30
NODE = NodeResources(cpu_millicores=4000, memory_bytes=8 * GiB, ephemeral_storage_bytes=100 * GiB)


def make_pod(containers, **spec):
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "team", "uid": "uid-123",
                     "labels": {"app": "web", "tier": "front"}, "annotations": {"note": 'say "hi"'}},
        "spec": {"containers": containers, **spec},
    }


def ctr(name="c", **fields):
    return {"name": name, "image": "busybox:1.35", **fields}


def build(pod, container=None, *, volume_paths=None, env_sources=None, kind="app", pod_ip="10.244.0.5"):
    container = container or pod["spec"]["containers"][0]
    return build_container_config(
        pod, container, kind=kind, attempt=3, pod_ip=pod_ip, host_ip="192.0.2.2", node_name="node-1",
        volume_paths=volume_paths or {}, env_sources=env_sources, node=NODE,
    )


class FakeSources:
    def __init__(self, config_maps=None, secrets=None):
        self.config_maps = config_maps or {}
        self.secrets = secrets or {}
        self.calls = []

    def config_map(self, namespace, name):
        self.calls.append(("configMap", namespace, name))
        return self.config_maps.get((namespace, name))

    def secret(self, namespace, name):
        self.calls.append(("secret", namespace, name))
        return self.secrets.get((namespace, name))


def env_of(*env, env_from=None, sources=None, pod_ip="10.244.0.5"):
    c = ctr(env=list(env))
    if env_from is not None:
        c["envFrom"] = env_from
    pod = make_pod([c])
    return make_environment(pod, c, pod_ip=pod_ip, host_ip="192.0.2.2", node_name="node-1",
                            env_sources=sources, node=NODE)


# --- $(VAR) expansion ----------------------------------------------------------------------

VARS = {"A": "alpha", "B": "beta", "EMPTY": "", "A$(B": "weird"}


@pytest.mark.parametrize("text, expected", [
    ("$(A)", "alpha"),
    ("x-$(A)-$(B)-y", "x-alpha-beta-y"),
    ("$(A)$(B)", "alphabeta"),
    ("$(UNDEFINED)", "$(UNDEFINED)"),
    ("pre $(UNDEFINED) $(A)", "pre $(UNDEFINED) alpha"),
    ("$$(A)", "$(A)"),
    ("$$$(A)", "$alpha"),
    ("$$$$(A)", "$$(A)"),
    ("$$", "$"),
    ("a$$b", "a$b"),
    ("$", "$"),
    ("x$", "x$"),
    ("$x", "$x"),
    ("$(A", "$(A"),
    ("$(", "$("),
    ("$()", "$()"),
    ("$(EMPTY)", ""),
    ("$(A$(B))", "weird)"),  # the name runs to the first ')'
    ("$(C$(A))", "$(C$(A))"),
    ("${A}", "${A}"),
    ("no refs", "no refs"),
    ("", ""),
    ("ünïcode $(A) ✓", "ünïcode alpha ✓"),
])
def test_expand(text, expected):
    assert expand(text, VARS) == expected


def test_expand_with_callable():
    assert expand("$(X)/$(Y)", {"X": "1"}.get) == "1/$(Y)"


# --- environment ------------------------------------------------------------------------


def test_literal_values_and_order_of_references():
    env = env_of({"name": "A", "value": "alpha"}, {"name": "B", "value": "$(A)-beta"},
                 {"name": "C", "value": "$(D)"}, {"name": "D", "value": "d"}, {"name": "E"},
                 {"name": "F", "value": "$$(A) $(B)"})
    assert env == {"A": "alpha", "B": "alpha-beta", "C": "$(D)", "D": "d", "E": "", "F": "$(A) alpha-beta"}


def test_redefinition_uses_previous_value():
    env = env_of({"name": "P", "value": "/bin"}, {"name": "P", "value": "$(P):/usr/bin"})
    assert env == {"P": "/bin:/usr/bin"}


def test_field_refs():
    paths = {
        "N": "metadata.name", "NS": "metadata.namespace", "UID": "metadata.uid", "APP": "metadata.labels['app']",
        "MISSING": "metadata.labels['nope']", "NOTE": "metadata.annotations['note']", "NODE": "spec.nodeName",
        "SA": "spec.serviceAccountName", "IP": "status.podIP", "IPS": "status.podIPs", "HOST": "status.hostIP",
        "HOSTS": "status.hostIPs",
    }
    env = env_of(*({"name": k, "valueFrom": {"fieldRef": {"fieldPath": p}}} for k, p in paths.items()))
    assert env == {"N": "web", "NS": "team", "UID": "uid-123", "APP": "web", "MISSING": "", "NOTE": 'say "hi"',
                   "NODE": "node-1", "SA": "", "IP": "10.244.0.5", "IPS": "10.244.0.5", "HOST": "192.0.2.2",
                   "HOSTS": "192.0.2.2"}


def test_field_ref_values_are_not_expanded_and_pod_ip_may_be_unknown():
    c = ctr(env=[{"name": "A", "value": "x"}, {"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                 {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}])
    pod = make_pod([c])
    pod["metadata"]["name"] = "$(A)"
    env = make_environment(pod, c, pod_ip=None, host_ip=None, node_name="n", node=NODE)
    assert env["N"] == "$(A)" and env["IP"] == ""


def test_spec_node_name_wins_over_parameter():
    c = ctr(env=[{"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}])
    pod = make_pod([c], nodeName="from-spec", serviceAccountName="robot")
    assert make_environment(pod, c, pod_ip=None, host_ip=None, node_name="param", node=NODE) == {"NODE": "from-spec"}


def rf(resource, divisor=None, container=None):
    ref = {"resource": resource}
    if divisor is not None:
        ref["divisor"] = divisor
    if container is not None:
        ref["containerName"] = container
    return {"name": "V", "valueFrom": {"resourceFieldRef": ref}}


@pytest.mark.parametrize("resource, divisor, expected", [
    ("limits.cpu", None, "1"),        # 500m rounds up to 1 core
    ("limits.cpu", "1m", "500"),
    ("requests.cpu", "1m", "250"),
    ("requests.cpu", None, "1"),
    ("limits.memory", None, str(64 * 2**20)),
    ("limits.memory", "1Mi", "64"),
    ("limits.memory", "1M", "68"),     # 67.1 rounds up
    ("requests.memory", "1Ki", str(32 * 1024)),
    ("limits.ephemeral-storage", "1Gi", "100"),  # no limit: node capacity
    ("requests.ephemeral-storage", None, "0"),
])
def test_resource_field_refs(resource, divisor, expected):
    c = ctr(env=[rf(resource, divisor)], resources={"requests": {"cpu": "250m", "memory": "32Mi"},
                                                      "limits": {"cpu": "500m", "memory": "64Mi"}})
    pod = make_pod([c])
    assert make_environment(pod, c, pod_ip=None, host_ip=None, node_name="n", node=NODE)["V"] == expected


def test_resource_field_ref_defaults_to_node_capacity_and_other_containers():
    sidecar = ctr("side", resources={"limits": {"memory": "1Gi"}})
    c = ctr(env=[rf("limits.cpu"), {**rf("limits.memory", "1Mi"), "name": "M"},
                 {**rf("requests.memory", "1Mi", container="side"), "name": "SIDE"}])
    pod = make_pod([c], initContainers=[sidecar])
    env = make_environment(pod, c, pod_ip=None, host_ip=None, node_name="n", node=NODE)
    assert env == {"V": "4", "M": str(8 * 1024), "SIDE": "1024"}  # limit implies the request


def test_resource_field_ref_unknown_container():
    with pytest.raises(ConfigError, match="'ghost'"):
        env_of(rf("limits.cpu", container="ghost"))


def test_config_map_and_secret_refs():
    sources = FakeSources(config_maps={("team", "cfg"): {"mode": "fast", "raw": "$(A)"}},
                          secrets={("team", "sec"): {"password": b"s3cret", "bin": b"\xff\xfe"}})
    env = env_of({"name": "A", "value": "a"},
                 {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}},
                 {"name": "RAW", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "raw"}}},
                 {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "password"}}},
                 {"name": "BIN", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "bin"}}},
                 sources=sources)
    assert env == {"A": "a", "MODE": "fast", "RAW": "$(A)", "PW": "s3cret", "BIN": "\ufffd\ufffd"}
    assert ("configMap", "team", "cfg") in sources.calls and ("secret", "team", "sec") in sources.calls


def test_missing_config_map_and_key():
    sources = FakeSources(config_maps={("team", "cfg"): {"a": "1"}})
    with pytest.raises(ConfigError, match='configmap "nope" not found') as info:
        env_of({"name": "X", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "a"}}}, sources=sources)
    assert info.value.reason == "CreateContainerConfigError"
    assert "'X'" in str(info.value)
    with pytest.raises(ConfigError, match="couldn't find key 'b' in ConfigMap team/cfg"):
        env_of({"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "b"}}}, sources=sources)
    with pytest.raises(ConfigError, match="Secret team/s"):
        env_of({"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "b"}}},
               sources=FakeSources(secrets={("team", "s"): {}}))


def test_optional_refs_are_skipped():
    sources = FakeSources(config_maps={("team", "cfg"): {"a": "1"}})
    env = env_of({"name": "X", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "a", "optional": True}}},
                 {"name": "Y", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "b", "optional": True}}},
                 {"name": "Z", "valueFrom": {"secretKeyRef": {"name": "s", "key": "b", "optional": True}}},
                 env_from=[{"secretRef": {"name": "gone", "optional": True}}], sources=sources)
    assert env == {}


def test_refs_without_cluster_mode():
    for var in ({"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "a"}}},
                {"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "a", "optional": True}}}):
        with pytest.raises(ConfigError, match="cluster mode"):
            env_of(var)
    with pytest.raises(ConfigError, match="cluster mode"):
        env_of(env_from=[{"configMapRef": {"name": "cfg"}}])


def test_env_from_order_prefix_and_invalid_keys():
    sources = FakeSources(config_maps={("team", "one"): {"A": "1", "B": "1", "bad=key": "x"},
                                       ("team", "two"): {"B": "2", "C": "2"}},
                          secrets={("team", "s"): {"TOKEN": b"t"}})
    env = env_of({"name": "C", "value": "env-$(B)"},
                 env_from=[{"configMapRef": {"name": "one"}}, {"configMapRef": {"name": "two"}},
                           {"secretRef": {"name": "s"}, "prefix": "SEC_"}], sources=sources)
    assert env == {"A": "1", "B": "2", "C": "env-2", "SEC_TOKEN": "t"}
    with pytest.raises(ConfigError, match='configmap "missing" not found'):
        env_of(env_from=[{"configMapRef": {"name": "missing"}}], sources=sources)


# --- command and args -------------------------------------------------------------------


@pytest.mark.parametrize("fields, expected", [
    ({}, (None, None)),
    ({"command": ["sh", "-c", "x"]}, (["sh", "-c", "x"], [])),
    ({"args": ["--flag"]}, (None, ["--flag"])),
    ({"command": ["app"], "args": ["--v", "2"]}, (["app"], ["--v", "2"])),
    ({"command": [], "args": []}, (None, None)),
    ({"command": [], "args": ["a"]}, (None, ["a"])),
])
def test_command_args_semantics(fields, expected):
    assert command_and_args(ctr(**fields), {}) == expected


def test_command_args_expand_with_final_environment():
    c = ctr(command=["echo", "$(MSG)", "$$(MSG)", "$(NOPE)"], args=["$(MSG)-$(LATER)"],
            env=[{"name": "MSG", "value": "hi"}, {"name": "LATER", "value": "$(MSG)!"}])
    cfg = build(make_pod([c]))
    assert cfg.entrypoint == ["echo", "hi", "$(MSG)", "$(NOPE)"]
    assert cfg.cmd == ["hi-hi!"]


# --- resources ---------------------------------------------------------------------------


@pytest.mark.parametrize("millis, shares", [(0, 2), (1, 2), (2, 2), (250, 256), (500, 512), (1000, 1024),
                                             (1500, 1536), (10**6, 262144)])
def test_shares(millis, shares):
    assert milli_cpu_to_shares(millis) == shares


@pytest.mark.parametrize("millis, quota", [(0, None), (1, 1000), (10, 1000), (250, 25000), (500, 50000),
                                            (2000, 200000)])
def test_quota(millis, quota):
    assert milli_cpu_to_quota(millis) == quota


def res(pod_resources, **pod_spec):
    c = ctr(resources=pod_resources)
    pod = make_pod([c], **pod_spec)
    return container_resources(pod, c, node_memory=8 * GiB)


def test_resources_burstable_like_e2e():
    r = res({"requests": {"cpu": "250m", "memory": "32Mi"}, "limits": {"cpu": "500m", "memory": "64Mi"}})
    assert (r.cpu_shares, r.cpu_quota, r.cpu_period, r.memory_limit) == (256, 50000, 100000, 64 * 2**20)
    assert r.oom_score_adj == 1000 - (1000 * 32 * 2**20) // (8 * GiB) == 997


def test_resources_best_effort():
    r = res({})
    assert (r.cpu_shares, r.cpu_quota, r.cpu_period, r.memory_limit, r.oom_score_adj) == (2, None, None, None, 1000)


def test_resources_only_limits_imply_requests():
    r = res({"limits": {"cpu": "1", "memory": "1Gi"}})
    assert (r.cpu_shares, r.cpu_quota, r.memory_limit, r.oom_score_adj) == (1024, 100000, GiB, -997)


def test_resources_limit_only_cpu():
    r = res({"limits": {"cpu": "2"}})
    assert (r.cpu_shares, r.cpu_quota, r.memory_limit, r.oom_score_adj) == (2048, 200000, None, 999)


@pytest.mark.parametrize("request_, expected", [
    ("4Gi", 500), ("8Gi", 3), ("16Gi", 3), ("7.99Gi", 3), ("1Mi", 999), ("0", 999), ("1", 999), ("2Gi", 750),
])
def test_burstable_oom_score(request_, expected):
    r = res({"requests": {"memory": request_, "cpu": "100m"}})
    assert r.oom_score_adj == expected


def test_oom_score_node_critical():
    assert res({"requests": {"memory": "1Mi"}}, priorityClassName="system-node-critical").oom_score_adj == -997
    assert res({}, priorityClassName="system-node-critical").oom_score_adj == -997


def test_oom_score_sidecar_never_above_app():
    sidecar = ctr("side", restartPolicy="Always", resources={"requests": {"memory": "1Mi"}})
    app = ctr("app", resources={"requests": {"memory": "4Gi"}})
    pod = make_pod([app], initContainers=[sidecar])
    assert oom_score_adj(pod, app, 8 * GiB) == 500
    assert oom_score_adj(pod, sidecar, 8 * GiB) == 500
    plain_init = ctr("init", resources={"requests": {"memory": "1Mi"}})
    pod = make_pod([app], initContainers=[plain_init])
    assert oom_score_adj(pod, plain_init, 8 * GiB) == 999


def test_init_container_makes_pod_burstable():
    app = ctr("app", resources={"limits": {"cpu": "1", "memory": "1Gi"}})
    init = ctr("init")
    pod = make_pod([app], initContainers=[init])
    assert container_resources(pod, app, node_memory=8 * GiB).oom_score_adj == 1000 - (1000 * GiB) // (8 * GiB)
    assert container_resources(pod, init, node_memory=8 * GiB).oom_score_adj == 999


# --- mounts ------------------------------------------------------------------------------


def mount_pod(mounts, volumes=None):
    volumes = volumes or [{"name": "data", "emptyDir": {}}, {"name": "cfg", "configMap": {"name": "x"}}]
    return make_pod([ctr(volumeMounts=mounts, env=[{"name": "SUB", "value": "from-env"}])], volumes=volumes)


def test_mounts_read_only_and_api_volumes_forced_read_only(tmp_path):
    pod = mount_pod([{"name": "data", "mountPath": "/data"}, {"name": "data", "mountPath": "/ro", "readOnly": True},
                     {"name": "cfg", "mountPath": "/etc/cfg"}])
    cfg = build(pod, volume_paths={"data": str(tmp_path), "cfg": tmp_path / "cfg"})
    assert cfg.mounts == [Mount(str(tmp_path), "/data", False), Mount(str(tmp_path), "/ro", True),
                          Mount(str(tmp_path / "cfg"), "/etc/cfg", True)]


def test_mount_of_volume_not_set_up():
    pod = mount_pod([{"name": "data", "mountPath": "/data"}])
    with pytest.raises(ConfigError, match="'data' is not set up"):
        build(pod, volume_paths={})


def test_sub_path_created_with_volume_mode(tmp_path):
    root = tmp_path / "vol"
    root.mkdir()
    os.chmod(root, 0o777)
    pod = mount_pod([{"name": "data", "mountPath": "/a", "subPath": "x/y"},
                     {"name": "data", "mountPath": "/b", "subPathExpr": "logs/$(SUB)"}])
    cfg = build(pod, volume_paths={"data": str(root)})
    assert [m.host_path for m in cfg.mounts] == [str(root / "x" / "y"), str(root / "logs" / "from-env")]
    for d in (root / "x", root / "x" / "y", root / "logs" / "from-env"):
        assert d.is_dir() and stat.S_IMODE(d.stat().st_mode) == 0o777


def test_sub_path_existing_file(tmp_path):
    (tmp_path / "conf.ini").write_text("x")
    pod = mount_pod([{"name": "data", "mountPath": "/etc/conf.ini", "subPath": "conf.ini"}])
    assert build(pod, volume_paths={"data": str(tmp_path)}).mounts[0].host_path == str(tmp_path / "conf.ini")


@pytest.mark.parametrize("sub", ["../escape", "a/../../b", "/abs"])
def test_sub_path_escape_rejected(tmp_path, sub):
    root = tmp_path / "vol"
    root.mkdir()
    pod = mount_pod([{"name": "data", "mountPath": "/a", "subPath": sub}])
    with pytest.raises(ConfigError, match="subPath"):
        build(pod, volume_paths={"data": str(root)})
    assert list(root.iterdir()) == [] and not (tmp_path / "escape").exists() and not (tmp_path / "b").exists()


def test_sub_path_symlink_escape_rejected(tmp_path):
    root = tmp_path / "vol"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    (root / "inner").symlink_to("link/deeper")
    for sub in ("link", "link/new", "inner"):
        pod = mount_pod([{"name": "data", "mountPath": "/a", "subPath": sub}])
        with pytest.raises(ConfigError, match="outside its volume"):
            build(pod, volume_paths={"data": str(root)})
    assert list(outside.iterdir()) == []


def test_sub_path_expr_escape_rejected(tmp_path):
    c = ctr(volumeMounts=[{"name": "data", "mountPath": "/a", "subPathExpr": "$(UP)/x"}],
            env=[{"name": "UP", "value": ".."}])
    pod = make_pod([c], volumes=[{"name": "data", "emptyDir": {}}])
    with pytest.raises(ConfigError, match="subPathExpr"):
        build(pod, volume_paths={"data": str(tmp_path)})


def test_sub_path_in_file_volume(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        prepare_sub_path(f, "x", where="test")


# --- the whole config ----------------------------------------------------------------------


def test_full_config():
    c = ctr(command=["run"], args=["--name=$(N)"], workingDir="/work", tty=True, stdin=True,
            env=[{"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
            securityContext={"runAsUser": 1000, "privileged": True},
            resources={"limits": {"cpu": "500m", "memory": "64Mi"}})
    pod = apply_defaults(make_pod([c], terminationGracePeriodSeconds=5, securityContext={"runAsGroup": 3000,
                                                                                          "runAsUser": 1}))
    c = pod["spec"]["containers"][0]
    cfg = build(pod, c, kind="app")
    assert (cfg.name, cfg.image, cfg.attempt, cfg.kind) == ("c", "busybox:1.35", 3, "app")
    assert (cfg.entrypoint, cfg.cmd, cfg.env) == (["run"], ["--name=web"], {"N": "web"})
    assert cfg.working_dir == "/work"
    assert (cfg.tty, cfg.stdin, cfg.privileged) == (True, True, True)
    assert (cfg.run_as_user, cfg.run_as_group) == (1000, 3000)  # container wins, pod fills in
    assert cfg.termination_grace_period == 5
    assert cfg.spec_hash == container_hash(c)
    assert (cfg.resources.cpu_shares, cfg.resources.cpu_quota, cfg.resources.memory_limit) == (512, 50000, 64 * 2**20)
    assert cfg.resources.oom_score_adj == -997


def test_defaults_in_config():
    cfg = build(make_pod([ctr()]), kind="sidecar")
    assert cfg.termination_grace_period == 30
    assert (cfg.entrypoint, cfg.cmd, cfg.working_dir, cfg.run_as_user, cfg.privileged) == (None, None, None, None, False)
    assert cfg.kind == "sidecar" and cfg.mounts == [] and cfg.env == {}


def test_spec_hash_changes_with_spec():
    a = build(make_pod([ctr(args=["1"])]))
    b = build(make_pod([ctr(args=["2"])]))
    assert a.spec_hash != b.spec_hash and len(a.spec_hash) == 16


def test_run_as_non_root_with_root_uid():
    c = ctr(securityContext={"runAsNonRoot": True, "runAsUser": 0})
    with pytest.raises(ConfigError, match="runAsNonRoot"):
        build(make_pod([c]))


def test_config_error_reason():
    err = ConfigError("boom")
    assert (str(err), err.reason) == ("boom", "CreateContainerConfigError")
    assert ConfigError("x", reason="Other").reason == "Other"


def test_node_resources_detect():
    node = NodeResources.detect()
    assert node.cpu_millicores >= 1000 and node.memory_bytes > 0
    assert NodeResources.detect() is node
