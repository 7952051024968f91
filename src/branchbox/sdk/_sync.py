# Generated from _async.py by scripts/gen_sync.py (unasync): edit _async.py, then run `make sdk`.
"""The SDK's sandbox object: ``Sandbox`` with ``sbx.commands``, ``sbx.pty`` and ``sbx.git``
(``_sync_commands.py``) and ``sbx.files`` (``_sync_files.py``) on its connections (``_sync_http.py``), and
``Template`` (builds and image imports by the daemon).

These modules are the source of both flavours: ``_sync.py``, ``_sync_commands.py``, ``_sync_files.py`` and
``_sync_http.py`` are generated from them by ``scripts/gen_sync.py`` (unasync, with the name table there) and never
edited by hand; ``tests/test_sdk_generated.py`` fails when a twin differs. What cannot be written once (callbacks
that may be awaitable, blocking work off the event loop, the terminal's reader) lives in ``_concurrency.py`` and
``_pty.py``, one hand-written pair each.

``timeout=`` parameters are the command's or the sandbox's lifetime (E2B naming), not a deadline of the call
itself, hence the ASYNC109 exemptions.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import branchbox.sdk._context as _context
import branchbox.sdk._requests as rq
from branchbox.sdk._concurrency import call, offload
from branchbox.sdk._config import UNSET, ConnectionConfig
from branchbox.sdk._errors import NotFoundError, SandboxError, SandboxNotFoundError
from branchbox.sdk._models import NetworkInfo, PoolInfo, SandboxInfo, SnapshotInfo, TemplateInfo
from branchbox.sdk._sync_commands import Commands, Git, OutputCallback, Pty
from branchbox.sdk._sync_files import Files, _chunks
from branchbox.sdk._sync_http import Timeout, _Http, _oneshot


class Sandbox:
    """A sandbox on a branchbox daemon. Make one with :meth:`create` or :meth:`connect`.

    ``with Sandbox.create() as sbx:`` kills the sandbox at the end of the block.
    """

    def __init__(self, info: SandboxInfo, http: _Http) -> None:
        self._info = info
        self._http = http
        self.commands = Commands(self)
        self.files = Files(self)
        self.pty = Pty(self)
        self.git = Git(self)  # git inside the sandbox: sbx.git.clone(...)

    @property
    def sandbox_id(self) -> str:
        return self._info.sandbox_id

    @property
    def info(self) -> SandboxInfo:
        """What the daemon said at create/connect time (``get_info()`` asks again)."""
        return self._info

    @classmethod
    def create(
        cls,
        template: str = "default",
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
        envs: Mapping[str, str] | None = None,
        cpu: float | None = None,
        memory_mb: int | None = None,
        pids: int | None = None,
        disk_mb: int | None = None,
        backend: str | None = None,
        hostname: str | None = None,
        snapshot: str | None = None,
        allow_internet_access: bool | None = None,
        network: Mapping[str, Any] | None = None,
        on_timeout: str | None = None,
        auto_resume: bool | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        request_timeout: Timeout = UNSET,
    ) -> Sandbox:
        """Create a sandbox. ``timeout`` is its lifetime in seconds (None: the daemon's default); ``on_timeout``
        says what its end does: ``"destroy"`` (the default) or ``"pause"`` (kept paused until resumed or killed;
        a resume starts its timeout again). ``auto_resume`` (with ``"pause"``): the next call that needs the
        sandbox running (a command, a file, a terminal, its ports) resumes it first.

        ``snapshot`` (id or name) restores that snapshot into the new sandbox (its template wins). ``disk_mb``
        limits what the sandbox may write (MiB; None: the daemon's default): past it, writes inside fail with
        "Disk quota exceeded"."""
        http = _Http(ConnectionConfig.resolve(base_url=base_url, api_key=api_key, request_timeout=request_timeout))
        try:
            req = rq.create_sandbox(
                template=template,
                timeout=timeout,
                metadata=metadata,
                envs=envs,
                cpu=cpu,
                memory_mb=memory_mb,
                pids=pids,
                disk_mb=disk_mb,
                backend=backend,
                hostname=hostname,
                snapshot=snapshot,
                allow_internet_access=allow_internet_access,
                network=network,
                on_timeout=on_timeout,
                auto_resume=auto_resume,
            )
            info = SandboxInfo.from_json((http.send(req)).json())
        except BaseException:
            http.close()
            raise
        return cls(info, http)

    @classmethod
    def connect(
        cls,
        sandbox_id: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        request_timeout: Timeout = UNSET,
    ) -> Sandbox:
        """Connect to an existing sandbox by id."""
        http = _Http(ConnectionConfig.resolve(base_url=base_url, api_key=api_key, request_timeout=request_timeout))
        try:
            info = SandboxInfo.from_json((http.send(rq.get_sandbox(sandbox_id))).json())
        except BaseException:
            http.close()
            raise
        return cls(info, http)

    @staticmethod
    def list(
        *,
        metadata: Mapping[str, str] | None = None,
        state: Sequence[str] | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        request_timeout: Timeout = UNSET,
    ) -> list[SandboxInfo]:
        """Sandboxes whose metadata has all the given pairs (and, if given, in one of ``state``)."""
        resp = _oneshot(
            rq.list_sandboxes(metadata=metadata, state=state),
            base_url=base_url,
            api_key=api_key,
            request_timeout=request_timeout,
        )
        return [SandboxInfo.from_json(d) for d in resp.json()]

    @staticmethod
    def templates(
        *, base_url: str | None = None, api_key: str | None = None, request_timeout: Timeout = UNSET
    ) -> builtins.list[TemplateInfo]:
        return [
            TemplateInfo.from_json(d)
            for d in (
                _oneshot(rq.list_templates(), base_url=base_url, api_key=api_key, request_timeout=request_timeout)
            ).json()
        ]

    # -- warm pools (daemon-wide, like list/templates) ------------------------------------------
    @staticmethod
    def pools(
        *, base_url: str | None = None, api_key: str | None = None, request_timeout: Timeout = UNSET
    ) -> builtins.list[PoolInfo]:
        """Statistics of every warm pool on the daemon."""
        return [
            PoolInfo.from_json(d)
            for d in (
                _oneshot(rq.list_pools(), base_url=base_url, api_key=api_key, request_timeout=request_timeout)
            ).json()
        ]

    @staticmethod
    def get_pool(
        template: str,
        *,
        backend: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        request_timeout: Timeout = UNSET,
    ) -> PoolInfo:
        """Statistics of the warm pool of ``template`` on ``backend`` (default: the daemon's; NotFoundError if
        it has none)."""
        return PoolInfo.from_json(
            (
                _oneshot(
                    rq.get_pool(template, backend), base_url=base_url, api_key=api_key, request_timeout=request_timeout
                )
            ).json()
        )

    @staticmethod
    def configure_pool(
        template: str,
        *,
        backend: str | None = None,
        min_size: int | None = None,
        max_size: int | None = None,
        target_free: int | None = None,
        max_memory_mb: int | None = None,
        max_parallel_boots: int | None = None,
        reuse: bool | None = None,
        cpu: float | None = None,
        memory_mb: int | None = None,
        pids: int | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        request_timeout: Timeout = UNSET,
    ) -> PoolInfo:
        """Create or replace the warm pool of ``template`` on ``backend`` (default: the daemon's default
        backend; each backend has pools of its own), live. Settings not given take the daemon's defaults.

        Creates with the pool's ``cpu``/``memory_mb``/``pids`` are served from it.
        """
        settings = {
            "min_size": min_size, "max_size": max_size, "target_free": target_free, "max_memory_mb": max_memory_mb,
            "max_parallel_boots": max_parallel_boots, "reuse": reuse, "cpu": cpu, "memory_mb": memory_mb,
            "pids": pids,
        }  # fmt: skip
        return PoolInfo.from_json(
            (
                _oneshot(
                    rq.configure_pool(template, settings, backend),
                    base_url=base_url,
                    api_key=api_key,
                    request_timeout=request_timeout,
                )
            ).json()
        )

    @staticmethod
    def remove_pool(
        template: str,
        *,
        backend: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        request_timeout: Timeout = UNSET,
    ) -> None:
        """Remove the warm pool of ``template`` on ``backend``; its ready members are destroyed (claimed
        sandboxes stay)."""
        _oneshot(rq.remove_pool(template, backend), base_url=base_url, api_key=api_key, request_timeout=request_timeout)

    # -- snapshots, forks, reset -------------------------------------------------------------------
    def create_snapshot(self, *, name: str | None = None, request_timeout: Timeout = UNSET) -> SnapshotInfo:
        """Capture the sandbox's files (frozen meanwhile, then thawed) into an immutable snapshot."""
        resp = self._http.send(rq.create_snapshot(self.sandbox_id, name), request_timeout=request_timeout)
        return SnapshotInfo.from_json(resp.json())

    def fork(self, *, count: int = 1, request_timeout: Timeout = UNSET) -> builtins.list[Sandbox | SandboxError]:
        """``count`` new sandboxes continuing from this one's current files (not its processes, on containers).

        One entry per child, in order: a sandbox object or the exception that child met."""
        body = (self._http.send(rq.fork(self.sandbox_id, count), request_timeout=request_timeout)).json()
        return [
            r if isinstance(r, SandboxError) else Sandbox(SandboxInfo.from_json(r), _Http(self._http.config))
            for r in rq.parse_fork(body)
        ]

    def reset(self, snapshot: str | None = None, *, request_timeout: Timeout = UNSET) -> SandboxInfo:
        """Back to its template (or to ``snapshot``): processes, files and /tmp are discarded; same id."""
        resp = self._http.send(rq.reset(self.sandbox_id, snapshot), request_timeout=request_timeout)
        self._info = SandboxInfo.from_json(resp.json())
        return self._info

    @staticmethod
    def snapshots(
        *, base_url: str | None = None, api_key: str | None = None, request_timeout: Timeout = UNSET
    ) -> builtins.list[SnapshotInfo]:
        return [
            SnapshotInfo.from_json(d)
            for d in (
                _oneshot(rq.list_snapshots(), base_url=base_url, api_key=api_key, request_timeout=request_timeout)
            ).json()
        ]

    @staticmethod
    def get_snapshot(
        snapshot: str, *, base_url: str | None = None, api_key: str | None = None, request_timeout: Timeout = UNSET
    ) -> SnapshotInfo:
        return SnapshotInfo.from_json(
            (
                _oneshot(rq.get_snapshot(snapshot), base_url=base_url, api_key=api_key, request_timeout=request_timeout)
            ).json()
        )

    @staticmethod
    def delete_snapshot(
        snapshot: str, *, base_url: str | None = None, api_key: str | None = None, request_timeout: Timeout = UNSET
    ) -> None:
        """Delete a snapshot (sandboxes made from it keep working)."""
        _oneshot(rq.delete_snapshot(snapshot), base_url=base_url, api_key=api_key, request_timeout=request_timeout)

    def get_info(self, *, request_timeout: Timeout = UNSET) -> SandboxInfo:
        resp = self._http.send(rq.get_sandbox(self.sandbox_id), request_timeout=request_timeout)
        self._info = SandboxInfo.from_json(resp.json())
        return self._info

    def is_running(self) -> bool:
        try:
            return (self.get_info()).state == "running"
        except NotFoundError:
            return False

    def get_network(self, *, request_timeout: Timeout = UNSET) -> NetworkInfo:
        """The sandbox's address and egress policy."""
        resp = self._http.send(rq.get_network(self.sandbox_id), request_timeout=request_timeout)
        return NetworkInfo.from_json(resp.json())

    def update_network(self, patch: Mapping[str, Any], *, request_timeout: Timeout = UNSET) -> NetworkInfo:
        """Change the egress policy live: keys given (``allow_out``, ``deny_out``, ``allow_internet_access``)
        replace the current values, absent keys stay. E.g. ``update_network({"deny_out": []})``."""
        resp = self._http.send(rq.update_network(self.sandbox_id, patch), request_timeout=request_timeout)
        return NetworkInfo.from_json(resp.json())

    def get_host(self, port: int) -> str:
        """A URL served by the daemon that reaches ``port`` inside the sandbox (HTTP; use ws:// for WebSocket).

        When the client has an API key the URL carries the sandbox's port token, so it works without one."""
        token = None
        if self._http.config.api_key:
            token = (self.get_network()).port_token
        return rq.host_url(self._http.config.base_url, self.sandbox_id, port, token)

    def set_timeout(self, timeout: float | None, *, request_timeout: Timeout = UNSET) -> SandboxInfo:
        """The sandbox now lives ``timeout`` more seconds (None: no timeout)."""
        resp = self._http.send(rq.set_timeout(self.sandbox_id, timeout), request_timeout=request_timeout)
        self._info = SandboxInfo.from_json(resp.json())
        return self._info

    def pause(self, *, request_timeout: Timeout = UNSET) -> SandboxInfo:
        resp = self._http.send(rq.pause(self.sandbox_id), request_timeout=request_timeout)
        self._info = SandboxInfo.from_json(resp.json())
        return self._info

    def resume(self, *, request_timeout: Timeout = UNSET) -> SandboxInfo:
        resp = self._http.send(rq.resume(self.sandbox_id), request_timeout=request_timeout)
        self._info = SandboxInfo.from_json(resp.json())
        return self._info

    def kill(self, *, request_timeout: Timeout = UNSET) -> bool:
        """Destroy the sandbox; False if it was already gone."""
        try:
            self._http.send(rq.kill_sandbox(self.sandbox_id), request_timeout=request_timeout)
        except SandboxNotFoundError:
            return False
        return True

    def close(self) -> None:
        """Release HTTP connections (the sandbox keeps running). Idle keep-alive connections stay pooled per
        daemon for the next sandbox object (sync: for the whole process; async: for the event loop, until its
        last user closes)."""
        self._http.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.kill()
        except SandboxError:
            pass
        finally:
            self.close()

    def __repr__(self) -> str:
        return f"Sandbox(sandbox_id={self.sandbox_id!r}, template={self._info.template_id!r})"


class Template:
    """Templates built by the daemon: ``Template.build(context, name=...)`` (a Dockerfile build)."""

    @staticmethod
    def build(
        context: str | Path,
        *,
        name: str,
        dockerfile: str | Path | None = None,
        build_args: Mapping[str, str] | None = None,
        on_log: OutputCallback | None = None,
        on_event: Callable[[dict[str, Any]], object] | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
    ) -> TemplateInfo:
        """Build template ``name`` from a Dockerfile (default ``CONTEXT/Dockerfile``) and the directory
        ``context`` (sent as a tar, minus what its ``.dockerignore`` excludes; symlinks are sent as links).

        ``build_args``: values of the Dockerfile's ARGs. ``on_log`` gets the output of RUN steps as it comes;
        ``on_event`` every event of the build log (step, cached/running, log, commit, built: docs/api.md). A
        failed build raises the daemon's error (``invalid_template_spec`` for a bad Dockerfile,
        ``template_not_found`` for an unknown FROM, ``template_build_failed`` with the step's line, exit code
        and last output lines for a failing RUN) and leaves no template behind."""
        packed, inside = offload(_context.pack_context, context, dockerfile)
        http = _Http(ConnectionConfig.resolve(base_url=base_url, api_key=api_key))
        try:
            with packed:
                req = rq.build_template(name, inside, build_args)
                with http.stream(req, content=_chunks(packed)) as resp:
                    for line in resp.iter_lines():
                        if not line.strip():
                            continue
                        event = rq.build_event(line.encode())
                        call(on_event, event)
                        if event.get("type") == "log":
                            call(on_log, str(event.get("data", "")))
                        elif event.get("type") == "done":
                            return TemplateInfo.from_json(event["template"])
        finally:
            http.close()
        raise SandboxError("the build log ended without a result: the daemon stopped during the build")

    @staticmethod
    def import_image(
        reference: str,
        *,
        name: str,
        username: str | None = None,
        password: str | None = None,
        insecure: bool = False,
        on_event: Callable[[dict[str, Any]], object] | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
    ) -> TemplateInfo:
        """Import template ``name`` from a container image in a registry (``docker://HOST/REPO:TAG``), pulled by
        the daemon. ``username``/``password``: registry credentials; ``insecure``: plain HTTP or unverified TLS.
        ``on_event`` gets each progress event (``step`` fetch/verify/unpack/cached, ``message``, ``fraction``).
        Errors: ``invalid_image_reference`` (also a registry in a blocked range), ``image_not_found``,
        ``registry_auth_failed``, ``registry_unreachable``, ``unsupported_image``, ``image_digest_mismatch``,
        ``unsafe_image``, ``image_too_large``; a failed import leaves no template behind."""
        http = _Http(ConnectionConfig.resolve(base_url=base_url, api_key=api_key))
        try:
            req = rq.import_template(reference, name, username=username, password=password, insecure=insecure)
            with http.stream(req) as resp:
                for line in resp.iter_lines():
                    if not line.strip():
                        continue
                    event = rq.build_event(line.encode())
                    call(on_event, event)
                    if event.get("type") == "done":
                        return TemplateInfo.from_json(event["template"])
        finally:
            http.close()
        raise SandboxError("the import log ended without a result: the daemon stopped during the import")
