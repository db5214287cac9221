"""The manifest source against hostile input: each case found crashing or hanging the
agent (issue 7), now reported by file name and field while the good pods stay."""

from __future__ import annotations

import json
import os
import time

import pytest
import yaml

from nodeagent.agent import mark_terminating
from nodeagent.api.podspec import apply_defaults, validate_pod
from nodeagent.standalone import manifestfile
from nodeagent.standalone.manifests import ManifestSource

NODE = "node1"


def pod(name: str, **spec) -> dict:
    base = {"containers": [{"name": "c", "image": "busybox:1.35"}]}
    base.update(spec)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": base}


def with_good(tmp_path) -> ManifestSource:
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(pod("good")))
    return ManifestSource(tmp_path, NODE, lambda snap: None)


def errors_for(snap, name: str) -> list[str]:
    return [e for e in snap.errors if name in e]


def assert_reported_and_good_kept(snap, name: str, *needles: str) -> str:
    assert {p["metadata"]["name"] for p in snap.pods.values() if p["metadata"]["uid"] not in snap.rejected} == {
        f"good-{NODE}"}
    errs = errors_for(snap, name)
    assert errs, f"{name} not reported: {snap.errors}"
    text = " | ".join(errs)
    for needle in needles:
        assert needle in text, text
    return text


BILLION_LAUGHS = "\n".join(
    ["apiVersion: v1", "kind: Pod", "x0: &x0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 9) + "]" for i in range(1, 9)]
    + ["metadata: {name: bomb, labels: {a: *x8}}", "spec: {containers: [{name: c, image: busybox:1.35}]}"]
)

# (file name, content, text that must appear in its error)
BAD_CONTENT = [
    ("ann-list.yaml", "kind: Pod\napiVersion: v1\nmetadata: {name: a, annotations: [x]}\n"
     "spec: {containers: [{name: c, image: busybox:1.35}]}", "metadata.annotations"),
    ("spec-list.yaml", "kind: Pod\napiVersion: v1\nmetadata: {name: b}\nspec: [x]", "spec"),
    ("no-spec.yaml", "kind: Pod\napiVersion: v1\nmetadata: {name: c}", "spec"),
    ("ns-map.yaml", "kind: Pod\napiVersion: v1\nmetadata: {name: d, namespace: {x: 1}}\n"
     "spec: {containers: [{name: c, image: busybox:1.35}]}", "metadata.namespace"),
    ("ns-list.yaml", "kind: Pod\napiVersion: v1\nmetadata: {name: d2, namespace: [1]}\n"
     "spec: {containers: [{name: c, image: busybox:1.35}]}", "metadata.namespace"),
    ("deep.yaml", "kind: Pod\nmetadata: {name: e}\nspec: " + "[" * 5000 + "]" * 5000, "nesting"),
    ("deep.json", '{"kind": "Pod", "spec": ' + "[" * 100000 + "]" * 100000 + "}", "nest"),
    ("deep-ok-parse.json", json.dumps({"kind": "Pod", "metadata": {"name": "f"},
                                       "spec": {"x": json.loads("[" * 40 + "]" * 40)}}), "nested deeper than"),
    ("bomb.yaml", BILLION_LAUGHS, "alias bomb"),
    ("bomb-svc.yaml", BILLION_LAUGHS.replace("kind: Pod", "kind: Service"), "alias bomb"),
    ("cycle.yaml", "kind: Pod\nmetadata: {name: g}\nspec: &s {containers: *s}", "recursive alias"),
    ("int-key.yaml", "kind: Pod\napiVersion: v1\nmetadata: {name: h, labels: {1: x}}\n"
     "spec: {containers: [{name: c, image: busybox:1.35}]}", "keys must be strings"),
    ("nan.yaml", "kind: Pod\napiVersion: v1\nmetadata: {name: i}\n"
     "spec: {terminationGracePeriodSeconds: .nan, containers: [{name: c, image: busybox:1.35}]}", "finite"),
    ("huge-int.yaml", "kind: Pod\napiVersion: v1\nmetadata: {name: j}\n"
     "spec: {terminationGracePeriodSeconds: 1000000000000000000000000000000, "
     "containers: [{name: c, image: busybox:1.35}]}", "64 bits"),
    ("digits.yaml", "kind: Pod\nmetadata: {name: k}\nspec: {x: " + "9" * 5000 + "}", "not valid YAML"),
    ("date.yaml", "kind: Pod\napiVersion: v1\nmetadata: {name: l}\nspec: {x: 2024-01-01, "
     "containers: [{name: c, image: busybox:1.35}]}", "quote dates"),
    ("many-docs.yaml", "---\nkind: Pod\n" * 150, "more than 100 documents"),
    ("python-tag.yaml", "kind: !!python/object/apply:os.system [true]", "not valid YAML"),
    ("svc-types.yaml", "kind: Service\napiVersion: v1\nmetadata: {name: s}\n"
     "spec: {ports: [{port: {x: 1}, protocol: [TCP]}], selector: [a]}", "spec.ports[0].port"),
    ("svc-meta.yaml", "kind: Service\nmetadata: [x]\nspec: {ports: [{port: 80}]}", "metadata"),
    ("kind-map.yaml", "kind: {a: 1}\nmetadata: {name: z}", "unsupported kind"),
]


