"""Kubernetes manifests: every kustomization renders, every object validates against the Kubernetes
schemas offline (kubernetes-validate, strict), and the pieces reference each other correctly."""

from __future__ import annotations

import re
from typing import Any

import kubernetes_validate  # a test dependency: missing, these tests fail rather than skip
import pytest
import yaml

from service.settings import Settings
from tests.deploy.conftest import DEPLOY
from tests.deploy.kustomize import KustomizeError, render

K8S_VERSION = "1.31.0"  # the oldest release still in upstream support when these were written
KUSTOMIZATIONS = ["base", "overlays/gpu", "overlays/repository-api", "overlays/rollout-new-models", "ray"]
SERVICE_OVERLAYS = ["base", "overlays/gpu", "overlays/repository-api", "overlays/rollout-new-models"]
K8S = DEPLOY / "k8s"


def _validate(obj: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise AssertionError(f"{obj['kind']}/{obj['metadata']['name']} at {where}: {exc.message}") from None


def _by_kind(objects: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for obj in objects:
        out.setdefault(obj["kind"], []).append(obj)
    return out


def _one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = _by_kind(objects).get(kind, [])
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(K8S / request.param)


def _pod_templates(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] == "RayJob":
        cluster = obj["spec"]["rayClusterSpec"]
        return [g["template"] for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]]
    if obj["kind"] == "Deployment":
        return [obj["spec"]["template"]]
    return []


def test_every_object_validates(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, objects = rendered
    assert objects, f"{name} renders nothing"
    for obj in objects:
        if obj["apiVersion"].startswith("ray.io/"):
            # A KubeRay custom resource: its pod templates are core/v1 PodTemplateSpecs, so validate
            # each one as a PodTemplate object against the real schema.
            for i, template in enumerate(_pod_templates(obj)):
                _validate(
                    {
                        "apiVersion": "v1",
                        "kind": "PodTemplate",
                        "metadata": {"name": f"ray-{i}"},
                        "template": template,
                    }
                )
        else:
            _validate(obj)


def test_strict_validation_catches_a_typo() -> None:
    deployment = _one(render(K8S / "base"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagee"] = "typo"
    with pytest.raises(AssertionError, match="imagee"):
        _validate(deployment)


def test_renderer_refuses_what_it_does_not_implement(tmp_path: Any) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nreplicas: [{name: x, count: 2}]\n")
    with pytest.raises(KustomizeError, match="replicas"):
        render(tmp_path)


def test_references_resolve(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    """Mounted volumes exist; ConfigMaps, Secrets and PVCs named by pods are rendered alongside (or,
    for the RayJob, by the base); the Service, PDB and HPA point at the Deployment's pods."""
    name, objects = rendered
    everything = objects + (render(K8S / "base") if name == "ray" else [])
    names = {(o["kind"], o["metadata"]["name"]) for o in everything}
    for obj in objects:
        for template in _pod_templates(obj):
            spec = template["spec"]
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for container in spec["containers"]:
                for mount in container.get("volumeMounts", []):
                    assert mount["name"] in volumes, (
                        f"{container['name']} mounts unknown volume {mount['name']}"
                    )
                for source in container.get("envFrom", []):
                    assert ("ConfigMap", source["configMapRef"]["name"]) in names
                for variable in container.get("env", []):
                    secret = variable.get("valueFrom", {}).get("secretKeyRef")
                    if secret is not None:
                        rendered_secret = next(
                            o
                            for o in everything
                            if (o["kind"], o["metadata"]["name"]) == ("Secret", secret["name"])
                        )
                        assert secret["key"] in rendered_secret.get(
                            "stringData", rendered_secret.get("data", {})
                        )
            for volume in volumes.values():
                if "secret" in volume:
                    assert ("Secret", volume["secret"]["secretName"]) in names
                if "persistentVolumeClaim" in volume:
                    assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names
    kinds = _by_kind(objects)
    if "Deployment" in kinds:
        deployment = _one(objects, "Deployment")
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        assert _one(objects, "Service")["spec"]["selector"].items() <= pod_labels.items()
        assert (
            _one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items()
            <= pod_labels.items()
        )
        target = _one(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
        namespaces = {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"}
        assert namespaces == {"oodflow"}


@pytest.mark.parametrize("overlay", SERVICE_OVERLAYS)
def test_service_deployment(overlay: str) -> None:
    objects = render(K8S / overlay)
    deployment = _one(objects, "Deployment")
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"requests", "limits"} <= set(container["resources"])
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True and "/tmp" in mounts  # read-only root: /tmp is a volume
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"

    # The settings are the service's own: each key is an OODFLOW_ field and the values validate.
    settings = _one(objects, "ConfigMap")["data"]
    fields = set(Settings.model_fields)
    for key in settings:
        assert key.startswith("OODFLOW_") and key[len("OODFLOW_") :].lower() in fields, key
    values = {k[len("OODFLOW_") :].lower(): v for k, v in settings.items() if k != "OODFLOW_API_KEY_FILE"}
    parsed = Settings(**values)
    assert str(parsed.model_repository) == mounts["/models"]["mountPath"]
    assert parsed.port == container["ports"][0]["containerPort"]
    key_file = settings["OODFLOW_API_KEY_FILE"]
    assert any(key_file.startswith(m + "/") for m in mounts), "API key file is not on a mounted volume"

    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    if overlay == "overlays/gpu":
        assert gpus == "1" and parsed.device == "cuda"
        assert container["image"].endswith(":cuda")
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    else:
        assert gpus is None and parsed.device == "cpu"
        assert container["image"].endswith(":cpu")


def test_rayjob_runs_score_batch_on_ray() -> None:
    job = _one(render(K8S / "ray"), "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    entrypoint = spec["entrypoint"].split()
    assert entrypoint[:2] == ["oodflow", "score-batch"]
    assert entrypoint[entrypoint.index("--engine") + 1] == "ray"
    assert "--address" not in entrypoint  # the RayJob sets RAY_ADDRESS; the CLI joins that cluster

    # The entrypoint parses with the CLI's own flags.
    import argparse

    from service.batch import add_score_batch_arguments

    args = add_score_batch_arguments(argparse.ArgumentParser()).parse_args(entrypoint[2:])
    cluster = spec["rayClusterSpec"]
    mounts = {
        m["mountPath"] for m in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    }
    assert args.repository in mounts
    assert any(args.output.startswith(m + "/") for m in mounts) and any(
        i.startswith("/data") for i in args.inputs
    )
    import ray

    assert cluster["rayVersion"] == ray.__version__, "the cluster's Ray must match the image's"
    gpu_groups = [
        g
        for g in cluster["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    assert gpu_groups, "a GPU worker group (one GPU per actor)"
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        image = group["template"]["spec"]["containers"][0]["image"]
        assert re.match(r"^[\w./-]+:[\w.-]+$", image), image


def test_manifests_are_plain_yaml() -> None:
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc is None or isinstance(doc, dict), path


# ---------------------------------------------------------------- new model versions (issue 14)


def _serve_settings(objects: list[dict[str, Any]]) -> tuple[Settings, dict[str, Any]]:
    """The Settings a pod of the rendered Deployment starts with: ConfigMap, env, then its args."""
    import argparse

    from service.cli import add_serve_arguments

    deployment = _one(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    data = _one(objects, "ConfigMap")["data"]
    values: dict[str, Any] = {
        k[len("OODFLOW_") :].lower(): v for k, v in data.items() if k != "OODFLOW_API_KEY_FILE"
    }
    for variable in container.get("env", []):
        if "value" in variable:
            values[variable["name"][len("OODFLOW_") :].lower()] = variable["value"]
    args = container["args"]
    assert args[0] == "serve"
    flags = add_serve_arguments(argparse.ArgumentParser()).parse_args(args[1:])
    if flags.poll_seconds is not None:
        values["poll_seconds"] = flags.poll_seconds
    if flags.version_policy is not None:
        values["version_policy"] = flags.version_policy
    return Settings(**values), container


@pytest.mark.parametrize("overlay", SERVICE_OVERLAYS)
def test_rolling_update_keeps_capacity(overlay: str) -> None:
    """Way 1 (new image or model volume): a new pod must be ready (every model loaded, verified,
    warmed) before an old one goes, and an old one drains before it exits."""
    objects = render(K8S / overlay)
    deployment = _one(objects, "Deployment")
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0 and strategy["rollingUpdate"]["maxSurge"] >= 1
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    settings, _ = _serve_settings(objects)
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > settings.shutdown_timeout_s + pre_stop
    pdb = _one(objects, "PodDisruptionBudget")["spec"]
    # Evictions (node drains) take at most one pod at a time; 0 would block every drain.
    assert pdb.get("maxUnavailable") == 1 and "minAvailable" not in pdb
    assert deployment["spec"]["replicas"] >= 2 or overlay == "overlays/gpu"


def test_new_model_volume_rolls_out() -> None:
    """The rollout overlay differs from the base only in the model claim (a new pod template, so
    a rolling update), and the new claim is rendered, read-only, mounted read-only."""
    base, new = (_one(render(K8S / o), "Deployment") for o in ("base", "overlays/rollout-new-models"))
    claims = [
        next(v for v in d["spec"]["template"]["spec"]["volumes"] if v["name"] == "models")[
            "persistentVolumeClaim"
        ]
        for d in (base, new)
    ]
    old_claim, new_claim = claims[0]["claimName"], claims[1]["claimName"]
    assert old_claim != new_claim and claims[1]["readOnly"] is True
    for d in (base, new):
        for v in d["spec"]["template"]["spec"]["volumes"]:
            if v["name"] == "models":
                v["persistentVolumeClaim"]["claimName"] = "x"
    assert base == new
    pvc = next(o for o in render(K8S / "overlays/rollout-new-models") if o["metadata"]["name"] == new_claim)
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadOnlyMany"]


def test_in_place_loading_overlay() -> None:
    """Way 2 (in place, through the repository API / polling): every replica polls the shared
    read-only volume, the admin key comes from its own Secret, and the settings validate."""
    objects = render(K8S / "overlays/repository-api")
    settings, container = _serve_settings(objects)
    assert settings.poll_seconds > 0 and settings.version_policy == "latest:1"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[str(settings.model_repository)]["readOnly"] is True
    admin = next(v for v in container["env"] if v["name"] == "OODFLOW_ADMIN_API_KEYS")
    ref = admin["valueFrom"]["secretKeyRef"]
    assert ref["name"] != "oodflow-api-keys", "the admin key must not live with the scoring keys"
    secrets = {o["metadata"]["name"] for o in objects if o["kind"] == "Secret"}
    assert {ref["name"], "oodflow-api-keys"} <= secrets
    assert "OODFLOW_ADMIN_API_KEYS" not in _one(objects, "ConfigMap")["data"], "keys belong in a Secret"
