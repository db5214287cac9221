import copy

import pytest

from nodeagent.api.podspec import (
    FieldError,
    apply_defaults,
    default_pull_policy,
    iter_containers,
    qos_class,
    static_pod_uid,
    validate_pod,
)


def make_pod(containers=None, **spec):
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"containers": containers if containers is not None else [container()], **spec},
    }
    return pod


def container(name="c", image="busybox:1.35", **fields):
    return {"name": name, "image": image, **fields}


def fields_of(pod):
    return [e.field for e in validate_pod(pod)]


def only_error(pod, field):
    """The pod has exactly one error, at ``field``; returns its message."""
    errors = validate_pod(pod)
    assert [e.field for e in errors] == [field], [str(e) for e in errors]
    return errors[0].message


# --- the basics ---------------------------------------------------------------------


def test_minimal_pod_is_valid_before_and_after_defaults():
    pod = make_pod()
    assert validate_pod(pod) == []
    assert validate_pod(apply_defaults(pod)) == []


def test_field_error_str_and_identity():
    a, b = FieldError("spec.x", "bad"), FieldError("spec.x", "bad")
    assert str(a) == "spec.x: bad"
    assert a != b and a == a  # identity semantics, as manifests.py relies on
    assert a in [a] and b not in [a]


def test_errors_are_all_collected():
    pod = make_pod([container(name="Bad_Name", image="Foo Bar", imagePullPolicy="Sometimes")], restartPolicy="Maybe")
    pod["metadata"]["name"] = "UPPER"
    assert set(fields_of(pod)) == {
        "metadata.name", "spec.containers[0].name", "spec.containers[0].image",
        "spec.containers[0].imagePullPolicy", "spec.restartPolicy",
    }


@pytest.mark.parametrize("bad", [None, [], "pod", 3])
def test_non_mapping_pod(bad):
    errors = validate_pod(bad)
    assert len(errors) == 1 and "mapping" in errors[0].message


def test_odd_shapes_never_raise():
    weird = [
        {"kind": "Pod", "metadata": [], "spec": []},
        {"metadata": {"name": "x"}, "spec": {"containers": "nope", "volumes": {"a": 1}}},
        {"metadata": {"name": "x"}, "spec": {"containers": [1, None, {"name": 3, "image": 4, "env": "x",
                                                                      "ports": [None], "resources": []}]}},
        {"metadata": {"name": "x", "labels": ["a"]}, "spec": {"containers": [{"name": "a", "image": "b",
                                                                              "volumeMounts": [3], "envFrom": [3]}]}},
    ]
    for pod in weird:
        assert validate_pod(pod)  # reported, not raised
        assert validate_pod(apply_defaults(pod))


# --- kind / metadata --------------------------------------------------------------


def test_other_kind():
    pod = make_pod()
    pod["kind"] = "Deployment"
    assert "'Deployment'" in only_error(pod, "kind")


def test_other_api_version():
    pod = make_pod()
    pod["apiVersion"] = "apps/v1"
    assert "'apps/v1'" in only_error(pod, "apiVersion")


def test_kind_and_api_version_may_be_absent():
    pod = make_pod()
    del pod["kind"], pod["apiVersion"]
    assert validate_pod(pod) == []


def test_missing_metadata():
    pod = make_pod()
    del pod["metadata"]
    assert "metadata.name" in fields_of(pod)


@pytest.mark.parametrize("name", ["", None])
def test_missing_name(name):
    pod = make_pod()
    pod["metadata"]["name"] = name
    assert "Required" in only_error(pod, "metadata.name")


@pytest.mark.parametrize("name", ["Web", "web_1", "-web", "web-", "a" * 254, "web..x", "wéb"])
def test_bad_names(name):
    pod = make_pod()
    pod["metadata"]["name"] = name
    assert repr(name)[:40] in only_error(pod, "metadata.name")


@pytest.mark.parametrize("name", ["web", "web-1", "a.b.c", "1abc", "a" * 253])
def test_good_names(name):
    pod = make_pod()
    pod["metadata"]["name"] = name
    assert validate_pod(pod) == []


@pytest.mark.parametrize("ns", ["Kube", "a.b", "a" * 64, "-x"])
def test_bad_namespace(ns):
    pod = make_pod()
    pod["metadata"]["namespace"] = ns
    assert repr(ns) in only_error(pod, "metadata.namespace")


def test_labels_and_annotations():
    pod = make_pod()
    pod["metadata"]["labels"] = {"app": "web", "example.com/tier": "front", "bad key": "x", "version": 1}
    pod["metadata"]["annotations"] = {"ok": "1", "n": 3}
    assert sorted(fields_of(pod)) == ["metadata.annotations[n]", "metadata.labels", "metadata.labels[version]"]


