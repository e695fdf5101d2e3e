"""Integration: deploy exactly deploy/serve/leanserve.yaml on a local Ray, answer a gRPC Generate.

The config goes through Ray's own path for config files: `ServeDeploySchema` -> `serve.start`
with its `grpc_options` / `http_options` -> the controller's `deploy_apps` (what `serve deploy`
and KubeRay's serveConfigV2 submission do), so the builder `import_path`, its `args` and the
servicer function names are the file's. Only what this machine forces is overridden:
127.0.0.1 and free ports, the model (a tiny one trained here in seconds), `threads` and the
replica's `num_cpus` (2 shared cores). Then a live scrape of Ray's metrics endpoint checks that
every metric the dashboard and the alert rules query is really exported.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG = ROOT / "deploy" / "serve" / "leanserve.yaml"


def _manifest_checks() -> Any:
    spec = importlib.util.spec_from_file_location(
        "deploy_manifest_checks", Path(__file__).with_name("test_manifests.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def served(calibrated_tiny_model_dir, free_port):
    from runtime.proto_build import load_stubs
    from runtime.serve_local import set_local_env

    set_local_env()
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(SERVE_CONFIG.read_text(encoding="utf-8"))
    config = copy.deepcopy(raw)
    app = config["applications"][0]
    app["args"]["model_dir"] = str(calibrated_tiny_model_dir)  # calibrated: the prediction metrics exist
    app["args"]["threads"] = 1
    app["args"]["deployment"]["ray_actor_options"]["num_cpus"] = 1
    schema = ServeDeploySchema.model_validate(config)
    ports = {"grpc": free_port(), "http": free_port(), "metrics": free_port()}
    temp = Path("/tmp") / f"lsdep-{ports['grpc']}"  # short: Ray's socket paths have a length limit
    load_stubs()  # generated before the proxy actor imports the servicer functions
    try:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _metrics_export_port=ports["metrics"],
            log_to_driver=False,
            _temp_dir=str(temp),
            _system_config={"metrics_report_interval_ms": 1000},
            configure_logging=False,
        )
        serve.start(
            http_options={**schema.http_options.model_dump(), "host": "127.0.0.1", "port": ports["http"]},
            grpc_options={**schema.grpc_options.model_dump(), "port": ports["grpc"]},
            logging_config=schema.logging_config,
        )
        _get_global_client().deploy_apps(schema)
        end = time.monotonic() + 240
        status = None
        while time.monotonic() < end:
            status = serve.status().applications.get(app["name"])
            if status is not None and status.status in ("RUNNING", "DEPLOY_FAILED", "UNHEALTHY"):
                break
            time.sleep(1)
        assert status is not None and status.status == "RUNNING", status
        yield {**ports, "raw": raw, "schema": schema, "target": f"127.0.0.1:{ports['grpc']}"}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


def test_the_deployed_config_is_the_file_apart_from_local_overrides(served):
    from ray import serve

    details = serve.status().applications["leanserve"]
    assert "LeanServer" in details.deployments
    raw = served["raw"]
    assert (
        served["schema"].grpc_options.grpc_servicer_functions
        == raw["grpc_options"]["grpc_servicer_functions"]
    )
    assert served["schema"].applications[0].import_path == raw["applications"][0]["import_path"]


def test_grpc_generate_and_health(served):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from runtime.client import Client, build_request

    client = Client(served["target"])
    try:
        reply = client.generate(build_request(client.pb2, "God said", max_tokens=8, steps=2), timeout=60)
        assert reply.usage.completion_tokens > 0 and reply.compute.steps == 2
        with pytest.raises(grpc.RpcError) as err:  # also feeds the error-code series scraped below
            client.generate(build_request(client.pb2, "God said", max_tokens=4, steps=99), timeout=30)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    finally:
        client.close()
    with grpc.insecure_channel(served["target"]) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    with urllib.request.urlopen(f"http://127.0.0.1:{served['http']}/healthz", timeout=10) as r:
        assert r.status == 200
    bad = urllib.request.Request(
        f"http://127.0.0.1:{served['http']}/v1/completions", data=b"{", method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as http_err:  # an HTTP error series for the dashboard
        urllib.request.urlopen(bad, timeout=30)
    assert http_err.value.code == 400


def test_live_scrape_exports_every_metric_the_dashboard_and_rules_use(served):
    from runtime.client import Client

    client = Client(served["target"])
    try:  # a speculating request: the leanserve_spec_* series exist only once one ran
        pb2 = client.pb2
        message = pb2.GenerateRequest(
            prompt="God said",
            sampling=pb2.SamplingParams(max_tokens=8, temperature=0.0),
            compute=pb2.ComputeParams(steps=4, draft_steps=2, draft_tokens=2),
        )
        reply = client.generate(message, timeout=60)
        assert reply.compute.speculation.draft_steps == 2
    finally:
        client.close()
    checks = _manifest_checks()
    used = checks.exported_metric_names_used()
    missing: list[str] = []
    end = time.monotonic() + 60
    while time.monotonic() < end:
        with urllib.request.urlopen(f"http://127.0.0.1:{served['metrics']}/metrics", timeout=10) as r:
            text = r.read().decode()
        families = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("ray_")}
        families |= {
            f.removesuffix(s) for f in families for s in ("_bucket", "_count", "_sum") if f.endswith(s)
        }
        missing = sorted(used - families)
        if not missing:
            break
        time.sleep(2)
    assert not missing, f"queried by deploy/grafana or deploy/prometheus but not exported: {missing}"
