"""The in-sandbox agent (``server``, stdlib only) and the host's client of it."""

# What runs inside a sandbox: a microVM guest (and the tests' agents) get copies of exactly these files.
FILES = ("__init__.py", "archive.py", "server.py", "users.py", "vsock.py", "wire.py")
