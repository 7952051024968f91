"""``python -m branchbox.cli``."""

from branchbox.cli.main import main

main()
