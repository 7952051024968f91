"""A real fleet on this machine: a ``ray.cluster_utils.Cluster`` of three nodes on 127.0.0.1 (tuned health
checks), a real ``branchbox serve --fleet`` daemon per Ray node (own data dir, port, cgroup parent, subnet, as
DaemonProc does) and a ``branchbox fleet serve`` controller subprocess. Everything is stopped and killed (only what
these fixtures started) even when a test fails."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from branchbox.sdk._wire import close_shared
from tests.conftest import DaemonProc, cli_env, free_port, new_data_dir

# node loss seen in ~1-1.5 s instead of Ray's default ~15 s (measured, /work/shared/MACHINE.md's numbers)
HEALTH = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}
MEMORY_MB = 4096  # what each node offers sandboxes (co-located nodes would each report the whole host)


def wait_for(check: Any, what: str, timeout: float = 60.0) -> Any:
    """Poll ``check()`` until it returns something truthy: separate processes, no event to wait on."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


class Controller:
    def __init__(self, address: str, policy: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        argv = [
            sys.executable, "-m", "branchbox.cli", "fleet", "serve", "--address", address, "--port", str(self.port),
            "--policy", policy, "--stale-after", "10", "--placement-timeout", "3",
        ]  # fmt: skip
        # the heartbeat timeout is 10 s here, not the default 3: at a load of ~40 on these 2 cores an agent's
        # pushes stall for seconds and healthy nodes flapped; the node the test kills is seen lost by Ray's
        # health checks (tuned above) within ~2-3 s, which is what the test exercises
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(argv, env=cli_env(), stdout=f, stderr=f, start_new_session=True)

    def nodes(self) -> dict[str, dict[str, Any]]:
        try:
            resp = httpx.get(self.url + "/v1/fleet/nodes", timeout=5)
        except httpx.TransportError:
            return {}
        return {n["node"]: n for n in resp.json()} if resp.status_code == 200 else {}

    def wait_ready(self, names: list[str]) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, self.log()
            got = self.nodes()
            return all(got.get(n, {}).get("state") == "ready" for n in names)

        wait_for(ready, f"nodes {names} ready on the controller", 240)  # a loaded host starts Ray workers slowly

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text()[-6000:]
        return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@dataclass
class Fleet:
    cluster: Any
    ray_nodes: list[Any]  # [head, worker1, worker2]
    daemons: list[DaemonProc]
    names: list[str]
    logs: Path
    controller: Controller | None = None
    extra: list[Any] = field(default_factory=list)

    def start_controller(self, policy: str = "spread") -> Controller:
        if self.controller is not None:
            self.controller.stop()
        self.controller = Controller(self.cluster.address, policy, self.logs / f"controller-{policy}.log")
        self.controller.wait_ready(self.names)
        return self.controller

    def holder(self, sandbox_id: str) -> str:
        """Which daemon holds the sandbox, asked of the daemons themselves (not of the controller)."""
        found = [
            name
            for name, d in zip(self.names, self.daemons, strict=True)
            if d.proc is not None
            and d.proc.poll() is None
            and httpx.get(f"{d.url}/v1/sandboxes/{sandbox_id}", timeout=10).status_code == 200
        ]
        assert len(found) == 1, (sandbox_id, found)
        return found[0]


def daemon_env(address: str, name: str, ray_node_id: str, slot: int) -> dict[str, str]:
    return {
        "BRANCHBOX_FLEET_ADDRESS": address,
        "BRANCHBOX_FLEET_NAME": name,
        "BRANCHBOX_FLEET_RAY_NODE_ID": ray_node_id,
        "BRANCHBOX_FLEET_MEMORY_MB": str(MEMORY_MB),
        "BRANCHBOX_FLEET_CPU": "4",
        "BRANCHBOX_FLEET_LABELS": f"slot={slot}",
    }


def fleet_table(env: dict[str, str]) -> str:
    """The same join settings as a config file's ``[fleet]`` table (TOML)."""
    labels = ", ".join(f'{k} = "{v}"' for k, v in (p.split("=") for p in env["BRANCHBOX_FLEET_LABELS"].split(",")))
    return (
        "[fleet]\n"
        f'address = "{env["BRANCHBOX_FLEET_ADDRESS"]}"\n'
        f'name = "{env["BRANCHBOX_FLEET_NAME"]}"\n'
        f'ray_node_id = "{env["BRANCHBOX_FLEET_RAY_NODE_ID"]}"\n'
        f"memory_mb = {env['BRANCHBOX_FLEET_MEMORY_MB']}\n"
        f"cpu = {env['BRANCHBOX_FLEET_CPU']}\n"
        f"labels = {{ {labels} }}\n"
    )


@pytest.fixture(scope="module")
def fleet(default_template: Any) -> Iterator[Fleet]:
    pytest.importorskip("ray", reason="the fleet tests need Ray: pip install 'branchbox[fleet]' (make test does)")
    from ray.cluster_utils import Cluster

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node on 127.0.0.1
    logs = new_data_dir()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "_system_config": HEALTH, "include_dashboard": False},
    )
    daemons: list[DaemonProc] = []
    fl = Fleet(cluster, [cluster.head_node], daemons, [], logs)
    try:
        fl.ray_nodes += [cluster.add_node(num_cpus=1) for _ in range(2)]
        for i, node in enumerate(fl.ray_nodes):
            name = f"n{i}"
            env = daemon_env(cluster.address, name, node.node_id, i)
            # keep: sandboxes outlive a daemon restart (the rejoin test restarts one); the last node joins with
            # its config file's [fleet] table instead of the environment, as a user's config would
            conf = fleet_table(env) if i == 2 else None
            d = DaemonProc(new_data_dir(), keep=True, env={} if conf else env, config=conf)
            daemons.append(d)
            fl.names.append(name)
            d.start()
        fl.start_controller()
        yield fl
    finally:
        if fl.controller is not None:
            print(f"--- controller log ---\n{fl.controller.log()}")
            fl.controller.stop()
        for d in daemons:
            print(f"--- the log of daemon {d.data_dir} ---\n{d.log()}")
            with contextlib.suppress(Exception):
                d.cleanup()
        cluster.shutdown()
        shutil.rmtree(logs, ignore_errors=True)
        close_shared()  # the SDK's pooled keep-alive connections to the controllers that are gone now