# --- containers ---------------------------------------------------------------------


def test_no_containers():
    assert "at least one container" in only_error(make_pod([]), "spec.containers")
    pod = make_pod()
    del pod["spec"]["containers"]
    assert "at least one container" in only_error(pod, "spec.containers")


def test_container_name_required_and_label():
    assert "Required" in only_error(make_pod([container(name="")]), "spec.containers[0].name")
    assert "'a.b'" in only_error(make_pod([container(name="a.b")]), "spec.containers[0].name")
    assert only_error(make_pod([container(name="x" * 64)]), "spec.containers[0].name")


def test_duplicate_names_across_init_and_app():
    pod = make_pod([container(name="a"), container(name="b")], initContainers=[container(name="a")])
    msg = only_error(pod, "spec.containers[0].name")
    assert "'a'" in msg and "spec.initContainers[0]" in msg
    assert "spec.containers[1].name" in fields_of(make_pod([container(name="a"), container(name="a")]))


def test_image_required():
    assert "Required" in only_error(make_pod([container(image="")]), "spec.containers[0].image")
    c = container()
    del c["image"]
    assert only_error(make_pod([c]), "spec.containers[0].image")


@pytest.mark.parametrize("image", ["Busybox", "busybox:", "busy box", "busybox@sha256:abc", "a:b:c", "-x/y"])
def test_invalid_image_reference(image):
    msg = only_error(make_pod([container(image=image)]), "spec.containers[0].image")
    assert repr(image) in msg


@pytest.mark.parametrize("image", ["busybox", "busybox:1.35", "localhost:5000/a/b:v1", "docker.io/library/x",
                                   "x@sha256:" + "a" * 64, "[::1]:5000/x:y"])
def test_valid_image_references(image):
    assert validate_pod(make_pod([container(image=image)])) == []


def test_init_container_image_field_path():
    pod = make_pod(initContainers=[container(name="i", image="NOPE")])
    assert only_error(pod, "spec.initContainers[0].image")


def test_pull_policy():
    assert "'Sometimes'" in only_error(make_pod([container(imagePullPolicy="Sometimes")]),
                                       "spec.containers[0].imagePullPolicy")
    for policy in ("Always", "IfNotPresent", "Never"):
        assert validate_pod(make_pod([container(imagePullPolicy=policy)])) == []


def test_command_and_args_must_be_string_lists():
    pod = make_pod([container(command="sh -c x", args=["a", 5])])
    assert sorted(fields_of(pod)) == ["spec.containers[0].args[1]", "spec.containers[0].command"]


@pytest.mark.parametrize("policy", ["Always", "OnFailure", "Never"])
def test_pod_restart_policies(policy):
    assert validate_pod(make_pod(restartPolicy=policy)) == []


def test_bad_pod_restart_policy():
    assert "'Sometimes'" in only_error(make_pod(restartPolicy="Sometimes"), "spec.restartPolicy")


def test_init_container_restart_policy_only_always():
    assert validate_pod(make_pod(initContainers=[container(name="s", restartPolicy="Always")])) == []
    msg = only_error(make_pod(initContainers=[container(name="s", restartPolicy="OnFailure")]),
                     "spec.initContainers[0].restartPolicy")
    assert "'OnFailure'" in msg
    assert only_error(make_pod([container(restartPolicy="Always")]), "spec.containers[0].restartPolicy")


def test_probes_not_on_plain_init_containers():
    probe = {"exec": {"command": ["true"]}}
    pod = make_pod(initContainers=[container(name="i", livenessProbe=probe)])
    assert only_error(pod, "spec.initContainers[0].livenessProbe")
    pod = make_pod(initContainers=[container(name="i", restartPolicy="Always", livenessProbe=probe)])
    assert validate_pod(pod) == []


def test_probe_handler_and_thresholds():
    pod = make_pod([container(livenessProbe={"exec": {"command": ["true"]}, "httpGet": {"port": 80}})])
    assert only_error(pod, "spec.containers[0].livenessProbe")
    pod = make_pod([container(livenessProbe={"tcpSocket": {"port": 80}, "successThreshold": 2})])
    assert only_error(pod, "spec.containers[0].livenessProbe.successThreshold")
    pod = make_pod([container(readinessProbe={"httpGet": {"port": 70000}, "successThreshold": 2})])
    assert only_error(pod, "spec.containers[0].readinessProbe.httpGet.port")
    pod = make_pod([container(readinessProbe={"httpGet": {"port": "http"}, "periodSeconds": -1})])
    assert only_error(pod, "spec.containers[0].readinessProbe.periodSeconds")


