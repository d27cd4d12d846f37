"""The few Kubernetes API calls the Job launcher makes, through the official ``kubernetes`` client.

Each call is blocking (run it in a thread) and has a deadline. Every failure becomes a
``KubernetesApiError`` with a readable message: this is the boundary's one exception table.
Responses are read as plain JSON rather than the client's models, so a field a newer API server
adds, or a value the models type more strictly than the server, can never break the launcher.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, TypeVar

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from lorafleet_trainer.settings import TrainerSettings

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# Background: the Job goes at once and the garbage collector deletes its pods and Secret after it.
PROPAGATION = "Background"

M = TypeVar("M")

# Every API right the launcher uses, and all it needs (group, resource, verbs): the chart's Role grants
# exactly these, and the launcher's tests check that it uses nothing else.
RBAC_RULES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("batch", "jobs", ("create", "list", "delete")),
    ("", "pods", ("list", "delete")),
    ("", "pods/log", ("get",)),
    ("", "secrets", ("create", "delete")),
)


class KubernetesApiError(RuntimeError):
    """A Kubernetes API call failed; ``status`` is the HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class KubernetesConfigError(RuntimeError):
    """The trainer cannot find or read its Kubernetes credentials (raised at start-up)."""


def _api_error(exc: Exception, what: str) -> KubernetesApiError:
    if isinstance(exc, ApiException):
        detail = exc.reason or ""
        with contextlib.suppress(ValueError, AttributeError):  # the API's Status object says precisely what failed
            detail = json.loads(exc.body or "{}").get("message") or detail
        return KubernetesApiError(f"{what}: HTTP {exc.status} {detail}".rstrip(), exc.status)
    if isinstance(exc, urllib3.exceptions.HTTPError | OSError):
        return KubernetesApiError(f"{what}: the Kubernetes API did not answer ({type(exc).__name__}: {exc})")
    return KubernetesApiError(f"{what}: {type(exc).__name__}: {exc}")


def connect(settings: TrainerSettings) -> tuple[client.ApiClient, str]:
    """An API client (its own configuration, nothing global) and the namespace the Jobs go to."""
    configuration = client.Configuration()
    mode = settings.k8s_config
    if mode == "auto":
        mode = "in-cluster" if os.environ.get("KUBERNETES_SERVICE_HOST") else "kubeconfig"
    try:
        if mode == "in-cluster":
            config.load_incluster_config(client_configuration=configuration)
            namespace = settings.k8s_namespace or SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
        else:
            kubeconfig = str(settings.k8s_kubeconfig) if settings.k8s_kubeconfig else None
            config.load_kube_config(
                config_file=kubeconfig,
                context=settings.k8s_context,
                client_configuration=configuration,
                persist_config=False,
            )
            namespace = settings.k8s_namespace or _context_namespace(kubeconfig, settings.k8s_context) or "default"
    except (ConfigException, OSError) as exc:
        raise KubernetesConfigError(f"cannot load the Kubernetes credentials ({mode}): {exc}") from exc
    # Connection failures are retried once; a request the server may have acted on never is (a POST twice
    # would create two Jobs). The launcher's own loops retry what is safe to retry.
    configuration.retries = urllib3.Retry(total=1, read=0, status=0, redirect=0)
    return client.ApiClient(configuration), namespace


def _context_namespace(kubeconfig: str | None, context: str | None) -> str | None:
    contexts, current = config.list_kube_config_contexts(kubeconfig)
    chosen = next((c for c in contexts if c["name"] == context), None) if context else current
    return (chosen or {}).get("context", {}).get("namespace")


def _model(cls: type[M], body: dict[str, Any]) -> M:
    """The client's model of a manifest (its create calls take nothing else)."""
    model = cls.from_dict(body)  # type: ignore[attr-defined]
    if model is None:
        raise ValueError(f"not a {cls.__name__}: {body!r:.200}")
    return model


