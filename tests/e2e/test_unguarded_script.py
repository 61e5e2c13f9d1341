"""End to end: the README's example in a plain script without ``if __name__ == "__main__":`` and a fresh class-index
cache finishes (datasets/class_index.py's process pool)."""
import os
import subprocess
import sys

from datasets import voc
from tests.helpers import REPO, unique_values


UNGUARDED_SCRIPT = """\
import datasets
print(datasets.step_image_ids("voc", {root!r}, "15-1", 1, True, cache_dir={cache!r}))
# the multi-worker path explicitly, whatever the number of CPUs of the test machine
samples, index = datasets.split_class_index("voc", {root!r}, "val", cache_dir={cache!r}, workers=3)
print(len(samples))
"""


def test_unguarded_script_finishes(synthetic_voc, tmp_path):
    # the README's example in a plain script without `if __name__ == "__main__":` and with a fresh cache:
    # a process pool started with spawn/forkserver re-runs such a script in every worker, without end
    script = tmp_path / "unguarded.py"
    cache = str(tmp_path / "fresh_cache")
    script.write_text(UNGUARDED_SCRIPT.format(root=synthetic_voc, cache=cache))
    env = {**os.environ, "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), env=env, capture_output=True,
                            text=True, timeout=90)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    expected = [s[0] for s in voc.list_split(synthetic_voc, "train") if 16 in unique_values(s[2])]
    printed = result.stdout.strip().splitlines()
    assert printed == [repr(expected), str(len(voc.list_split(synthetic_voc, "val")))]
    assert expected  # the synthetic fixture has step-1 images, so the comparison means something