def test_lifecycle_handlers():
    pod = make_pod([container(lifecycle={"preStop": {"sleep": {"seconds": 5}}})])
    assert validate_pod(pod) == []
    pod = make_pod([container(lifecycle={"preStop": {}})])
    assert only_error(pod, "spec.containers[0].lifecycle.preStop")


# --- ports ----------------------------------------------------------------------------


@pytest.mark.parametrize("port", [0, 65536, -1, "80", None])
def test_container_port_range(port):
    pod = make_pod([container(ports=[{"containerPort": port}])])
    assert only_error(pod, "spec.containers[0].ports[0].containerPort")


def test_host_port_protocol_and_name():
    pod = make_pod([container(ports=[{"containerPort": 80, "hostPort": 70000, "protocol": "ICMP",
                                      "name": "Too_Long_Port_Name"}])])
    assert sorted(fields_of(pod)) == [
        "spec.containers[0].ports[0].hostPort", "spec.containers[0].ports[0].name", "spec.containers[0].ports[0].protocol",
    ]
    by_field = {e.field: e.message for e in validate_pod(pod)}
    assert "'ICMP'" in by_field["spec.containers[0].ports[0].protocol"]
    assert "70000" in by_field["spec.containers[0].ports[0].hostPort"]


@pytest.mark.parametrize("protocol", ["TCP", "UDP", "SCTP"])
def test_protocols(protocol):
    assert validate_pod(make_pod([container(ports=[{"containerPort": 53, "protocol": protocol}])])) == []


def test_duplicate_host_ports_across_containers():
    pod = make_pod([container(name="a", ports=[{"containerPort": 80, "hostPort": 8080}]),
                    container(name="b", ports=[{"containerPort": 81, "hostPort": 8080}])])
    assert "spec.containers[0].ports[0]" in only_error(pod, "spec.containers[1].ports[0].hostPort")
    pod = make_pod([container(name="a", ports=[{"containerPort": 80, "hostPort": 8080}]),
                    container(name="b", ports=[{"containerPort": 81, "hostPort": 8080, "protocol": "UDP"}])])
    assert validate_pod(pod) == []


def test_host_network_host_port_must_match():
    pod = make_pod([container(ports=[{"containerPort": 80, "hostPort": 81}])], hostNetwork=True)
    assert only_error(pod, "spec.containers[0].ports[0].hostPort")


def test_duplicate_port_names():
    pod = make_pod([container(ports=[{"containerPort": 80, "name": "http"}, {"containerPort": 81, "name": "http"}])])
    assert only_error(pod, "spec.containers[0].ports[1].name")


# --- env --------------------------------------------------------------------------------


def env_pod(*env, env_from=None):
    c = container(env=list(env))
    if env_from is not None:
        c["envFrom"] = env_from
    return make_pod([c])


def test_env_name_required_and_valid():
    assert only_error(env_pod({"value": "x"}), "spec.containers[0].env[0].name")
    assert "'A=B'" in only_error(env_pod({"name": "A=B"}), "spec.containers[0].env[0].name")
    assert only_error(env_pod({"name": "tab\there"}), "spec.containers[0].env[0].name")
    # Kubernetes 1.32 accepts any printable ASCII except '='.
    assert validate_pod(env_pod({"name": "my.var-1"}, {"name": "1st"}, {"name": "a b"})) == []


def test_env_value_must_be_string():
    assert "quote" in only_error(env_pod({"name": "N", "value": 5}), "spec.containers[0].env[0].value")


def test_value_and_value_from_exclusive():
    var = {"name": "A", "value": "x", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    assert only_error(env_pod(var), "spec.containers[0].env[0].valueFrom")


def test_value_from_exactly_one_source():
    assert only_error(env_pod({"name": "A", "valueFrom": {}}), "spec.containers[0].env[0].valueFrom")
    both = {"fieldRef": {"fieldPath": "metadata.name"}, "secretKeyRef": {"name": "s", "key": "k"}}
    msg = only_error(env_pod({"name": "A", "valueFrom": both}), "spec.containers[0].env[0].valueFrom")
    assert "more than one" in msg


@pytest.mark.parametrize("path", [
    "metadata.name", "metadata.namespace", "metadata.uid", "metadata.labels['app']",
    "metadata.annotations['example.com/x']", "spec.nodeName", "spec.serviceAccountName", "status.podIP",
    "status.podIPs", "status.hostIP", "status.hostIPs",
])
def test_supported_field_paths(path):
    assert validate_pod(env_pod({"name": "A", "valueFrom": {"fieldRef": {"fieldPath": path}}})) == []


@pytest.mark.parametrize("path", ["metadata.labels", "spec.containers", "status.phase", "metadata.labels['bad key']"])
def test_unsupported_field_paths(path):
    msg = only_error(env_pod({"name": "A", "valueFrom": {"fieldRef": {"fieldPath": path}}}),
                     "spec.containers[0].env[0].valueFrom.fieldRef.fieldPath")
    assert path.split("[")[0] in msg


def test_field_ref_api_version():
    var = {"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name", "apiVersion": "v2"}}}
    assert only_error(env_pod(var), "spec.containers[0].env[0].valueFrom.fieldRef.apiVersion")