class KubernetesApi:
    """Jobs, their pods, logs and Secrets in one namespace; every call bounded by ``timeout_s``."""

    def __init__(self, api_client: client.ApiClient, namespace: str, timeout_s: float) -> None:
        self.api_client = api_client
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)

    def create_job(self, body: dict[str, Any]) -> str:
        """Create the Job; its uid (the Secret's owner reference needs it)."""
        try:
            response: Any = self.batch.create_namespaced_job(
                self.namespace, _model(client.V1Job, body), _preload_content=False, _request_timeout=self.timeout_s
            )
            try:
                return str(json.loads(response.data)["metadata"]["uid"])
            finally:
                response.release_conn()
        except Exception as exc:
            raise _api_error(exc, f"creating Kubernetes Job {body['metadata']['name']}") from exc

    def create_secret(self, body: dict[str, Any]) -> None:
        try:
            self.core.create_namespaced_secret(
                self.namespace, _model(client.V1Secret, body), _request_timeout=self.timeout_s
            )
        except Exception as exc:
            raise _api_error(exc, f"creating Secret {body['metadata']['name']}") from exc

    def delete_job(self, name: str, grace_s: int, timeout_s: float | None = None) -> None:
        """Delete a Job (its pods and Secret follow); one already gone is fine."""
        try:
            self.batch.delete_namespaced_job(
                name,
                self.namespace,
                grace_period_seconds=grace_s,
                propagation_policy=PROPAGATION,
                _request_timeout=timeout_s or self.timeout_s,
            )
        except ApiException as exc:
            if exc.status != 404:
                raise _api_error(exc, f"deleting Kubernetes Job {name}") from exc
        except Exception as exc:
            raise _api_error(exc, f"deleting Kubernetes Job {name}") from exc

    def delete_secret(self, name: str) -> None:
        try:
            self.core.delete_namespaced_secret(name, self.namespace, _request_timeout=self.timeout_s)
        except ApiException as exc:
            if exc.status != 404:
                raise _api_error(exc, f"deleting Secret {name}") from exc
        except Exception as exc:
            raise _api_error(exc, f"deleting Secret {name}") from exc

    def delete_pod(self, name: str, grace_s: int, timeout_s: float | None = None) -> None:
        """Delete a pod: its container gets SIGTERM, then SIGKILL after ``grace_s`` (0: at once)."""
        try:
            self.core.delete_namespaced_pod(
                name, self.namespace, grace_period_seconds=grace_s, _request_timeout=timeout_s or self.timeout_s
            )
        except ApiException as exc:
            if exc.status != 404:
                raise _api_error(exc, f"deleting pod {name}") from exc
        except Exception as exc:
            raise _api_error(exc, f"deleting pod {name}") from exc

    def list_jobs(self, label_selector: str) -> list[str]:
        """Names of the Jobs the selector matches."""
        items = self._list(self.batch.list_namespaced_job, label_selector, "listing Kubernetes Jobs")
        return [str(item["metadata"]["name"]) for item in items]

    def list_pods(self, job_name: str, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """The pods of one Job (the Job controller labels them with its name), as the API's JSON."""
        return self._list(
            self.core.list_namespaced_pod, f"job-name={job_name}", f"listing the pods of Job {job_name}", timeout_s
        )

    def _list(self, method: Any, label_selector: str, what: str, timeout_s: float | None = None) -> list[Any]:
        try:
            response = method(
                self.namespace,
                label_selector=label_selector,
                _preload_content=False,
                _request_timeout=timeout_s or self.timeout_s,
            )
            try:
                return list(json.loads(response.data).get("items") or [])
            finally:
                response.release_conn()
        except Exception as exc:
            raise _api_error(exc, what) from exc

    def open_log(self, pod: str, container: str, since_seconds: int | None, idle_timeout_s: float) -> Any:
        """The pod's log as a live stream (a urllib3 response, each line stamped with the node's time).

        A stream silent for ``idle_timeout_s`` raises a read timeout: the caller then checks the pod and
        re-opens it rather than hang on a connection that died without closing.
        """
        try:
            return self.core.read_namespaced_pod_log(
                pod,
                self.namespace,
                container=container,
                follow=True,
                timestamps=True,
                since_seconds=since_seconds,
                _preload_content=False,
                _request_timeout=(self.timeout_s, idle_timeout_s),
            )
        except Exception as exc:
            raise _api_error(exc, f"reading the log of pod {pod}") from exc
