"""modules.hashes without the on-disk cache: sha256_from_cache always misses (returns None)."""
import hashlib


def calculate_sha256(filename):
    h = hashlib.sha256()
    with open(filename, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def addnet_hash_safetensors(b):
    """sha256 of the tensor bytes after the safetensors header (what kohya's addnet hash is)."""
    h = hashlib.sha256()
    b.seek(0)
    n = int.from_bytes(b.read(8), "little")
    b.seek(n + 8)
    for chunk in iter(lambda: b.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def sha256_from_cache(filename, title, use_addnet_hash=False):
    return None


def sha256(filename, title, use_addnet_hash=False):
    if use_addnet_hash:
        with open(filename, "rb") as file:
            return addnet_hash_safetensors(file)
    return calculate_sha256(filename)
