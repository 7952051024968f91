"""The version, once: pyproject.toml reads it from here (setuptools ``dynamic``), the package exports it as
``branchbox.__version__``, the daemon reports it (``GET /v1/version``)."""

VERSION = "0.1.0"
