"""The ``branchbox`` command line (click + rich), over the SDK; entry point ``branchbox.cli.main:main``."""
