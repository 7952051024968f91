"""Shared fixtures: the default template (built once, cached across runs), Managers on fresh data dirs, and a
check that tests leave no processes, cgroups or mounts behind."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from branchbox.core.models import TemplateInfo
from branchbox.core.settings import ManagerSettings

TEST_ROOT = Path(os.environ.get("BRANCHBOX_TEST_ROOT", "/var/tmp/branchbox-test"))


def templates_dir() -> Path:
    return Path(os.environ.get("BRANCHBOX_TEST_TEMPLATES") or TEST_ROOT / "templates")


@pytest.fixture(scope="session")
def default_template() -> TemplateInfo:
    """The default template (Debian 12 minbase + python3, git, ...). Built once (~1 min), then a cache hit."""
    from branchbox.images.store import TemplateStore

    store = TemplateStore(templates_dir())
    return asyncio.run(store.ensure_default())


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A fresh data dir reachable by the sandbox uid range (tmp_path is 0700 and would not be)."""
    TEST_ROOT.mkdir(parents=True, exist_ok=True)
    os.chmod(TEST_ROOT, 0o711)
    d = TEST_ROOT / f"data-{secrets.token_hex(4)}"
    d.mkdir(mode=0o711)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def make_settings(data_dir: Path, **overrides: object) -> ManagerSettings:
    kw: dict[str, object] = {
        "data_dir": data_dir,
        "templates_dir": templates_dir(),
        "cgroup_parent": f"bbtest-{data_dir.name}",
        "keep_sandboxes_on_shutdown": False,
    }
    kw.update(overrides)
    return ManagerSettings(**kw)  # type: ignore[arg-type]


@pytest.fixture
async def manager(default_template: TemplateInfo, data_dir: Path) -> AsyncIterator[object]:
    from branchbox.core.manager import Manager

    async with Manager.open(make_settings(data_dir)) as m:
        yield m
