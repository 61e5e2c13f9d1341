"""JSON files of a run folder: written atomically (a temporary file beside the target, then a rename, so that a
reader never sees half a file) and read back leniently where a missing or damaged file means "none"."""
import json
import os


def write_json(content, path):
    """Write ``content`` as JSON to ``path`` atomically (a temporary file beside it, then a rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(content, handle, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_json_or_none(path):
    """The content of the JSON file ``path``, or None when it is missing or cannot be read or parsed."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None
