"""modules.patches: replace an attribute of a module/class, remember the original per caller key."""
from collections import defaultdict

originals = defaultdict(dict)


def patch(key, obj, field, replacement):
    """Set ``obj.field = replacement``; returns the previous value. Raises if ``key`` already patched it."""
    stored = originals[key]
    if (obj, field) in stored:
        raise RuntimeError(f"patch for {field} is already applied")
    previous = getattr(obj, field)
    stored[(obj, field)] = previous
    setattr(obj, field, replacement)
    return previous


def undo(key, obj, field):
    """Put back what patch() replaced; raises if there is nothing to undo. Returns None."""
    stored = originals[key]
    if (obj, field) not in stored:
        raise RuntimeError(f"there is no patch for {field} to undo")
    setattr(obj, field, stored.pop((obj, field)))


def original(key, obj, field):
    return originals[key].get((obj, field))
