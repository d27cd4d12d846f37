"""/v1/lorafleet/adapters (what a tenant's adapters are, where they are loaded, their traffic) and the
admin-only /v1/admin/adapters/{id}/load|unload."""
