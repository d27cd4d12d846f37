"""Where a tenant's objects live in the shared object store, and how its model ids map to adapter names.

A tenant sees model ids; the store holds adapters named ``<tenant>/<model id>``.
The gateway always puts the caller's tenant in front, so no model id a caller
can send names another tenant's adapter: isolation is by construction, not by
a check that could be forgotten. Files live under ``files/<tenant>/`` and job
manifests under ``manifests/<tenant>/`` for the same reason.

Adapters published straight into the store without a namespace (single-segment
names, e.g. by an operator with ``publish_adapter``) belong to the built-in
"default" tenant, the one the admin key acts as; they are visible to nobody else.
"""

from __future__ import annotations

from lorafleet_gateway.tenancy.keys import DEFAULT_TENANT


def adapter_names(tenant: str, model: str) -> list[str]:
    """Store names a tenant's model id may refer to, in order of preference."""
    names = [f"{tenant}/{model}"]
    if tenant == DEFAULT_TENANT and "/" not in model:
        names.append(model)  # un-namespaced legacy adapter
    return names


def model_id(tenant: str, adapter_name: str) -> str | None:
    """The id under which ``tenant`` sees a stored adapter; None if it is not the tenant's."""
    prefix = f"{tenant}/"
    if adapter_name.startswith(prefix):
        return adapter_name[len(prefix) :]
    if tenant == DEFAULT_TENANT and "/" not in adapter_name:
        return adapter_name
    return None


def adapter_list_prefix(tenant: str) -> str:
    """The store prefix under which a tenant's namespaced adapters live."""
    return f"adapters/{tenant}/"


def files_prefix(tenant: str) -> str:
    return f"files/{tenant}/"


def manifests_prefix(tenant: str) -> str:
    return f"manifests/{tenant}/"
