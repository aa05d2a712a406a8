"""The scan rendered: the port map as a table, the findings as journal lines, the JSON, and the
metrics file node_exporter's textfile collector reads (written atomically, through a directory
reached without following a symlink another user owns)."""

from __future__ import annotations

import os
import socket
import time

from bindguard.action.scan import Scan
from bindguard.model.endpoints import TCP, Endpoint
from bindguard.model.facts import ProcessFact
from bindguard.model.hostmap import Listener
from bindguard.model.kinds import COLLISION_KINDS, ClaimSource, FindingKind, UnitStatus
from bindguard.model.text import escape
from bindguard.report import output


def _command(process: ProcessFact | None) -> str:
    if process is None:
        return "-"
    return process.command


def _unit_column(listener: Listener) -> str:
    """The UNIT column: "(no unit)" when the manager says so, "?" when nobody asked it, and a name
    only its cgroup path bears marked "(cgroup)"."""
    if listener.by_manager:
        return f"{listener.owner or '?'} (systemd)"
    if listener.unit_status == UnitStatus.BY_MANAGER and listener.unit is not None:
        return listener.unit
    if listener.unit_status == UnitStatus.BY_CGROUP:
        return f"{listener.unit} (cgroup)"
    return "(no unit)" if listener.unit_status == UnitStatus.NO_UNIT else "?"


def table_rows(scan: Scan) -> list[tuple[str, ...]]:
    """PORT, ADDRESS, STATE, PID, UNIT, DECLARED BY, COMMAND; one row per listener or unserved claim."""
    rows: list[tuple[tuple, tuple[str, ...]]] = []
    served: set[tuple[str, Endpoint]] = set()
    for listener in scan.listeners:
        s, p = listener.socket, listener.process
        declared = sorted({c.unit + ("" if c.source == ClaimSource.SOCKET_UNIT else f" ({c.source})")
                           for c in scan.claims if c.source != ClaimSource.LISTENING and c.bind.endpoint == s.local})
        served.update((c.unit, c.bind.endpoint) for c in scan.claims if c.bind.endpoint == s.local)
        state = "LISTEN" if s.local.proto == TCP else "UDP"
        unit = _unit_column(listener)
        rows.append(((s.local.port, s.local.proto, str(s.local)),
                     (f"{s.local.port}/{s.local.proto}", s.local.address(), state, str(p.pid) if p else "-",
                      unit, ", ".join(declared) or "-", _command(p))))
    for claim in scan.claims:
        ep = claim.bind.endpoint
        if claim.source == ClaimSource.LISTENING or (claim.unit, ep) in served:
            continue
        served.add((claim.unit, ep))
        state = "not running" if claim.will_run is False else "not listening"
        rows.append(((ep.port, ep.proto, str(ep)),
                     (f"{ep.port}/{ep.proto}", ep.address(), state, "-", claim.unit,
                      f"{claim.source}: {claim.detail}" + ("" if claim.confident else " (guess)"), "-")))
    return [row for _, row in sorted(rows, key=lambda r: r[0])]


