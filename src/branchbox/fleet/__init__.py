"""A fleet of branchbox daemons on Ray (``pip install 'branchbox[fleet]'``): a registry of nodes that allocates
in microseconds (:mod:`.registry`, pure Python), a node agent per host (:mod:`.node`), a controller that serves
the daemon's HTTP API in front of them (:mod:`.controller`, :mod:`.proxy`). See docs/fleet.md."""
