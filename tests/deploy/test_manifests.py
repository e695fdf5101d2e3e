"""deploy/: every artefact checked by the real schemas and tools, offline (no cluster, no Docker).

* `kubectl kustomize` of each overlay; every object validates with kubernetes-validate
  (`strict=True`) against Kubernetes K8S_VERSION; the RayService (and its RayCluster spec)
  against the KubeRay v1.7.0 CRD schema (`../shared/kuberay/`, next to the checkout; see
  deploy/README.md for where the files come from); pod templates inside the CR also as strict
  core/v1 PodTemplates.
* `serveConfigV2` is the serve config byte for byte and parses with Ray's `ServeDeploySchema`.
* `promtool check rules`; the dashboard's PromQL names only exported metrics.
* Dockerfiles: base tag = pinned Ray, COPY sources exist, non-root USER, CMD exists.

kubectl, promtool and the KubeRay CRDs: skipped (with the reason) when missing locally, a
failure under CI=true.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERAY = ROOT.parent / "shared" / "kuberay"
K8S_VERSION = "1.32.0"  # the Kubernetes version the manifests target (kubectl here is v1.32)
OVERLAYS = ("cpu", "gpu")
SERVE_CONFIG = DEPLOY / "serve" / "leanserve.yaml"
PORTS = {"serve-grpc": 9000, "serve": 8000, "metrics": 8080, "gcs": 6379, "dashboard": 8265}
CRD_KINDS = {"RayService", "PodMonitor"}  # not in kubernetes-validate's schema set


def _missing(msg: str) -> None:
    """A prerequisite is absent: skip with `msg` locally, fail with it under CI=true."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg)
    pytest.skip(msg)


