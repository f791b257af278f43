"""The command's first seconds: `import unlearn_fast` does not import torch (the command's handlers are in place
before torch's import starts), and a Ctrl-C during that import is one line with exit 130, not a traceback."""
from __future__ import annotations

import subprocess
import sys

from unlearn_fast.cli.main import main


def test_importing_the_package_and_the_command_leaves_torch_unimported():
    code = ("import sys, unlearn_fast, unlearn_fast.cli.main; print('torch' in sys.modules); "
            "print(callable(unlearn_fast.create_model), 'ops' in dir(unlearn_fast))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "True"]


class _InterruptingFinder:
    """A meta-path finder that raises KeyboardInterrupt when the module it names is imported (as a Ctrl-C in the
    middle of torch's import would)."""

    def __init__(self, name):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            raise KeyboardInterrupt
        return None


def test_ctrl_c_while_torch_is_imported_is_one_line_and_exit_130(monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "unlearn_fast.train.checkpoint", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_InterruptingFinder("unlearn_fast.train.checkpoint")] + sys.meta_path)
    assert main(["list-models"]) == 130
    err = capsys.readouterr().err
    assert err == "unlearn-fast: interrupted while starting; nothing was written\n"
