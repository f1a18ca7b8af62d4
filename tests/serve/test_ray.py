"""phi-onnx on Ray Serve: the deployment's options, its proxy middleware, and a live 2-replica local cluster.

The cluster tests (marked `ray`) share one local Ray (2 CPUs, every listener on loopback) and run in
file order: requests, listeners, a replica killed mid-load, the example config, then an export with
switchable LoRA adapters in place of the first deployment. Every phase is bounded by timeouts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import make_adapter

from phi_onnx.errors import OptionsError, PhiOnnxError
from phi_onnx.serve import ray as pray
from phi_onnx.tiny import TINY_PHI3_DIR

ROOT = Path(__file__).resolve().parents[2]
APP = "phi-onnx"
LONG = 400  # tokens of the requests a replica kill interrupts (the slots hold 512)
QUESTIONS = [[{"role": "user", "content": f"What does os.path.{name} do?"}]
             for name in ("join", "split", "exists", "isdir", "basename", "dirname", "getsize", "abspath")] * 2


# --- the Serve options, without Ray ---------------------------------------------------------------

def test_fixed_replicas_admit_their_own_queue_and_reserve_their_devices():
    options = pray.deployment_options(replicas=3, gpus_per_replica=1, cpus_per_replica=2, max_batch=16, max_queue=32)
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["max_ongoing_requests"] == 16 + 32  # the replica's own capacity, not Serve's default of 5
    assert "max_queued_requests" not in options  # Serve over-counts it in a burst: a bound would refuse early
    assert options["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1}
    assert pray.replica_settings(gpus_per_replica=1, cpus_per_replica=2) == {"device": "cuda", "backend": "ort",
                                                                             "threads": 2}
    assert pray.replica_settings(cpus_per_replica=1.5, device="auto")["device"] == "cpu"
    assert pray.replica_settings(cpus_per_replica=4, threads=3)["threads"] == 3


def test_replicas_auto_autoscales_on_a_full_batch_per_replica():
    options = pray.deployment_options(replicas="auto", min_replicas=2, max_replicas=8, max_batch=12)
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 8, "target_ongoing_requests": 12.0}
    scaled = pray.deployment_options(replicas=3, max_replicas=4, target_ongoing_requests=5)["autoscaling_config"]
    assert scaled == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 5.0, "initial_replicas": 3}
    assert pray.deployment_options(replicas="AUTO", max_replicas=2)["autoscaling_config"]["min_replicas"] == 1


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"replicas": "auto"}, "--max-replicas"),
    ({"replicas": 0}, "at least 1"),
    ({"replicas": "two"}, "whole number"),
    ({"replicas": "auto", "min_replicas": 4, "max_replicas": 2}, "4..2"),
    ({"replicas": 5, "min_replicas": 1, "max_replicas": 4}, "outside"),
    ({"gpus_per_replica": 1.5}, "whole"),
    ({"gpus_per_replica": -1}, "gpus_per_replica"),
    ({"max_batch": 0}, "max_batch"),
])
def test_inconsistent_options_are_refused(kwargs, words):
    with pytest.raises(OptionsError, match=re.escape(words)):
        pray.deployment_options(**kwargs)


def test_a_gpu_count_the_cluster_cannot_give_is_refused():
    cluster = {"CPU": 16.0, "GPU": 2.0}
    pray.check_resources(cluster, pray.deployment_options(replicas=2, gpus_per_replica=1))
    pray.check_resources(cluster, pray.deployment_options(replicas=4, gpus_per_replica=0.5))
    with pytest.raises(OptionsError, match="need 3 GPUs; the Ray cluster has 2"):
        pray.check_resources(cluster, pray.deployment_options(replicas=3, gpus_per_replica=1))
    with pytest.raises(OptionsError, match="need 3 GPUs"):  # autoscaling: its minimum must fit
        pray.check_resources(cluster, pray.deployment_options(replicas="auto", min_replicas=3, max_replicas=6,
                                                              gpus_per_replica=1))
    with pytest.raises(OptionsError, match="CPU"):
        pray.check_resources(cluster, pray.deployment_options(replicas=5, cpus_per_replica=4))
    assert pray.replicas_for_cluster(cluster, 1, 1) == 2 and pray.replicas_for_cluster(cluster, 0, 4) == 4


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(PhiOnnxError, match=re.escape('pip install "phi-onnx[ray]"')):
        pray.require_ray()


def test_a_folder_that_is_not_an_export_or_bad_options_fail_before_ray_starts(tmp_path, tiny_export):
    from phi_onnx.cli.serve_ray import serve_cluster
    from phi_onnx.serve.config import ServeConfig

    with pytest.raises(PhiOnnxError, match="export"):
        serve_cluster(str(tmp_path / "nowhere"), ServeConfig(port=0), replicas=2, min_replicas=None,
                      max_replicas=None, gpus_per_replica=0, ray_address=None)
    with pytest.raises(OptionsError, match=re.escape("3..2")):
        serve_cluster(str(tiny_export), ServeConfig(port=0), replicas="auto", min_replicas=3, max_replicas=2,
                      gpus_per_replica=0, ray_address=None)
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()
    from click.testing import CliRunner

    from phi_onnx.cli import main

    result = CliRunner().invoke(main, ["serve", str(tmp_path), "--replicas", "2"])
    assert result.exit_code == 2 and "is not a phi-onnx export" in result.output
    assert "Traceback" not in result.output


def test_max_adapters_reaches_each_replicas_serve_config(tiny_export):
    """`max_adapters` (the CLI's --max-adapters) is in the arguments every replica builds its ServeConfig from."""
    pytest.importorskip("ray")

    def replica_max(**options: Any) -> int | None:
        folder, load, app = pray.deployment(tiny_export, **options)._bound_deployment.init_args
        return pray.replica_config(folder, load, app).max_adapters

    assert replica_max(max_adapters=2, app_options={"capacity": 64}) == 2
    assert replica_max(app_options={"max_adapters": 3}) == 3  # a Serve config's app_options
    assert replica_max() is None  # all of them


class _FakeScheduler:
    """Answers `submit` like the app's Scheduler: tokens and a finish reason, or a full queue."""

    def __init__(self, outcome: str) -> None:
        self.outcome = outcome
        self.submitted: list[Any] = []

    def submit(self, prompt: list[int], options: Any) -> Any:
        from phi_onnx.runtime.scheduler import FinishEvent, QueueFullError

        self.submitted.append((prompt, options))
        if self.outcome == "full":
            raise QueueFullError("8 requests are already waiting")
        reason, tokens = {"ok": ("length", [7]), "error": ("error", [])}[self.outcome]
        return types.SimpleNamespace(result=lambda: (tokens, FinishEvent(reason, 1, len(tokens), "", "ORT failed")),
                                     cancel=lambda: None)


def _app_with(scheduler: Any) -> Any:
    from phi_onnx.runtime.options import GenerationOptions

    model = types.SimpleNamespace(defaults=GenerationOptions(), folder=types.SimpleNamespace(bos_token_id=1))
    return types.SimpleNamespace(state=types.SimpleNamespace(phi_onnx=types.SimpleNamespace(
        model=model, scheduler=scheduler)))


def test_the_health_probe_generates_one_token_and_fails_on_an_engine_error():
    ok = _FakeScheduler("ok")
    asyncio.run(pray.probe(_app_with(ok)))
    ((prompt, options),) = ok.submitted
    assert prompt == [1] and options.max_new_tokens == 1 and options.temperature == 0
    asyncio.run(pray.probe(_app_with(_FakeScheduler("full"))))  # busy is not broken
    with pytest.raises(RuntimeError, match="ended 'error': ORT failed"):
        asyncio.run(pray.probe(_app_with(_FakeScheduler("error"))))
    with pytest.raises(RuntimeError, match="no running scheduler"):
        asyncio.run(pray.probe(_app_with(None)))


@pytest.mark.parametrize("name", ["serve_config.yaml", "rayservice.yaml"])
def test_the_examples_name_real_options(name):
    import inspect

    config = yaml.safe_load((ROOT / "examples" / "ray" / name).read_text())
    if "spec" in config:  # the RayService carries a Serve config as text
        assert config["spec"]["rayClusterConfig"]["rayVersion"] == pray.TESTED_RAY
        config = yaml.safe_load(config["spec"]["serveConfigV2"])
    (application,) = config["applications"]
    assert application["import_path"] == "phi_onnx.serve.ray:app_builder"
    args = dict(application["args"])
    assert set(args) - {"folder"} <= set(inspect.signature(pray.deployment).parameters)
    args.pop("folder")
    pray.deployment_options(**{key: value for key, value in args.items() if key in
                               inspect.signature(pray.deployment_options).parameters})
    schema = pytest.importorskip("ray.serve.schema")
    schema.ServeDeploySchema.model_validate(config)


# --- the proxy middleware, on a fake proxy --------------------------------------------------------

def _through_middleware(messages: list[dict[str, Any]], fail: bool = False) -> list[dict[str, Any]]:
    """Run ReplicaFailureErrors over an app that sends `messages` (then raises when `fail`)."""
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        for message in messages:
            await send(message)
        if fail:
            raise RuntimeError("the replica died")

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {"type": "http.disconnect"}

    asyncio.run(pray.ReplicaFailureErrors(app)({"type": "http"}, receive, send))
    return sent


def _start(status: int, kind: bytes) -> dict[str, Any]:
    return {"type": "http.response.start", "status": status, "headers": [(b"content-type", kind)]}


def test_proxy_turns_its_own_errors_into_openai_errors():
    for status, code in ((500, "replica_failed"), (503, "queue_full")):
        sent = _through_middleware([_start(status, b"text/plain"),
                                    {"type": "http.response.body", "body": b"Internal Server Error"}])
        headers = dict(sent[0]["headers"])
        assert sent[0]["status"] == status and headers[b"content-type"] == b"application/json"
        assert (b"retry-after" in headers) == (status == 503)
        error = json.loads(sent[1]["body"])["error"]
        assert error["type"] == "server_error" and error["code"] == code and "Retry" in error["message"]


def test_proxy_ends_a_cut_stream_with_an_error_event_and_leaves_app_errors_alone():
    chunk = {"type": "http.response.body", "body": b'data: {"choices": []}\n\n', "more_body": True}
    sent = _through_middleware([_start(200, b"text/event-stream"), chunk])  # the stream stops, no last body
    assert sent[:2] == [_start(200, b"text/event-stream"), chunk]
    last = sent[2]
    assert last["more_body"] is False and last["body"].startswith(b"data: ")
    assert json.loads(last["body"][len(b"data: "):])["error"]["code"] == "replica_failed"

    assert len(_through_middleware([_start(200, b"text/event-stream"), chunk], fail=True)) == 3
    nothing = _through_middleware([])  # the proxy gave up without a response
    assert nothing[0]["status"] == 500 and json.loads(nothing[1]["body"])["error"]["code"] == "replica_failed"
    app_error = [_start(503, b"application/json"), {"type": "http.response.body", "body": b'{"error": {}}'}]
    assert _through_middleware(app_error) == app_error


# --- a live local cluster: 2 CPU replicas of tiny-phi3 ------------------------------------------

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _replicas(ray: Any, app: str = APP) -> list[str]:
    return [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith(f"SERVE_REPLICA::{app}#")]


def _wait_running(serve: Any, count: int, seconds: float = 90, app: str = APP) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app)
        if status is not None and status.status == "RUNNING":
            states = status.deployments[APP].replica_states  # the deployment's name is always APP
            if states.get("RUNNING", 0) == count and sum(states.values()) == count:
                return
        time.sleep(0.5)
    raise AssertionError(f"the deployment did not reach {count} running replicas in {seconds} s")