def write_table(scan: Scan, stream, legend: bool = True) -> None:
    """The table; legend: its header line, or the line that says it is empty. COMMAND is cut at 60
    characters on a terminal only: a pipe or a file gets every row whole, as systemctl's lists do."""
    header = ("PORT", "ADDRESS", "STATE", "PID", "UNIT", "DECLARED BY", "COMMAND")
    rows = [tuple(escape(cell) for cell in row) for row in table_rows(scan)]
    if not rows:
        if legend:
            stream.write("nothing listens, and no unit declares an address\n")
        return
    cut = stream.isatty()
    lines = [header, *rows] if legend else rows
    widths = [max(len(r[i]) for r in lines) for i in range(len(header) - 1)]
    for row in lines:
        # widths: every column but the last (COMMAND), which has no width to keep
        command = row[-1] if not cut or len(row[-1]) <= 60 else row[-1][:57] + "..."
        stream.write("  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths, strict=False)) + "  " + command + "\n")
    stream.flush()


def write_findings(console: output.Console, scan: Scan) -> None:
    for f in scan.findings:
        where = f" on {f.port}/{f.proto}" if f.port is not None and f.proto else ""
        lines = [f"bindguard: scan: {f.kind}{where}: {f.summary}"]
        lines += [f"    evidence: {e}" for e in f.evidence]
        lines.append(f"    fix: {f.fix}")
        console.emit(output.WARNING, lines)
    for note in scan.notes:
        console.emit(output.NOTICE, f"  note: {note}")
    if scan.findings:
        kinds = ", ".join(f"{scan.count(k)} {k}" for k in FindingKind if scan.count(k))
        console.emit(output.WARNING, f"bindguard: scan: {len(scan.findings)} finding(s) need attention ({kinds})")
    else:
        console.emit(output.INFO, f"bindguard: scan: nothing needs attention ({len(scan.listeners)} listeners, "
                                  f"{len([c for c in scan.claims if c.source != ClaimSource.LISTENING])} "
                                  "declared addresses)")


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def scan_json(scan: Scan) -> dict:
    def listener(item: Listener) -> dict:
        s, p = item.socket, item.process
        return {
            "proto": s.local.proto, "address": s.local.address(), "port": s.local.port,
            "state": s.state, "v6only": s.v6only, "inode": s.inode or None, "uid": s.uid,
            "pid": p.pid if p else None, "ppid": p.ppid if p else None, "command": _command(p) if p else None,
            "user": p.user if p else None, "cgroup": p.cgroup if p else None,
            "started": _iso(p.started) if p else None, "unit": item.unit, "unit_status": item.unit_status,
            "socket_unit": item.socket_unit, "held_by_manager": item.by_manager,
        }

    return {
        "host": socket.gethostname(),
        "scanned_at": _iso(scan.scanned_at),
        "needs_attention": scan.needs_attention,
        "exit_code": scan.exit_code,
        "systemd_bus": scan.bus,
        "ephemeral_port_range": list(scan.port_range) if scan.port_range else None,
        "reserved_ports": scan.reserved,
        "counts": {kind: scan.count(kind) for kind in FindingKind} | {
            "conflicts": sum(scan.count(k) for k in COLLISION_KINDS), "listeners": len(scan.listeners)},
        "listeners": [listener(item) for item in sorted(
            scan.listeners, key=lambda i: (i.socket.local.port, i.socket.local.proto, str(i.socket.local)))],
        "claims": [{
            "unit": c.unit, "proto": c.bind.endpoint.proto, "address": c.bind.endpoint.address(),
            "port": c.bind.endpoint.port,
            "v6only": c.bind.v6only if c.bind.endpoint.family == socket.AF_INET6 else None,
            "reuseport": c.bind.options.reuseport, "source": c.source, "detail": c.detail,
            "confident": c.confident, "will_run": c.will_run, "triggers": list(c.triggers),
        } for c in sorted(scan.claims, key=lambda c: (c.bind.endpoint.port, c.bind.endpoint.proto, c.unit))],
        "units": [{
            "unit": u.name, "active_state": u.active_state or None, "unit_file_state": u.unit_file_state or None,
            "addresses_from": u.source or None, "n_restarts": u.n_restarts, "result": u.result or None,
            "warnings": u.warnings,
        } for u in scan.units],
        "findings": [{
            "kind": f.kind, "proto": f.proto, "port": f.port, "units": list(f.units),
            "addresses": list(f.addresses), "summary": f.summary, "evidence": list(f.evidence), "fix": f.fix,
        } for f in scan.findings],
        "notes": scan.notes,
    }


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def prometheus_text(scan: Scan) -> str:
    """The scan as node_exporter's textfile collector reads it (text exposition format 0.0.4)."""
    lines: list[str] = []

    def metric(name: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} gauge")
        for labels, value in samples:
            text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            number = str(int(value)) if float(value).is_integer() else repr(float(value))
            lines.append(f"{name}{{{text}}} {number}" if text else f"{name} {number}")

    metric("bindguard_conflicts", "Address conflicts between units that the last scan found, by kind.",
           [({"kind": kind}, scan.count(kind)) for kind in COLLISION_KINDS])
    metric("bindguard_findings", "Everything the last scan found that needs attention, by kind.",
           [({"kind": kind}, scan.count(kind)) for kind in FindingKind])
    metric("bindguard_listeners", "Listening sockets (TCP LISTEN, bound UDP) seen by the last scan.",
           [({}, len(scan.listeners))])
    metric("bindguard_listeners_without_unit", "Listeners whose process belongs to no running unit.",
           [({}, scan.count(FindingKind.UNCLAIMED_LISTENER))])
    metric("bindguard_ports_in_ephemeral_range",
           "Declared ports inside net.ipv4.ip_local_port_range and not in ip_local_reserved_ports.",
           [({}, scan.count(FindingKind.EPHEMERAL_PORT))])
    metric("bindguard_restart_loops", "Services restarting after a bind conflict (exit status 98).",
           [({}, scan.count(FindingKind.RESTART_LOOP))])
    loops = [f for f in scan.findings if f.kind == FindingKind.RESTART_LOOP]
    restarts = {u.name: u.n_restarts for u in scan.units}
    if loops:
        metric("bindguard_restart_loop_restarts", "NRestarts of each service in a restart loop on a bind conflict.",
               [({"unit": f.units[0]}, restarts.get(f.units[0], 0)) for f in loops])
    ephemeral = [f for f in scan.findings if f.kind == FindingKind.EPHEMERAL_PORT]
    if ephemeral:
        metric("bindguard_ephemeral_port", "A declared port in the ephemeral range, by port and unit.",
               [({"port": str(f.port), "unit": unit}, 1) for f in ephemeral for unit in f.units])
    metric("bindguard_last_scan_timestamp_seconds", "When the last scan ran, in seconds since the epoch.",
           [({}, round(scan.scanned_at, 3))])
    return "\n".join(lines) + "\n"


def write_prometheus(scan: Scan, path: str) -> None:
    """Write the metrics file atomically: a temporary file in the same directory, then rename(2),
    both relative to a descriptor of the directory that open_directory() reached safely."""
    directory, name = os.path.split(os.path.abspath(path))
    dir_fd = open_directory(directory)
    temporary = f".{name}.{os.urandom(6).hex()}.tmp"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                     dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(prometheus_text(scan))
                f.flush()
                os.fchmod(f.fileno(), 0o644)
                os.fsync(f.fileno())
            os.replace(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            try:
                os.unlink(temporary, dir_fd=dir_fd)
            except OSError:
                pass
            raise
    finally:
        os.close(dir_fd)


class UntrustedLink(OSError):
    """A symlink on the way to a directory that neither root nor this process's user owns."""


def open_directory(path: str) -> int:
    """An O_PATH descriptor of the directory `path`, reached one component at a time from `/`.

    A symlink on the way is followed only if root or this process's user owns it: any other
    owner of a directory on the way (node_exporter's textfile directory belongs to prometheus)
    could swap a subdirectory for a link to /etc, and root would write there. Once a component
    is open, swapping its name changes nothing. Raises UntrustedLink, or OSError as open(2) does.
    """
    import errno
    import stat

    trusted = {0, os.geteuid()}
    pending = [part for part in path.split("/") if part not in ("", ".")]
    fd = os.open("/" if path.startswith("/") else ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    walked, links = "/" if path.startswith("/") else ".", 0
    try:
        while pending:
            part = pending.pop(0)
            try:
                child = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as exc:
                info = os.stat(part, dir_fd=fd, follow_symlinks=False) if exc.errno in (errno.ENOTDIR, errno.ELOOP) \
                    else None
                if info is None or not stat.S_ISLNK(info.st_mode):
                    raise
                shown = os.path.join(walked, part)
                if info.st_uid not in trusted:
                    raise UntrustedLink(errno.ELOOP, f"{shown} is a symlink owned by uid {info.st_uid}") from None
                links += 1
                if links > 40:  # as the kernel's MAXSYMLINKS
                    raise OSError(errno.ELOOP, f"too many symlinks on the way to {path}") from None
                target = os.readlink(part, dir_fd=fd)
                pending[:0] = [p for p in target.split("/") if p not in ("", ".")]
                if target.startswith("/"):
                    os.close(fd)
                    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                    walked = "/"
                continue
            os.close(fd)
            fd, walked = child, os.path.join(walked, part)
        return fd
    except BaseException:
        os.close(fd)
        raise
