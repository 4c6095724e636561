"""The Kubernetes manifests (k8s/) and the container artifacts (deploy/) hold their promises.

Kustomizations are rendered by a small in-process renderer of the kustomize features this
repository uses (resources, components, namespace, images, replicas, strategic-merge and
JSON 6902 patches), so no kustomize/kubectl binary is needed. Core kinds are validated with
kubernetes-validate in strict mode; KEDA and Prometheus-operator resources with jsonschema
against the CRDs vendored in k8s/crds/ (made strict: unknown fields are errors).

Needs: pip install kubernetes-validate jsonschema pyyaml
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

try:
    import jsonschema
    import kubernetes_validate
except ImportError as exc:  # fail loudly, never skip
    raise ImportError(
        f"{exc}: the manifest tests need `pip install kubernetes-validate jsonschema`"
    ) from exc

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
DEPLOY = ROOT / "deploy"

BASE = K8S / "base"
OVERLAY = K8S / "overlays" / "example"
HPA_ALTERNATIVE = K8S / "alternatives" / "hpa"
KUSTOMIZATIONS = {
    "base": BASE,
    "overlay": OVERLAY,
    "hpa-alternative": HPA_ALTERNATIVE,
    "backfill-job": K8S / "jobs" / "backfill",
    "db-upgrade-job": K8S / "jobs" / "db-upgrade",
    "model-cache-seed-job": K8S / "jobs" / "model-cache-seed",
    "overlay-backfill-job": OVERLAY / "jobs" / "backfill",
    "overlay-db-upgrade-job": OVERLAY / "jobs" / "db-upgrade",
    "overlay-model-cache-seed-job": OVERLAY / "jobs" / "model-cache-seed",
}
JOBS = ("backfill-job", "db-upgrade-job", "model-cache-seed-job")
# The oldest Kubernetes the manifests promise to work on, and the newest schemas bundled.
K8S_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())
OVERLAY_NAMESPACE = "captioner"
SECRET_NAME = "captioner-secrets"
SECRET_KEYS = {"CAPTIONER_BROKER_URL", "CAPTIONER_DATABASE_URL"}
WORKER_EGRESS_PORTS = {("UDP", 53), ("TCP", 53), ("TCP", 6379), ("TCP", 5432), ("TCP", 443)}
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding",
                  "PersistentVolume", "StorageClass", "PriorityClass", "APIService"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"}


# --- a tiny kustomize -------------------------------------------------------------------------

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "components", "namespace", "images",
                      "replicas", "patches"}


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """Render `directory` like `kustomize build` would, for the features used here."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - KUSTOMIZATION_KEYS
    assert not unknown, f"{directory}: the test renderer does not know {sorted(unknown)}"
    resources: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        target = directory / entry
        resources += kustomize(target) if target.is_dir() else load_docs(target)
    for entry in spec.get("components", []):
        component = directory / entry
        component_spec = yaml.safe_load((component / "kustomization.yaml").read_text())
        assert component_spec["kind"] == "Component", component
        for item in component_spec.get("resources", []):
            resources += load_docs(component / item)
        resources = transform(resources, component_spec, component)
    return transform(resources, spec, directory)


def transform(resources: list[dict], spec: dict, directory: Path) -> list[dict]:
    for patch in spec.get("patches", []):
        text = patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text()
        resources = apply_patch(resources, yaml.safe_load(text), patch.get("target"))
    if "namespace" in spec:
        for resource in resources:
            if resource["kind"] not in CLUSTER_SCOPED:
                resource["metadata"]["namespace"] = spec["namespace"]
    for image in spec.get("images", []):
        for container in all_containers(resources):
            set_image(container, image)
    for replicas in spec.get("replicas", []):
        matches = [r for r in resources if r["metadata"]["name"] == replicas["name"]
                   and r["kind"] in {"Deployment", "StatefulSet", "ReplicaSet"}]
        assert matches, f"replicas: no workload named {replicas['name']}"
        for resource in matches:
            resource["spec"]["replicas"] = replicas["count"]
    return resources


def selects(target: dict | None, resource: dict, patch: Any) -> bool:
    if target is None:
        return (resource["kind"] == patch["kind"]
                and resource["metadata"]["name"] == patch["metadata"]["name"])
    return all(
        re.fullmatch(target[key], value)
        for key, value in (("kind", resource["kind"]), ("name", resource["metadata"]["name"]))
        if key in target
    )


