"""The in-sandbox agent (stdlib only): ``server`` (entry points), ``protocol`` (frames and dispatch),
``handlers`` (the methods), ``flow`` (flow-controlled calls), ``watch`` (directory watches by inotify),
``supervise`` (processes), ``spawn`` (starting one), ``shell``, ``errors``, ``chardev`` (virtio-serial) and
``vsock`` (transports), ``archive``, ``users``, and ``wire`` (the framing, shared with the host's client in
:mod:`branchbox.agentclient`)."""

# What runs inside a sandbox: a microVM guest (and the tests' agents) get copies of exactly these files.
FILES = (
    "__init__.py",
    "archive.py",
    "chardev.py",
    "errors.py",
    "flow.py",
    "handlers.py",
    "protocol.py",
    "server.py",
    "shell.py",
    "spawn.py",
    "supervise.py",
    "users.py",
    "vsock.py",
    "watch.py",
    "wire.py",
)