@pytest.fixture(scope="module")
def cluster(tiny_export: Path) -> Iterator[dict[str, Any]]:
    """A local Ray (2 CPUs, loopback only) serving 2 CPU replicas of tiny-phi3 on 127.0.0.1."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in pray.local_environment().items():  # before ray is imported: Ray reads them then
            patch.setenv(key, value)
        ray = pytest.importorskip("ray")
        from ray import serve

        # Ray read the variable when it was imported, which may have been before (another test): set it.
        patch.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)

        assert not ray.is_initialized()
        port = _free_port()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            app = pray.deployment(tiny_export, replicas=2, cpus_per_replica=1, max_batch=4, max_queue=8,
                                  model_name="tiny", app_options={"capacity": 512})
            serve.run(app, name=APP, route_prefix="/")
            _wait_running(serve, 2)
            yield {"ray": ray, "serve": serve, "url": f"http://127.0.0.1:{port}", "port": port}
        finally:
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()


@pytest.fixture()
def client(cluster: dict[str, Any]) -> Any:
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{cluster['url']}/v1", api_key="unused", max_retries=0, timeout=60)


def _ask(client: Any, messages: Any, **options: Any) -> tuple[str, str]:
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=messages, **options)
    return raw.headers["x-phi-onnx-replica"], raw.parse().choices[0].message.content


@pytest.mark.ray
@pytest.mark.xdist_group("ray")  # one worker takes them all under --dist loadgroup: one Ray
@pytest.mark.slow
def test_phi_onnx_serve_with_replicas_runs_a_loopback_only_local_ray_and_stops_on_ctrl_c(tiny_export, tmp_path):
    """The CLI's Ray mode in a fresh process (before the shared cluster starts: one Ray at a time)."""
    openai = pytest.importorskip("openai")
    port = _free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "phi_onnx", "serve", str(tiny_export), "--replicas", "1",
                                   "--port", str(port), "--threads", "1", "--model-name", "tiny"],
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "Ctrl-C stops" not in log.read_text():
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        replica, text = _ask(client, QUESTIONS[0], max_tokens=8)
        assert replica and text
        _assert_loopback_only(_listeners(server.pid), port, replicas=1)
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=60) == 0, log.read_text()[-2000:]
    finally:
        if server.poll() is None:  # a failed run: end the server and the Ray it started, not only the CLI
            import psutil

            family = [*psutil.Process(server.pid).children(recursive=True), psutil.Process(server.pid)]
            for process in family:
                with contextlib.suppress(psutil.Error):
                    process.kill()
            server.wait(timeout=30)


