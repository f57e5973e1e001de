"""Render a kustomization offline, as `kubectl kustomize` builds it, for the features k8s/ uses.

    objects = render("k8s/overlays/gpu")    # a list of plain dicts, one per Kubernetes object

Implemented: ``resources`` (files and directories, recursively), ``patches`` (RFC 6902 JSON patches
with a ``target``; strategic-merge patches of maps), then ``namespace``, ``labels`` (metadata only)
and ``images`` (every ``containers``/``initContainers`` image at any depth), in kustomize's order.
Any other kustomization field, a patch that matches nothing, or a failed JSON-patch ``test`` is an
error naming the file, so an overlay is never rendered differently from what it says; so are what
kustomize itself refuses: a base that contains the overlay naming it (a cycle), and a resource or
patch file outside the kustomization's folder.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FIELDS = ("apiVersion", "kind", "resources", "namespace", "labels", "images", "patches")
CLUSTER_SCOPED = ("Namespace",)


class RenderError(ValueError):
    """A kustomization or a patch cannot be applied; the message names the file and the field."""


def load_manifests(path: Path) -> list[dict[str, Any]]:
    """Every object in a (multi-document) YAML file."""
    with open(path) as stream:
        documents = [doc for doc in yaml.safe_load_all(stream) if doc is not None]
    for index, doc in enumerate(documents):
        if not isinstance(doc, dict) or "kind" not in doc:
            raise RenderError(f"{path}: document {index} is not a Kubernetes object (no kind)")
    return documents


def render(path: str | Path, _visited: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """The objects of a kustomization directory (as `kubectl kustomize` would build them) or of a file."""
    path = Path(path).resolve()
    if path.is_file():
        return load_manifests(path)
    _check_no_cycle(path, _visited)
    kustomization_file = path / "kustomization.yaml"
    if not kustomization_file.is_file():
        raise RenderError(f"{path}: neither a manifest file nor a directory with kustomization.yaml")
    kustomization = yaml.safe_load(kustomization_file.read_text()) or {}
    unknown = sorted(set(kustomization) - set(KUSTOMIZATION_FIELDS))
    if unknown:
        raise RenderError(f"{kustomization_file}: fields this renderer does not implement: {unknown}")
    if kustomization.get("kind", "Kustomization") != "Kustomization":
        raise RenderError(f"{kustomization_file}: kind must be Kustomization")

    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        target = (path / entry).resolve()
        if not target.exists():
            raise RenderError(f"{kustomization_file}: resource {entry!r} does not exist")
        if target.is_file():
            _check_within(target, path, f"{kustomization_file}: resource {entry!r}")
        objects.extend(render(target, (*_visited, path)))
    _check_unique_ids(objects, kustomization_file)
    for index, patch in enumerate(kustomization.get("patches", [])):
        _apply_patch_entry(objects, patch, path, f"{kustomization_file}: patches[{index}]")
    if "namespace" in kustomization:
        for obj in objects:
            # As kustomize does: namespaced objects move into it, and a Namespace object is renamed to it.
            key = "name" if obj["kind"] == "Namespace" else "namespace" if obj["kind"] not in CLUSTER_SCOPED else None
            if key:
                obj.setdefault("metadata", {})[key] = kustomization["namespace"]
    for index, entry in enumerate(kustomization.get("labels", [])):
        _apply_labels(objects, entry, f"{kustomization_file}: labels[{index}]")
    for index, entry in enumerate(kustomization.get("images", [])):
        _apply_image(objects, entry, f"{kustomization_file}: images[{index}]")
    return objects


def _check_no_cycle(root: Path, visited: tuple[Path, ...]) -> None:
    """kustomize refuses a kustomization that is, or contains, one already being built (an overlay
    naming a folder above itself as its base): `cycle detected: candidate root ... contains visited root`."""
    for seen in visited:
        if seen == root or seen.is_relative_to(root):
            raise RenderError(f"{root}: cycle detected: it contains {seen}, which names it as a resource")


def _check_within(file: Path, root: Path, where: str) -> None:
    # kustomize's default load restrictor (LoadRestrictionsRootOnly): files come from the root or below.
    if not file.is_relative_to(root):
        raise RenderError(f"{where}: {file} is not in or below {root} (kustomize refuses files outside the root)")


def object_id(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def _check_unique_ids(objects: list[dict[str, Any]], where: Path) -> None:
    seen: set[str] = set()
    for obj in objects:
        if object_id(obj) in seen:
            raise RenderError(f"{where}: {object_id(obj)} appears twice")
        seen.add(object_id(obj))


def _matches(obj: dict[str, Any], target: dict[str, Any]) -> bool:
    group, _, version = obj.get("apiVersion", "").rpartition("/")
    metadata = obj.get("metadata", {})
    labels = metadata.get("labels", {})
    selector = dict(item.split("=", 1) for item in target.get("labelSelector", "").split(",") if item)
    # kustomize reads a target's name as a regular expression.
    return (
        target.get("kind", obj.get("kind")) == obj.get("kind")
        and target.get("group", group) == group
        and target.get("version", version) == version
        and re.fullmatch(target.get("name", ".*"), metadata.get("name", "")) is not None
        and all(labels.get(key) == value for key, value in selector.items())
    )


def _apply_patch_entry(objects: list[dict[str, Any]], entry: dict[str, Any], base: Path, where: str) -> None:
    unknown = sorted(set(entry) - {"path", "patch", "target"})
    if unknown or ("path" in entry) == ("patch" in entry):
        raise RenderError(f"{where}: needs exactly one of path/patch (and optionally target), got {sorted(entry)}")
    source = f"{where} ({entry['path']})" if "path" in entry else where
    if "path" in entry:
        _check_within((base / entry["path"]).resolve(), base, source)
    text = (base / entry["path"]).read_text() if "path" in entry else entry["patch"]
    patch = yaml.safe_load(text)
    target = entry.get("target")
    if isinstance(patch, list):
        if target is None:
            raise RenderError(f"{source}: a JSON patch needs a target")
        chosen = [obj for obj in objects if _matches(obj, target)]
        if not chosen:
            raise RenderError(f"{source}: target {target} matches no object")
        for obj in chosen:
            replaced = json_patch(obj, patch, f"{source} on {object_id(obj)}")
            obj.clear()
            obj.update(replaced)
    elif isinstance(patch, dict):
        target = target or {"kind": patch.get("kind"), "name": re.escape(patch.get("metadata", {}).get("name", ""))}
        chosen = [obj for obj in objects if _matches(obj, target)]
        if not chosen:
            raise RenderError(f"{source}: strategic-merge patch of {object_id(patch)} matches no object")
        for obj in chosen:
            strategic_merge(obj, patch, f"{source} on {object_id(obj)}")
    else:
        raise RenderError(f"{source}: a patch must be a JSON patch (a list) or a strategic-merge patch (a map)")


def _pointer(path: str, where: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise RenderError(f"{where}: JSON pointer {path!r} must start with /")
    return [token.replace("~1", "/").replace("~0", "~") for token in path[1:].split("/")]


def _index(container: list[Any], token: str, where: str, *, insert: bool = False) -> int:
    if insert and token == "-":
        return len(container)
    if not re.fullmatch(r"0|[1-9][0-9]*", token):
        raise RenderError(f"{where}: {token!r} is not a list index")
    index = int(token)
    if index > len(container) or (index == len(container) and not insert):
        raise RenderError(f"{where}: index {index} is out of range (list of {len(container)})")
    return index


def _parent(document: Any, tokens: list[str], where: str) -> Any:
    node = document
    for token in tokens[:-1]:
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list):
            node = node[_index(node, token, where)]
        else:
            raise RenderError(f"{where}: {token!r} does not exist")
    return node


def _get(document: Any, path: str, where: str) -> Any:
    tokens = _pointer(path, where)
    if not tokens:
        return document
    parent, last = _parent(document, tokens, where), tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise RenderError(f"{where}: {path} does not exist")
        return parent[last]
    if isinstance(parent, list):
        return parent[_index(parent, last, where)]
    raise RenderError(f"{where}: {path} does not exist")


def _add(document: Any, path: str, value: Any, where: str) -> Any:
    tokens = _pointer(path, where)
    if not tokens:
        return value
    parent, last = _parent(document, tokens, where), tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, last, where, insert=True), value)
    else:
        raise RenderError(f"{where}: cannot add below a scalar at {path}")
    return document


def _remove(document: Any, path: str, where: str) -> Any:
    tokens = _pointer(path, where)
    if not tokens:
        raise RenderError(f"{where}: cannot remove the whole document")
    _get(document, path, where)  # must exist
    parent, last = _parent(document, tokens, where), tokens[-1]
    if isinstance(parent, dict):
        del parent[last]
    else:
        del parent[_index(parent, last, where)]
    return document


def json_patch(document: Any, operations: list[dict[str, Any]], where: str = "patch") -> Any:
    """RFC 6902: apply add/remove/replace/move/copy/test operations to a copy of ``document``."""
    result = copy.deepcopy(document)
    for number, operation in enumerate(operations):
        here = f"{where}: operation {number} ({operation.get('op')} {operation.get('path')})"
        op, path = operation.get("op"), operation.get("path")
        if not isinstance(path, str):
            raise RenderError(f"{here}: needs a path")
        if op in ("add", "replace", "test") and "value" not in operation:
            raise RenderError(f"{here}: needs a value")
        if op == "add":
            result = _add(result, path, copy.deepcopy(operation["value"]), here)
        elif op == "remove":
            result = _remove(result, path, here)
        elif op == "replace":
            _get(result, path, here)  # must exist
            tokens = _pointer(path, here)
            if not tokens:
                result = copy.deepcopy(operation["value"])
            else:
                parent = _parent(result, tokens, here)
                key = tokens[-1] if isinstance(parent, dict) else _index(parent, tokens[-1], here)
                parent[key] = copy.deepcopy(operation["value"])  # in place: keeps the key order
        elif op in ("move", "copy"):
            value = copy.deepcopy(_get(result, operation.get("from", ""), here))
            if op == "move":
                result = _remove(result, operation["from"], here)
            result = _add(result, path, value, here)
        elif op == "test":
            actual = _get(result, path, here)
            if actual != operation["value"]:
                raise RenderError(f"{here}: test failed: found {actual!r}, expected {operation['value']!r}")
        else:
            raise RenderError(f"{here}: unknown op {op!r}")
    return result


def strategic_merge(target: dict[str, Any], patch: dict[str, Any], where: str = "patch", path: str = "") -> None:
    """Merge a map patch into ``target`` in place: maps merge key by key, null deletes a key.

    Lists are refused: kustomize merges some lists by key and replaces others depending on schemas it
    has (or guesses for custom resources); use a JSON patch for those so the result is unambiguous."""
    for key, value in patch.items():
        here = f"{path}.{key}" if path else key
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            strategic_merge(target[key], value, where, here)
        elif isinstance(value, list) or isinstance(target.get(key), list):
            raise RenderError(f"{where}: {here} is a list; patch lists with a JSON patch")
        else:
            target[key] = copy.deepcopy(value)


def _apply_labels(objects: list[dict[str, Any]], entry: dict[str, Any], where: str) -> None:
    unknown = sorted(set(entry) - {"pairs", "includeSelectors", "includeTemplates"})
    if unknown or entry.get("includeSelectors") or entry.get("includeTemplates"):
        raise RenderError(f"{where}: only `pairs` on metadata is implemented (got {sorted(entry)})")
    for obj in objects:
        obj.setdefault("metadata", {}).setdefault("labels", {}).update(entry.get("pairs", {}))


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """``registry:5000/team/name:tag@sha256:...`` -> (``registry:5000/team/name``, tag, digest)."""
    name, _, digest = image.partition("@")
    slash, colon = name.rfind("/"), name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1 :], digest or None
    return name, None, digest or None


def containers(node: Any) -> Iterator[dict[str, Any]]:
    """Every container (containers/initContainers lists at any depth), as kustomize's image transformer finds them."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            yield from containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from containers(item)


def _apply_image(objects: list[dict[str, Any]], entry: dict[str, Any], where: str) -> None:
    unknown = sorted(set(entry) - {"name", "newName", "newTag", "digest"})
    if unknown or "name" not in entry:
        raise RenderError(f"{where}: needs name and any of newName/newTag/digest (got {sorted(entry)})")
    found = False
    for obj in objects:
        for container in containers(obj):
            name, tag, digest = split_image(str(container.get("image", "")))
            if name != entry["name"]:
                continue
            found = True
            name = entry.get("newName", name)
            tag = str(entry["newTag"]) if "newTag" in entry else tag
            digest = entry.get("digest", digest)
            container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    if not found:
        raise RenderError(f"{where}: no container uses image {entry['name']!r}")