def test_resource_field_ref():
    ok = {"name": "A", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}}
    assert validate_pod(env_pod(ok)) == []
    cpu = {"name": "A", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1m"}}}
    assert validate_pod(env_pod(cpu)) == []
    bad = {"name": "A", "valueFrom": {"resourceFieldRef": {"resource": "limits.gpu"}}}
    assert "'limits.gpu'" in only_error(env_pod(bad), "spec.containers[0].env[0].valueFrom.resourceFieldRef.resource")
    div = {"name": "A", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "2"}}}
    assert "'2'" in only_error(env_pod(div), "spec.containers[0].env[0].valueFrom.resourceFieldRef.divisor")
    other = {"name": "A", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "containerName": "zz"}}}
    assert "'zz'" in only_error(env_pod(other), "spec.containers[0].env[0].valueFrom.resourceFieldRef.containerName")


def test_key_refs():
    ok = {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "a.key", "optional": True}}}
    assert validate_pod(env_pod(ok)) == []
    no_key = {"name": "A", "valueFrom": {"secretKeyRef": {"name": "s"}}}
    assert only_error(env_pod(no_key), "spec.containers[0].env[0].valueFrom.secretKeyRef.key")
    bad_key = {"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "a/b"}}}
    assert "'a/b'" in only_error(env_pod(bad_key), "spec.containers[0].env[0].valueFrom.secretKeyRef.key")
    no_name = {"name": "A", "valueFrom": {"configMapKeyRef": {"key": "k"}}}
    assert only_error(env_pod(no_name), "spec.containers[0].env[0].valueFrom.configMapKeyRef.name")


def test_env_from():
    assert validate_pod(env_pod(env_from=[{"configMapRef": {"name": "c"}, "prefix": "P_"}])) == []
    assert only_error(env_pod(env_from=[{"prefix": "P_"}]), "spec.containers[0].envFrom[0]")
    assert only_error(env_pod(env_from=[{"configMapRef": {"name": "c"}, "secretRef": {"name": "s"}}]),
                      "spec.containers[0].envFrom[0]")
    assert only_error(env_pod(env_from=[{"secretRef": {}}]), "spec.containers[0].envFrom[0].secretRef.name")
    assert only_error(env_pod(env_from=[{"secretRef": {"name": "s"}, "prefix": "A="}]),
                      "spec.containers[0].envFrom[0].prefix")


# --- resources ------------------------------------------------------------------------


def res_pod(**resources):
    return make_pod([container(resources=resources)])


def test_bad_quantity_quotes_value():
    msg = only_error(res_pod(limits={"memory": "12Mx"}), "spec.containers[0].resources.limits.memory")
    assert "'12Mx'" in msg


def test_bad_quantity_reported_once_after_defaults():
    pod = apply_defaults(res_pod(limits={"memory": "12Mx", "cpu": "1"}))
    assert only_error(pod, "spec.containers[0].resources.limits.memory")


def test_negative_quantity():
    assert only_error(res_pod(requests={"cpu": "-1"}), "spec.containers[0].resources.requests.cpu")


def test_requests_must_not_exceed_limits():
    msg = only_error(res_pod(requests={"cpu": "2"}, limits={"cpu": "500m"}), "spec.containers[0].resources.requests.cpu")
    assert "'2'" in msg and "'500m'" in msg
    assert validate_pod(res_pod(requests={"cpu": "0.5"}, limits={"cpu": "500m"})) == []
    assert validate_pod(res_pod(requests={"memory": "1Gi"}, limits={"memory": 2**30})) == []


def test_resource_names():
    assert only_error(res_pod(limits={"gpu": "1"}), "spec.containers[0].resources.limits.gpu")
    assert validate_pod(res_pod(limits={"example.com/gpu": 1, "hugepages-2Mi": "4Mi", "ephemeral-storage": "1Gi"})) == []


def test_init_container_resource_path():
    pod = make_pod(initContainers=[container(name="i", resources={"requests": {"memory": "lots"}})])
    assert only_error(pod, "spec.initContainers[0].resources.requests.memory")


# --- volumes and mounts ----------------------------------------------------------------


def vol_pod(volumes, mounts=()):
    return make_pod([container(volumeMounts=list(mounts))], volumes=volumes)


def test_mount_names_existing_volume():
    pod = vol_pod([{"name": "data", "emptyDir": {}}], [{"name": "other", "mountPath": "/x"}])
    assert "'other'" in only_error(pod, "spec.containers[0].volumeMounts[0].name")


def test_mount_path_absolute_and_unique():
    pod = vol_pod([{"name": "d", "emptyDir": {}}], [{"name": "d", "mountPath": "rel"}])
    assert "'rel'" in only_error(pod, "spec.containers[0].volumeMounts[0].mountPath")
    pod = vol_pod([{"name": "d", "emptyDir": {}}], [{"name": "d"}])
    assert only_error(pod, "spec.containers[0].volumeMounts[0].mountPath")
    pod = vol_pod([{"name": "d", "emptyDir": {}}], [{"name": "d", "mountPath": "/a"}, {"name": "d", "mountPath": "/a/"}])
    assert only_error(pod, "spec.containers[0].volumeMounts[1].mountPath")


def test_sub_path_rules():
    vols = [{"name": "d", "emptyDir": {}}]
    assert validate_pod(vol_pod(vols, [{"name": "d", "mountPath": "/a", "subPath": "x/y"}])) == []
    assert only_error(vol_pod(vols, [{"name": "d", "mountPath": "/a", "subPath": "../x"}]),
                      "spec.containers[0].volumeMounts[0].subPath")
    assert only_error(vol_pod(vols, [{"name": "d", "mountPath": "/a", "subPath": "/x"}]),
                      "spec.containers[0].volumeMounts[0].subPath")
    assert only_error(vol_pod(vols, [{"name": "d", "mountPath": "/a", "subPath": "x", "subPathExpr": "$(A)"}]),
                      "spec.containers[0].volumeMounts[0].subPathExpr")


def test_bidirectional_needs_privileged():
    vols = [{"name": "d", "emptyDir": {}}]
    pod = vol_pod(vols, [{"name": "d", "mountPath": "/a", "mountPropagation": "Bidirectional"}])
    assert only_error(pod, "spec.containers[0].volumeMounts[0].mountPropagation")


def test_volume_names_unique_and_labels():
    pod = vol_pod([{"name": "d", "emptyDir": {}}, {"name": "d", "emptyDir": {}}])
    assert "'d'" in only_error(pod, "spec.volumes[1].name")
    assert only_error(vol_pod([{"name": "D", "emptyDir": {}}]), "spec.volumes[0].name")
    assert only_error(vol_pod([{"emptyDir": {}}]), "spec.volumes[0].name")


def test_volume_source_required_and_single():
    assert only_error(vol_pod([{"name": "d"}]), "spec.volumes[0]")
    assert "no volume type" not in only_error(vol_pod([{"name": "d", "emptyDir": {}, "hostPath": {"path": "/x"}}]),
                                              "spec.volumes[0]")


def test_unsupported_volume_source():
    msg = only_error(vol_pod([{"name": "d", "persistentVolumeClaim": {"claimName": "c"}}]),
                     "spec.volumes[0].persistentVolumeClaim")
    assert "'persistentVolumeClaim'" in msg


def test_volume_without_source_defaults_to_empty_dir():
    pod = apply_defaults(vol_pod([{"name": "d"}]))
    assert pod["spec"]["volumes"][0]["emptyDir"] == {}
    assert validate_pod(pod) == []


def test_empty_dir_fields():
    assert only_error(vol_pod([{"name": "d", "emptyDir": {"medium": "Disk"}}]), "spec.volumes[0].emptyDir.medium")
    assert "'1Gx'" in only_error(vol_pod([{"name": "d", "emptyDir": {"sizeLimit": "1Gx"}}]),
                                 "spec.volumes[0].emptyDir.sizeLimit")
    assert validate_pod(vol_pod([{"name": "d", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}}])) == []


