"""deploy/kubernetes/: every manifest valid against Kubernetes' published OpenAPI schemas (kubernetes-validate,
offline, strict: an unknown field fails), consistent with the container, and its probe commands run as
written against Cog's real server in each state they must tell apart."""

from __future__ import annotations

import copy
import ipaddress
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from cogserver import CogServer, concurrency_max
from faulty_predict import FAULT_PROMPT
from inpaint import egress

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
# The oldest Kubernetes the manifests are for, and the newest kubernetes-validate knows.
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
KNATIVE = "serving.knative.dev/v1"
# Fields of Knative's RevisionSpec beside the PodSpec it inlines (Knative Serving API, RevisionSpec).
KNATIVE_REVISION_FIELDS = ("containerConcurrency", "timeoutSeconds", "responseStartTimeoutSeconds", "idleTimeoutSeconds")


def documents() -> list[tuple[str, dict]]:
    return [(path.name, document) for path in MANIFESTS for document in yaml.safe_load_all(path.read_text()) if document]


def _as_pod(service: dict) -> dict:
    """A Knative Service's revision template as the Pod it becomes, for the PodSpec schema (Knative names an
    unnamed container "user-container")."""
    template = copy.deepcopy(service["spec"]["template"])
    spec = {key: value for key, value in template["spec"].items() if key not in KNATIVE_REVISION_FIELDS}
    for container in spec["containers"]:
        container.setdefault("name", "user-container")
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": service["metadata"]["name"], **template.get("metadata", {})},
            "spec": spec}


def _containers(document: dict) -> list[dict]:
    if document["kind"] == "Deployment":
        return document["spec"]["template"]["spec"]["containers"]
    if document.get("apiVersion") == KNATIVE:
        return document["spec"]["template"]["spec"]["containers"]
    return []


