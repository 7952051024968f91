"""The host's client of the in-sandbox agent (the guest side is :mod:`branchbox.agent`): one connection per
sandbox, any number of concurrent calls (``client``), streamed processes (``process``)."""
