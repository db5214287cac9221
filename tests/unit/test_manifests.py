"""The manifest-directory source, without Docker: parsing, identity, bad input."""

from __future__ import annotations

import asyncio
import json

import pytest
import yaml

from nodeagent.standalone.manifests import ManifestSource

NODE = "node1"


def pod(name: str, **spec) -> dict:
    base = {"containers": [{"name": "c", "image": "busybox:1.35"}]}
    base.update(spec)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": base}


def source(tmp_path) -> ManifestSource:
    return ManifestSource(tmp_path, NODE, lambda snap: None)


def names(snapshot) -> set[str]:
    return {p["metadata"]["name"] for p in snapshot.pods.values()}


def write(path, *docs):
    path.write_text("\n---\n".join(yaml.safe_dump(d) for d in docs))


def test_static_pod_identity_and_defaults(tmp_path):
    write(tmp_path / "a.yaml", pod("web"))
    snap = source(tmp_path).scan()
    (p,) = snap.pods.values()
    assert p["metadata"]["name"] == f"web-{NODE}"
    assert p["metadata"]["namespace"] == "default"
    assert p["spec"]["nodeName"] == NODE
    assert p["spec"]["restartPolicy"] == "Always"
    assert p["spec"]["containers"][0]["imagePullPolicy"] == "IfNotPresent"
    assert p["metadata"]["annotations"]["kubernetes.io/config.source"] == "file"
    assert p["metadata"]["annotations"]["kubernetes.io/config.hash"] == p["metadata"]["uid"]
    assert len(p["metadata"]["uid"]) == 32


def test_multi_document_yaml_json_and_hidden_files(tmp_path):
    write(tmp_path / "multi.yml", pod("a"), pod("b"))
    (tmp_path / "c.json").write_text(json.dumps(pod("c")))
    write(tmp_path / ".hidden.yaml", pod("hidden"))
    write(tmp_path / "notes.txt", pod("txt"))
    assert names(source(tmp_path).scan()) == {f"{n}-{NODE}" for n in "abc"}


def test_edit_changes_uid_and_unchanged_file_is_not_reparsed(tmp_path):
    src = source(tmp_path)
    path = tmp_path / "a.yaml"
    write(path, pod("a"))
    uid1 = next(iter(src.scan().pods))
    assert next(iter(src.scan().pods)) == uid1
    write(path, pod("a", restartPolicy="Never"))
    uid2 = next(iter(src.scan().pods))
    assert uid2 != uid1
    path.unlink()
    assert src.scan().pods == {}


@pytest.mark.parametrize("text,field,needle", [
    ("kind: Pod\nmetadata: {name: x\n  bad", None, "not valid YAML at line"),
    ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n", "kind", "Deployment"),
    ("- 1\n- 2\n", None, "mapping"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: Bad_Name}\nspec: {containers: [{name: c, image: busybox:1.35}]}\n",
     "metadata.name", "Bad_Name"),
])
def test_unusable_manifests_are_errors_naming_file_and_field(tmp_path, text, field, needle):
    (tmp_path / "bad.yaml").write_text(text)
    write(tmp_path / "good.yaml", pod("good"))
    snap = source(tmp_path).scan()
    assert names(snap) == {f"good-{NODE}"}
    assert len(snap.errors) == 1
    (err,) = snap.errors
    assert "bad.yaml" in err and needle in err
    if field:
        assert field in err


def test_invalid_spec_pod_exists_but_is_rejected_with_reason(tmp_path):
    write(tmp_path / "q.yaml", pod("q", containers=[
        {"name": "c", "image": "busybox:1.35", "resources": {"limits": {"memory": "12Mx"}},
         "volumeMounts": [{"name": "nope", "mountPath": "/x"}]}]))
    snap = source(tmp_path).scan()
    (uid,) = snap.pods
    reason = snap.rejected[uid]
    assert "q.yaml" in reason
    assert "spec.containers[0].resources.limits.memory" in reason and "12Mx" in reason
    assert "spec.containers[0].volumeMounts[0].name" in reason


def test_invalid_image_is_not_a_rejection(tmp_path):
    write(tmp_path / "i.yaml", pod("i", containers=[{"name": "c", "image": "UPPER/Case::bad"}]))
    snap = source(tmp_path).scan()
    assert len(snap.pods) == 1 and not snap.rejected


def test_missing_image_is_a_rejection(tmp_path):
    write(tmp_path / "i.yaml", pod("i", containers=[{"name": "c"}]))
    snap = source(tmp_path).scan()
    assert len(snap.rejected) == 1


def test_duplicate_names_first_file_wins(tmp_path):
    write(tmp_path / "a.yaml", pod("same"))
    write(tmp_path / "b.yaml", pod("same", restartPolicy="Never"))
    snap = source(tmp_path).scan()
    (p,) = snap.pods.values()
    assert p["metadata"]["annotations"]["nodeagent.io/manifest-file"].endswith("a.yaml")
    assert any("b.yaml" in e and "duplicate pod default/same" in e for e in snap.errors)


def test_duplicate_within_one_file(tmp_path):
    write(tmp_path / "a.yaml", pod("same"), pod("same"))
    snap = source(tmp_path).scan()
    assert len(snap.pods) == 1
    assert any("duplicate Pod default/same" in e for e in snap.errors)


def test_broken_edit_keeps_last_good_pods(tmp_path):
    src = source(tmp_path)
    path = tmp_path / "a.yaml"
    write(path, pod("a"), pod("b"))
    before = src.scan().pods
    path.write_text("kind: Pod\nmetadata: {name: a\n")
    snap = src.scan()
    assert snap.pods.keys() == before.keys()
    assert snap.errors and "a.yaml" in snap.errors[0]


def test_invalid_pod_edit_keeps_previous_version(tmp_path):
    src = source(tmp_path)
    path = tmp_path / "a.yaml"
    write(path, pod("a"))
    before = src.scan().pods
    write(path, pod("a", containers=[{"name": "c", "image": "busybox:1.35",
                                      "resources": {"requests": {"cpu": "lots"}}}]))
    snap = src.scan()
    assert snap.pods.keys() == before.keys() and not snap.rejected
    assert any("keeping the previous version running" in e for e in snap.errors)


def test_services_are_collected(tmp_path):
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
           "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}
    write(tmp_path / "s.yaml", svc, pod("web"))
    snap = source(tmp_path).scan()
    assert [s["metadata"]["name"] for s in snap.services] == ["web"]
    assert snap.services[0]["metadata"]["namespace"] == "default"


def test_unreadable_directory_keeps_pods(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    src = ManifestSource(d, NODE, lambda s: None)
    write(d / "a.yaml", pod("a"))
    assert len(src.scan().pods) == 1
    d.rename(tmp_path / "moved")
    assert len(src.scan().pods) == 1


async def test_run_notifies_on_change_via_inotify(tmp_path):
    seen = []
    src = ManifestSource(tmp_path, NODE, seen.append, poll_period=30.0)
    task = asyncio.create_task(src.run())
    try:
        await asyncio.wait_for(src.synced.wait(), 5)
        assert seen and seen[-1].pods == {}
        write(tmp_path / "a.yaml", pod("a"))
        async with asyncio.timeout(3):  # far below the 30 s poll: inotify woke it
            while not seen[-1].pods:
                await asyncio.sleep(0.02)
        assert names(seen[-1]) == {f"a-{NODE}"}
    finally:
        task.cancel()