@pytest.mark.parametrize("name,text,needle", BAD_CONTENT, ids=[c[0] for c in BAD_CONTENT])
def test_bad_content_is_reported_by_name_and_good_pod_stays(tmp_path, name, text, needle):
    src = with_good(tmp_path)
    (tmp_path / name).write_bytes(text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text)
    started = time.monotonic()
    snap = src.scan()
    assert time.monotonic() - started < 5
    assert_reported_and_good_kept(snap, name, needle)


def test_binary_garbage_is_not_utf8(tmp_path):
    src = with_good(tmp_path)
    (tmp_path / "bin.yaml").write_bytes(b"kind: Pod\n\xff\xfe\x00garbage")
    assert_reported_and_good_kept(src.scan(), "bin.yaml", "not valid UTF-8 at byte 10")


def test_file_size_limit(tmp_path):
    src = with_good(tmp_path)
    (tmp_path / "big.yaml").write_text("kind: Pod\nx: " + "a" * manifestfile.MAX_FILE_BYTES)
    assert_reported_and_good_kept(src.scan(), "big.yaml", "file too large", str(manifestfile.MAX_FILE_BYTES))


@pytest.mark.parametrize("name,text", [
    ("flow.yaml", "kind: Pod\nx: [" + "0," * 400_000 + "0]"),
    ("block.yaml", "kind: Pod\nx:\n" + "- 0\n" * 200_000),
    ("values.json", '{"kind": "Pod", "x": [' + "0," * 400_000 + "0]}"),
])
def test_value_budget_bounds_memory_and_time(tmp_path, name, text):
    """1 MiB of tiny values would be half a million objects (~250 MB): refused early."""
    import resource

    src = with_good(tmp_path)
    (tmp_path / name).write_text(text)
    started = time.monotonic()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    snap = src.scan()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB
    assert_reported_and_good_kept(snap, name, f"more than {manifestfile.MAX_NODES} values")
    assert time.monotonic() - started < 10
    assert grown < 80 * 1024, f"peak grew by {grown} KiB"


def test_annotations_over_256k_in_total_are_refused(tmp_path):
    src = with_good(tmp_path)
    doc = pod("ann")
    doc["metadata"]["annotations"] = {f"k{i}": "x" * 100_000 for i in range(3)}
    (tmp_path / "ann.yaml").write_text(yaml.safe_dump(doc))
    assert_reported_and_good_kept(src.scan(), "ann.yaml", "metadata.annotations", "262144 bytes")


