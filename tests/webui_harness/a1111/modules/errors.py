"""modules.errors: report / display print to stderr and are recorded in ``exception_records``
(the harness fixture can fail a test on them)."""
import sys
import traceback

exception_records = []


def record_exception():
    _, e, tb = sys.exc_info()
    if e is None:
        return
    exception_records.append((e, traceback.format_exception(type(e), e, tb)))


def report(message: str, *, exc_info: bool = False) -> None:
    print("***", message, file=sys.stderr)
    if exc_info:
        record_exception()
        traceback.print_exc(file=sys.stderr)
        print("---", file=sys.stderr)


def print_error_explanation(message):
    print(message, file=sys.stderr)


def display(e: Exception, task, *, full_traceback=False):
    exception_records.append((e, traceback.format_exception(type(e), e, e.__traceback__)))
    print(f"{task or 'error'}: {type(e).__name__}", file=sys.stderr)
    traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)


def display_once(e: Exception, task):
    display(e, task)


def run(code, task):
    try:
        code()
    except Exception as e:
        display(task, e)