def apply_patch(resources: list[dict], patch: Any, target: dict | None) -> list[dict]:
    matched = [r for r in resources if selects(target, r, patch)]
    assert matched, f"patch matches nothing: target={target} patch={patch}"
    if isinstance(patch, dict) and patch.get("$patch") == "delete":
        return [r for r in resources if all(r is not m for m in matched)]
    for resource in matched:
        if isinstance(patch, list):
            for op in patch:
                json6902(resource, op)
        else:
            merge(resource, {k: v for k, v in patch.items() if k not in {"apiVersion", "kind"}})
    return resources


def merge(into: dict, patch: dict) -> None:
    """Strategic merge, simplified: maps merge, lists of named maps merge by name."""
    for key, value in patch.items():
        if value is None:
            into.pop(key, None)
        elif isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        elif (isinstance(value, list) and isinstance(into.get(key), list)
              and all(isinstance(v, dict) and "name" in v for v in value + into[key])):
            by_name = {item["name"]: item for item in into[key]}
            for item in value:
                if item["name"] in by_name:
                    merge(by_name[item["name"]], item)
                else:
                    into[key].append(copy.deepcopy(item))
        else:
            into[key] = copy.deepcopy(value)


def json6902(document: dict, op: dict) -> None:
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    node: Any = document
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if op["op"] == "add":
            node.insert(index, op["value"])
        elif op["op"] == "replace":
            node[index] = op["value"]
        elif op["op"] == "remove":
            del node[index]
        else:
            raise AssertionError(f"unsupported op {op}")
    elif op["op"] in {"add", "replace"}:
        assert op["op"] == "add" or last in node, f"replace of missing {op['path']}"
        node[last] = op["value"]
    elif op["op"] == "remove":
        del node[last]
    else:
        raise AssertionError(f"unsupported op {op}")


def pod_spec(resource: dict) -> dict | None:
    spec = resource.get("spec", {})
    if resource["kind"] == "CronJob":
        return spec["jobTemplate"]["spec"]["template"]["spec"]
    if resource["kind"] in WORKLOAD_KINDS:
        return spec["template"]["spec"]
    return None


def all_containers(resources: list[dict]) -> Iterator[dict]:
    for resource in resources:
        spec = pod_spec(resource)
        if spec:
            yield from spec.get("initContainers", [])
            yield from spec["containers"]


def split_image(image: str) -> tuple[str, str | None, str | None]:
    name, _, digest = image.partition("@")
    tag = None
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    return name, tag, digest or None


def set_image(container: dict, image: dict) -> None:
    name, tag, digest = split_image(container["image"])
    if name != image["name"]:
        return
    name = image.get("newName", name)
    tag = image.get("newTag", tag)
    digest = image.get("digest", digest)
    container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


# --- fixtures and helpers ---------------------------------------------------------------------


@cache
def rendered(name: str) -> tuple[dict, ...]:
    return tuple(kustomize(KUSTOMIZATIONS[name]))


def find(resources, kind: str, name: str) -> dict:
    matches = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def all_rendered() -> list[tuple[str, dict]]:
    """Every distinct rendered document, with where it came from."""
    seen: dict[str, tuple[str, dict]] = {}
    for name in KUSTOMIZATIONS:
        for resource in rendered(name):
            seen.setdefault(json.dumps(resource, sort_keys=True), (name, resource))
    return list(seen.values())


def resource_id(item: tuple[str, dict]) -> str:
    source, resource = item
    return f"{source}:{resource['kind']}/{resource['metadata']['name']}"


ALL = all_rendered()
WORKLOADS = [item for item in ALL if pod_spec(item[1]) is not None]


def labels_match(selector: dict, labels: dict) -> bool:
    if not all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        value = labels.get(expression["key"])
        operator = expression["operator"]
        if operator == "In" and value not in expression["values"]:
            return False
        if operator == "NotIn" and value in expression["values"]:
            return False
        if operator == "Exists" and value is None:
            return False
        if operator == "DoesNotExist" and value is not None:
            return False
    return True


def pod_templates(resources) -> list[tuple[dict, dict]]:
    """(workload, pod template metadata labels) of every workload."""
    result = []
    for resource in resources:
        if resource["kind"] == "CronJob":
            template = resource["spec"]["jobTemplate"]["spec"]["template"]
        elif resource["kind"] in WORKLOAD_KINDS:
            template = resource["spec"]["template"]
        else:
            continue
        result.append((resource, template["metadata"].get("labels", {})))
    return result


