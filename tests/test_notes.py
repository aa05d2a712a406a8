"""A note's priority is decided where it is made and travels with it: the report renders each at
its own priority, whatever its text says. Pure: recorded outcomes, no root."""

from __future__ import annotations

import io
import json

from bindguard.action.guard import Outcome
from bindguard.model.facts import Evidence
from bindguard.model.notes import NOTICE, WARNING, Note
from bindguard.report import outcome as report
from bindguard.report.output import Console

SAME_TEXT = "ssh.service has KillMode=process"


def test_each_note_is_written_at_its_own_priority():
    notes = (Note(NOTICE, SAME_TEXT), Note(WARNING, SAME_TEXT))
    console = Console(io.StringIO(), environ={}, journal=True, journal_socket="/nonexistent/socket")
    report.write_human(console, Outcome(0, (), (), Evidence(), notes=notes))
    lines = console.stream.getvalue().splitlines()
    assert f"<5>  note: {SAME_TEXT}" in lines and f"<4>  warning: {SAME_TEXT}" in lines, lines


def test_the_json_lists_the_notes_as_text(capsys):
    report.write_json(Outcome(0, (), (), Evidence(), notes=(Note(WARNING, "advice"), Note(NOTICE, "no bus"))))
    assert json.loads(capsys.readouterr().out)["notes"] == ["advice", "no bus"]
