"""No extension manager in the harness: nothing is "active"; callbacks are named after 'base'."""
extensions = []


def active():
    return []


def find_extension(filename):
    return None
