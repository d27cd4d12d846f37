"""A small Kubernetes API server on loopback, for testing the trainer's Job launcher with the real client.

It implements only what launch_k8s.py uses, with the API's paths, JSON and error Status objects:
create/list/delete Jobs (batch/v1), create/delete Secrets, list/delete pods by label, and a pod's
log with ``follow=true`` (chunked, ``timestamps``, ``sinceSeconds``). A created Job is checked
against the strict Kubernetes schema (kubernetes-validate), as the API server would reject it.

Its "kubelet" runs each Job's pod as a local process: the container's command, with each volume
a local folder (container paths in the command, the env and JSON Secret files are rewritten to
them, standing in for the container's mount namespace), a Secret volume filled from the Secret
once it exists, a claim from ``claims``. Stdout and stderr become the pod's log, the exit status
its container state. Deleting a pod sends SIGTERM and SIGKILL after its grace period; deleting a
Job deletes its pods and the Secrets it owns (the garbage collector). An image on a ``.invalid``
registry never pulls: the pod stays Pending in ImagePullBackOff.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

TOKEN = "fake-cluster-token"
_JOBS = re.compile(r"^/apis/batch/v1/namespaces/([^/]+)/jobs(?:/([^/]+))?$")
_CORE = re.compile(r"^/api/v1/namespaces/([^/]+)/(secrets|pods)(?:/([^/]+))?(/log)?$")


def stamp() -> str:
    """RFC 3339 with nanoseconds, trailing zeros trimmed, as the kubelet writes it."""
    ns = time.time_ns()
    base = datetime.fromtimestamp(ns // 1_000_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{ns % 1_000_000_000:09d}".rstrip("0")
    return f"{base}.{fraction}Z" if fraction else f"{base}Z"


@dataclass
class FakePod:
    name: str
    namespace: str
    job_uid: str
    labels: dict[str, str]
    spec: dict[str, Any]
    root: Path
    phase: str = "Pending"
    container_state: dict[str, Any] | None = None  # None: not scheduled yet, no container status
    conditions: list[dict[str, Any]] = field(default_factory=list)
    log: list[tuple[float, str, bytes]] = field(default_factory=list)  # (unix time, stamp, line)
    process: subprocess.Popen[bytes] | None = None
    deleting: bool = False
    kill_at: float | None = None
    done: bool = False  # no more log lines will come
    spec_file_intact: bool | None = None  # was the mounted spec still there when the worker exited?

    def as_json(self) -> dict[str, Any]:
        container = self.spec["containers"][0]
        status: dict[str, Any] = {"phase": self.phase, "conditions": self.conditions}
        if self.container_state is not None:
            status["containerStatuses"] = [
                {
                    "name": container["name"],
                    "image": container["image"],
                    "imageID": "",
                    "ready": self.phase == "Running",
                    "restartCount": 0,
                    "state": self.container_state,
                }
            ]
        metadata: dict[str, Any] = {
            "name": self.name,
            "namespace": self.namespace,
            "labels": self.labels,
            "ownerReferences": [
                {"apiVersion": "batch/v1", "kind": "Job", "name": self.labels["job-name"], "uid": self.job_uid}
            ],
        }
        if self.deleting:
            metadata["deletionTimestamp"] = stamp()
        return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": self.spec, "status": status}


class FakeKubernetes:
    """The API objects, the pods' processes, and a record of every request (for assertions)."""

    def __init__(self, root: Path, claims: dict[str, Path] | None = None, validate: Any = None) -> None:
        self.root = root
        self.claims = claims or {}
        self.validate = validate  # kubernetes_validate, when installed
        self.lock = threading.Condition()
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.secrets: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: dict[tuple[str, str], FakePod] = {}
        self.requests: list[tuple[str, str, dict[str, list[str]], Any]] = []
        self.created_jobs: list[dict[str, Any]] = []
        self.finished: list[FakePod] = []  # pods whose process exited, in order
        self.drop_log_after_lines = 0  # > 0: the first log stream of each pod breaks after that many lines
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="fake-kubernetes", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeKubernetes:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self.lock:
            pods = list(self.pods.values())
        for pod in pods:
            self._kill(pod, signal.SIGKILL)
        for pod in pods:
            if pod.process is not None:
                pod.process.wait(timeout=10)
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, path: Path, namespace: str) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "trainer", "user": {"token": TOKEN}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "trainer", "namespace": namespace}}],
            "current-context": "fake",
        }
        path.write_text(json.dumps(config))  # JSON is YAML
        return path

    def used_rights(self) -> set[tuple[str, str, str]]:
        """(API group, resource, RBAC verb) of every request made, as an RBAC authorizer would see them."""
        rights = set()
        for method, path, _, _ in self.requests:
            if match := _JOBS.match(path):
                group, resource, named, sub = "batch", "jobs", match.group(2) is not None, None
            elif match := _CORE.match(path):
                group, resource, named, sub = "", match.group(2), match.group(3) is not None, match.group(4)
            else:
                continue
            if sub:
                resource += sub
            verb = {"POST": "create", "DELETE": "delete"}.get(method) or ("get" if named else "list")
            rights.add((group, resource, verb))
        return rights

    def deletes(self, what: str) -> list[tuple[str, dict[str, list[str]]]]:
        """(path, query) of every DELETE of ``what`` ("jobs", "pods", "secrets")."""
        return [(p, q) for m, p, q, _ in self.requests if m == "DELETE" and f"/{what}/" in p]

    # -- objects --------------------------------------------------------------------------------

    def create_job(self, namespace: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if self.validate is not None:
            try:
                self.validate.validate(body, "1.28.0", strict=True)
            except self.validate.ValidationError as exc:
                return 422, _status(422, "Invalid", f"Job is invalid: {exc.message}")
        name = body["metadata"]["name"]
        with self.lock:
            if (namespace, name) in self.jobs:
                return 409, _status(409, "AlreadyExists", f'jobs.batch "{name}" already exists')
            job = json.loads(json.dumps(body))
            job["metadata"] |= {"uid": str(uuid.uuid4()), "namespace": namespace, "creationTimestamp": stamp()}
            self.jobs[(namespace, name)] = job
            self.created_jobs.append(job)
            template = job["spec"]["template"]
            pod_name = f"{name}-{secrets.token_hex(3)[:5]}"
            labels = {**template["metadata"].get("labels", {}), "job-name": name, "batch.kubernetes.io/job-name": name}
            pod = FakePod(pod_name, namespace, job["metadata"]["uid"], labels, template["spec"], self.root / pod_name)
            self.pods[(namespace, pod_name)] = pod
        threading.Thread(target=self._kubelet, args=(pod,), name=f"kubelet-{pod_name}", daemon=True).start()
        return 201, job

    def delete_job(self, namespace: str, name: str, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        with self.lock:
            job = self.jobs.pop((namespace, name), None)
        if job is None:
            return 404, _status(404, "NotFound", f'jobs.batch "{name}" not found')
        policy = query.get("propagationPolicy", ["Background"])[0]
        if policy != "Orphan":  # the garbage collector: the Job's pods (their own grace) and owned Secrets
            uid = job["metadata"]["uid"]
            with self.lock:
                owned = [p for p in self.pods.values() if p.job_uid == uid]
                for key, secret in list(self.secrets.items()):
                    if any(o["uid"] == uid for o in secret["metadata"].get("ownerReferences", [])):
                        del self.secrets[key]
            for pod in owned:
                self.delete_pod(pod, int(pod.spec.get("terminationGracePeriodSeconds", 30)))
        return 200, _status(200, "Success", "")

    def delete_pod(self, pod: FakePod, grace: int) -> None:
        with self.lock:
            kill_at = time.time() + grace
            if pod.deleting and pod.kill_at is not None and pod.kill_at <= kill_at:
                return  # already going, sooner
            first = not pod.deleting
            pod.deleting, pod.kill_at = True, kill_at
            if pod.process is None or pod.done:  # never started, or already finished: it just goes
                self.pods.pop((pod.namespace, pod.name), None)
                pod.done = True
                self.lock.notify_all()
                return
        if grace == 0:
            self._kill(pod, signal.SIGKILL)
        elif first:
            self._kill(pod, signal.SIGTERM)
            threading.Thread(target=self._reap, args=(pod,), daemon=True).start()

    def _reap(self, pod: FakePod) -> None:
        assert pod.process is not None
        while pod.process.poll() is None:
            if pod.kill_at is not None and time.time() >= pod.kill_at:
                self._kill(pod, signal.SIGKILL)
            time.sleep(0.05)

    def _kill(self, pod: FakePod, sig: signal.Signals) -> None:
        if pod.process is not None and pod.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pod.process.pid, sig)

    # -- the kubelet ----------------------------------------------------------------------------

    def _kubelet(self, pod: FakePod) -> None:
        container = pod.spec["containers"][0]
        if not self._schedule(pod):
            return
        if urlsplit(f"//{container['image']}").hostname.endswith(".invalid"):  # type: ignore[union-attr]
            self._set_waiting(pod, "ErrImagePull", f'failed to pull image "{container["image"]}": no such host')
            time.sleep(0.3)
            self._set_waiting(pod, "ImagePullBackOff", f'Back-off pulling image "{container["image"]}"')
            return
        paths = self._mount_volumes(pod)
        if paths is None:
            return
        command = [self._map(arg, paths) for arg in container["command"]]
        if command[0] == "python":
            command[0] = sys.executable
        env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
        env |= {e["name"]: self._map(e["value"], paths) for e in container.get("env", []) if "value" in e}
        with self.lock:
            if pod.deleting:
                return
            pod.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=paths.get("/var/lib/lorafleet", pod.root),
                start_new_session=True,
            )
            pod.phase = "Running"
            pod.container_state = {"running": {"startedAt": stamp()}}
        readers = [
            threading.Thread(target=self._read, args=(pod, s), daemon=True)
            for s in (pod.process.stdout, pod.process.stderr)
        ]
        for reader in readers:
            reader.start()
        status = pod.process.wait()
        for reader in readers:
            reader.join()
        spec_env = env.get("LORAFLEET_WORKER_SPEC_FILE")
        code = 128 - status if status < 0 else status  # a signal's death, as container runtimes report it
        with self.lock:
            pod.spec_file_intact = Path(spec_env).exists() if spec_env else None
            pod.phase = "Succeeded" if code == 0 else "Failed"
            pod.container_state = {
                "terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error", "finishedAt": stamp()}
            }
            pod.done = True
            self.finished.append(pod)
            if pod.deleting:
                self.pods.pop((pod.namespace, pod.name), None)
            self.lock.notify_all()
        shutil.rmtree(pod.root, ignore_errors=True)

    def _set_waiting(self, pod: FakePod, reason: str, message: str) -> None:
        with self.lock:
            pod.container_state = {"waiting": {"reason": reason, "message": message}}

    def _schedule(self, pod: FakePod) -> bool:
        """A pod whose claim does not exist fits no node: it stays Pending, Unschedulable."""
        for volume in pod.spec.get("volumes", []):
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim is not None and claim not in self.claims:
                message = f'persistentvolumeclaim "{claim}" not found'
                with self.lock:
                    pod.conditions = [
                        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
                    ]
                return False
        with self.lock:
            pod.conditions = [{"type": "PodScheduled", "status": "True"}]
            pod.container_state = {"waiting": {"reason": "ContainerCreating"}}
        return True

    def _mount_volumes(self, pod: FakePod) -> dict[str, Path] | None:
        """Each mount path's local folder; None when the pod cannot start (it stays Pending, saying why)."""
        volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
        paths: dict[str, Path] = {}
        for mount in pod.spec["containers"][0].get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "persistentVolumeClaim" in volume:
                paths[mount["mountPath"]] = self.claims[volume["persistentVolumeClaim"]["claimName"]]
                continue
            local = pod.root / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            paths[mount["mountPath"]] = local
        for mount in pod.spec["containers"][0].get("volumeMounts", []):
            secret_source = volumes[mount["name"]].get("secret")
            if secret_source is not None:
                data = self._wait_for_secret(pod, secret_source["secretName"])
                if data is None:
                    return None
                for key, value in data.items():
                    target = paths[mount["mountPath"]] / key
                    target.write_bytes(self._map_document(base64.b64decode(value), paths))
                    target.chmod(0o440)
        return paths

    def _wait_for_secret(self, pod: FakePod, name: str) -> dict[str, str] | None:
        """The kubelet retries a mount until its Secret exists."""
        deadline = time.time() + 30
        with self.lock:
            while (pod.namespace, name) not in self.secrets:
                if pod.deleting or time.time() > deadline:
                    return None
                self.lock.wait(0.1)
            return dict(self.secrets[(pod.namespace, name)].get("data", {}))

    def _map(self, value: str, paths: dict[str, Path]) -> str:
        for mount_path in sorted(paths, key=len, reverse=True):
            if value == mount_path or value.startswith(mount_path + "/"):
                return str(paths[mount_path]) + value[len(mount_path) :]
        return value

    def _map_document(self, data: bytes, paths: dict[str, Path]) -> bytes:
        try:
            document = json.loads(data)
        except ValueError:
            return data

        def walk(node: Any) -> Any:
            if isinstance(node, dict):
                return {k: walk(v) for k, v in node.items()}
            if isinstance(node, list):
                return [walk(v) for v in node]
            return self._map(node, paths) if isinstance(node, str) else node

        return json.dumps(walk(document)).encode()

    def _read(self, pod: FakePod, stream: Any) -> None:
        for line in stream:
            with self.lock:
                pod.log.append((time.time(), stamp(), line.rstrip(b"\n")))
                self.lock.notify_all()

    def log_lines(self, pod: FakePod, start: int, since: float | None) -> tuple[list[tuple[str, bytes]], int, bool]:
        """Lines after index ``start`` (and not older than ``since``), the next index, and whether the log ended."""
        with self.lock:
            while len(pod.log) <= start and not pod.done:
                self.lock.wait(0.5)
            lines = [(s, line) for t, s, line in pod.log[start:] if since is None or t >= since]
            return lines, len(pod.log), pod.done  # done: the readers have finished, no line comes after


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Success" if code < 300 else "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }


