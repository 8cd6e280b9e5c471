"""The README's usage example runs as written."""

import re
from pathlib import Path


README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python code block"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out
    assert "Cardiomegaly" in printed and "Pleural effusion" in printed
    assert (tmp_path / "rect-classifier" / "modeling_rect.py").exists()


def test_readme_other_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[1:]
    assert blocks, "README.md shows how to use the recipes from a script"
    monkeypatch.chdir(tmp_path)
    for index, block in enumerate(blocks, start=1):
        exec(compile(block, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
