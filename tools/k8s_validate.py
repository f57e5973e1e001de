"""Offline checks for the Kubernetes manifests in k8s/: render each kustomization, validate every object.

    .venv/bin/python tools/k8s_validate.py                     # k8s/base, every overlay, secret.example.yaml
    .venv/bin/python tools/k8s_validate.py k8s/overlays/gpu    # one kustomization (or manifest file)

No cluster, kubectl or kustomize binary is needed (rendering: ``k8s_render``). The project does not
import this at run time; tests/test_k8s.py does, and so can anyone checking an edited overlay.

Every problem names the object and the field. The checks:

1. schema: RayCluster/RayJob against the upstream KubeRay v1.7.0 CRDs' ``openAPIV3Schema`` (k8s/crds/),
   core kinds (Namespace, ConfigMap, Secret) and all ``metadata`` against small hand-written schemas
   of the fields Kubernetes allows there (no Kubernetes schema package is available offline);
2. what the API server does beyond the schema: unknown fields (it prunes them silently, so a typo
   vanishes), duplicate keys in ``x-kubernetes-list-type: map`` lists, the CRDs' CEL rules on values;
3. the KubeRay controller's rules (``ray-operator/controllers/ray/utils/validation.go``), which it only
   reports as events once the object exists: name lengths, replicas, rayStartParams vs resources,
   autoscaler v2, submissionMode, TTL vs shutdown, runtimeEnvYAML, deadlines, ...;
4. what Kubernetes checks when it creates the Pods: an image per container, requests <= limits,
   extended resources (nvidia.com/gpu) with requests == limits;
5. lensray's policy: the restricted Pod Security profile for every pod (autoscaler and submitter
   included), credentials only from Secrets (never literal in env, ConfigMaps or runtime envs),
   /dev/shm as a memory emptyDir for Ray containers, pinned image tags, RayJobs that delete their
   cluster, and entrypoints that are real ``lensray`` commands naming config files the image ships.
"""

from __future__ import annotations

import base64
import functools
import io
import re
import shlex
import sys
from collections.abc import Iterator
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from k8s_render import CLUSTER_SCOPED, RenderError, object_id, render, split_image

REPO = Path(__file__).resolve().parents[1]
K8S_DIR = REPO / "k8s"
CRD_DIR = K8S_DIR / "crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
RAY_API_VERSION = "ray.io/v1"  # v1alpha1 is deprecated

# Where docker/Dockerfile puts the repository's config folders inside the image (the demo's configs
# ship in the package, lensray/resources/, which the image copies too).
IMAGE_APP_DIR = "/home/ray/lensray"
IMAGE_CONFIG_DIRS = ("configs", "tune_configs", "lensray/resources")

# KubeRay limits (utils/constant.go): the operator appends 6 characters to a RayJob's name.
MAX_NAME_LENGTH = {"RayCluster": 53, "RayJob": 47}
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
MANAGED_BY = ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue")
FEATURE_GATED = ("networkPolicy", "tlsOptions", "historyServerOptions")  # each needs an operator feature gate

DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
LABEL_NAME = r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"

# A variable name that holds a credential: AWS_SECRET_ACCESS_KEY, DB_PASSWORD, HF_TOKEN (not TOKENIZERS_...).
SECRET_NAME = re.compile(r"(^|_)(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|API_KEY|PRIVATE_KEY)(_|$)", re.IGNORECASE)
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b")
SHELL_SPECIAL = re.compile(r"[$`'\"\\;&|<>(){}\[\]*?!#~\n]")
ALLOWED_ADDED_CAPABILITIES = ("NET_BIND_SERVICE",)


# --- schemas ------------------------------------------------------------------------------------------


