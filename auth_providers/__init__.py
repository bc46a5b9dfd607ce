"""Built-in auth providers: `local` (SQLite users and ACLs) and `none` (allow all).

Each module implements `gateway.providers.AuthProvider`; third-party providers
register through the `polygate.auth_providers` entry-point group instead.
"""
