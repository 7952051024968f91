"""Services built above core and added to a Manager (``Manager.add_service``; the git workspaces are one, added by
the daemon): started after the Manager's recovery and before its warm pools, closed before its warm pools and
sandboxes in the reverse order of adding; added only before the start. And the HTTP app's workspace routes reach
the service handed to ``create_app`` (docs/architecture.md, "Layers")."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from branchbox import errors
from branchbox.api import create_app
from branchbox.api.settings import ApiSettings
from branchbox.core.manager import Manager
from branchbox.core.pool import PoolConfig
from branchbox.models import TemplateInfo
from branchbox.workspaces.service import WorkspaceService
from tests.conftest import make_settings

pytestmark = [pytest.mark.root, pytest.mark.template]


class Recorder:
    """A service that writes down when it runs and what it saw of the Manager then."""

    def __init__(self, name: str, m: Manager, log: list[str], sandbox_id: str, *, fail: bool = False) -> None:
        self.name, self.m, self.log, self.sandbox_id, self.fail = name, m, log, sandbox_id, fail

    async def _sandbox_answers(self) -> str:
        r = await self.m.exec(self.sandbox_id, ["echo", "up"], timeout=60)
        return r.stdout.decode().strip()

    async def start(self) -> None:
        self.log.append(f"{self.name}.start")
        if self.fail:
            raise errors.BadRequestError(f"{self.name} cannot start")
        # after the recovery: the sandbox that outlived the last Manager is attached again and answers
        self.log.append(f"{self.name}.start sees sandbox {await self._sandbox_answers()}")
        # before the warm pools: the exec above gave a started pool time to begin a boot; this one began none
        stats = self.m.pool_statistics()
        self.log.append(f"{self.name}.start sees pool boots {sum(s.boots + s.booting for s in stats)}")

    async def aclose(self) -> None:
        self.log.append(f"{self.name}.close")
        if not self.fail:  # before the sandboxes: the Manager destroys them (keep_sandboxes_on_shutdown=False) after
            self.log.append(f"{self.name}.close sees sandbox {await self._sandbox_answers()}")


def _cgroups_left(cgroup_parent: str) -> list[Path]:
    return list(Path("/sys/fs/cgroup").glob(f"*/{cgroup_parent}"))


async def test_services_start_after_the_recovery_and_close_first(default_template: TemplateInfo,
                                                                 data_dir: Path) -> None:  # fmt: skip
    async with Manager.open(make_settings(data_dir, keep_sandboxes_on_shutdown=True)) as first:
        sid = (await first.create(template="default")).id  # keeps running after this Manager closed
    pool = PoolConfig(template="default", min_size=1, target_free=1, max_size=1, memory_mb=256)
    settings = make_settings(data_dir, pools=(pool,), keep_sandboxes_on_shutdown=False)
    log: list[str] = []
    m = Manager(settings)
    a = Recorder("a", m, log, sid)
    assert m.add_service(a) is a
    m.add_service(Recorder("b", m, log, sid))
    async with m:
        assert log == ["a.start", "a.start sees sandbox up", "a.start sees pool boots 0",
                       "b.start", "b.start sees sandbox up", "b.start sees pool boots 0"]  # fmt: skip
        with pytest.raises(errors.InvalidStateError, match="before the Manager starts"):
            m.add_service(Recorder("c", m, log, sid))
        log.clear()
    assert log == ["b.close", "b.close sees sandbox up", "a.close", "a.close sees sandbox up"]
    assert not _cgroups_left(settings.cgroup_parent)  # and then the Manager destroyed its sandboxes


async def test_a_service_that_fails_to_start_fails_the_start_and_releases_everything(
    default_template: TemplateInfo, data_dir: Path
) -> None:
    async with Manager.open(make_settings(data_dir, keep_sandboxes_on_shutdown=True)) as first:
        sid = (await first.create(template="default")).id
    settings = make_settings(data_dir)  # keep_sandboxes_on_shutdown=False
    log: list[str] = []
    m = Manager(settings)
    m.add_service(Recorder("a", m, log, sid))
    m.add_service(Recorder("bad", m, log, sid, fail=True))
    with pytest.raises(errors.BadRequestError, match="bad cannot start"):
        async with m:
            raise AssertionError("the Manager started")
    assert log == ["a.start", "a.start sees sandbox up", "a.start sees pool boots 0", "bad.start",
                   "bad.close", "a.close", "a.close sees sandbox up"]  # fmt: skip
    assert not _cgroups_left(settings.cgroup_parent)


async def test_the_apps_workspace_routes_use_the_service_it_was_given(default_template: TemplateInfo,
                                                                      data_dir: Path) -> None:  # fmt: skip
    m = Manager(make_settings(data_dir))
    workspaces = m.add_service(WorkspaceService(m))
    async with m:
        for app, status in ((create_app(m, ApiSettings(), workspaces=workspaces), 200),
                            (create_app(m, ApiSettings()), 501)):  # fmt: skip
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
                r = await c.get("/v1/workspaces")
                assert r.status_code == status, r.text
                if status == 200:
                    assert r.json() == []
                    r = await c.get("/v1/workspaces/ws-0123456789abcdef")
                    assert r.status_code == 404 and r.json()["error"]["code"] == "workspace_not_found"
                else:  # an app made without the service says so, and what to pass
                    assert r.json()["error"]["code"] == "not_supported"
                    assert "create_app(manager, workspaces=" in r.json()["error"]["message"]