def test_there_are_manifests_for_a_deployment_a_service_a_volume_and_knative():
    kinds = {(document["apiVersion"], document["kind"]) for _, document in documents()}
    assert {("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "PersistentVolumeClaim"), (KNATIVE, "Service"),
            ("networking.k8s.io/v1", "NetworkPolicy")} <= kinds


# The instance metadata services, as each cloud documents them: AWS (IPv4 and IPv6), GCP, Azure and OCI at
# 169.254.169.254, Alibaba Cloud at 100.100.100.200.
METADATA = ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")


def test_the_network_policy_keeps_every_pod_off_the_metadata_services_and_nothing_else():
    """Cog's server posts webhooks to any URL a request names (the model's code never sees them, so
    egress.py cannot check them): the policy closes the metadata services to the pods of both workloads,
    and leaves public, private and the rest of link-local (NodeLocal DNSCache's 169.254.20.10) open."""
    (policy,) = [document for _, document in documents() if document["kind"] == "NetworkPolicy"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    workloads = [document for _, document in documents() if document["kind"] in ("Deployment", "Service")
                 and "template" in document["spec"]]
    assert len(workloads) == 2 and all(selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()
                                       for workload in workloads)
    assert policy["spec"]["policyTypes"] == ["Egress"]
    blocks = [peer["ipBlock"] for rule in policy["spec"]["egress"] for peer in rule["to"]]
    assert not any("ports" in rule for rule in policy["spec"]["egress"])

    def reachable(address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return any(ip in ipaddress.ip_network(block["cidr"]) and not any(ip in ipaddress.ip_network(cut)
                   for cut in block.get("except", [])) for block in blocks)

    for address in METADATA:
        assert not reachable(address), address
        assert not egress.allowed(ipaddress.ip_address(address), ()), address  # nor does a URL input reach it
    for address in ("8.8.8.8", "2001:4860:4860::8888", "10.96.0.10", "169.254.20.10", "fd00:ec2::253"):
        assert reachable(address), address


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_against_the_published_schemas(version):
    for name, document in documents():
        resource = _as_pod(document) if document["apiVersion"] == KNATIVE else document
        kubernetes_validate.validate(resource, version, strict=True)  # raises with the field and the reason


def test_the_validator_refuses_a_broken_manifest():
    """The check above is real: a misspelt field, a string where a number goes, a missing image all fail."""
    deployment = next(document for _, document in documents() if document["kind"] == "Deployment")
    for breaking in (
        lambda d: d["spec"]["template"]["spec"]["containers"][0].update(livenesProbe={}),
        lambda d: d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"].update(periodSeconds="10"),
        lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("name"),
    ):
        broken = copy.deepcopy(deployment)
        breaking(broken)
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_the_manifests_agree_with_the_container():
    slots = concurrency_max()
    for name, document in documents():
        for container in _containers(document):
            env = {entry["name"]: entry.get("value") for entry in container["env"]}
            assert env["COG_MAX_CONCURRENCY"] == str(slots), name
            assert container["ports"][0]["containerPort"] == 5000, name  # Cog's server
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1, name
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                command = container[probe]["exec"]["command"]
                assert command[:2] == ["python", "script/probe"] and (ROOT / command[1]).exists(), (name, probe)
            mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
            assert env["INPAINT_COMPILE_CACHE"].startswith(mounts["compiled"] + "/"), name
        if document.get("apiVersion") == KNATIVE:
            spec, annotations = document["spec"]["template"]["spec"], document["spec"]["template"]["metadata"]["annotations"]
            assert spec["containerConcurrency"] == slots  # the queue-proxy never sends more than Cog takes
            assert int(annotations["autoscaling.knative.dev/target"]) <= slots
            # Knative's API takes no lifecycle hooks (knative/serving, pkg/apis/serving/fieldmask.go: ContainerMask)
            assert "lifecycle" not in spec["containers"][0]
        if document["kind"] == "Deployment":
            spec = document["spec"]["template"]["spec"]
            assert _pre_stop_command() == ["python", "script/probe", "drain"]
            # The grace period counts from the hook's start: its settle, then a long prediction, then SIGTERM.
            assert spec["terminationGracePeriodSeconds"] > _probe_script().SETTLE_SECONDS + 60
    claims = {document["metadata"]["name"] for _, document in documents() if document["kind"] == "PersistentVolumeClaim"}
    for name, document in documents():
        for volume in document.get("spec", {}).get("template", {}).get("spec", {}).get("volumes", []):
            assert volume["persistentVolumeClaim"]["claimName"] in claims, name


def _probe_commands() -> dict[str, list[str]]:
    """Each distinct probe command of the manifests, by the check it makes."""
    commands = {}
    for _, document in documents():
        for container in _containers(document):
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                command = container[probe]["exec"]["command"]
                commands[command[-1]] = command
    assert set(commands) == {"ready", "live"}
    return commands


def _probe_script():
    """script/probe as a module, for its defaults."""
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("probe", str(ROOT / "script" / "probe"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("probe", loader))
    loader.exec_module(module)
    return module


def _pre_stop_command() -> list[str]:
    (deployment,) = [document for _, document in documents() if document["kind"] == "Deployment"]
    return deployment["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]


def _run_probe(command: list[str], port: int, env: dict | None = None):
    """The command as the kubelet runs it in the container: from the working directory (Cog's /src is the
    repository root), `python` from PATH, the container's environment (`env`: what the server was given).
    Its exit code; with `env`, and the reason it wrote."""
    done = subprocess.run(command, cwd=ROOT, env=_environment(port, env), capture_output=True, text=True, timeout=30)
    return done.returncode if env is None else (done.returncode, done.stderr)


def _environment(port: int, env: dict | None) -> dict:
    return {**os.environ, **(env or {}), "PORT": str(port),
            "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}


def test_probes_pass_on_a_ready_server(server):
    server.wait_ready(30)
    commands = _probe_commands()
    assert _run_probe(commands["ready"], server.port) == 0
    assert _run_probe(commands["live"], server.port) == 0


@pytest.mark.slow
def test_probes_during_setup_and_with_no_server(tiny_weights, tmp_path):
    commands = _probe_commands()
    starting = CogServer(tiny_weights, log_path=tmp_path / "server.log").launch()
    try:
        deadline = time.monotonic() + 60
        state = None
        while time.monotonic() < deadline:
            try:
                state = starting.health().get("status")
                break
            except OSError:
                time.sleep(0.05)
        if state != "STARTING":
            pytest.skip(f"setup was over before the first health check ({state})")
        assert _run_probe(commands["ready"], starting.port) == 1  # not ready: no traffic yet
        assert _run_probe(commands["live"], starting.port) == 0  # but not restarted during setup
        started = time.monotonic()
        assert _run_probe(_pre_stop_command(), starting.port) == 0  # no prediction to finish: no settle either
        assert time.monotonic() - started < 5
        starting.wait_ready(120)
        assert _run_probe(commands["ready"], starting.port) == 0
    finally:
        starting.stop()
    assert _run_probe(commands["ready"], starting.port) == 1  # nothing listening
    assert _run_probe(commands["live"], starting.port) == 1
    started = time.monotonic()
    assert _run_probe(_pre_stop_command(), starting.port) == 0  # nor anything to finish
    assert time.monotonic() - started < 5


def test_probes_fail_once_the_gpu_failed_for_good(faulty_server, tmp_path):
    from conftest import make_mask, make_photo
    from cogserver import data_uri

    photo, mask = make_photo(tmp_path / "photo.png"), make_mask(tmp_path / "mask.png")
    body = {"image": data_uri(photo), "mask": data_uri(mask), "width": 64, "height": 64, "num_inference_steps": 2,
            "prompt": FAULT_PROMPT}
    status, response = faulty_server.predict(body)
    assert response["status"] == "failed"
    deadline = time.monotonic() + 30
    while faulty_server.health()["status"] != "UNHEALTHY" and time.monotonic() < deadline:
        time.sleep(0.2)
    commands = _probe_commands()
    assert _run_probe(commands["live"], faulty_server.port) == 1  # the kubelet restarts the container
    assert _run_probe(commands["ready"], faulty_server.port) == 1
    started = time.monotonic()
    assert _run_probe(_pre_stop_command(), faulty_server.port) == 0  # and its preStop hook does not hold it up
    assert time.monotonic() - started < 5


@pytest.mark.slow
def test_probes_fail_once_cogs_server_has_lost_its_slots_and_pass_while_they_are_busy(tiny_weights, tmp_path):
    """Cog 0.23.1's server loses a prediction slot for good to a request id over 255 bytes (it cannot make its
    output folder; tests/test_reliability.py records the bug): once all are lost it says BUSY for good. Before,
    the probes passed on that, and the pod served 409 until someone restarted it. A pod whose slots are all
    busy with real predictions still passes, however long they run."""
    from cogserver import data_uri
    from conftest import make_mask, make_photo

    temporary = tmp_path / "tmp"  # the server's and its probes' own TMPDIR: no other server's record
    temporary.mkdir()
    env = {"TMPDIR": str(temporary)}
    commands = _probe_commands()
    photo, mask = make_photo(tmp_path / "photo.png"), make_mask(tmp_path / "mask.png")
    body = {"image": data_uri(photo), "mask": data_uri(mask), "width": 64, "height": 64, "num_inference_steps": 2}
    with CogServer(tiny_weights, log_path=tmp_path / "server.log", env=env) as server:
        slow = {**body, "num_inference_steps": 40, "width": 256, "height": 256}
        with ThreadPoolExecutor(concurrency_max()) as clients:
            answers = [clients.submit(server.predict, slow) for _ in range(concurrency_max())]
            deadline = time.monotonic() + 60
            while server.health()["status"] != "BUSY" and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # every one in run() by now
            for check in ("ready", "live"):
                assert _run_probe([*commands[check], "--lost-after", "0"], server.port, env) == (0, "")
            assert all(answer.result()[1]["status"] == "succeeded" for answer in answers)
        deadline = time.monotonic() + 10  # moments after a sync answer its slot is still being freed (docs/serving.md)
        while server.health()["status"] != "READY" and time.monotonic() < deadline:
            time.sleep(0.05)
        for index in range(concurrency_max()):  # each takes a slot for good
            server.request("POST", "/predictions", {"id": "x" * 256 + str(index), "input": body})
        assert server.health()["status"] == "BUSY"
        assert server.request("POST", "/predictions", {"input": body})[0] == 409
        assert _run_probe(commands["live"], server.port, env) == (0, "")  # within the first minute: not yet
        time.sleep(1)
        for check in ("ready", "live"):
            code, reason = _run_probe([*commands[check], "--lost-after", "1"], server.port, env)
            assert code == 1 and reason.startswith(f"{check}: status BUSY, but no prediction has been in run() for ")
            assert reason.endswith("Cog's server has lost its prediction slots (coglet 0.23.1, a request id over 255 "
                                   "bytes or with a NUL; docs/serving.md), and only a restart frees them\n")


@pytest.mark.slow
def test_the_pre_stop_hook_holds_sigterm_until_async_predictions_have_ended_and_sent_their_webhooks(
        tiny_weights, tmp_path, webhook):
    """On SIGTERM Cog's server (coglet 0.23.1) drops an async prediction still running, with no final webhook
    (tests/test_reliability.py records it). The Deployment's preStop hook runs before the kubelet sends
    SIGTERM: it waits out its settle, in which the Service may still send a request, then until no
    prediction has been in run() for a moment. Then SIGTERM loses nothing."""
    from cogserver import data_uri
    from conftest import make_mask, make_photo

    temporary = tmp_path / "tmp"  # the server's and its hook's own TMPDIR: no other server's record
    temporary.mkdir()
    env = {"TMPDIR": str(temporary)}
    photo, mask = make_photo(tmp_path / "photo.png"), make_mask(tmp_path / "mask.png")
    # Long enough to be in run() still when the first check below has started its Python, on a loaded CI machine.
    body = {"image": data_uri(photo), "mask": data_uri(mask), "width": 256, "height": 256, "num_inference_steps": 200}
    hook = [*_pre_stop_command(), "--settle", "1"]
    terminal = ("succeeded", "failed", "canceled")

    def post(prediction_id: str) -> None:
        request = {"id": prediction_id, "input": body, "webhook": webhook.url}
        assert server.request("POST", "/predictions", request, {"Prefer": "respond-async"})[0] == 202

    server = CogServer(tiny_weights, log_path=tmp_path / "server.log", env=env).start()
    try:
        started = time.monotonic()
        code, said = _run_probe(hook, server.port, env)  # an idle server: its settle and a moment
        assert code == 0 and said == "" and time.monotonic() - started < 10
        post("first")
        webhook.wait_for(lambda event: event.get("id") == "first" and "denoising" in (event.get("logs") or ""), 60)
        code, said = _run_probe([*hook[:3], "--settle", "0", "--timeout", "0.5"], server.port, env)
        assert code == 1 and said == "drain: gave up after 0.5 s past the settle: 1 prediction in run()\n"
        draining = subprocess.Popen(hook, cwd=ROOT, env=_environment(server.port, env), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        post("second")  # within the settle
        out, err = draining.communicate(timeout=120)
        ended = {event["id"]: event["status"] for event in list(webhook.events) if event.get("status") in terminal}
        assert draining.returncode == 0 and err == "" and out == "drain: nothing left to finish (status READY)\n"
        assert ended == {"first": "succeeded", "second": "succeeded"}  # before SIGTERM
        assert server.stop(timeout=60) == 0
    finally:
        server.stop()