def _selector(query: dict[str, list[str]]) -> dict[str, str]:
    text = query.get("labelSelector", [""])[0]
    return dict(part.split("=", 1) for part in text.split(",") if part)


def _handler(cluster: FakeKubernetes) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self, method: str) -> None:
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            cluster.requests.append((method, url.path, query, body))
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self._send(401, _status(401, "Unauthorized", "Unauthorized"))
                return
            if match := _JOBS.match(url.path):
                self._jobs(method, match.group(1), match.group(2), query, body)
            elif match := _CORE.match(url.path):
                namespace, kind, name, log = match.groups()
                if kind == "secrets":
                    self._secrets(method, namespace, name, body)
                elif log:
                    self._log(namespace, name, query)
                else:
                    self._pods(method, namespace, name, query)
            else:
                self._send(404, _status(404, "NotFound", f"no route {method} {url.path}"))

        def _jobs(self, method: str, ns: str, name: str | None, query: dict[str, list[str]], body: Any) -> None:
            if method == "POST" and name is None:
                self._send(*cluster.create_job(ns, body))
            elif method == "GET" and name is None:
                wanted = _selector(query)
                with cluster.lock:
                    items = [
                        j
                        for (n, _), j in cluster.jobs.items()
                        if n == ns and wanted.items() <= j["metadata"].get("labels", {}).items()
                    ]
                self._send(200, {"kind": "JobList", "apiVersion": "batch/v1", "metadata": {}, "items": items})
            elif method == "DELETE" and name is not None:
                self._send(*cluster.delete_job(ns, name, query))
            else:
                self._send(405, _status(405, "MethodNotAllowed", method))

        def _secrets(self, method: str, ns: str, name: str | None, body: Any) -> None:
            with cluster.lock:
                if method == "POST" and name is None:
                    key = (ns, body["metadata"]["name"])
                    if key in cluster.secrets:
                        self._send(409, _status(409, "AlreadyExists", f'secrets "{key[1]}" already exists'))
                        return
                    cluster.secrets[key] = body
                    cluster.lock.notify_all()
                    self._send(201, body)
                elif method == "DELETE" and name is not None:
                    if cluster.secrets.pop((ns, name), None) is None:
                        self._send(404, _status(404, "NotFound", f'secrets "{name}" not found'))
                    else:
                        self._send(200, _status(200, "Success", ""))
                else:
                    self._send(405, _status(405, "MethodNotAllowed", method))

        def _pods(self, method: str, ns: str, name: str | None, query: dict[str, list[str]]) -> None:
            if method == "GET" and name is None:
                wanted = _selector(query)
                with cluster.lock:
                    items = [
                        p.as_json()
                        for (n, _), p in cluster.pods.items()
                        if n == ns and wanted.items() <= p.labels.items()
                    ]
                self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
            elif method == "DELETE" and name is not None:
                pod = cluster.pods.get((ns, name))
                if pod is None:
                    self._send(404, _status(404, "NotFound", f'pods "{name}" not found'))
                    return
                grace = int(query.get("gracePeriodSeconds", [pod.spec.get("terminationGracePeriodSeconds", 30)])[0])
                cluster.delete_pod(pod, grace)
                self._send(200, pod.as_json())
            else:
                self._send(405, _status(405, "MethodNotAllowed", method))

        def _log(self, ns: str, name: str, query: dict[str, list[str]]) -> None:
            pod = cluster.pods.get((ns, name))
            if pod is None:
                self._send(404, _status(404, "NotFound", f'pods "{name}" not found'))
                return
            if pod.process is None:
                self._send(400, _status(400, "BadRequest", f'container "worker" in pod "{name}" is waiting to start'))
                return
            follow = query.get("follow") == ["true"]
            stamps = query.get("timestamps") == ["true"]
            since = time.time() - int(query["sinceSeconds"][0]) if "sinceSeconds" in query else None
            drop_after = cluster.drop_log_after_lines
            cluster.drop_log_after_lines = 0  # only the first stream breaks
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            sent, index = 0, 0
            while True:
                lines, index, ended = cluster.log_lines(pod, index, since)
                for line_stamp, line in lines:
                    data = (f"{line_stamp} ".encode() if stamps else b"") + line + b"\n"
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    self.wfile.flush()
                    sent += 1
                    if drop_after and sent >= drop_after:
                        self.close_connection = True
                        self.connection.shutdown(2)  # mid-stream, no closing chunk: the client sees it break
                        return
                if ended or not follow:
                    break
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def do_DELETE(self) -> None:
            self._route("DELETE")

    return Handler
