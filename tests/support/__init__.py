"""Test support: processes, clients, proxies and waiting, shared by every test module."""
