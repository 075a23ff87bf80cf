"""``mgrpo sync <run folder> [...]``: send to MLflow what a run logged while its tracking store was away.

A run whose tracking store did not answer keeps what it could not send in ``<run>/tracking/``
(``reporting.outbox``) and ends with a line saying so; the next ``resume=`` of the run sends it too.
This command sends it now, in order, to the store the run logs to, and says how much it sent. It takes
the run folder's lock (``training.runlock``), so it never races the run itself.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from mgrpo_cli.errors import EXIT_RUN_FAILED, EXIT_USER_ERROR, UserError

USAGE = "usage: mgrpo sync <run folder> [<run folder> ...]"


def sync(folder: Path) -> str:
    """Send ``folder``'s unsent operations; what was done, in one line. Raises ``UserError`` for a folder
    with no outbox and ``TrackingUnavailable`` when the store does not answer."""
    from mgrpo_cli.reporting import outbox, tracking
    from mgrpo_cli.training import runlock

    if not (folder / outbox.FOLDER / outbox.TARGET).is_file():
        raise UserError(f"{folder}: not the folder of a run that logs to MLflow (no {outbox.FOLDER}/{outbox.TARGET})")
    runlock.lock(folder, "sync")
    try:
        uri = outbox.target_uri(folder)
        tracking.check_reachable(uri)
        try:
            sent, dropped, _ = outbox.send_all(folder, tracking.client)
        except Exception as e:
            raise tracking.TrackingUnavailable(f"no answer ({outbox.first_line(e)})") from None
    finally:
        runlock.release(folder)
    refused = f"; {dropped} refused by the store and dropped" if dropped else ""
    return f"{folder}: sent {sent} operations to {uri}{refused}" if sent or dropped else \
        f"{folder}: nothing to send, {uri} has the whole run"


def main(argv: Optional[Sequence[str]] = None) -> None:
    from mgrpo_cli.reporting.tracking import TrackingUnavailable

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or any(a.startswith("-") for a in args):
        print(USAGE, file=sys.stderr if args else sys.stdout)
        sys.exit(EXIT_USER_ERROR if args else 0)
    code = 0
    for arg in args:
        folder = Path(arg).expanduser().resolve()
        try:
            print(sync(folder), flush=True)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            code = code or EXIT_USER_ERROR
        except TrackingUnavailable as e:
            print(f"error: {folder}: the tracking store does not work: {e}; nothing more was sent, try again "
                  f"when it answers", file=sys.stderr, flush=True)
            code = code or EXIT_RUN_FAILED
    sys.exit(code)