def test_host_path_fields():
    assert only_error(vol_pod([{"name": "d", "hostPath": {}}]), "spec.volumes[0].hostPath.path")
    assert only_error(vol_pod([{"name": "d", "hostPath": {"path": "rel"}}]), "spec.volumes[0].hostPath.path")
    assert only_error(vol_pod([{"name": "d", "hostPath": {"path": "/a/../b"}}]), "spec.volumes[0].hostPath.path")
    assert "'Dir'" in only_error(vol_pod([{"name": "d", "hostPath": {"path": "/a", "type": "Dir"}}]),
                                 "spec.volumes[0].hostPath.type")
    for kind in ("", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket", "CharDevice", "BlockDevice"):
        assert validate_pod(vol_pod([{"name": "d", "hostPath": {"path": "/a", "type": kind}}])) == []


def test_config_map_and_secret_volume_shape():
    good = [{"name": "c", "configMap": {"name": "cfg", "items": [{"key": "k", "path": "dir/k", "mode": 0o600}]}},
            {"name": "s", "secret": {"secretName": "sec", "defaultMode": 0o400}}]
    assert validate_pod(vol_pod(good)) == []
    assert only_error(vol_pod([{"name": "s", "secret": {}}]), "spec.volumes[0].secret.secretName")
    assert only_error(vol_pod([{"name": "c", "configMap": {"name": "cfg", "items": [{"key": "k", "path": "../k"}]}}]),
                      "spec.volumes[0].configMap.items[0].path")
    assert only_error(vol_pod([{"name": "c", "configMap": {"name": "cfg", "defaultMode": 0o1777}}]),
                      "spec.volumes[0].configMap.defaultMode")


def test_downward_api_volume_shape():
    good = {"name": "d", "downwardAPI": {"items": [
        {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
        {"path": "mem", "resourceFieldRef": {"containerName": "c", "resource": "limits.memory"}}]}}
    assert validate_pod(vol_pod([good])) == []
    bad = {"name": "d", "downwardAPI": {"items": [{"path": "ip", "fieldRef": {"fieldPath": "status.podIP"}}]}}
    assert only_error(vol_pod([bad]), "spec.volumes[0].downwardAPI.items[0].fieldRef.fieldPath")
    no_container = {"name": "d", "downwardAPI": {"items": [{"path": "m", "resourceFieldRef": {"resource": "limits.cpu"}}]}}
    assert only_error(vol_pod([no_container]), "spec.volumes[0].downwardAPI.items[0].resourceFieldRef.containerName")


def test_projected_volume_shape():
    good = {"name": "p", "projected": {"sources": [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}}]}}
    assert validate_pod(vol_pod([good])) == []
    dup = {"name": "p", "projected": {"sources": [
        {"secret": {"name": "a", "items": [{"key": "k", "path": "x"}]}},
        {"configMap": {"name": "b", "items": [{"key": "k", "path": "x"}]}}]}}
    assert "'x'" in only_error(vol_pod([dup]), "spec.volumes[0].projected.sources[1]")
    two = {"name": "p", "projected": {"sources": [{"secret": {"name": "a"}, "configMap": {"name": "b"}}]}}
    assert only_error(vol_pod([two]), "spec.volumes[0].projected.sources[0]")