def _tool(name: str) -> str:
    """Path of a CLI tool; skip when missing locally, fail under CI=true."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path:
        return path
    _missing(f"{name} not found on PATH or in /usr/bin (CI installs it; see scripts/_env.sh)")
    raise AssertionError("unreachable")  # _missing always raises


@functools.cache
def _kustomize(overlay: str) -> tuple[dict[str, Any], ...]:
    kubectl = _tool("kubectl")
    out = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KUBECONFIG": "/dev/null"},
    )
    assert out.returncode == 0, f"kubectl kustomize {overlay} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def _objects(overlay: str) -> list[dict[str, Any]]:
    return [copy.deepcopy(d) for d in _kustomize(overlay)]


def _one(overlay: str, kind: str) -> dict[str, Any]:
    found = [d for d in _objects(overlay) if d["kind"] == kind]
    assert len(found) == 1, f"{overlay}: expected one {kind}, got {len(found)}"
    return found[0]


def _crd_schema(file: str) -> dict[str, Any]:
    path = KUBERAY / file
    if not path.exists():
        # Not cached: a skip must be raised again by every test that needs the file.
        _missing(
            f"KubeRay CRD {path} is missing: the v1.7.0 CRDs (helm-chart/kuberay-operator/crds/ of "
            "ray-project/kuberay) live in ../shared/kuberay/ next to the checkout; see deploy/README.md"
        )
    return _load_crd_schema(str(path))


@functools.cache
def _load_crd_schema(path: str) -> dict[str, Any]:
    crd = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert version["served"] and version["storage"]
    return version["schema"]["openAPIV3Schema"]


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields rejected (the API server would silently prune them)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _crd_errors(obj: dict[str, Any], file: str) -> list[str]:
    import jsonschema

    schema = _strict(_crd_schema(file))
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


# --- Kubernetes objects --------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_builtin_object_validates_strictly(overlay):
    import kubernetes_validate

    objects = _objects(overlay)
    kinds = {d["kind"] for d in objects}
    assert {"Namespace", "Service", "PodDisruptionBudget", "RayService", "PodMonitor"} <= kinds
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)  # raises with the field path


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_and_its_raycluster_validate_against_kuberay_crds(overlay):
    rs = _one(overlay, "RayService")
    assert rs["apiVersion"] == "ray.io/v1"
    assert _crd_errors(rs, "ray.io_rayservices.yaml") == []
    cluster = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": "leanserve"},
        "spec": rs["spec"]["rayClusterConfig"],
    }
    assert _crd_errors(cluster, "ray.io_rayclusters.yaml") == []


def test_crd_check_catches_a_wrong_field():
    rs = _one("cpu", "RayService")
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3  # typo
    rs["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] = "yes"
    errors = "\n".join(_crd_errors(rs, "ray.io_rayservices.yaml"))
    assert "maxReplica" in errors and "'yes' is not of type 'boolean'" in errors


def _groups(rs: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = rs["spec"]["rayClusterConfig"]
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_templates_in_the_cr_validate_as_core_pod_templates(overlay):
    import kubernetes_validate

    for name, group in _groups(_one(overlay, "RayService")):
        obj = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": name},
            "template": group["template"],
        }
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_probes_resources_and_graceful_shutdown(overlay):
    rs = _one(overlay, "RayService")
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == _pinned_ray()
    for name, group in _groups(rs):
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        wanted = PORTS if name == "head" else {k: PORTS[k] for k in ("serve-grpc", "serve", "metrics")}
        assert {k: ports.get(k) for k in wanted} == wanted, name
        res = container["resources"]
        assert res["requests"] and res["limits"] and res["requests"] == res["limits"], name
        assert container["image"].startswith("registry.example.com/leanserve:"), name
        _check_drain(name, pod, container)
        _check_api_key_env(name, container)
        assert pod["securityContext"]["runAsNonRoot"] is True
        if name != "head":
            assert container["readinessProbe"]["grpc"]["port"] == PORTS["serve-grpc"]
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    gpu_groups = [
        g
        for _, g in _groups(rs)
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    assert len(gpu_groups) == (1 if overlay == "gpu" else 0)


def _prestop_args(container: dict[str, Any]) -> argparse.Namespace:
    """The preStop hook's command, parsed with deploy/docker/prestop.py's own options."""
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["python", "/home/ray/prestop.py"], command
    ns: dict[str, Any] = {"head": False, "settle": 5.0, "wait": 60.0, "stop_grace": 10}
    rest = list(command[2:])
    while rest:
        flag = rest.pop(0)
        assert flag.startswith("--"), command
        key = flag[2:].replace("-", "_")
        assert key in ns, f"unknown preStop option {flag}"
        ns[key] = True if key == "head" else float(rest.pop(0))
    return argparse.Namespace(**ns)


def _serve_args() -> dict[str, Any]:
    return yaml.safe_load(SERVE_CONFIG.read_text(encoding="utf-8"))["applications"][0]["args"]


def _check_drain(name: str, pod: dict[str, Any], container: dict[str, Any]) -> None:
    """preStop drains Serve (workers: `ray drain-node`; the head keeps GCS up) for long enough
    that a replica's graceful_shutdown_timeout_s and the proxy's draining period fit, and
    Kubernetes' grace period covers the whole hook."""
    hook = _prestop_args(container)
    assert hook.head == (name == "head"), name
    env = {e["name"]: e.get("value") for e in container["env"]}
    proxy_drain_s = float(env["RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S"])
    graceful_s = _serve_args()["deployment"]["graceful_shutdown_timeout_s"]
    assert hook.wait >= graceful_s + proxy_drain_s + 10, (name, hook, graceful_s)
    assert pod["terminationGracePeriodSeconds"] >= hook.settle + hook.wait + hook.stop_grace + 5, name