def env_value(container: dict, name: str, configmaps: dict[str, dict] | None = None) -> str | None:
    for item in container.get("env", []):
        if item["name"] == name:
            return item.get("value")
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref and configmaps and name in configmaps[ref["name"]].get("data", {}):
            return configmaps[ref["name"]]["data"][name]
    return None


def worker_parts(name: str = "base") -> tuple[dict, dict, dict]:
    resources = rendered(name)
    deployment = find(resources, "Deployment", "captioner-worker")
    spec = deployment["spec"]["template"]["spec"]
    container = next(c for c in spec["containers"] if c["name"] == "worker")
    return deployment, spec, container


def configmaps(name: str = "base") -> dict[str, dict]:
    return {r["metadata"]["name"]: r for r in rendered(name) if r["kind"] == "ConfigMap"}


# --- CRD schemas ------------------------------------------------------------------------------


def strict(schema: Any) -> Any:
    """The CRD schema with unknown fields rejected, as the API server's strict field
    validation (kubectl --validate=strict) does."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        pattern = schema.get("pattern")
        if isinstance(pattern, str) and "(?i)" in pattern[1:]:
            # Go's RE2 allows a flag group mid-pattern; Python wants it first.
            schema["pattern"] = "(?i)" + pattern.replace("(?i)", "")
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@cache
def crd_schemas() -> dict[tuple[str, str], dict]:
    schemas = {}
    for path in sorted((K8S / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = strict(version["schema"]["openAPIV3Schema"])
            # `metadata` is the API server's ObjectMeta; check the parts we write.
            schema["properties"]["metadata"] = {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
                    "namespace": {"type": "string"},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                },
                "additionalProperties": False,
            }
            schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


# --- validation -------------------------------------------------------------------------------


def test_every_kustomization_is_checked() -> None:
    found = {path.parent for path in K8S.rglob("kustomization.yaml")
             if yaml.safe_load(path.read_text())["kind"] == "Kustomization"}
    assert found == set(KUSTOMIZATIONS.values())


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_kustomization_renders_unique_resources(name: str) -> None:
    resources = rendered(name)
    assert resources
    ids = [(r["kind"], r["metadata"].get("namespace"), r["metadata"]["name"]) for r in resources]
    assert len(ids) == len(set(ids)), f"duplicate resources in {name}"


@pytest.mark.parametrize("item", ALL, ids=resource_id)
def test_resource_is_schema_valid(item: tuple[str, dict]) -> None:
    _, resource = item
    key = (resource["apiVersion"], resource["kind"])
    if key in crd_schemas():
        jsonschema.validate(resource, crd_schemas()[key])
        return
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{resource_id(item)} invalid for Kubernetes {version} at "
                        f"{'/'.join(map(str, error.path))}: {error.message}")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_validate_cli_strict(version: str, tmp_path: Path) -> None:
    """The same check through the `kubernetes-validate --strict` command, on one stream."""
    core = [r for _, r in ALL if (r["apiVersion"], r["kind"]) not in crd_schemas()]
    stream = tmp_path / "core.yaml"
    stream.write_text(yaml.safe_dump_all(core))
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", version,
         str(stream)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_custom_resource_kinds_are_covered_by_vendored_crds() -> None:
    kinds = {(r["apiVersion"], r["kind"]) for _, r in ALL if "." in r["apiVersion"].split("/")[0]
             and not r["apiVersion"].split("/")[0].endswith("k8s.io")}
    assert kinds == {
        ("keda.sh/v1alpha1", "ScaledObject"),
        ("monitoring.coreos.com/v1", "PodMonitor"),
        ("monitoring.coreos.com/v1", "ServiceMonitor"),
        ("monitoring.coreos.com/v1", "PrometheusRule"),
    }
    assert kinds <= set(crd_schemas())


def test_strict_crd_schema_rejects_a_misplaced_field() -> None:
    scaled_object = copy.deepcopy(find(rendered("base"), "ScaledObject", "captioner-worker"))
    scaled_object["spec"]["activationThreshold"] = "1"  # belongs in trigger metadata
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled_object, crd_schemas()[("keda.sh/v1alpha1", "ScaledObject")])


def test_every_resource_is_labelled() -> None:
    for item in ALL:
        labels = item[1]["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "captioner", resource_id(item)


# --- pods: security, resources ----------------------------------------------------------------


@pytest.mark.parametrize("item", WORKLOADS, ids=resource_id)
def test_every_pod_is_locked_down(item: tuple[str, dict]) -> None:
    spec = pod_spec(item[1])
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] >= 10000
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec.get("automountServiceAccountToken") is False
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    for container in spec.get("initContainers", []) + spec["containers"]:
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        assert "add" not in context["capabilities"], container["name"]
        assert context["seccompProfile"]["type"] == "RuntimeDefault", container["name"]
        assert not context.get("privileged"), container["name"]
        # A read-only root needs a writable /tmp.
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        assert "emptyDir" in volumes[mounts["/tmp"]], container["name"]
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), container["name"]
        assert "memory" in resources["limits"], container["name"]


# --- the GPU worker ---------------------------------------------------------------------------


def test_worker_takes_one_gpu_on_gpu_nodes() -> None:
    _, spec, container = worker_parts()
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # Extended resources: a request, if given, must equal the limit.
    assert container["resources"]["requests"].get("nvidia.com/gpu", 1) == 1
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule"
               for t in spec["tolerations"])
    assert spec["nodeSelector"]
    assert container["args"][:1] == ["worker"]
    assert "--concurrency" in container["args"]
    assert container["args"][container["args"].index("--concurrency") + 1] == "1"
    queues = container["args"][container["args"].index("--queues") + 1]
    assert queues.split(",") == ["captions.realtime", "captions.bulk"], "realtime served first"


def test_worker_grace_period_outlasts_one_job() -> None:
    _, spec, container = worker_parts()
    limit = int(env_value(container, "CAPTIONER_JOB_TIME_LIMIT_S", configmaps()) or 900)
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    pre_stop_s = int(pre_stop[-1]) if pre_stop[0] == "sleep" else 0
    assert spec["terminationGracePeriodSeconds"] > limit + pre_stop_s


def test_worker_probes_use_captioner_health() -> None:
    _, _, container = worker_parts()
    assert container["readinessProbe"]["exec"]["command"] == ["captioner", "health", "--ready"]
    assert container["livenessProbe"]["exec"]["command"] == ["captioner", "health"]
    startup = container["startupProbe"]
    assert startup["exec"]["command"] == ["captioner", "health"]
    # Model load and warm-up get minutes before liveness may kill the pod.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_worker_loads_weights_from_a_readonly_volume_offline() -> None:
    _, spec, container = worker_parts()
    hf_home = env_value(container, "HF_HOME")
    assert env_value(container, "HF_HUB_OFFLINE") == "1"
    mounts = [m for m in container["volumeMounts"] if hf_home.startswith(m["mountPath"])]
    assert len(mounts) == 1 and mounts[0]["readOnly"] is True
    volume = next(v for v in spec["volumes"] if v["name"] == mounts[0]["name"])
    claim = volume["persistentVolumeClaim"]["claimName"]
    pvc = find(rendered("base"), "PersistentVolumeClaim", claim)
    assert {"ReadWriteMany", "ReadOnlyMany"} & set(pvc["spec"]["accessModes"])
    # The seed Job writes the same claim at the same HF_HOME.
    seed = find(rendered("model-cache-seed-job"), "Job", "captioner-model-cache-seed")
    seed_spec = pod_spec(seed)
    seed_container = seed_spec["containers"][0]
    assert env_value(seed_container, "HF_HOME") == hf_home
    assert any(v.get("persistentVolumeClaim", {}).get("claimName") == claim
               for v in seed_spec["volumes"])
    model = configmaps()["captioner-config"]["data"]["CAPTIONER_MODEL"]
    assert model in seed_container["command"], "the seed Job must download CAPTIONER_MODEL"


def test_worker_term_cache_is_one_writable_volume_for_every_replica() -> None:
    """The first worker encodes the terms once; every later pod reads them."""
    _, spec, container = worker_parts()
    cache_dir = env_value(container, "CAPTIONER_TERM_CACHE_DIR")
    (mount,) = [m for m in container["volumeMounts"] if cache_dir.startswith(m["mountPath"])]
    assert not mount.get("readOnly")
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert "ReadWriteMany" in find(rendered("base"), "PersistentVolumeClaim", claim)["spec"][
        "accessModes"]
    assert configmaps()["captioner-config"]["data"]["CAPTIONER_CLIP_MODEL"]


def test_worker_multiprocess_metrics_dir_is_an_emptydir() -> None:
    _, spec, container = worker_parts()
    directory = env_value(container, "PROMETHEUS_MULTIPROC_DIR")
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == directory)
    assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == mount["name"])
    port = next(p for p in container["ports"] if p["name"] == "metrics")
    assert port["containerPort"] == int(env_value(container, "CAPTIONER_METRICS_PORT"))


def test_worker_replicas_belong_to_the_autoscaler() -> None:
    for name in ("base", "overlay", "hpa-alternative"):
        deployment, _, _ = worker_parts(name)
        assert "replicas" not in deployment["spec"], f"{name}: apply would reset KEDA's choice"
    strategy = worker_parts()[0]["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxSurge"] == 0, "a rollout must not need spare GPUs"


# --- autoscaling ------------------------------------------------------------------------------


def scaled_object(name: str = "base") -> dict:
    return find(rendered(name), "ScaledObject", "captioner-worker")


def trigger(name: str, resources: str = "base") -> dict:
    (found,) = [t for t in scaled_object(resources)["spec"]["triggers"] if t["name"] == name]
    return found


def test_scaledobject_scales_the_worker_on_the_backlog_rule() -> None:
    spec = scaled_object()["spec"]
    assert spec["scaleTargetRef"]["name"] == "captioner-worker"
    assert spec["minReplicaCount"] == 0
    assert spec["maxReplicaCount"] > 1
    assert spec["cooldownPeriod"] > 0
    assert {t["name"] for t in spec["triggers"]} == {"images-backlog", "images-finished"}
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    recorded = {r.get("record") for g in rules["groups"] for r in g["rules"]}
    for item in spec["triggers"]:
        assert item["type"] == "prometheus"
        assert item["metricType"] == "AverageValue"
        metadata = item["metadata"]
        assert float(metadata["threshold"]) > 0
        assert float(metadata["activationThreshold"]) >= 0
        assert metadata["ignoreNullValues"] == "false"
        (record,) = re.findall(r"captioner:[a-z_:0-9]+", metadata["query"])
        assert record in recorded
    assert "captioner:images_backlog" in trigger("images-backlog")["metadata"]["query"]
    # One waiting image wakes the fleet; the finish rate only sizes a running fleet.
    assert float(trigger("images-backlog")["metadata"]["activationThreshold"]) == 0
    finished = trigger("images-finished")["metadata"]
    assert float(finished["activationThreshold"]) > spec["maxReplicaCount"] * float(
        finished["threshold"]), "the finish rate must never activate the fleet by itself"
    # At zero replicas no worker series exist: that must read 0, not a scaler error.
    assert finished["query"].endswith("or vector(0)")
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] > 0
    assert behavior["scaleDown"]["policies"] and behavior["scaleUp"]["policies"]


def test_scaledobject_threshold_is_throughput_times_drain_goal() -> None:
    text = (BASE / "worker-scaledobject.yaml").read_text()
    match = re.search(r"#\s+= ([\d.]+) images/s [^\n]*?x\s+([\d.]+) s\s+= ([\d,]+)", text)
    assert match, "the threshold's arithmetic comment is missing"
    rate, drain, product = float(match[1]), float(match[2]), int(match[3].replace(",", ""))
    assert rate * drain == product
    assert float(trigger("images-backlog")["metadata"]["threshold"]) == product
    # The finished-rate trigger targets the same per-worker throughput.
    assert float(trigger("images-finished")["metadata"]["threshold"]) == rate


def test_scaledobject_query_names_the_overlay_namespace() -> None:
    for item in scaled_object("overlay")["spec"]["triggers"]:
        assert f'namespace="{OVERLAY_NAMESPACE}"' in item["metadata"]["query"]
    assert scaled_object("overlay")["metadata"]["namespace"] == OVERLAY_NAMESPACE


def test_hpa_alternative_mirrors_the_scaledobject() -> None:
    resources = rendered("hpa-alternative")
    assert not [r for r in resources if r["kind"] == "ScaledObject"]
    hpa = find(resources, "HorizontalPodAutoscaler", "captioner-worker")
    keda = scaled_object()["spec"]
    assert hpa["spec"]["scaleTargetRef"] == keda["scaleTargetRef"]
    assert hpa["spec"]["maxReplicas"] == keda["maxReplicaCount"]
    assert hpa["spec"]["behavior"] == keda["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    values = yaml.safe_load((HPA_ALTERNATIVE / "prometheus-adapter-values.yaml").read_text())
    adapter = {rule["name"]["as"]: rule for rule in values["rules"]["external"]}

    def record(query: str) -> str:
        return re.search(r"captioner:[a-z_:0-9]+", query)[0]

    # Each HPA metric reads the same recording rule, with the same target, as a KEDA trigger.
    hpa_targets = {}
    for metric in hpa["spec"]["metrics"]:
        rule = adapter[metric["external"]["metric"]["name"]]
        query = rule["metricsQuery"].replace("<<.Series>>", rule["seriesQuery"])
        assert metric["external"]["target"]["type"] == "AverageValue"
        hpa_targets[record(query)] = float(metric["external"]["target"]["averageValue"])
    assert hpa_targets == {record(t["metadata"]["query"]): float(t["metadata"]["threshold"])
                           for t in keda["triggers"]}
    # Not in the default kustomization.
    assert not [r for r in rendered("base") if r["kind"] == "HorizontalPodAutoscaler"]
    assert not [r for r in rendered("overlay") if r["kind"] == "HorizontalPodAutoscaler"]


def load_bench():
    spec = importlib.util.spec_from_file_location("autoscale", ROOT / "bench" / "autoscale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["autoscale"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_autoscale_bench_models_these_settings_and_they_hold_a_steady_stream() -> None:
    bench = load_bench()
    scaling = bench.load_scaling()  # exits on a trigger it cannot model
    keda = scaled_object()["spec"]
    assert scaling.max_replicas == keda["maxReplicaCount"]
    assert scaling.cooldown_s == keda["cooldownPeriod"]
    assert scaling.threshold == float(trigger("images-backlog")["metadata"]["threshold"])
    run = {"throughput": 8.0, "startup_s": 210, "metric_lag_s": 30, "job_images": 32,
           "timeline_every_s": 300}
    steady = bench.simulate(bench.SCENARIOS["steady-uploads"](), scaling, "now", **run)
    assert steady.flips == 0 and steady.left == 0
    # 40 images/s at 8 per worker: the fleet settles on 5 workers.
    assert {replicas for now, replicas, _, _ in steady.timeline if 1800 <= now <= 6600} == {5}
    idle = bench.simulate(bench.SCENARIOS["idle"](), scaling, "now", **run)
    assert idle.timeline[-1][1] == 0, "an idle fleet must reach zero"


# --- wiring: selectors, ports, references -----------------------------------------------------


@pytest.mark.parametrize("name", ["base", "overlay", "hpa-alternative"])
def test_selectors_and_ports_point_at_real_pods(name: str) -> None:
    resources = rendered(name)
    templates = pod_templates(resources)
    # NetworkPolicies also cover the on-demand Jobs, which live in their own kustomizations.
    job_templates = pod_templates([r for job in JOBS for r in rendered(job)])

    def selected(selector: dict) -> list[dict]:
        return [w for w, labels in templates if labels_match(selector, labels)]

    def container_ports(workloads: list[dict]) -> set:
        ports = set()
        for workload in workloads:
            for container in pod_spec(workload)["containers"]:
                for port in container.get("ports", []):
                    ports |= {port["name"], port["containerPort"]}
        return ports

    for resource in resources:
        kind, spec = resource["kind"], resource.get("spec", {})
        label = f"{kind}/{resource['metadata']['name']}"
        if kind == "Service" and spec.get("type") != "ExternalName":
            workloads = selected({"matchLabels": spec["selector"]})
            assert workloads, label
            for port in spec["ports"]:
                assert port["targetPort"] in container_ports(workloads), label
        elif kind in {"PodDisruptionBudget", "PodMonitor", "ServiceMonitor"}:
            assert selected(spec["selector"]), label
        elif kind == "NetworkPolicy":
            assert any(labels_match(spec["podSelector"], labels)
                       for _, labels in templates + job_templates), label
        elif kind in WORKLOAD_KINDS:
            template_labels = (resource["spec"]["template"]["metadata"]["labels"]
                               if kind != "CronJob" else {})
            if "selector" in spec:
                assert labels_match(spec["selector"], template_labels), label
        if kind == "PodMonitor":
            for endpoint in spec["podMetricsEndpoints"]:
                assert endpoint["port"] in container_ports(selected(spec["selector"])), label
        if kind == "ServiceMonitor":
            services = [r for r in resources if r["kind"] == "Service"
                        and labels_match(spec["selector"], r["metadata"]["labels"])]
            assert services, label
            names = {p["name"] for s in services for p in s["spec"]["ports"]}
            assert {e["port"] for e in spec["endpoints"]} <= names, label


def test_monitors_name_jobs_like_the_compose_scrape_config() -> None:
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    compose_jobs = {job["job_name"] for job in scrape["scrape_configs"]}
    resources = rendered("base")
    endpoints = (find(resources, "PodMonitor", "captioner-worker")["spec"]["podMetricsEndpoints"]
                 + find(resources, "ServiceMonitor", "captioner-exporter")["spec"]["endpoints"])
    jobs = {r["replacement"] for e in endpoints for r in e["relabelings"]
            if r["targetLabel"] == "job"}
    assert jobs == {"captioner-worker", "captioner-exporter"}
    assert jobs <= compose_jobs


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_references_resolve(name: str) -> None:
    resources = rendered(name)
    # Job-only kustomizations lean on the fleet's shared objects.
    shared = rendered("overlay" if name.startswith("overlay") else "base")
    names = {(r["kind"], r["metadata"]["name"]) for r in resources + shared}
    for workload in [r for r in resources if pod_spec(r) is not None]:
        spec = pod_spec(workload)
        if "serviceAccountName" in spec:
            assert ("ServiceAccount", spec["serviceAccountName"]) in names
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in names
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                assert ("ConfigMap", source["configMapRef"]["name"]) in names
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == SECRET_NAME and ref["key"] in SECRET_KEYS, item
                value = item.get("value") or ""
                assert not re.search(r"://[^/\s]*:[^/\s]*@", value), f"credential in {item}"


def test_no_secret_is_committed() -> None:
    assert not [item for item in ALL if item[1]["kind"] == "Secret"]
    for path in K8S.rglob("*.yaml"):
        assert not re.search(r"^kind:\s*Secret\s*$", path.read_text(), re.M), path
    for data in configmaps()["captioner-config"]["data"].values():
        assert "@" not in data and "password" not in data.lower()


def test_s3_pods_carry_the_iam_role() -> None:
    resources = rendered("overlay")
    account = find(resources, "ServiceAccount", "captioner")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith(
        "arn:aws:iam::")
    for workload in ("captioner-worker", "captioner-listener"):
        assert pod_spec(find(resources, "Deployment", workload))["serviceAccountName"] == (
            "captioner")


def test_redis_and_postgres_are_external_services() -> None:
    for service in ("captioner-redis", "captioner-postgres"):
        base = find(rendered("base"), "Service", service)
        overlay = find(rendered("overlay"), "Service", service)
        assert base["spec"]["type"] == "ExternalName"
        assert overlay["spec"]["externalName"] != base["spec"]["externalName"]


def test_worker_network_policy_allows_only_broker_db_s3_dns() -> None:
    policy = find(rendered("base"), "NetworkPolicy", "captioner-worker")
    _, _, container = worker_parts()
    assert labels_match(policy["spec"]["podSelector"],
                        worker_parts()[0]["spec"]["template"]["metadata"]["labels"])
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    allowed = {(p.get("protocol", "TCP"), p["port"])
               for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert allowed == WORKER_EGRESS_PORTS
    for rule in policy["spec"]["egress"]:
        assert rule.get("to"), "every egress rule names its destination"
        for peer in rule["to"]:
            block = peer.get("ipBlock")
            if block and block["cidr"] == "0.0.0.0/0":
                assert {p["port"] for p in rule["ports"]} == {443}
                assert "169.254.169.254/32" in block["except"]
    ingress_ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ingress_ports == {int(env_value(container, "CAPTIONER_METRICS_PORT"))}


# --- the example overlay and the Job templates ------------------------------------------------


def test_overlay_sets_namespace_images_buckets_and_replicas() -> None:
    resources = rendered("overlay")
    for resource in resources:
        if resource["kind"] != "Namespace":
            assert resource["metadata"]["namespace"] == OVERLAY_NAMESPACE, resource["kind"]
    namespace = find(resources, "Namespace", OVERLAY_NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name in [n for n in KUSTOMIZATIONS if n.startswith("overlay")]:
        for container in all_containers(list(rendered(name))):
            image, tag, digest = split_image(container["image"])
            assert "/" in image and (tag or digest) and tag != "latest", container["image"]
    base_config = configmaps("base")["captioner-config"]["data"]
    config = configmaps("overlay")["captioner-config"]["data"]
    assert config["CAPTIONER_ALLOWED_BUCKETS"] != base_config["CAPTIONER_ALLOWED_BUCKETS"]
    assert config["CAPTIONER_RESULTS_URI"].startswith("s3://")
    assert set(config) == set(base_config), "a patch must not invent settings"
    assert find(resources, "Deployment", "captioner-listener")["spec"]["replicas"] == 3


def test_backfill_job_is_a_template_outside_the_fleet() -> None:
    assert not [r for r in rendered("base") + rendered("overlay") if r["kind"] == "Job"]
    job = find(rendered("overlay-backfill-job"), "Job", "captioner-backfill-acme-photos-2024")
    args = pod_spec(job)["containers"][0]["args"]
    assert args[0] == "backfill" and args[1].startswith("s3://acme-photos/")
    assert "--resume" in args and "--max-queue-depth" in args
    bucket = args[1].removeprefix("s3://").split("/")[0]
    allowed = configmaps("overlay")["captioner-config"]["data"]["CAPTIONER_ALLOWED_BUCKETS"]
    assert bucket in allowed.split(",")
    assert pod_spec(job)["restartPolicy"] in {"OnFailure", "Never"}
    assert job["spec"]["ttlSecondsAfterFinished"] > 0


def test_schema_migration_runs_once_as_a_job() -> None:
    job = find(rendered("overlay-db-upgrade-job"), "Job", "captioner-db-upgrade")
    assert pod_spec(job)["containers"][0]["args"] == ["db", "upgrade"]
    for deployment in [r for r in rendered("base") if r["kind"] == "Deployment"]:
        for container in pod_spec(deployment).get("initContainers", []):
            assert "upgrade" not in container.get("args", []), "replicas would race on DDL"


# --- deploy/: images and the compose stack ----------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
            for line in (raw.strip() for raw in text.splitlines())
            if line and not line.startswith("#")]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.worker"])
def test_dockerfiles_run_captioner_as_non_root(name: str) -> None:
    instructions = dockerfile_instructions(DEPLOY / name)
    known = {"ARG", "FROM", "RUN", "ENV", "WORKDIR", "COPY", "USER", "EXPOSE", "ENTRYPOINT",
             "CMD", "VOLUME", "HEALTHCHECK", "LABEL"}
    assert {op for op, _ in instructions} <= known
    final_stage = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM"):]
    users = [arg for op, arg in final_stage if op == "USER"]
    assert users and not users[-1].startswith(("0", "root"))
    entrypoint = json.loads(next(arg for op, arg in final_stage if op == "ENTRYPOINT"))
    assert entrypoint[-1] == "captioner"
    for op, arg in final_stage:
        if op in {"ENTRYPOINT", "CMD"}:
            json.loads(arg)  # exec form: signals reach the process
    if name == "Dockerfile.worker":
        assert re.search(r"nvidia/cuda:[\w.]+-(cudnn-)?runtime-", (DEPLOY / name).read_text())
        cmd = json.loads(next(arg for op, arg in final_stage if op == "CMD"))
        assert cmd[0] == "worker"
        assert ("VOLUME", '["/models"]') in final_stage


def test_compose_stack_is_complete() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    required = {"redis", "s3", "postgres", "prometheus", "grafana", "worker", "exporter"}
    assert required <= set(services)
    assert services["s3"]["image"].startswith("chrislusf/seaweedfs:")
    assert services["s3"]["command"][0] == "server" and "-s3" in services["s3"]["command"]
    worker = services["worker"]
    assert worker["environment"]["CAPTIONER_MODEL"] == "tiny-random-blip2"
    assert worker["environment"]["CAPTIONER_DEVICE"] == "cpu"
    assert worker["command"][0] == "worker"
    assert services["exporter"]["command"][0] == "exporter"
    builds = [s["build"] for s in services.values() if "build" in s]
    assert builds and all((DEPLOY / b["context"] / b["dockerfile"]).is_file() for b in builds)
    for name, service in services.items():
        if service.get("image") == "captioner:local":
            assert service["user"] != "root" and service["read_only"] is True, name
            assert service["cap_drop"] == ["ALL"], name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
    assert set(compose["volumes"]) >= {
        v.split(":")[0] for s in services.values() for v in s.get("volumes", [])
        if not v.startswith(".")}
    provisioning = DEPLOY / "grafana" / "provisioning"
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    dashboards = yaml.safe_load((provisioning / "dashboards" / "captioner.yml").read_text())
    assert dashboards["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    assert json.loads((DEPLOY / "seaweedfs" / "s3.json").read_text())["identities"]
