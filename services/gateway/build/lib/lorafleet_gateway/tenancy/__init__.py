"""Tenants, their API keys, the admin API that manages them, and the object-store namespace of each tenant."""