def _check_api_key_env(name: str, container: dict[str, Any]) -> None:
    (var,) = [e for e in container["env"] if e["name"] == "LEANSERVE_API_KEY"]
    ref = var["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "leanserve-api-key", "key": "api-key", "optional": True}, name


def test_serve_config_drain_bound_is_leanserves_default():
    from runtime.serve_config import DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S

    assert _serve_args()["deployment"]["graceful_shutdown_timeout_s"] == DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S


def _fake_ray(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A `ray` on PATH that only logs its arguments."""
    log = tmp_path / "ray.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ray = bin_dir / "ray"
    ray.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    ray.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, log


@pytest.mark.parametrize("head", [False, True])
def test_prestop_drains_then_stops_ray(tmp_path, head):
    env, log = _fake_ray(tmp_path)
    # --descendants-only: other Ray clusters on a shared machine must not count as this pod's.
    args = [
        sys.executable,
        str(DEPLOY / "docker" / "prestop.py"),
        "--settle",
        "0",
        "--wait",
        "2",
        "--descendants-only",
    ]
    out = subprocess.run(
        args + (["--head"] if head else []), env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    calls = log.read_text().splitlines()
    if head:
        assert calls == ["stop --grace-period 10"]
    else:
        assert calls[0].startswith("drain-node --reason DRAIN_NODE_REASON_PREEMPTION --reason-message")
        assert calls[0].endswith("--deadline-remaining-seconds 2") and calls[1:] == ["stop --grace-period 10"]
        assert "prestop: drained after" in out.stderr


def test_prestop_waits_for_serve_processes_bounded(tmp_path):
    sys.path.insert(0, str(DEPLOY / "docker"))
    try:
        import prestop
    finally:
        sys.path.remove(str(DEPLOY / "docker"))
    # A Python child titled like a Serve proxy. Not `sleep` with argv[0] set: a multi-call
    # coreutils (uutils, busybox) picks its applet from argv[0] and exits at once.
    sleeper = subprocess.Popen(
        ["ray::ProxyActor", "-c", "import time; time.sleep(30)"], executable=sys.executable
    )
    try:
        deadline = time.monotonic() + 10
        while sleeper.pid not in prestop.serve_processes() and time.monotonic() < deadline:
            assert sleeper.poll() is None, f"the titled child exited with {sleeper.returncode}"
            time.sleep(0.05)
        assert sleeper.pid in prestop.serve_processes()
        t0 = time.monotonic()
        mine = lambda prefixes: [p for p in prestop.serve_processes(prefixes) if p == sleeper.pid]  # noqa: E731
        assert prestop.wait_until_gone(prestop.SERVE_PROCESSES, 0.5, mine) is False  # bounded
        assert time.monotonic() - t0 < 10
    finally:
        sleeper.kill()
        sleeper.wait(10)
    assert prestop.wait_until_gone(prestop.SERVE_PROCESSES, 5, mine) is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_exposes_grpc_and_podmonitors_scrape_the_metrics_port(overlay):
    svc = _one(overlay, "Service")
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]}
    assert ports["serve-grpc"] == (9000, "serve-grpc") and ports["serve"] == (8000, "serve")
    assert svc["spec"]["selector"]["ray.io/serve"] == "true"
    monitors = [d for d in _objects(overlay) if d["kind"] == "PodMonitor"]
    assert {m["spec"]["selector"]["matchLabels"]["ray.io/node-type"] for m in monitors} == {"head", "worker"}
    for m in monitors:
        assert m["apiVersion"] == "monitoring.coreos.com/v1"
        assert [e["port"] for e in m["spec"]["podMetricsEndpoints"]] == ["metrics"]
        labels = m["spec"]["selector"]["matchLabels"]
        assert labels["app.kubernetes.io/name"] == "leanserve"
    assert not [d for d in _objects(overlay) if d["kind"] == "HorizontalPodAutoscaler"]


# --- serve config ------------------------------------------------------------------------------
def test_rendered_files_are_current():
    out = subprocess.run(
        [sys.executable, str(DEPLOY / "render.py"), "--check"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_v2_is_the_serve_config(overlay):
    text = _one(overlay, "RayService")["spec"]["serveConfigV2"]
    committed = yaml.safe_load((DEPLOY / "k8s" / "base" / "rayservice.yaml").read_text(encoding="utf-8"))
    if overlay == "cpu":
        assert text == SERVE_CONFIG.read_text(encoding="utf-8")  # byte for byte, comments included
        assert committed["spec"]["serveConfigV2"] == text
    else:
        sys.path.insert(0, str(DEPLOY))
        try:
            import render
        finally:
            sys.path.remove(str(DEPLOY))
        expected = render.gpu_serve_config(
            SERVE_CONFIG.read_text(encoding="utf-8"), render.GPU_OVERRIDES.read_text(encoding="utf-8")
        )
        assert yaml.safe_load(text) == expected
        args = expected["applications"][0]["args"]
        assert args["device"] == "cuda" and args["deployment"]["ray_actor_options"]["num_gpus"] == 1


def _known_fields(model: Any) -> set[str]:
    return set(getattr(model, "model_fields", None) or model.__fields__)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_v2_parses_with_rays_schema_and_the_builder_args(overlay):
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    from runtime.proto_build import HEALTH_SERVICER_FUNCTION, SERVICER_FUNCTION
    from runtime.serve_app import APP_NAME, ServeArgs

    raw = yaml.safe_load(_one(overlay, "RayService")["spec"]["serveConfigV2"])
    # ServeDeploySchema allows extra keys (forward compatibility): reject typos here.
    assert set(raw) <= _known_fields(ServeDeploySchema), set(raw) - _known_fields(ServeDeploySchema)
    for app in raw["applications"]:
        assert set(app) <= _known_fields(ServeApplicationSchema)
    schema = (
        ServeDeploySchema.model_validate(raw)
        if hasattr(ServeDeploySchema, "model_validate")
        else (ServeDeploySchema.parse_obj(raw))
    )
    assert schema.grpc_options.port == 9000
    assert schema.grpc_options.grpc_servicer_functions == [SERVICER_FUNCTION, HEALTH_SERVICER_FUNCTION]
    assert (schema.http_options.host, schema.http_options.port) == ("0.0.0.0", 8000)
    (app,) = schema.applications
    assert (app.name, app.import_path) == (APP_NAME, "runtime.serve_app:build_app")
    args = ServeArgs.from_dict(app.args)  # the builder's own validation (unknown keys, types)
    assert args.engine["kv_cache_bytes"] > 0 and args.engine["slo_target_itl_ms"] > 0
    for key in ("autoscaling_config", "max_ongoing_requests", "max_queued_requests", "health_check_period_s"):
        assert key in args.deployment
    assert (
        args.deployment["max_ongoing_requests"] <= args.engine["max_batch_size"] + args.engine["max_waiting"]
    )


def test_servicer_functions_import():
    import importlib

    raw = yaml.safe_load(SERVE_CONFIG.read_text(encoding="utf-8"))
    from runtime.proto_build import load_stubs

    load_stubs()
    for dotted in raw["grpc_options"]["grpc_servicer_functions"]:
        module, _, name = dotted.rpartition(".")
        assert callable(getattr(importlib.import_module(module), name)), dotted


# --- Prometheus and Grafana ------------------------------------------------------------------------
def _promtool(command: str, rules_file: str) -> None:
    """`promtool <command> rules deploy/prometheus/<rules_file>` succeeds."""
    out = subprocess.run(
        [_tool("promtool"), command, "rules", str(DEPLOY / "prometheus" / rules_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_check_rules():
    _promtool("check", "rules.yaml")


def test_promtool_unit_tests_of_the_alerts():
    """deploy/prometheus/rules_test.yaml: the speculation and KV-preemption alerts fire when they should."""
    _promtool("test", "rules_test.yaml")


def leanserve_metric_names() -> set[str]:
    """Exported names of the metrics declared in runtime/metrics.py (Ray adds `ray_`; counters `_total`)."""
    src = (ROOT / "runtime" / "metrics.py").read_text(encoding="utf-8")
    names = set()
    for kind, name in re.findall(r"f\.(counter|gauge|histogram)\(\s*\"(leanserve_\w+)\"", src):
        names.add(f"ray_{name}_total" if kind == "counter" else f"ray_{name}")
    assert len(names) >= 10, f"metric declarations not found in runtime/metrics.py: {names}"
    return names


def ray_serve_metric_names() -> set[str]:
    """Exported names of Ray Serve's own metrics, read from the installed ray package's source."""
    import ray.serve

    names = set()
    pattern = re.compile(r"metrics\.(Counter|Gauge|Histogram)\(\s*(?:name=)?f?\"(serve_[\w{}]+)\"")
    for path in Path(ray.serve.__file__).parent.joinpath("_private").rglob("*.py"):
        for kind, name in pattern.findall(path.read_text(encoding="utf-8")):
            for protocol in ("grpc", "http"):
                exported = "ray_" + name.replace("{protocol_name}", protocol)
                if kind == "Counter" and not exported.endswith("_total"):
                    exported += "_total"
                names.add(exported)
    assert "ray_serve_deployment_replica_starts_total" in names
    return names


def _metric_names(expr: str) -> set[str]:
    names = set()
    for token in re.findall(r"\bray_\w+", expr):
        names.add(re.sub(r"_(bucket|count|sum)$", "", token) if not token.endswith("_total") else token)
    return names


def _dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "leanserve-dashboard.json").read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v.get("definition")]
    return exprs


def _rule_exprs() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yaml").read_text(encoding="utf-8"))
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def exported_metric_names_used() -> set[str]:
    """Every `ray_*` metric the dashboard and the rules query (histograms without their suffix)."""
    return set().union(*(_metric_names(e) for e in _dashboard_exprs() + _rule_exprs()))


def test_dashboard_parses_and_covers_the_required_views():
    dash = json.loads((DEPLOY / "grafana" / "leanserve-dashboard.json").read_text(encoding="utf-8"))
    assert dash["uid"] == "leanserve" and dash["panels"]
    titles = " | ".join(p["title"] for p in dash["panels"]).lower()
    for words in (
        "time to first token",
        "inter-token",
        "step count",
        "expert",
        "kv cache",
        "throughput",
        "errors",
    ):
        assert words in titles, words
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_and_rules_name_only_exported_metrics():
    leanserve, ray_serve = leanserve_metric_names(), ray_serve_metric_names()
    used = exported_metric_names_used()
    unknown = sorted(used - leanserve - ray_serve)
    assert not unknown, f"not exported by leanserve (runtime/metrics.py) or Ray Serve: {unknown}"
    # ...and the leanserve series that matter are all on the dashboard.
    dashboard = set().union(*(_metric_names(e) for e in _dashboard_exprs()))
    missing = sorted(leanserve - dashboard - {"ray_leanserve_device_memory_bytes"})
    assert not missing, f"leanserve metrics missing from the dashboard: {missing}"


# --- Dockerfiles -------------------------------------------------------------------------------
def _pinned_ray() -> str:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    (version,) = re.findall(r'"ray\[serve\]==([\d.]+)"', text)
    return version


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


@pytest.mark.parametrize(
    ("name", "platform", "extra"), [("Dockerfile", "cpu", "cpu"), ("Dockerfile.cuda", "cu", "gpu")]
)
def test_dockerfile(name, platform, extra):
    ins = _instructions(DEPLOY / "docker" / name)
    (base,) = [a for i, a in ins if i == "FROM"]
    image, _, tag = base.partition(":")
    assert image == "rayproject/ray"
    assert re.fullmatch(rf"{re.escape(_pinned_ray())}-py311-{platform}\w*", tag), tag
    for i, args in ins:
        if i == "COPY":
            parts = [p for p in args.split() if not p.startswith("--")]
            for src in parts[:-1]:
                assert (ROOT / src).exists(), f"{name}: COPY source {src} does not exist"
                assert not _dockerignored(src), f"{name}: COPY source {src} is excluded by .dockerignore"
    users = [a for i, a in ins if i == "USER"]
    assert users and users[-1] == "ray", f"{name}: the final USER must be the non-root `ray` user"
    runs = " ".join(a for i, a in ins if i == "RUN")
    assert f"[{extra}]" in runs and f"[{'gpu' if extra == 'cpu' else 'cpu'}]" not in runs
    assert "torch==2.13.0" in runs and ("whl/cpu" in runs) == (extra == "cpu")
    (cmd,) = [json.loads(a) for i, a in ins if i == "CMD"]
    assert cmd[0] == "leanserve"  # the console script of pyproject.toml
    assert 'leanserve = "runtime.cli:main"' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    from runtime.cli import build_parser  # noqa: F401  (the CLI module imports)

    (health,) = [a for i, a in ins if i == "HEALTHCHECK"]
    assert "/home/ray/healthcheck.py" in health and (DEPLOY / "docker" / "healthcheck.py").exists()
    from runtime.serve_local import GRPC_MESSAGE_ENV, SERVE_LATENCY_ENV

    env = dict(pair.split("=", 1) for i, a in ins if i == "ENV" for pair in a.split())
    assert {k: env.get(k) for k in SERVE_LATENCY_ENV} == SERVE_LATENCY_ENV, f"{name}: Serve latency env"
    assert {k: env.get(k) for k in GRPC_MESSAGE_ENV} == GRPC_MESSAGE_ENV, f"{name}: gRPC message bounds"
    copied = " ".join(a for i, a in ins if i == "COPY")
    assert "deploy/docker/prestop.py /home/ray/prestop.py" in copied, f"{name}: the preStop hook"


def _dockerignored(src: str) -> bool:
    import fnmatch

    patterns = [
        p.strip().rstrip("/")
        for p in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if p.strip() and not p.startswith("#")
    ]
    src = src.rstrip("/")
    return any(fnmatch.fnmatch(src, p) or fnmatch.fnmatch(src, p.removeprefix("**/")) for p in patterns)


def test_healthcheck_script_reports_unhealthy_without_a_server():
    out = subprocess.run(
        [sys.executable, str(DEPLOY / "docker" / "healthcheck.py"), "127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1 and "unhealthy" in out.stderr


# --- the CRD files' absence: a visible skip locally, a failure in CI ----------------------------
def test_missing_crds_skip_with_the_reason_locally_and_fail_under_ci(monkeypatch, tmp_path):
    monkeypatch.setattr(sys.modules[__name__], "KUBERAY", tmp_path / "absent")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"ray.io_rayservices.yaml is missing.*deploy/README.md"):
        _crd_schema("ray.io_rayservices.yaml")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"ray.io_rayservices.yaml is missing"):
        _crd_schema("ray.io_rayservices.yaml")
