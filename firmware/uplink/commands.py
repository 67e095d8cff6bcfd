"""Back-office commands: ``cmd/<name>`` in, ``cmd/<name>/result`` out.

A command is ``{"request_id": str, "args": {...}}`` (:func:`parse_command`; a malformed one is
rejected with a logged reason and no reply, since it has no usable request id). Commands run
on :class:`CommandLanes` threads, one per command name, never in a paho callback and never on
the uplink worker: a badge list that takes ten seconds to load must not hold up PUBACKs,
keepalives or an ``unlock`` behind it. The result is ``{"request_id", "ok": true, "result"}``
or ``{"request_id", "ok": false, "error"}``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from firmware.exceptions import BadMessageError, CommandError, CredentialListError
from firmware.journal.events import NewEvent, Receipt
from firmware.policy.badges import BadgeList, load_badges
from firmware.policy.policy import Policy
from firmware.uplink.topics import loads

log = logging.getLogger(__name__)

MAX_REQUEST_ID = 128
LANE_DEPTH = 4
"""Commands of one name waiting at most; more are answered "busy"."""
MIN_PULSE_S = 0.1
"""The shortest remote unlock, seconds (as ``gpio.pulse_s``): a shorter one is no unlock
anybody could use, yet would be journaled as one."""
MAX_PULSE_S = 60.0
LANE_POLL_S = 0.2
"""How often an idle lane checks whether the reader is stopping, seconds."""


@dataclass(frozen=True, slots=True)
class Command:
    """A parsed command: ``name`` (from the topic), ``request_id``, ``args``."""

    name: str
    request_id: str
    args: dict[str, Any]


Handler = Callable[[Command], dict[str, Any]]
"""Runs a command; returns the ``result`` object, raises CommandError with the reason."""
Reply = Callable[[Command, dict[str, Any]], None]
"""Receives (command, result payload) to publish; must not block."""


def parse_command(name: str, payload: bytes) -> Command:
    """A command from its topic name and payload. Raises BadMessageError (oversized, not UTF-8
    JSON, not an object, no usable ``request_id``, ``args`` not an object)."""
    obj = loads(payload)
    rid = obj.get("request_id")
    if not isinstance(rid, str) or not rid or len(rid) > MAX_REQUEST_ID or not rid.isprintable():
        raise BadMessageError(f"request_id must be 1-{MAX_REQUEST_ID} printable characters")
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise BadMessageError("args must be a JSON object")
    return Command(name, rid, args)


def result_payload(
    cmd: Command, *, result: dict[str, Any] | None = None, error: str | None = None
) -> dict[str, Any]:
    """The result message: ok with ``result``, or not ok with ``error``."""
    if error is not None:
        return {"request_id": cmd.request_id, "ok": False, "error": error}
    return {"request_id": cmd.request_id, "ok": True, "result": result or {}}


class CommandLanes:
    """Runs commands on one thread per command name ("qrgate-cmd-<name>", started on first
    use), in arrival order within a name.

    ``handlers``: command name -> :data:`Handler`. ``reply``: gets every result. A handler's
    CommandError becomes ``ok: false`` with its message; any other exception is logged and
    answered "internal error". At most ``depth`` commands of one name wait; more are answered
    "busy" at once.
    """

    def __init__(
        self, handlers: Mapping[str, Handler], reply: Reply, *, depth: int = LANE_DEPTH
    ) -> None:
        self.handlers = dict(handlers)
        self._reply = reply
        self._depth = depth
        self._lock = threading.Lock()
        self._lanes: dict[str, tuple[queue.Queue[Command], threading.Thread]] = {}
        self._stopped = False

    def submit(self, cmd: Command) -> None:
        """Queue ``cmd`` for its lane; answers at once when it cannot run (unknown, busy,
        stopped)."""
        handler = self.handlers.get(cmd.name)
        if handler is None:
            self._reply(cmd, result_payload(cmd, error=f"unknown command {cmd.name!r}"))
            return
        with self._lock:
            if self._stopped:
                lane = None
            else:
                lane = self._lanes.get(cmd.name)
                if lane is None:
                    q: queue.Queue[Command] = queue.Queue(self._depth)
                    t = threading.Thread(
                        target=self._run,
                        args=(q, handler),
                        name=f"qrgate-cmd-{cmd.name}",
                        daemon=True,
                    )
                    lane = (q, t)
                    self._lanes[cmd.name] = lane
                    t.start()
        if lane is None:
            self._reply(cmd, result_payload(cmd, error="the reader is stopping"))
            return
        try:
            lane[0].put_nowait(cmd)
        except queue.Full:
            self._reply(
                cmd,
                result_payload(
                    cmd, error=f"busy: {self._depth} {cmd.name} commands already waiting"
                ),
            )

    def stop(self, timeout_s: float = 2.0) -> bool:
        """Refuse new commands, answer queued ones "the reader is stopping", and wait for the
        lanes at most ``timeout_s`` seconds in all; True if every lane ended (a handler still
        running after that finishes on its daemon thread, its result unpublished)."""
        with self._lock:
            self._stopped = True
            lanes = list(self._lanes.values())
        end = time.monotonic() + timeout_s
        for _, t in lanes:
            t.join(max(0.0, end - time.monotonic()))
        alive = [t.name for _, t in lanes if t.is_alive()]
        if alive:
            log.warning("command threads still running at stop: %s", ", ".join(alive))
        return not alive

    def _run(self, q: queue.Queue[Command], handler: Handler) -> None:
        while True:
            try:
                cmd = q.get(timeout=LANE_POLL_S)
            except queue.Empty:
                if self._stopped:
                    return
                continue
            if self._stopped:
                payload = result_payload(cmd, error="the reader is stopping")
            else:
                payload = self._execute(handler, cmd)
            try:
                self._reply(cmd, payload)
            except Exception:
                log.exception("cannot hand over the result of %s", cmd.name)

    @staticmethod
    def _execute(handler: Handler, cmd: Command) -> dict[str, Any]:
        try:
            return result_payload(cmd, result=handler(cmd))
        except CommandError as e:
            log.warning("command %s %s refused: %s", cmd.name, cmd.request_id, e)
            return result_payload(cmd, error=str(e))
        except Exception as e:
            log.exception("command %s %s failed", cmd.name, cmd.request_id)
            return result_payload(cmd, error=f"internal error: {type(e).__name__}")


class EventJournal(Protocol):
    """What the unlock command needs of the journal."""

    def append(self, event: NewEvent) -> Receipt:
        """Store ``event``; return once it is durable."""
        ...


class Door(Protocol):
    """What the unlock command needs of the feedback devices."""

    def granted(self, pulse_s: float | None = None) -> int:
        """Unlock now; the monotonic ns the relay switched, or -1 when it could not."""
        ...


def unlock_handler(
    *,
    journal: EventJournal,
    door: Door,
    door_name: str,
    direction: str,
    clock_synced: Callable[[], bool],
) -> Handler:
    """``unlock``: journal a "command" event, then pulse the relay through the running
    reader's feedback (the same order as a scan: what happened is stored before it happens).

    ``args.pulse_s`` (optional): seconds unlocked, 0.1 <= x <= 60; the relay's default otherwise.
    Result ``{"seq", "event_id"}`` of the journaled event. Raises CommandError for a bad
    ``pulse_s`` or when the relay could not be driven (the door stays locked).
    """

    def run(cmd: Command) -> dict[str, Any]:
        pulse = cmd.args.get("pulse_s")
        if pulse is not None and (
            isinstance(pulse, bool)
            or not isinstance(pulse, (int, float))
            or not math.isfinite(pulse)
            or not MIN_PULSE_S <= pulse <= MAX_PULSE_S
        ):
            raise CommandError(
                f"args.pulse_s must be seconds, {MIN_PULSE_S:g} <= x <= {MAX_PULSE_S:g}"
            )
        receipt = journal.append(
            NewEvent(
                kind="command",
                wall_ns=time.time_ns(),
                clock_synced=bool(clock_synced()),
                mono_ns=time.monotonic_ns(),
                door=door_name,
                direction=direction,
                decision="granted",
                reason="remote_unlock",
                detail={
                    "command": "unlock",
                    "request_id": cmd.request_id,
                    **({"pulse_s": float(pulse)} if pulse is not None else {}),
                },
            )
        )
        if door.granted(None if pulse is None else float(pulse)) < 0:
            raise CommandError("the door relay could not be driven: the door stays locked")
        log.info("remote unlock %s (seq %d)", cmd.request_id, receipt.seq)
        return {"seq": receipt.seq, "event_id": receipt.event_id}

    return run


def reload_badges_handler(
    *, policy: Policy, path: Path | None, load: Callable[[Path], BadgeList] = load_badges
) -> Handler:
    """``reload_config``: read the badge list at ``path`` again and put it in force.

    A list that does not load is refused with the reason (CommandError); the reader keeps
    deciding with its last good list. The swap replaces the policy's credential set in one
    assignment, so a scan sees the old list or the new one, never a mix. While a signed
    credential snapshot is in force the local file is not read (CommandError: publish a new
    snapshot instead), so a stale file never undoes a revocation. Result
    ``{"version", "allow", "deny"}``.
    """

    def run(cmd: Command) -> dict[str, Any]:
        if path is None:
            raise CommandError("no badge list configured (policy.badges)")
        current = policy.credentials
        if current.source == "snapshot":
            raise CommandError(
                f"credential snapshot version {current.version} is in force: "
                "publish a new snapshot instead of reloading the local badge list"
            )
        try:
            badges = load(path)
        except CredentialListError as e:
            raise CommandError(str(e)) from e
        policy.credentials = dataclasses.replace(current, badges=badges)
        log.info(
            "badge list %s reloaded: version %d, %d allowed, %d denied",
            path,
            badges.version,
            len(badges.allow),
            len(badges.deny),
        )
        return {"version": badges.version, "allow": len(badges.allow), "deny": len(badges.deny)}

    return run
