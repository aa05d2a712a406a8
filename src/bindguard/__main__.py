"""`python -m bindguard`: the bindguard command, as bin/bindguard runs it.

Not isolated by itself: whoever runs `python -m` chooses the interpreter's options, and the
every-service drop-in runs bin/bindguard, which runs `python3 -I`. Like bin/bindguard, this
fails open (70 with --fail-closed) when the package does not load, and says so in one line.
"""

import sys

try:
    from bindguard.cli import end, main

    code = main()
    end(code)  # returns only where the ordinary exit must end it
except Exception as exc:  # main() handles its own faults; this is a package that does not load
    if "--debug" in sys.argv:
        raise
    closed = "--fail-closed" in sys.argv
    why = f"{type(exc).__name__}: {exc}".encode("unicode_escape").decode()
    line = (f"bindguard: cannot load the bindguard package with {sys.executable} ({why}); nothing was checked, "
            f"failing {'closed (--fail-closed)' if closed else 'open'}")
    try:  # a priority prefix only on the journal's stream, as bindguard.report.output decides
        import os

        st = os.fstat(2)
        journal = os.environ.get("JOURNAL_STREAM") == f"{st.st_dev}:{st.st_ino}"
        sys.stderr.write(f"<{3 if closed else 4}>{line}\n" if journal else f"{line}\n")
        sys.stderr.flush()
    except Exception:
        pass
    code = 70 if closed else 0
sys.exit(code)
