"""The README's library examples run as written (docs that match the code)."""

import os
import re

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_library_examples_run():
  text = open(README, encoding="utf-8").read()
  section = text.split("## Use as a library", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
  assert len(blocks) == 2
  namespace = {}
  for block in blocks:
    exec(compile(block, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["records"]["stack"][2].slot_table.shape == (4, 6)
