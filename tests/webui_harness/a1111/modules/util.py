import os
import re

_digits = re.compile(r"([0-9]+)")


def natural_sort_key(s, regex=_digits):
    return [int(part) if part.isdigit() else part.lower() for part in regex.split(s)]


def listfiles(dirname):
    names = sorted((x for x in os.listdir(dirname) if not x.startswith(".")), key=natural_sort_key)
    return [p for p in (os.path.join(dirname, x) for x in names) if os.path.isfile(p)]


def walk_files(path, allowed_extensions=None):
    """Yield files under ``path`` (natural order); ``allowed_extensions`` like [".safetensors"]."""
    if not os.path.exists(path):
        return
    allowed = set(allowed_extensions) if allowed_extensions is not None else None
    for root, _, files in sorted(os.walk(path, followlinks=True), key=lambda item: natural_sort_key(item[0])):
        for filename in sorted(files, key=natural_sort_key):
            if allowed is None or os.path.splitext(filename)[1].lower() in allowed:
                yield os.path.join(root, filename)


def ldm_print(*args, **kwargs):
    print(*args, **kwargs)


def topological_sort(dependencies):
    order, seen = [], set()

    def visit(name):
        seen.add(name)
        for dep in dependencies.get(name, []):
            if dep in dependencies and dep not in seen:
                visit(dep)
        order.append(name)

    for name in dependencies:
        if name not in seen:
            visit(name)
    return order