@functools.cache
def crd_schema(kind: str) -> dict[str, Any]:
    """The ``v1`` openAPIV3Schema of a KubeRay CRD copied into k8s/crds/."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~1 MB each
    with open(CRD_DIR / CRD_FILES[kind]) as stream:
        crd = yaml.load(stream, Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def _string_map(key_pattern: str | None = None, value: dict[str, Any] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "additionalProperties": value or {"type": "string"}}
    if key_pattern:
        schema["propertyNames"] = {"pattern": key_pattern}
    return schema


# Hand-written from the Kubernetes API reference (v1.33), for the fields these manifests may use.
OBJECT_META: dict[str, Any] = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 253, "pattern": DNS1123_SUBDOMAIN},
        "namespace": {"type": "string", "maxLength": 63, "pattern": DNS1123_LABEL},
        "labels": _string_map(value={"type": "string", "maxLength": 63, "pattern": LABEL_VALUE}),
        "annotations": _string_map(),
    },
}
DATA_KEY = r"^[-._a-zA-Z0-9]+$"
BASE64 = r"^[A-Za-z0-9+/]*={0,2}$"
CORE_SCHEMAS: dict[str, dict[str, Any]] = {
    "Namespace": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "v1"},
            "kind": {"const": "Namespace"},
            "metadata": OBJECT_META,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"finalizers": {"type": "array", "items": {"type": "string"}}},
            },
        },
    },
    "ConfigMap": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "v1"},
            "kind": {"const": "ConfigMap"},
            "metadata": OBJECT_META,
            "data": _string_map(DATA_KEY),
            "binaryData": _string_map(DATA_KEY, {"type": "string", "pattern": BASE64}),
            "immutable": {"type": "boolean"},
        },
    },
    "Secret": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "v1"},
            "kind": {"const": "Secret"},
            "metadata": OBJECT_META,
            "type": {"type": "string", "minLength": 1},
            "data": _string_map(DATA_KEY, {"type": "string", "pattern": BASE64}),
            "stringData": _string_map(DATA_KEY),
            "immutable": {"type": "boolean"},
        },
    },
}


def _path(parts: Any) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<root>"


def schema_problems(obj: dict[str, Any]) -> list[str]:
    """Types, enums, patterns and required fields (jsonschema), for the object and its metadata."""
    kind = obj.get("kind")
    if kind in CRD_FILES:
        if obj.get("apiVersion") != RAY_API_VERSION:
            return [f"apiVersion: {obj.get('apiVersion')!r}, expected {RAY_API_VERSION!r}"]
        checks = [(crd_schema(kind), obj, []), (OBJECT_META, obj.get("metadata"), ["metadata"])]
    elif kind in CORE_SCHEMAS:
        checks = [(CORE_SCHEMAS[kind], obj, [])]
    else:
        return [f"kind {kind!r} has no schema here (known: {sorted([*CRD_FILES, *CORE_SCHEMAS])})"]
    problems = []
    for schema, instance, prefix in checks:
        validator = jsonschema.Draft7Validator(schema)
        for error in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path))):
            problems.append(f"{_path([*prefix, *error.absolute_path])}: {error.message}")
    return problems


def api_server_problems(value: Any, schema: dict[str, Any], path: list[Any] | None = None) -> list[str]:
    """What the API server does with a custom resource beyond the schema: fields the schema does not
    declare (pruned silently), duplicate keys in list-type maps/sets, and the CRDs' value rules."""
    path = path or []
    problems: list[str] = []
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return problems
    if isinstance(value, dict):
        properties = schema.get("properties")
        if properties is None:
            item_schema = schema.get("additionalProperties")
            if isinstance(item_schema, dict):  # a map: every value follows one schema
                for key, item in value.items():
                    problems += api_server_problems(item, item_schema, [*path, key])
            return problems  # a free-form object
        for key, item in value.items():
            if key not in properties:
                problems.append(
                    f"{_path([*path, key])}: unknown field (not in the schema; the API server would drop it)"
                )
            elif not path and key == "status":
                problems.append("status: set by the controller, not by a manifest")
            elif path or key != "metadata":  # metadata: checked against OBJECT_META
                problems += api_server_problems(item, properties[key], [*path, key])
        if "managedBy" in properties and "managedBy" in value and value["managedBy"] not in MANAGED_BY:
            problems.append(f"{_path([*path, 'managedBy'])}: must be one of {list(MANAGED_BY)}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        problems += _list_key_problems(value, schema, path)
        for index, item in enumerate(value):
            problems += api_server_problems(item, schema["items"], [*path, index])
    return problems


def _list_key_problems(items: list[Any], schema: dict[str, Any], path: list[Any]) -> list[str]:
    kind = schema.get("x-kubernetes-list-type")
    if kind == "set":
        keys = [repr(item) for item in items]
    elif kind == "map":
        item_properties = schema["items"].get("properties", {})
        names = schema.get("x-kubernetes-list-map-keys", [])
        keys = [
            tuple(item.get(name, item_properties.get(name, {}).get("default")) for name in names)
            for item in items
            if isinstance(item, dict)
        ]
    else:
        return []
    duplicates = sorted({str(key) for key in keys if keys.count(key) > 1})
    return [
        f"{_path(path)}: duplicate key {key} in a list the API server keys by {schema.get('x-kubernetes-list-map-keys', 'value')}"
        for key in duplicates
    ]


# --- walking RayCluster / RayJob objects ------------------------------------------------------------


def cluster_specs(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The RayCluster specs in an object: a RayCluster's spec, a RayJob's rayClusterSpec."""
    spec = obj.get("spec") or {}
    if obj.get("kind") == "RayCluster":
        yield "spec", spec
    elif obj.get("kind") == "RayJob" and isinstance(spec.get("rayClusterSpec"), dict):
        yield "spec.rayClusterSpec", spec["rayClusterSpec"]


def ray_groups(spec: dict[str, Any], where: str) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(path, role, group) for the head group and every worker group of a cluster spec."""
    yield f"{where}.headGroupSpec", "head", spec.get("headGroupSpec") or {}
    for index, group in enumerate(spec.get("workerGroupSpecs") or []):
        yield f"{where}.workerGroupSpecs[{index}]", "worker", group


def pod_templates(obj: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(path, role, pod template) for every pod an object makes: head, worker, submitter."""
    for where, spec in cluster_specs(obj):
        for path, role, group in ray_groups(spec, where):
            yield f"{path}.template", role, group.get("template") or {}
    if obj.get("kind") == "RayJob" and isinstance((obj.get("spec") or {}).get("submitterPodTemplate"), dict):
        yield "spec.submitterPodTemplate", "submitter", obj["spec"]["submitterPodTemplate"]


def env_var(container: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((e for e in container.get("env") or [] if e.get("name") == name), None)


# --- KubeRay's controller rules (validation.go, v1.7.0) -------------------------------------------


def kuberay_problems(obj: dict[str, Any]) -> list[str]:
    kind, metadata = obj.get("kind"), obj.get("metadata") or {}
    if kind not in CRD_FILES:
        return []
    problems = []
    name = str(metadata.get("name", ""))
    if len(name) > MAX_NAME_LENGTH[kind]:
        problems.append(
            f"metadata.name: {kind} names may have at most {MAX_NAME_LENGTH[kind]} characters ({len(name)})"
        )
    if not re.fullmatch(DNS1035_LABEL, name) or len(name) > 63:
        problems.append(f"metadata.name: {name!r} is not a DNS-1035 label (lowercase letter first, then [-a-z0-9])")
    for where, spec in cluster_specs(obj):
        problems += _cluster_spec_problems(
            spec, where, metadata.get("annotations") or {}, embedded=kind != "RayCluster"
        )
    if kind == "RayJob":
        problems += _rayjob_problems(obj.get("spec") or {})
    return problems


def _autoscaler_version(spec: dict[str, Any]) -> str | None:
    if not spec.get("enableInTreeAutoscaling"):
        return None
    version = (spec.get("autoscalerOptions") or {}).get("version")
    head = ((spec.get("headGroupSpec") or {}).get("template") or {}).get("spec", {}).get("containers") or [{}]
    env = env_var(head[0], "RAY_enable_autoscaler_v2")
    return version or ("v2" if env and env.get("value") in ("1", "true") else "v1")


def _cluster_spec_problems(
    spec: dict[str, Any], where: str, annotations: dict[str, str], *, embedded: bool
) -> list[str]:
    problems = []
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    version = _autoscaler_version(spec)
    group_names: list[str] = []
    for path, role, group in ray_groups(spec, where):
        containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or []
        if not containers:
            problems.append(
                f"{path}.template.spec.containers: a {role} pod needs at least one container (the Ray container first)"
            )
        params = group.get("rayStartParams") or {}
        if any(params.get(key) for key in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
            problems.append(
                f"{path}: rayStartParams num-cpus/num-gpus/memory/resources and `resources` are both set; use one"
            )
        if "labels" in params:
            problems.append(f"{path}.rayStartParams.labels: not supported; use the group's `labels` field")
        for key, value in (group.get("labels") or {}).items():
            problems += [f"{path}.labels: {p}" for p in label_problems(key, value)]
        restart = ((group.get("template") or {}).get("spec") or {}).get("restartPolicy")
        if version == "v2" and restart not in (None, "", "Never"):
            problems.append(
                f"{path}.template.spec.restartPolicy: must be Never or unset with autoscaler v2 (got {restart})"
            )
        if role != "worker":
            continue
        group_names.append(group.get("groupName"))
        low, high, replicas = group.get("minReplicas"), group.get("maxReplicas"), group.get("replicas")
        if not autoscaling and (low is None or high is None):
            problems.append(f"{path}: minReplicas and maxReplicas are required without enableInTreeAutoscaling")
        for key, value in (("minReplicas", low), ("maxReplicas", high), ("replicas", replicas)):
            if isinstance(value, int) and value < 0:
                problems.append(f"{path}.{key}: must be >= 0 (got {value})")
        if isinstance(low, int) and isinstance(high, int) and low > high:
            problems.append(f"{path}: minReplicas {low} > maxReplicas {high}")
        elif (
            isinstance(replicas, int) and isinstance(low, int) and isinstance(high, int) and not low <= replicas <= high
        ):
            problems.append(
                f"{path}.replicas: {replicas} is outside [minReplicas {low}, maxReplicas {high}] (KubeRay clamps it)"
            )
        if group.get("suspend"):
            problems.append(
                f"{path}.suspend: needs the RayJobDeletionPolicy feature gate"
                + (" and is not allowed with autoscaling" if autoscaling else "")
            )
        if version != "v2" and "idleTimeoutSeconds" in group:
            problems.append(f"{path}.idleTimeoutSeconds: needs autoscaler v2 (autoscalerOptions.version: v2)")
        if version != "v2" and "priority" in group:
            problems.append(f"{path}.priority: needs autoscaler v2 and Ray >= 2.56.0")
    duplicates = sorted({str(n) for n in group_names if group_names.count(n) > 1})
    if duplicates:
        problems.append(f"{where}.workerGroupSpecs: duplicate groupName {duplicates}")

    head_containers = (((spec.get("headGroupSpec") or {}).get("template") or {}).get("spec") or {}).get(
        "containers"
    ) or [{}]
    head, head_params = head_containers[0], (spec.get("headGroupSpec") or {}).get("rayStartParams") or {}
    fault_tolerance = spec.get("gcsFaultToleranceOptions")
    if not autoscaling and (env := env_var(head, "RAY_enable_autoscaler_v2")) and env.get("value") in ("1", "true"):
        problems.append(f"{where}: RAY_enable_autoscaler_v2 is set but enableInTreeAutoscaling is not")
    if (
        autoscaling
        and (spec.get("autoscalerOptions") or {}).get("version")
        and env_var(head, "RAY_enable_autoscaler_v2")
    ):
        problems.append(f"{where}: set autoscalerOptions.version, not the head's RAY_enable_autoscaler_v2")
    if fault_tolerance is not None:
        if annotations.get("ray.io/ft-enabled"):
            problems.append(f"{where}.gcsFaultToleranceOptions: not with the ray.io/ft-enabled annotation")
        if head_params.get("redis-password") or env_var(head, "REDIS_PASSWORD") or env_var(head, "RAY_REDIS_ADDRESS"):
            problems.append(
                f"{where}.gcsFaultToleranceOptions: not with redis-password / REDIS_PASSWORD / RAY_REDIS_ADDRESS"
            )
        if annotations.get("ray.io/external-storage-namespace"):
            problems.append(
                f"{where}.gcsFaultToleranceOptions: not with the ray.io/external-storage-namespace annotation"
            )
    elif env_var(head, "RAY_REDIS_ADDRESS") and not annotations.get("ray.io/ft-enabled"):
        problems.append(f"{where}: RAY_REDIS_ADDRESS enables GCS fault tolerance; set gcsFaultToleranceOptions")
    if head_params.get("redis-username") or env_var(head, "REDIS_USERNAME"):
        problems.append(f"{where}: set the redis username in gcsFaultToleranceOptions.redisUsername")
    if (spec.get("authOptions") or {}).get("mode") == "token" and _version(spec.get("rayVersion")) < (2, 52, 0):
        problems.append(f"{where}.authOptions: token mode needs rayVersion >= 2.52.0")
    if embedded and (spec.get("authOptions") or {}).get("enableK8sTokenAuth"):
        problems.append(f"{where}.authOptions.enableK8sTokenAuth: not supported for RayJob")
    if embedded and spec.get("upgradeStrategy"):
        problems.append(f"{where}.upgradeStrategy: only for RayClusters created directly")
    for field in FEATURE_GATED:
        if field in spec:
            problems.append(f"{where}.{field}: needs an operator feature gate (off by default)")
    return problems


def _version(text: Any) -> tuple[int, ...]:
    numbers = re.findall(r"\d+", str(text or ""))
    return tuple(int(n) for n in numbers[:3]) if numbers else (0,)


def _rayjob_problems(spec: dict[str, Any]) -> list[str]:
    problems = []
    mode = spec.get("submissionMode", "K8sJobMode")
    selector = spec.get("clusterSelector") or {}
    backoff = spec.get("backoffLimit")
    if mode not in SUBMISSION_MODES:
        problems.append(f"spec.submissionMode: {mode!r} is not one of {list(SUBMISSION_MODES)}")
    if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        problems.append("spec.suspend: needs shutdownAfterJobFinishes: true")
    ttl = spec.get("ttlSecondsAfterFinished")
    if isinstance(ttl, int) and ttl < 0:
        problems.append(f"spec.ttlSecondsAfterFinished: must be >= 0 (got {ttl})")
    if isinstance(ttl, int) and ttl > 0 and not spec.get("shutdownAfterJobFinishes"):
        problems.append(
            "spec.ttlSecondsAfterFinished: needs shutdownAfterJobFinishes: true (nothing is deleted otherwise)"
        )
    if "deletionStrategy" in spec:
        problems.append("spec.deletionStrategy: needs the operator's RayJobDeletionPolicy feature gate")
    if not spec.get("rayClusterSpec") and not selector:
        problems.append("spec: set rayClusterSpec or clusterSelector")
    if selector:
        if not selector.get("ray.io/cluster"):
            problems.append("spec.clusterSelector: needs a non-empty ray.io/cluster key")
        if mode == "SidecarMode":
            problems.append("spec.clusterSelector: not supported in SidecarMode")
        if spec.get("suspend"):
            problems.append("spec.clusterSelector: cannot be combined with suspend")
        if isinstance(backoff, int) and backoff > 0:
            problems.append("spec.clusterSelector: cannot be combined with backoffLimit > 0")
    if mode == "InteractiveMode" and isinstance(backoff, int) and backoff > 0:
        problems.append("spec.backoffLimit: must be 0 in InteractiveMode")
    if mode == "SidecarMode":
        for field in ("submitterPodTemplate", "submitterConfig"):
            if field in spec:
                problems.append(f"spec.{field}: not supported in SidecarMode")
        head = ((spec.get("rayClusterSpec") or {}).get("headGroupSpec") or {}).get("template", {}).get("spec", {})
        if head.get("restartPolicy") not in (None, "", "Never"):
            problems.append(
                "spec.rayClusterSpec.headGroupSpec.template.spec.restartPolicy: must be Never or unset in SidecarMode"
            )
    try:
        yaml.safe_load(spec.get("runtimeEnvYAML") or "")
    except yaml.YAMLError as exc:
        problems.append(f"spec.runtimeEnvYAML: not valid YAML: {exc}")
    for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if isinstance(spec.get(field), int) and spec[field] <= 0:
            problems.append(f"spec.{field}: must be > 0 (got {spec[field]})")
    if isinstance(backoff, int) and backoff < 0:
        problems.append(f"spec.backoffLimit: must be >= 0 (got {backoff})")
    submitter = spec.get("submitterPodTemplate")
    if isinstance(submitter, dict) and not (submitter.get("spec") or {}).get("containers"):
        problems.append("spec.submitterPodTemplate.spec.containers: KubeRay uses container [0] as the submitter")
    return problems


def label_problems(key: str, value: Any) -> list[str]:
    """Kubernetes label syntax: [prefix/]name (name <= 63, prefix a DNS subdomain <= 253), value <= 63."""
    problems = []
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not re.fullmatch(DNS1123_SUBDOMAIN, prefix)):
        problems.append(f"label key {key!r}: prefix must be a DNS subdomain")
    if not name or len(name) > 63 or not re.fullmatch(LABEL_NAME, name):
        problems.append(f"label key {key!r}: name must be 1-63 characters [-A-Za-z0-9_.], alphanumeric at both ends")
    if not isinstance(value, str) or len(value) > 63 or not re.fullmatch(LABEL_VALUE, value):
        problems.append(f"label {key}: value {value!r} must be a string of <= 63 characters [-A-Za-z0-9_.]")
    return problems


# --- what Kubernetes checks when it creates the pods -------------------------------------------------

QUANTITY = re.compile(r"([+-]?(?:\d+(?:\.\d*)?|\.\d+))(?:[eE]([+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]))?")
QUANTITY_SCALE = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "n": 1e-9,
    "u": 1e-6,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
}


def quantity(value: Any) -> float:
    """A Kubernetes resource quantity (``500m``, ``16Gi``, ``1e3``, 2) as a number."""
    match = QUANTITY.fullmatch(str(value).strip())
    if match is None:
        raise ValueError(f"{value!r} is not a Kubernetes quantity")
    number, exponent, suffix = match.groups()
    return float(number) * (10 ** int(exponent) if exponent else QUANTITY_SCALE.get(suffix, 1))


def pod_problems(obj: dict[str, Any]) -> list[str]:
    problems = []
    for where, _, template in pod_templates(obj):
        pod = template.get("spec") or {}
        for index, container in enumerate(pod.get("containers") or []):
            here = f"{where}.spec.containers[{index}]"
            if not container.get("image"):
                problems.append(f"{here}.image: missing (Kubernetes rejects the pod)")
            problems += _resource_problems(container.get("resources") or {}, f"{here}.resources")
    return problems


def _resource_problems(resources: dict[str, Any], where: str) -> list[str]:
    problems = []
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    for name, request in requests.items():
        try:
            requested, limit = quantity(request), quantity(limits[name]) if name in limits else None
        except ValueError as exc:
            problems.append(f"{where}.requests.{name}: {exc}")
            continue
        if "/" in name and not name.startswith(("kubernetes.io/", "requests.")):  # an extended resource
            if limit is None or limit != requested:
                problems.append(f"{where}: extended resource {name} needs equal requests and limits")
        elif limit is not None and requested > limit:
            problems.append(f"{where}.requests.{name}: {request} exceeds the limit {limits[name]}")
    return problems


# --- lensray's policy -------------------------------------------------------------------------------


def policy_problems(obj: dict[str, Any], repo: Path = REPO) -> list[str]:
    problems = _credential_problems(obj)
    for where, role, template in pod_templates(obj):
        problems += _pod_security_problems(template.get("spec") or {}, f"{where}.spec")
        containers = (template.get("spec") or {}).get("containers") or []
        for index, container in enumerate(containers):
            image = str(container.get("image") or "")
            _, tag, digest = split_image(image)
            if image and not digest and tag in (None, "latest"):
                problems.append(
                    f"{where}.spec.containers[{index}].image: {image!r} needs a pinned tag (not latest) or a digest"
                )
        if role in ("head", "worker") and containers:
            problems += _shm_problems(template.get("spec") or {}, containers[0], f"{where}.spec")
    for where, spec in cluster_specs(obj):
        if spec.get("enableInTreeAutoscaling"):
            context = (spec.get("autoscalerOptions") or {}).get("securityContext") or {}
            problems += _container_security_problems(context, {}, f"{where}.autoscalerOptions.securityContext")
    if obj.get("kind") == "RayJob":
        problems += _rayjob_policy_problems(obj.get("spec") or {}, repo)
    return problems


def _pod_security_problems(pod: dict[str, Any], where: str) -> list[str]:
    """The Pod Security Standards' restricted profile (as `pod-security.kubernetes.io/enforce: restricted`)."""
    problems = []
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            problems.append(f"{where}.{field}: not allowed")
    for index, volume in enumerate(pod.get("volumes") or []):
        if "hostPath" in volume:
            problems.append(f"{where}.volumes[{index}]: hostPath volumes are not allowed")
    pod_context = pod.get("securityContext") or {}
    for kind in ("initContainers", "containers"):
        for index, container in enumerate(pod.get(kind) or []):
            problems += _container_security_problems(
                container.get("securityContext") or {}, pod_context, f"{where}.{kind}[{index}].securityContext"
            )
    return problems


def _container_security_problems(context: dict[str, Any], pod_context: dict[str, Any], where: str) -> list[str]:
    problems = []
    if context.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}.allowPrivilegeEscalation: must be false")
    if context.get("privileged"):
        problems.append(f"{where}.privileged: not allowed")
    capabilities = context.get("capabilities") or {}
    if "ALL" not in (capabilities.get("drop") or []):
        problems.append(f"{where}.capabilities.drop: must include ALL")
    extra = sorted(set(capabilities.get("add") or []) - set(ALLOWED_ADDED_CAPABILITIES))
    if extra:
        problems.append(f"{where}.capabilities.add: {extra} not allowed")
    if context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is not True:
        problems.append(f"{where}.runAsNonRoot: must be true (here or in the pod's securityContext)")
    if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
        problems.append(f"{where}.runAsUser: 0 (root) is not allowed")
    seccomp = (context.get("seccompProfile") or pod_context.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        problems.append(
            f"{where}.seccompProfile.type: must be RuntimeDefault or Localhost (here or in the pod's securityContext)"
        )
    return problems


def _shm_problems(pod: dict[str, Any], container: dict[str, Any], where: str) -> list[str]:
    """Ray's object store lives in /dev/shm, which is 64 MB in a container unless a memory emptyDir backs it."""
    mount = next((m for m in container.get("volumeMounts") or [] if m.get("mountPath") == "/dev/shm"), None)
    volume = next((v for v in pod.get("volumes") or [] if mount and v.get("name") == mount.get("name")), None)
    empty_dir = (volume or {}).get("emptyDir")
    if empty_dir is None or empty_dir.get("medium") != "Memory":
        return [f"{where}.containers[0]: the Ray container needs /dev/shm mounted from an emptyDir with medium: Memory"]
    size, memory = empty_dir.get("sizeLimit"), ((container.get("resources") or {}).get("limits") or {}).get("memory")
    try:
        too_big = size is not None and memory is not None and quantity(size) >= quantity(memory)
    except ValueError:
        return []  # the schema reports a malformed quantity
    if too_big:
        return [
            f"{where}: /dev/shm sizeLimit {size} must stay below the container's memory limit {memory} (it counts against it)"
        ]
    return []


def _looks_secret(name: str, value: Any) -> bool:
    return bool(SECRET_NAME.search(name)) or bool(AWS_KEY_ID.search(str(value)))


def _credential_problems(obj: dict[str, Any]) -> list[str]:
    """Credentials only come from Secrets: never a literal env value, ConfigMap entry or runtime env var."""
    problems = []
    for where, _, template in pod_templates(obj):
        for kind in ("initContainers", "containers"):
            for index, container in enumerate((template.get("spec") or {}).get(kind) or []):
                for number, env in enumerate(container.get("env") or []):
                    here = f"{where}.spec.{kind}[{index}].env[{number}] ({env.get('name')})"
                    source = env.get("valueFrom") or {}
                    if "value" in env and _looks_secret(str(env.get("name", "")), env["value"]):
                        problems.append(f"{here}: a credential as a literal value; use valueFrom.secretKeyRef")
                    elif SECRET_NAME.search(str(env.get("name", ""))) and source and "secretKeyRef" not in source:
                        problems.append(f"{here}: a credential must come from a Secret (valueFrom.secretKeyRef)")
    if obj.get("kind") == "ConfigMap":
        for key, value in (obj.get("data") or {}).items():
            if _looks_secret(key, value):
                problems.append(f"data.{key}: a credential in a ConfigMap; put it in a Secret")
    if obj.get("kind") == "Secret":
        values = {**(obj.get("stringData") or {})}
        for key, value in (obj.get("data") or {}).items():
            try:
                values[key] = base64.b64decode(value).decode(errors="replace")
            except ValueError:
                continue  # the schema reports bad base64
        for key, value in values.items():
            if AWS_KEY_ID.search(value):
                problems.append(f"{key}: looks like a real AWS access key; manifests carry placeholders only")
    if obj.get("kind") == "RayJob":
        runtime_env = _runtime_env(obj.get("spec") or {})
        for key, value in (runtime_env.get("env_vars") or {}).items() if isinstance(runtime_env, dict) else ():
            if _looks_secret(str(key), value):
                problems.append(
                    f"spec.runtimeEnvYAML.env_vars.{key}: a credential in the runtime env (shown in the "
                    "dashboard and job metadata); give the pods a secretKeyRef instead"
                )
    return problems


def _runtime_env(spec: dict[str, Any]) -> Any:
    try:
        return yaml.safe_load(spec.get("runtimeEnvYAML") or "") or {}
    except yaml.YAMLError:
        return {}  # kuberay_problems reports it


def _rayjob_policy_problems(spec: dict[str, Any], repo: Path) -> list[str]:
    problems = []
    if spec.get("rayClusterSpec") and not spec.get("shutdownAfterJobFinishes"):
        problems.append("spec.shutdownAfterJobFinishes: must be true, or the job's cluster (GPUs included) outlives it")
    if spec.get("rayClusterSpec") and spec.get("shutdownAfterJobFinishes") and "ttlSecondsAfterFinished" not in spec:
        problems.append("spec.ttlSecondsAfterFinished: set it (how long the finished cluster stays for its logs)")
    runtime_env = _runtime_env(spec)
    if not isinstance(runtime_env, dict):
        problems.append("spec.runtimeEnvYAML: must be a mapping of runtime-env fields")
    elif runtime_env:
        problems += _runtime_env_problems(runtime_env)
    if spec.get("submissionMode", "K8sJobMode") != "InteractiveMode":
        problems += entrypoint_problems(spec.get("entrypoint"), repo)
    return problems


def _runtime_env_problems(runtime_env: dict[str, Any]) -> list[str]:
    from ray.runtime_env import RuntimeEnv

    unknown = sorted(set(runtime_env) - set(RuntimeEnv.known_fields))
    if unknown:
        return [f"spec.runtimeEnvYAML: unknown runtime-env fields {unknown} (Ray ignores them)"]
    try:
        RuntimeEnv(**runtime_env)
    except (TypeError, ValueError) as exc:
        return [f"spec.runtimeEnvYAML: {exc}"]
    return []


def entrypoint_problems(entrypoint: Any, repo: Path = REPO) -> list[str]:
    """A RayJob entrypoint must be a plain `lensray` command (the submitter pod runs it through bash)
    that lensray's own parser accepts, naming config files the image ships (by absolute path)."""
    if not isinstance(entrypoint, str) or not entrypoint.strip():
        return ["spec.entrypoint: missing"]
    special = sorted(set(SHELL_SPECIAL.findall(entrypoint)))
    if special:
        return [f"spec.entrypoint: shell characters {special}: the submitter pod's bash would interpret them"]
    argv = shlex.split(entrypoint)
    if argv[0] != "lensray":
        return [f"spec.entrypoint: must run the `lensray` command, not {argv[0]!r}"]
    from lensray.cli import build_parser

    errors = io.StringIO()
    try:
        with redirect_stderr(errors):
            args = build_parser().parse_args(argv[1:])
    except SystemExit:
        return [f"spec.entrypoint: `lensray` rejects it: {errors.getvalue().strip().splitlines()[-1]}"]
    config = getattr(args, "config", None)
    if config is None:
        return []
    prefix = f"{IMAGE_APP_DIR}/"
    relative = config[len(prefix) :] if config.startswith(prefix) else None
    if relative is None or not any(relative.startswith(f"{folder}/") for folder in IMAGE_CONFIG_DIRS):
        dirs = ", ".join(f"{prefix}{d}/" for d in IMAGE_CONFIG_DIRS)
        return [f"spec.entrypoint: --config {config} is not in the image (use {dirs})"]
    local = repo / relative
    if not local.is_file():
        return [f"spec.entrypoint: --config {config}: {relative} does not exist in the repository"]
    return _config_problems(args.command, local, list(getattr(args, "overrides", []) or []))


def _config_problems(command: str, path: Path, overrides: list[str]) -> list[str]:
    from lensray.config import ConfigError, load_config

    try:
        if command == "tune":
            from lensray.train.tune import load_tune_config

            load_tune_config(path, overrides)
        else:
            load_config(path, overrides)
    except ConfigError as exc:
        return [f"spec.entrypoint: --config {path.name}: {exc}"]
    return []


# --- everything together ------------------------------------------------------------------------------


def problems(obj: dict[str, Any], repo: Path = REPO) -> list[str]:
    """Every problem of one object, each prefixed with Kind/name."""
    found = schema_problems(obj)
    if obj.get("kind") in CRD_FILES and obj.get("apiVersion") == RAY_API_VERSION:
        found += api_server_problems(obj, crd_schema(obj["kind"]))
    found += kuberay_problems(obj) + pod_problems(obj) + policy_problems(obj, repo)
    for key, value in ((obj.get("metadata") or {}).get("labels") or {}).items():
        found += [f"metadata.labels: {p}" for p in label_problems(key, value)]
    return [f"{object_id(obj)}: {problem}" for problem in found]


def validate(objects: list[dict[str, Any]], repo: Path = REPO) -> list[str]:
    """Problems of a rendered set: each object's, plus one namespace for all and unique Kind/name."""
    found = [problem for obj in objects for problem in problems(obj, repo)]
    namespaces = {
        (obj.get("metadata") or {}).get("namespace") for obj in objects if obj.get("kind") not in CLUSTER_SCOPED
    }
    if len(namespaces) > 1:
        found.append(f"objects are spread over namespaces {sorted(map(str, namespaces))}")
    declared = [obj["metadata"]["name"] for obj in objects if obj.get("kind") == "Namespace"]
    for name in declared:
        if namespaces and name not in namespaces:
            found.append(f"Namespace/{name}: the other objects are in {sorted(map(str, namespaces))}")
    ids = [object_id(obj) for obj in objects]
    found += [f"{i}: defined twice" for i in sorted({i for i in ids if ids.count(i) > 1})]
    return found


def check(path: str | Path, repo: Path = REPO) -> list[str]:
    """Render ``path`` (kustomization directory or manifest file) and validate it."""
    try:
        objects = render(path)
    except RenderError as exc:
        return [str(exc)]
    return validate(objects, repo)


def default_targets() -> list[Path]:
    overlays = sorted(p for p in (K8S_DIR / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
    return [K8S_DIR / "base", *overlays, K8S_DIR / "secret.example.yaml"]


def main(argv: list[str] | None = None) -> int:
    targets = [Path(a) for a in (argv if argv is not None else sys.argv[1:])] or default_targets()
    failed = False
    for target in targets:
        found = check(target)
        failed |= bool(found)
        resolved = target.resolve()
        label = resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else target
        print(f"{'FAIL' if found else 'ok'}: {label}" + "".join(f"\n  {p}" for p in found))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
