"""One clear line on the terminal for the errors the bundle raises on purpose.

MONAI's config runner wraps every error of a ``$`` expression in ``RuntimeError("Failed to evaluate
...")``, so a refused input reaches the terminal as a long chained traceback. Importing ``scripts``
(every config does) installs :func:`excepthook`: when an uncaught exception's chain holds one of
the bundle's own errors (a bad case, file, option, checkpoint or output folder), only that error's
message is printed, with the exit status 1, and log records of such errors (Ignite and MONAI log one
when an error ends an engine run) keep their message without the traceback. ``IGREG_DEBUG=1``
keeps every traceback.
"""
from __future__ import annotations

import logging
import os
import sys
from types import TracebackType
from typing import Any

DEBUG_VARIABLE = "IGREG_DEBUG"


def bundle_error(exc: BaseException | None) -> BaseException | None:
    """The first of the bundle's own errors in the chain of `exc` (outermost first), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if _is_bundle_error(exc):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _is_bundle_error(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    return module == "scripts" or module.startswith("scripts.") or isinstance(exc, (FileNotFoundError,
                                                                                    FileExistsError))


def message(exc: BaseException) -> str:
    """The terminal line for a bundle error."""
    return f"error ({type(exc).__name__}): {exc}"


def excepthook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    found = None if _debug() else bundle_error(value)
    if found is None:
        _previous(kind, value, tb)
        return
    sys.stderr.write(f"\n{message(found)}\n(set {DEBUG_VARIABLE}=1 to see the traceback)\n")
    sys.stderr.flush()


_previous = sys.excepthook


def _debug() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def _record_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    """Log records of the bundle's own errors keep their message but lose the traceback (Ignite's
    and MONAI's handlers log one when an error ends an engine run), unless IGREG_DEBUG is set."""
    record = _previous_factory(*args, **kwargs)
    if record.exc_info and record.exc_info[1] is not None and not _debug() \
            and bundle_error(record.exc_info[1]) is not None:
        record.exc_info, record.exc_text = None, None
    return record


_previous_factory = logging.getLogRecordFactory()


def install() -> None:
    """Install :func:`excepthook` and the log-record factory once (the previous hook handles every
    other error)."""
    global _previous, _previous_factory
    if sys.excepthook is not excepthook:
        _previous = sys.excepthook
        sys.excepthook = excepthook
    if logging.getLogRecordFactory() is not _record_factory:
        _previous_factory = logging.getLogRecordFactory()
        logging.setLogRecordFactory(_record_factory)