@pytest.mark.parametrize("field,value,needle", [
    ("activeDeadlineSeconds", -5, "spec.activeDeadlineSeconds"),
    ("priority", 2**31, "spec.priority"),
    ("priority", -(2**31) - 1, "spec.priority"),
    ("securityContext", {"runAsUser": -1}, "spec.securityContext.runAsUser"),
    ("securityContext", {"runAsUser": 2**31}, "spec.securityContext.runAsUser"),
    ("terminationGracePeriodSeconds", "twelve", "spec.terminationGracePeriodSeconds"),
    ("terminationGracePeriodSeconds", {"n": 1}, "spec.terminationGracePeriodSeconds"),
    ("terminationGracePeriodSeconds", 1.5, "spec.terminationGracePeriodSeconds"),
])
def test_api_server_limits(field, value, needle):
    errors = validate_pod(apply_defaults(pod("p", **{field: value})))
    assert any(e.field == needle for e in errors), [str(e) for e in errors]


def test_negative_grace_period_is_corrected_to_one_like_the_api_server():
    p = apply_defaults(pod("p", terminationGracePeriodSeconds=-7))
    assert p["spec"]["terminationGracePeriodSeconds"] == 1
    assert validate_pod(p) == []


@pytest.mark.parametrize("mount_name", [["x"], {"a": 1}])
def test_unhashable_volume_mount_name(mount_name):
    p = pod("p", containers=[{"name": "c", "image": "busybox:1.35",
                              "volumeMounts": [{"name": mount_name, "mountPath": "/x"}]}])
    errors = validate_pod(apply_defaults(p))
    assert any(e.field == "spec.containers[0].volumeMounts[0].name" for e in errors)


@pytest.mark.parametrize("grace", ["twelve", {"n": 1}, float("nan"), 10**30, -5, None, True, 2**62])
def test_mark_terminating_never_raises(grace):
    p = {"metadata": {"name": "x", "uid": "u"}, "spec": {"terminationGracePeriodSeconds": grace}}
    out = mark_terminating(p)
    assert out["metadata"]["deletionTimestamp"].endswith("Z")
    assert 0 <= out["metadata"]["deletionGracePeriodSeconds"] <= 10 * 365 * 24 * 3600
    assert mark_terminating({"metadata": ["x"], "spec": ["y"]})["metadata"]["deletionGracePeriodSeconds"] == 30


# --- what is not a regular file ------------------------------------------------------------


def test_special_files_are_reported_not_read(tmp_path):
    src = with_good(tmp_path)
    os.symlink("/dev/zero", tmp_path / "zero.yaml")
    os.symlink(tmp_path / "nowhere.yaml.target", tmp_path / "dangling.yaml")
    (tmp_path / "dir.yaml").mkdir()
    os.mkfifo(tmp_path / "fifo.yaml")
    os.symlink("loop2.yaml", tmp_path / "loop1.yaml")
    os.symlink("loop1.yaml", tmp_path / "loop2.yaml")
    started = time.monotonic()
    snap = src.scan()
    assert time.monotonic() - started < 2  # the FIFO did not block, /dev/zero was not read
    assert_reported_and_good_kept(snap, "zero.yaml", "character device", "symlink")
    assert_reported_and_good_kept(snap, "dangling.yaml", "dangling symlink", "nowhere.yaml.target")
    assert_reported_and_good_kept(snap, "dir.yaml", "a directory")
    assert_reported_and_good_kept(snap, "fifo.yaml", "FIFO")
    assert_reported_and_good_kept(snap, "loop1.yaml", "symbolic links")
    # Visible to a user on /healthz?verbose, without making the node unhealthy.
    ok, detail = src.health()
    assert ok and "dangling.yaml" in detail and "fifo.yaml" in detail