# --- pod-level fields -----------------------------------------------------------------


@pytest.mark.parametrize("value", [-1, "30", 1.5, True])
def test_grace_period(value):
    assert only_error(make_pod(terminationGracePeriodSeconds=value), "spec.terminationGracePeriodSeconds")


def test_grace_period_zero_is_fine():
    assert validate_pod(make_pod(terminationGracePeriodSeconds=0)) == []


def test_dns_policy():
    assert only_error(make_pod(dnsPolicy="Google"), "spec.dnsPolicy")
    assert only_error(make_pod(dnsPolicy="None"), "spec.dnsConfig")
    assert validate_pod(make_pod(dnsPolicy="None", dnsConfig={"nameservers": ["1.1.1.1"]})) == []


def test_misc_pod_fields():
    assert only_error(make_pod(hostNetwork="yes"), "spec.hostNetwork")
    assert only_error(make_pod(nodeName="Node_1"), "spec.nodeName")
    assert only_error(make_pod(hostname="a.b"), "spec.hostname")
    assert only_error(make_pod(activeDeadlineSeconds=0), "spec.activeDeadlineSeconds")
    assert only_error(make_pod(securityContext={"runAsUser": -1}), "spec.securityContext.runAsUser")
    assert only_error(make_pod([container(securityContext={"privileged": "yes"})]),
                      "spec.containers[0].securityContext.privileged")


# --- defaults ---------------------------------------------------------------------------


def test_defaults_pod_level():
    pod = make_pod()
    del pod["metadata"]["namespace"]
    out = apply_defaults(pod)
    assert out is not pod and "namespace" not in pod["metadata"]  # a copy
    spec = out["spec"]
    assert out["metadata"]["namespace"] == "default"
    assert spec["restartPolicy"] == "Always"
    assert spec["terminationGracePeriodSeconds"] == 30
    assert spec["dnsPolicy"] == "ClusterFirst"
    assert spec["schedulerName"] == "default-scheduler"
    assert spec["enableServiceLinks"] is True
    assert spec["securityContext"] == {}


