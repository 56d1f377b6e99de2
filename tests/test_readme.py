"""The README's worked example runs as written (its asserts are part of the example)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README.md should show a worked example in a ```python block"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})
