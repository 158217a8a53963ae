"""Persistence: tables, the async engine, and the store used by the API and the daemon."""