def test_defaults_keep_explicit_values():
    out = apply_defaults(make_pod(restartPolicy="Never", terminationGracePeriodSeconds=0, dnsPolicy="Default"))
    assert (out["spec"]["restartPolicy"], out["spec"]["terminationGracePeriodSeconds"], out["spec"]["dnsPolicy"]) == (
        "Never", 0, "Default")


def test_defaults_container_level():
    pod = make_pod([container(ports=[{"containerPort": 80}], resources={"limits": {"cpu": "1", "memory": "1Gi"}},
                              env=[{"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                              livenessProbe={"httpGet": {"port": 80}})],
                   initContainers=[container(name="i")])
    out = apply_defaults(pod)
    c = out["spec"]["containers"][0]
    assert c["terminationMessagePath"] == "/dev/termination-log"
    assert c["terminationMessagePolicy"] == "File"
    assert c["imagePullPolicy"] == "IfNotPresent"
    assert c["ports"] == [{"containerPort": 80, "protocol": "TCP"}]
    assert c["resources"]["requests"] == {"cpu": "1", "memory": "1Gi"}
    assert c["env"][0]["valueFrom"]["fieldRef"]["apiVersion"] == "v1"
    assert c["livenessProbe"] == {"httpGet": {"port": 80, "path": "/", "scheme": "HTTP"}, "timeoutSeconds": 1,
                                  "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3}
    init = out["spec"]["initContainers"][0]
    assert init["resources"] == {} and init["imagePullPolicy"] == "IfNotPresent"


def test_defaults_requests_do_not_override():
    out = apply_defaults(make_pod([container(resources={"requests": {"cpu": "100m"}, "limits": {"cpu": "1"}})]))
    assert out["spec"]["containers"][0]["resources"]["requests"] == {"cpu": "100m"}


def test_defaults_host_network_host_port():
    out = apply_defaults(make_pod([container(ports=[{"containerPort": 8080}])], hostNetwork=True))
    assert out["spec"]["containers"][0]["ports"][0]["hostPort"] == 8080


def test_defaults_volumes():
    pod = vol_pod([{"name": "c", "configMap": {"name": "x"}}, {"name": "h", "hostPath": {"path": "/x"}},
                   {"name": "p", "projected": {"sources": [{"serviceAccountToken": {"path": "t"}}]}}])
    vols = apply_defaults(pod)["spec"]["volumes"]
    assert vols[0]["configMap"]["defaultMode"] == 420
    assert vols[1]["hostPath"]["type"] == ""
    assert vols[2]["projected"]["defaultMode"] == 420
    assert vols[2]["projected"]["sources"][0]["serviceAccountToken"]["expirationSeconds"] == 3600


@pytest.mark.parametrize("image, policy", [
    ("busybox", "Always"), ("busybox:latest", "Always"), ("busybox:1.35", "IfNotPresent"),
    ("localhost:5000/busybox", "Always"), ("localhost:5000/busybox:v1", "IfNotPresent"),
    ("busybox@sha256:" + "a" * 64, "IfNotPresent"), ("busybox:latest@sha256:" + "a" * 64, "Always"),
    ("NOT VALID", "IfNotPresent"),
])
def test_default_pull_policy(image, policy):
    assert default_pull_policy(image) == policy
    assert apply_defaults(make_pod([container(image=image)]))["spec"]["containers"][0]["imagePullPolicy"] == policy


def test_defaults_idempotent():
    once = apply_defaults(make_pod([container(resources={"limits": {"cpu": "1"}})]))
    assert apply_defaults(once) == once


# --- QoS ----------------------------------------------------------------------------------


def qpod(*resources, init=()):
    return make_pod([container(name=f"c{i}", resources=r) for i, r in enumerate(resources)],
                    initContainers=[container(name=f"i{i}", resources=r) for i, r in enumerate(init)])


GUARANTEED = {"limits": {"cpu": "1", "memory": "1Gi"}}


@pytest.mark.parametrize("pod, expected", [
    (qpod({}), "BestEffort"),
    (qpod({"requests": {"ephemeral-storage": "1Gi"}}), "BestEffort"),
    (qpod({"requests": {"cpu": "0"}}), "BestEffort"),
    (qpod({"requests": {"memory": "64Mi"}}), "Burstable"),
    (qpod(GUARANTEED), "Guaranteed"),  # limits imply requests
    (qpod({"requests": {"cpu": "1", "memory": "1Gi"}, **GUARANTEED}), "Guaranteed"),
    (qpod({"requests": {"cpu": "1000m", "memory": "1024Mi"}, **GUARANTEED}), "Guaranteed"),
    (qpod({"requests": {"cpu": "500m", "memory": "1Gi"}, **GUARANTEED}), "Burstable"),
    (qpod({"limits": {"cpu": "1"}}), "Burstable"),
    (qpod(GUARANTEED, {}), "Burstable"),
    (qpod(GUARANTEED, GUARANTEED), "Guaranteed"),
    (qpod(GUARANTEED, init=[{}]), "Burstable"),
    (qpod(GUARANTEED, init=[GUARANTEED]), "Guaranteed"),
    (qpod({}, init=[{"requests": {"cpu": "1"}}]), "Burstable"),
    (qpod({"requests": {"cpu": "0", "memory": "1Gi"}, **GUARANTEED}), "Burstable"),
    (qpod({"limits": {"cpu": "1", "memory": "1Gi", "example.com/gpu": "1"}}), "Guaranteed"),
])
def test_qos(pod, expected):
    assert qos_class(pod) == expected
    assert qos_class(apply_defaults(pod)) == expected


# --- identity -------------------------------------------------------------------------


def test_static_pod_uid_stable_and_sensitive():
    pod = apply_defaults(make_pod())
    uid = static_pod_uid(pod, "node-a", "/etc/manifests/web.yaml")
    assert len(uid) == 32 and int(uid, 16) >= 0
    assert static_pod_uid(copy.deepcopy(pod), "node-a", "/etc/manifests/web.yaml") == uid
    # key order does not matter
    reordered = dict(reversed(list(pod.items())))
    assert static_pod_uid(reordered, "node-a", "/etc/manifests/web.yaml") == uid
    edited = copy.deepcopy(pod)
    edited["spec"]["containers"][0]["image"] = "busybox:1.36"
    assert static_pod_uid(edited, "node-a", "/etc/manifests/web.yaml") != uid
    assert static_pod_uid(pod, "node-b", "/etc/manifests/web.yaml") != uid
    assert static_pod_uid(pod, "node-a", "/etc/manifests/other.yaml") != uid


def test_static_pod_uid_ignores_agent_stamps():
    pod = apply_defaults(make_pod())
    uid = static_pod_uid(pod, "n", "/m.yaml")
    stamped = copy.deepcopy(pod)
    stamped["metadata"].update(uid=uid, creationTimestamp="2024-01-01T00:00:00Z",
                               annotations={"kubernetes.io/config.seen": "now", "kubernetes.io/config.hash": uid})
    assert static_pod_uid(stamped, "n", "/m.yaml") == uid
    labelled = copy.deepcopy(pod)
    labelled["metadata"]["labels"] = {"app": "x"}
    assert static_pod_uid(labelled, "n", "/m.yaml") != uid


def test_iter_containers_order_and_kinds():
    pod = make_pod([container(name="a1"), container(name="a2")],
                   initContainers=[container(name="i1"), container(name="s1", restartPolicy="Always"),
                                   container(name="i2")])
    assert [(k, c["name"]) for k, c in iter_containers(pod)] == [
        ("init", "i1"), ("sidecar", "s1"), ("init", "i2"), ("app", "a1"), ("app", "a2")]
    assert list(iter_containers({"spec": {"containers": "x"}})) == []
    assert list(iter_containers({})) == []


@pytest.mark.parametrize("spec, field", [
    ({"ephemeralContainers": [{"name": "debug", "image": "busybox:1.35"}]}, "spec.ephemeralContainers"),
    ({"runtimeClassName": "gvisor"}, "spec.runtimeClassName"),
    ({"overhead": {"cpu": "250m"}}, "spec.overhead"),
    ({"resourceClaims": [{"name": "gpu"}]}, "spec.resourceClaims"),
    ({"resources": {"limits": {"cpu": "1"}}}, "spec.resources"),
    ({"os": {"name": "windows"}}, "spec.os.name"),
])
def test_fields_the_node_cannot_carry_out_refuse_the_pod(spec, field):
    from nodeagent.api.podspec import validate_pod

    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
           "spec": {"containers": [{"name": "c", "image": "busybox:1.35"}], **spec}}
    errors = validate_pod(pod)
    assert [e.field for e in errors] == [field], errors
    assert "not supported" in str(errors[0]) or "Linux" in str(errors[0])


def test_container_fields_the_node_cannot_carry_out():
    from nodeagent.api.podspec import validate_pod

    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
           "spec": {"containers": [{"name": "c", "image": "busybox:1.35",
                                    "volumeDevices": [{"name": "d", "devicePath": "/dev/xvda"}],
                                    "resources": {"claims": [{"name": "gpu"}]}}],
                    "os": {"name": "linux"}, "hostUsers": True}}
    assert sorted(e.field for e in validate_pod(pod)) == [
        "spec.containers[0].resources.claims", "spec.containers[0].volumeDevices"]
