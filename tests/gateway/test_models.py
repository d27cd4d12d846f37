"""GET /v1/models and /v1/models/{id}."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.gateway.gateway_harness import ADAPTER, BASE_MODEL, Stack, publish_test_adapter


def test_list_has_base_and_published_adapters(gw: Stack, client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert BASE_MODEL in models and ADAPTER in models
    assert models[BASE_MODEL].object == "model" and models[BASE_MODEL].owned_by == "lorafleet"
    assert models[ADAPTER].created == 1_700_000_000
    assert models[ADAPTER].model_dump().get("parent") == BASE_MODEL
    assert "parent" not in models[BASE_MODEL].model_dump(exclude_unset=True)
    assert next(iter(client.models.list())).id == BASE_MODEL


def test_retrieve_ids_with_colons_and_slashes(gw: Stack, client: openai.OpenAI, tmp_path: Path) -> None:
    names = ["ft:smollm2-135m-instruct:default:demo:0123456789ab", "team-a/support-bot"]
    for name in names:  # in the default tenant's namespace: the admin key acts as that tenant
        publish_test_adapter(gw.store, tmp_path / name.replace("/", "_"), f"default/{name}", "ftjob-0123456789ab")
    listed = {m.id for m in client.models.list()}
    for name in names:
        assert name in listed
        assert client.models.retrieve(name).id == name
        assert client.models.retrieve(f"{name}@ftjob-0123456789ab").id == f"{name}@ftjob-0123456789ab"
    assert client.models.retrieve(BASE_MODEL).id == BASE_MODEL
    # And they are servable by that id.
    completion = client.chat.completions.create(model=names[1], messages=[{"role": "user", "content": "hi"}])
    assert "team-a/support-bot" in (completion.choices[0].message.content or "")


@pytest.mark.parametrize("model", ["no-such-adapter", f"{ADAPTER}@v999", "..%2Fetc%2Fpasswd", "bad name"])
def test_retrieve_unknown_is_404(gw: Stack, client: openai.OpenAI, model: str) -> None:
    with gw.gateway.http() as http:
        response = http.get(f"/v1/models/{model}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
