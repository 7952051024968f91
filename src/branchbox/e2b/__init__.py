"""An E2B-compatible API on the daemon's port: the unmodified ``e2b`` SDK runs against branchbox with
``E2B_API_URL`` and ``E2B_SANDBOX_URL`` set to the daemon's address and ``E2B_API_KEY`` to a branchbox key
(docs/e2b.md). Everything maps onto the Manager and the agent protocol; the ASGI entry is
:class:`branchbox.e2b.gateway.E2BGateway`."""