@pytest.mark.ray
@pytest.mark.xdist_group("ray")
def test_concurrent_requests_spread_over_replicas_and_equal_one_process(cluster, client, tiny_model):
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda messages: _ask(client, messages, max_tokens=24, temperature=0), QUESTIONS,
                                timeout=120))
    assert len(answers) == 16
    assert {replica for replica, _ in answers} == {name.rsplit("#", 1)[1] for name in _replicas(cluster["ray"])}
    for messages, (_, text) in zip(QUESTIONS, answers, strict=True):
        assert text == tiny_model.chat(messages, max_new_tokens=24).text
    health = __import__("urllib.request").request.urlopen(f"{cluster['url']}/health", timeout=10)
    assert health.status == 200 and health.headers["x-phi-onnx-replica"]


@pytest.mark.ray
@pytest.mark.xdist_group("ray")
def test_each_replica_passes_its_one_token_health_probe(cluster):
    ray = cluster["ray"]
    for name in _replicas(ray):  # Serve's own check, called directly: raises if the probe fails
        assert ray.get(ray.get_actor(name, namespace="serve").check_health.remote(), timeout=60) is None


def _loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]").split("%")[0]
    if host == "*":
        return False
    ip = ipaddress.ip_address(host)
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def _listeners(root: int) -> list[tuple[str, str]]:
    """(local address, process name) of every TCP/UDP listener of process `root` and its descendants."""
    if shutil.which("ss") is None:
        pytest.fail("`ss` is missing: install iproute2 (apt-get install -y iproute2) to check Ray's listeners.")
    pytest.importorskip("ray")  # puts Ray's bundled psutil on sys.path
    import psutil

    top = psutil.Process(root)
    pids = {root} | {child.pid for child in top.children(recursive=True)}
    listing = subprocess.run(["ss", "-H", "-l", "-t", "-u", "-n", "-p"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    found = []
    for line in listing.splitlines():
        if {int(pid) for pid in re.findall(r"pid=(\d+)", line)} & pids:
            found.append((line.split()[4], re.findall(r'"([^"]+)"', line)[0]))
    return found


def _assert_loopback_only(found: list[tuple[str, str]], port: int, replicas: int) -> None:
    names = {name for _, name in found}
    # Not vacuous: the proxy's HTTP port, the replicas' gRPC servers, the GCS and the raylet are seen.
    assert f"127.0.0.1:{port}" in {address for address, _ in found}, found
    assert {"gcs_server", "raylet"} <= names, found
    assert sum(name.startswith("ray::ServeRepli") for _, name in found) >= replicas, found
    beyond = [entry for entry in found if not _loopback(entry[0])]
    assert not beyond, f"listening beyond loopback: {beyond}"


@pytest.mark.ray
@pytest.mark.xdist_group("ray")
def test_every_listener_of_the_deployment_is_on_loopback(cluster):
    _assert_loopback_only(_listeners(os.getpid()), cluster["port"], replicas=2)


@pytest.mark.ray
@pytest.mark.xdist_group("ray")
def test_a_cluster_without_gpus_refuses_a_gpu_deployment(cluster):
    with pytest.raises(OptionsError, match="GPU"):
        pray.check_resources(cluster["ray"].cluster_resources(), pray.deployment_options(gpus_per_replica=1))


@pytest.mark.ray
@pytest.mark.xdist_group("ray")
def test_an_export_missing_on_a_node_is_named_before_deploying(cluster, tiny_export, tmp_path):
    pray.check_export_on_nodes(tiny_export)
    with pytest.raises(OptionsError, match=r"not usable on 1 of 1 node\(s\): 127\.0\.0\.1: .* is not a folder"):
        pray.check_export_on_nodes(tmp_path / "elsewhere")


def _streamed(client: Any, index: int, started: queue.Queue) -> str:
    """A long greedy stream (ignore_eos); puts its replica on `started` at its first token, returns "ok"."""
    with client.chat.completions.with_streaming_response.create(
            model="tiny", messages=QUESTIONS[index], max_tokens=LONG, stream=True, temperature=0,
            extra_body={"ignore_eos": True}) as response:
        pieces = 0
        for chunk in response.parse():
            pieces += bool(chunk.choices and chunk.choices[0].delta.content)
            if pieces == 1:
                started.put(response.headers["x-phi-onnx-replica"])
    assert pieces >= LONG - 1
    return "ok"


@pytest.mark.ray
@pytest.mark.xdist_group("ray")
def test_a_replica_killed_mid_load_fails_cleanly_and_is_replaced(cluster, client):
    import openai

    ray, serve = cluster["ray"], cluster["serve"]
    before = _replicas(ray)
    started: queue.Queue = queue.Queue()
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(_streamed, client, i, started) if i % 3 else
                   pool.submit(_ask, client, QUESTIONS[i], max_tokens=LONG, extra_body={"ignore_eos": True})
                   for i in range(12)]
        victim = started.get(timeout=60)  # a stream is decoding on it
        (name,) = [name for name in before if name.endswith(f"#{victim}")]
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        outcomes = []
        for future in futures:
            try:
                outcomes.append(future.result(timeout=90))  # no request hangs
            except openai.APIError as error:
                outcomes.append(error)
    failed = [outcome for outcome in outcomes if isinstance(outcome, Exception)]
    assert failed, outcomes  # the victim's requests failed (the other's usually did not: routing is random)
    for error in failed:
        assert isinstance(error.body, dict) and {"message", "type", "code"} <= set(error.body), error
    deadline = time.monotonic() + 90
    while not (len(_replicas(ray)) == 2 and name not in _replicas(ray)) and time.monotonic() < deadline:
        time.sleep(0.5)
    _wait_running(serve, 2)
    (new,) = {name.rsplit("#", 1)[1] for name in _replicas(ray)} - {name.rsplit("#", 1)[1] for name in before}
    served = set()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for _ in range(4):  # until the new replica has answered too (bounded)
            later = list(pool.map(lambda messages: _ask(client, messages, max_tokens=8), QUESTIONS[:8], timeout=120))
            assert all(text for _, text in later)
            served |= {replica for replica, _ in later}
            if new in served:
                break
    assert new in served


@pytest.mark.ray
@pytest.mark.xdist_group("ray")
def test_the_example_serve_config_deploys(cluster, tiny_export):
    import openai
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    serve = cluster["serve"]
    config = yaml.safe_load((ROOT / "examples" / "ray" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    assert schema.http_options.host == "127.0.0.1"
    (application,) = config["applications"]
    module, _, attribute = application["import_path"].partition(":")
    builder = getattr(__import__(module, fromlist=[attribute]), attribute)
    args = {**application["args"], "folder": str(tiny_export), "replicas": 1}  # the 2 CPUs are the test's
    serve.delete(APP)
    serve.run(call_user_app_builder_with_args_if_necessary(builder, args), name=application["name"],
              route_prefix=application["route_prefix"])
    served = openai.OpenAI(base_url=f"{cluster['url']}{application['route_prefix'].rstrip('/')}/v1",
                           api_key=args.get("api_key") or "unused", max_retries=0, timeout=60)
    name = served.models.list().data[0].id
    reply = served.completions.create(model=name, prompt="Once upon a time", max_tokens=4)
    assert reply.choices[0].text and reply.usage.completion_tokens == 4
    serve.delete(application["name"])


@pytest.fixture(scope="module")
def adapter_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-phi3 int4 with two switchable peft adapters: a1 (r=4, every projection), a2 (r=8, o/down)."""
    pytest.importorskip("peft")
    from phi_onnx.export import ExportOptions, export

    root = tmp_path_factory.mktemp("ray-lora")
    a1 = make_adapter(TINY_PHI3_DIR, root / "a1", 1, r=4, lora_alpha=8,
                      target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    a2 = make_adapter(TINY_PHI3_DIR, root / "a2", 2, r=8, lora_alpha=16, target_modules=["o_proj", "down_proj"])
    export("tiny-phi3", root / "out", ExportOptions(adapters=(("a1", str(a1)), ("a2", str(a2)))))
    return root / "out"


def _gauge(text: str, name: str) -> float | None:
    found = re.search(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else None


@pytest.mark.ray
@pytest.mark.xdist_group("ray")
def test_replicas_serve_the_exports_switchable_adapters_by_model(cluster, adapter_export):
    """Each replica lists the adapters, `model` picks one (its tokens are the library's), --max-adapters reaches it."""
    httpx = pytest.importorskip("httpx")
    import phi_onnx

    prompt = list(range(40, 51))
    with phi_onnx.load(adapter_export, backend="ort", threads=1) as model:
        expected = {name: model.generate(prompt, adapter=None if name == "base" else name, max_new_tokens=8,
                                         min_new_tokens=8, temperature=0).token_ids for name in ("base", "a1", "a2")}
    assert expected["a1"] != expected["base"] and expected["a2"] != expected["base"]

    serve, url, name = cluster["serve"], cluster["url"], f"{APP}-lora"
    serve.delete(APP)  # its 2 CPUs are this deployment's (the cluster holds one deployment at a time)
    app = pray.deployment(adapter_export, replicas=2, cpus_per_replica=1, max_batch=4, max_queue=8,
                          model_name="base", max_adapters=1, app_options={"capacity": 256})
    serve.run(app, name=name, route_prefix="/")
    try:
        _wait_running(serve, 2, app=name)
        replicas = {replica.rsplit("#", 1)[1] for replica in _replicas(cluster["ray"], app=name)}

        def ask(model_name: str) -> tuple[str, list[int]]:
            body = {"model": model_name, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                    "return_token_ids": True}
            reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            assert reply.status_code == 200, reply.text
            return reply.headers["x-phi-onnx-replica"], reply.json()["choices"][0]["token_ids"]

        names = ["base", "a1", "a2"] * 4
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, names, timeout=120))
        assert [tokens for _, tokens in answers] == [expected[n] for n in names]
        served = {replica for (replica, _), n in zip(answers, names, strict=True) if n != "base"}
        for _ in range(20):  # bounded: until every replica has served an adapter (routing is random)
            if served >= replicas:
                break
            replica, tokens = ask("a2")
            assert tokens == expected["a2"]
            served.add(replica)
        assert served == replicas and len(replicas) == 2

        listings: dict[str, list[str]] = {}
        gauges: dict[str, tuple[float | None, float | None]] = {}
        for _ in range(40):  # each replica's own listing and adapter gauges (bounded; routing is random)
            models = httpx.get(f"{url}/v1/models", timeout=30)
            metrics = httpx.get(f"{url}/metrics", timeout=30)
            assert models.status_code == metrics.status_code == 200
            listings[models.headers["x-phi-onnx-replica"]] = [m["id"] for m in models.json()["data"]]
            gauges[metrics.headers["x-phi-onnx-replica"]] = (_gauge(metrics.text, "phi_onnx_lora_adapters_max"),
                                                             _gauge(metrics.text, "phi_onnx_lora_adapters_loaded"))
            if set(listings) == set(gauges) == replicas:
                break
        assert listings == {replica: ["base", "a1", "a2"] for replica in replicas}
        # max_adapters=1 reached every replica, which holds one adapter of the two it read.
        assert gauges == {replica: (1.0, 1.0) for replica in replicas}
        missing = httpx.post(f"{url}/v1/completions", json={"model": "a3", "prompt": "x"}, timeout=30)
        assert missing.status_code == 404 and "a1" in missing.json()["error"]["message"]
    finally:
        serve.delete(name)