def test_errors_are_logged_once_per_change(tmp_path, capsys):
    src = with_good(tmp_path)
    os.symlink(tmp_path / "missing", tmp_path / "dangling.yaml")
    (tmp_path / "bad.yaml").write_text("kind: Pod\nmetadata: {name: b}\nspec: [x]")
    for _ in range(3):
        snap = src.scan()
    out = capsys.readouterr().out + capsys.readouterr().err
    lines = out.splitlines()
    assert sum("dangling symlink" in line for line in lines) == 1
    assert sum("bad.yaml" in line for line in lines) == 1
    assert len(errors_for(snap, "dangling.yaml")) == 1
    (tmp_path / "dangling.yaml").unlink()
    (tmp_path / "bad.yaml").unlink()
    snap = src.scan()
    assert snap.errors == [] and src.health() == (True, "ok")


def test_non_utf8_file_name(tmp_path):
    src = with_good(tmp_path)
    name = os.fsencode(tmp_path) + b"/caf\xe9.yaml"
    with open(name, "w") as f:
        f.write(yaml.safe_dump(pod("cafe")))
    snap = src.scan()
    assert_reported_and_good_kept(snap, "caf\\xe9.yaml", "not valid UTF-8")
    json.dumps(snap.errors).encode("utf-8")  # servable as is


def test_any_exception_stops_at_the_file_boundary(tmp_path, monkeypatch):
    src = with_good(tmp_path)
    (tmp_path / "boom.yaml").write_text(yaml.safe_dump(pod("boom")))
    real = ManifestSource._add_pod

    def explode(self, state, where, path, doc, previous):
        if "boom" in path:
            raise KeyError("surprise")
        return real(self, state, where, path, doc, previous)

    monkeypatch.setattr(ManifestSource, "_add_pod", explode)
    assert_reported_and_good_kept(src.scan(), "boom.yaml", "KeyError")
    monkeypatch.setattr("nodeagent.standalone.manifests.load_documents", lambda *a, **k: 1 / 0)
    (tmp_path / "boom2.yaml").write_text("kind: Pod")
    assert_reported_and_good_kept(src.scan(), "boom2.yaml", "ZeroDivisionError")


def test_alias_within_budget_is_fine(tmp_path):
    src = ManifestSource(tmp_path, NODE, lambda snap: None)
    (tmp_path / "anchors.yaml").write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: anchors}\nspec:\n  containers:\n"
        "  - name: a\n    image: busybox:1.35\n    env: &env [{name: A, value: '1'}, {name: B, value: '2'}]\n"
        "  - name: b\n    image: busybox:1.35\n    env: *env\n")
    snap = src.scan()
    assert snap.errors == []
    (p,) = snap.pods.values()
    assert p["spec"]["containers"][1]["env"] == [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]


def test_service_wrong_types_reported_and_good_service_kept(tmp_path):
    src = ManifestSource(tmp_path, NODE, lambda snap: None)
    good = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}
    (tmp_path / "svc.yaml").write_text(yaml.safe_dump(good))
    (tmp_path / "bad-svc.yaml").write_text(yaml.safe_dump(
        {**good, "metadata": {"name": "bad"}, "spec": {"ports": [{"port": "eighty"}], "clusterIP": [1]}}))
    snap = src.scan()
    assert [s["metadata"]["name"] for s in snap.services] == ["web"]
    text = " | ".join(errors_for(snap, "bad-svc.yaml"))
    assert "spec.ports[0].port" in text and "spec.clusterIP" in text


def test_null_annotations_are_fine_for_pods_and_services(tmp_path):
    src = ManifestSource(tmp_path, NODE, lambda snap: None)
    (tmp_path / "p.yaml").write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: p, annotations: null}\n"
                                     "spec: {containers: [{name: c, image: busybox:1.35}]}\n")
    (tmp_path / "s.yaml").write_text("apiVersion: v1\nkind: Service\nmetadata: {name: s, annotations: null}\n"
                                     "spec: {ports: [{port: 80}]}\n")
    snap = src.scan()
    assert snap.errors == []
    (p,) = snap.pods.values()
    assert p["metadata"]["annotations"]["kubernetes.io/config.source"] == "file"
    assert snap.services[0]["metadata"]["annotations"]["nodeagent.io/manifest-file"].endswith("s.yaml")
