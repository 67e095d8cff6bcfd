"""``qrgate demo``: the real daemon on an embedded default, with a live terminal view, its MQTT
uplink and the reference back office.

Writes a site key, a pass issuer key and its trust list, a badge list (the demo's allowed
badge on the allowlist, its revoked badge on the denylist), a check-in reader's config and,
unless another reel or a webcam is given, a generated camera-like reel (badges, an ID card,
and passes signed for this run) into a state folder. The reader treats the host clock as
synced, so the passes are judged as a synced reader judges them. Then it starts a private
mosquitto on a free loopback port (:class:`~firmware.demo.broker.LocalBroker`, its files in
``<state>/broker``) and the real ``qrgate ingest`` as a process of its own, storing into
``<state>/backoffice.db``; runs
the same :func:`build_reader` as ``qrgate run`` on gpiozero mock pins with ``[uplink]``
pointed at that broker; and prints each verdict with the LED, buzzer and relay state, the
uplink's state and backlog, and what the back office stored and acknowledged. Without
mosquitto the reader runs offline and the view shows its backlog growing.

At the end (the reel is over, or Ctrl-C) it waits briefly for the back office to acknowledge
everything, prints a summary and the fleet table, stops the reader, then ``qrgate ingest``,
then mosquitto, and prints the commands that read what was stored.

The parts, in the order the data flows: :mod:`firmware.demo.prepare` writes the state folder,
:mod:`firmware.demo.backoffice` runs the broker and ``qrgate ingest`` (and, at the end, the
drain and the fleet table), :mod:`firmware.demo.view` prints what the terminal shows, and
:mod:`firmware.demo.signals` turns Ctrl-C into a clean stop; this module wires them together.
"""

from __future__ import annotations

import datetime as dt
from contextlib import ExitStack
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from drivers.exceptions import DriverError
from firmware.config import load_config
from firmware.daemon import Reader, build_reader
from firmware.demo.backoffice import BACKOFFICE_DB, drain, print_fleet, start_broker, start_ingest
from firmware.demo.broker import HOST, free_port
from firmware.demo.prepare import DEVICE, prepare
from firmware.demo.signals import Stopper
from firmware.demo.view import LiveView, UplinkProbe, print_closing, print_header, print_summary
from firmware.exceptions import QrgateError


def run_demo(
    state: Path,
    *,
    reel: Path | None = None,
    camera: str | None = None,
    fps: float = 30.0,
    mosquitto: str | None = None,
) -> int:
    """Run the demo; returns the process exit code. ``mosquitto``: the broker executable
    (None: on PATH or Debian's /usr/sbin/mosquitto; a path that is not there runs the demo
    without a broker)."""
    console = Console()
    started = dt.date.today()
    with ExitStack() as stack:
        stopper = Stopper()
        stack.callback(stopper.restore)
        try:
            state.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            console.print(f"[red]qrgate demo: cannot create {state}: {escape(str(e))}[/]")
            return 2
        broker = start_broker(console, state, mosquitto, stack)
        ingest = start_ingest(console, state, broker, stopper, stack) if broker else None
        if stopper.interrupted.is_set():
            return 0
        # Without a broker the uplink still runs, pointed at a port nothing listens on: the
        # view then shows what a reader does when its broker is away (backlog grows).
        port = broker.port if broker is not None else free_port()
        try:
            config = load_config(
                prepare(state, reel=reel, camera=camera, fps=fps, uplink_port=port)
            )
            ref: list[Reader] = []
            probe = UplinkProbe(
                ref, config.journal_path, state / BACKOFFICE_DB if ingest is not None else None
            )
            view = LiveView(console, ref, probe)
            # The demo treats the host clock as synced: it shows how a synced reader decides
            # (passes are time-limited and would all be denied clock_untrusted otherwise),
            # also in a container whose kernel reports its clock unsynced. A real reader
            # (`qrgate run`) asks the kernel and keeps its clock.json floor instead.
            reader = build_reader(
                config, listeners=[view.on_scan], device_id=DEVICE, clock_synced=lambda: True
            )
        except QrgateError as e:
            console.print(f"[red]qrgate demo: {escape(str(e))}[/]")
            return 2
        # Undone in reverse: the view prints what is still queued, the probe lets go of the
        # journal (so the journal's own close is the last one and folds its WAL back in), then
        # the reader stops.
        stack.callback(reader.stop)
        stack.callback(probe.close)
        stack.callback(view.close)
        ref.append(reader)
        stopper.reader = reader
        if stopper.interrupted.is_set():
            reader.stop_event.set()
        print_header(
            console,
            config=config,
            state=state,
            reel=reel,
            camera=camera,
            fps=fps,
            broker=broker,
            ingest=ingest,
        )
        view.start()
        try:
            reader.start()
        except (QrgateError, DriverError) as e:
            # a webcam that is not there, a journal it cannot open: one line, not a traceback
            console.print(f"[red]qrgate demo: cannot start: {escape(str(e))}[/]")
            return 3
        while not reader.wait(0.5):
            pass
        drained = None
        if broker is not None and ingest is not None and reader.uplink is not None:
            drained = drain(reader, config.journal_path, stopper)
        view.close()
        final = probe.sample()
        print_summary(console, reader, final, broker)
        if drained is not None and drained[0] < drained[1]:
            console.print(
                f"[yellow]the back office has acknowledged seq {drained[0]} of "
                f"{drained[1]} so far; the rest goes out on the next run.[/]",
                highlight=False,
            )
        if broker is not None:
            console.print(
                f"fleet status (what `qrgate fleet status --broker {HOST}:{broker.port}` "
                "shows while the demo's broker runs):",
                soft_wrap=True,
                highlight=False,
            )
            print_fleet(console, broker)
        exit_code = reader.exit_code
    # the ExitStack stopped the reader (offline status, DISCONNECT), then qrgate ingest,
    # then mosquitto
    print_closing(
        console,
        config=config,
        state=state,
        started=started,
        broker=broker,
        ingest=ingest,
        final=final,
    )
    return exit_code
