"""HTTP access to the gateway for the CLI: one httpx client, OpenAI error bodies turned into one-line CliErrors
with documented exit codes, and server-sent events read line by line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

# Exit codes (docs/console.md): 0 ok, 1 refused or failed, 2 usage (click), 3 key, 4 not found, 5 try again later.
EXIT_FAILED = 1
EXIT_AUTH = 3
EXIT_NOT_FOUND = 4
EXIT_UNAVAILABLE = 5

USER_AGENT = "lorafleet-cli/0.1"


class CliError(Exception):
    """A failure to report as one line on stderr, exiting with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def exit_code_for(status: int) -> int:
    if status in (401, 403):
        return EXIT_AUTH
    if status == 404:
        return EXIT_NOT_FOUND
    if status == 429 or status >= 500:
        return EXIT_UNAVAILABLE
    return EXIT_FAILED


def api_error(response: httpx.Response) -> CliError:
    """The gateway's OpenAI error body as one line: "<message> (HTTP <status>, <code>)"."""
    status = response.status_code
    try:
        error = response.json()["error"]
        message, code = str(error.get("message") or "").strip(), error.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        text = " ".join(response.text.split())[:200]
        return CliError(f"HTTP {status} from the gateway: {text or response.reason_phrase}", exit_code_for(status))
    hint = ""
    if status == 401:
        hint = " Check --api-key / LORAFLEET_API_KEY."
    elif status == 403:
        hint = " This needs the admin key."
    suffix = f"HTTP {status}, {code}" if code else f"HTTP {status}"
    return CliError(f"{message.rstrip('.')} ({suffix}).{hint}", exit_code_for(status))


def stream_error(payload: dict[str, Any]) -> CliError:
    """An error event inside a started stream (the HTTP status was already 200)."""
    error = payload.get("error") or {}
    code = error.get("code") or error.get("type") or "error"
    return CliError(f"{str(error.get('message') or 'the stream failed').rstrip('.')} ({code}).", EXIT_UNAVAILABLE)


def path_of(*parts: str) -> str:
    """A URL path from ids that may hold ':', '/' and '@' (adapter ids): those stay as they are."""
    return "/".join(quote(part, safe="/:@") for part in parts)


@dataclass
class SSEMessage:
    data: str
    id: str | None = None

    def json(self) -> Any:
        return json.loads(self.data)


def read_sse(lines: Iterator[str]) -> Iterator[SSEMessage]:
    data: list[str] = []
    event_id: str | None = None
    for line in lines:
        if not line:
            if data:
                yield SSEMessage("\n".join(data), event_id)
            data = []
            continue
        if line.startswith(":"):  # keepalive comment
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        elif field == "id":
            event_id = value
    if data:
        yield SSEMessage("\n".join(data), event_id)


class FleetClient:
    """The gateway's HTTP API with one key."""

    def __init__(self, url: str, api_key: str, *, timeout_s: float) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": USER_AGENT},
            timeout=timeout_s,
        )

    def close(self) -> None:
        self._http.close()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except httpx.ConnectError as exc:
            raise CliError(
                f"cannot reach the gateway at {self.url} ({exc}); is it running? Set --url or LORAFLEET_URL.",
                EXIT_UNAVAILABLE,
            ) from None
        except httpx.TimeoutException:
            raise CliError(f"the gateway at {self.url} did not answer in time.", EXIT_UNAVAILABLE) from None
        except httpx.HTTPError as exc:
            raise CliError(f"request to {self.url} failed: {exc}", EXIT_UNAVAILABLE) from None

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request; the decoded JSON answer, or CliError."""
        with self._errors():
            response = self._http.request(method, path, **kwargs)
        if response.is_error:
            raise api_error(response)
        try:
            return response.json()
        except ValueError:
            raise CliError(f"the gateway answered {path} with something that is not JSON", EXIT_FAILED) from None

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Any:
        return self.request("POST", path, json=body, **kwargs)

    @contextmanager
    def stream(
        self, method: str, path: str, *, body: Any = None, headers: dict[str, str] | None = None
    ) -> Iterator[Iterator[SSEMessage]]:
        """A server-sent-event response; reading waits for the first event as long as a request may take
        (adapter loading on first use) and at most that long between events."""
        timeout = httpx.Timeout(self.timeout_s, read=max(self.timeout_s, 90.0))
        with self._errors():
            request = self._http.build_request(
                method, path, json=body, headers={"Accept": "text/event-stream", **(headers or {})}, timeout=timeout
            )
            response = self._http.send(request, stream=True)
            try:
                if response.is_error:
                    response.read()
                    raise api_error(response)
                yield read_sse(response.iter_lines())
            finally:
                response.close()
