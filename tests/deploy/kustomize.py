"""A small Python renderer for the subset of kustomize that deploy/k8s uses (no kubectl in CI).

Supported `kustomization.yaml` fields: `resources` (files, or folders holding a kustomization),
`namespace`, `labels` (with `includeSelectors`/`includeTemplates`), `commonAnnotations`, `images`
(`newName`, `newTag`, `digest`) and `patches` (strategic-merge patch files, matched by kind and
name). Any other field fails loudly, so this renderer can never silently disagree with kustomize.
The strategic merge follows Kubernetes' patch merge keys for the lists used here (containers by
`name`, volumes by `name`, env by `name`, volumeMounts by `mountPath`, ports by `containerPort`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

__all__ = ["KustomizeError", "render"]

_SUPPORTED = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "labels",
    "commonAnnotations",
    "images",
    "patches",
}
_CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
}
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "tolerations": "key",
    "imagePullSecrets": "name",
}
_WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
_POD_SELECTORS = {"Service", "PodDisruptionBudget"}


class KustomizeError(ValueError):
    pass


def _load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _merge(base: Any, patch: Any, key: str | None = None) -> Any:
    """Strategic merge of `patch` into `base` (a copy is returned)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)  # `key: null` deletes, as in a strategic merge patch
            elif k in out:
                out[k] = _merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    merge_key = _MERGE_KEYS.get(key or "")
    if isinstance(base, list) and isinstance(patch, list) and merge_key:
        out_list = [copy.deepcopy(item) for item in base]
        for item in patch:
            match = next(
                (
                    i
                    for i, old in enumerate(out_list)
                    if isinstance(old, dict) and old.get(merge_key) == item.get(merge_key)
                ),
                None,
            )
            if match is None:
                out_list.append(copy.deepcopy(item))
            else:
                out_list[match] = _merge(out_list[match], item)
        return out_list
    return copy.deepcopy(patch)


def _pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """Pod specs inside an object: workloads' templates, CronJobs', and KubeRay's head/worker groups."""
    spec = obj.get("spec") or {}
    found = []
    if obj.get("kind") in _WORKLOADS:
        found.append(spec.get("template", {}).get("spec", {}))
    if obj.get("kind") == "CronJob":
        found.append(spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec", {}))
    cluster = spec.get("rayClusterSpec") or (spec if obj.get("kind") == "RayCluster" else {})
    if cluster:
        groups = [cluster.get("headGroupSpec", {}), *cluster.get("workerGroupSpecs", [])]
        found.extend(g.get("template", {}).get("spec", {}) for g in groups)
    return [s for s in found if s]


def _set_images(obj: dict[str, Any], images: list[dict[str, Any]]) -> None:
    for pod in _pod_specs(obj):
        for container in [*pod.get("containers", []), *pod.get("initContainers", [])]:
            image = container.get("image", "")
            name = (
                image.split("@")[0].rsplit(":", 1)[0] if ":" in image.split("/")[-1] else image.split("@")[0]
            )
            for rule in images:
                if rule["name"] != name:
                    continue
                new = rule.get("newName", name)
                if "digest" in rule:
                    container["image"] = f"{new}@{rule['digest']}"
                elif "newTag" in rule:
                    container["image"] = f"{new}:{rule['newTag']}"
                else:
                    tag = image[len(name) :]
                    container["image"] = new + tag


def _add_labels(obj: dict[str, Any], pairs: dict[str, str], selectors: bool, templates: bool) -> None:
    obj.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    if kind in _WORKLOADS:
        if selectors:
            spec.setdefault("selector", {}).setdefault("matchLabels", {}).update(pairs)
        if selectors or templates:
            spec.setdefault("template", {}).setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
    elif kind == "Service" and selectors:
        spec.setdefault("selector", {}).update(pairs)
    elif kind == "PodDisruptionBudget" and selectors:
        spec.setdefault("selector", {}).setdefault("matchLabels", {}).update(pairs)


def render(directory: str | Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize directory` would print (for the supported subset)."""
    directory = Path(directory)
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    config = yaml.safe_load(path.read_text()) or {}
    unknown = set(config) - _SUPPORTED
    if unknown:
        raise KustomizeError(f"{path}: fields this renderer does not implement: {sorted(unknown)}")

    objects: list[dict[str, Any]] = []
    for resource in config.get("resources", []):
        target = (directory / resource).resolve()
        objects.extend(render(target) if target.is_dir() else _load_documents(target))

    for patch in config.get("patches", []):
        if set(patch) != {"path"}:
            raise KustomizeError(f"{path}: only `patches: - path: <strategic merge file>` is supported")
        for doc in _load_documents(directory / patch["path"]):
            kind, name = doc.get("kind"), doc.get("metadata", {}).get("name")
            matches = [
                i
                for i, o in enumerate(objects)
                if o.get("kind") == kind and o["metadata"].get("name") == name
            ]
            if len(matches) != 1:
                raise KustomizeError(
                    f"{path}: patch {patch['path']} matches {len(matches)} objects ({kind}/{name})"
                )
            objects[matches[0]] = _merge(objects[matches[0]], doc)

    namespace = config.get("namespace")
    for obj in objects:
        if namespace and obj.get("kind") not in _CLUSTER_SCOPED:
            obj.setdefault("metadata", {})["namespace"] = namespace
        for entry in config.get("labels", []):
            _add_labels(
                obj,
                entry["pairs"],
                bool(entry.get("includeSelectors", False)),
                bool(entry.get("includeTemplates", False)),
            )
        if config.get("commonAnnotations"):
            obj.setdefault("metadata", {}).setdefault("annotations", {}).update(config["commonAnnotations"])
        if config.get("images"):
            _set_images(obj, config["images"])
    return objects
