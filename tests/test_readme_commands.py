"""The README's commands work as written: the set-up command's extras and pins are the project's,
its quick-start job is accepted word for word (planned here; run whole, in a fresh virtual
environment, by the slow test), and every `neuqi` command the README shows in a code block parses.

CI runs the test command itself in a bare clone (.ci/run checks it is the README's, word for word).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
from helpers import neuqi

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```bash\n(.*?)```", README, re.DOTALL)
SETUP = next(b.strip() for b in BLOCKS if "neuqi quantize smollm2" in b and "pip install" in b)


def _steps(command: str) -> list[list[str]]:
    return [shlex.split(step) for step in command.split("&&")]


def test_the_setup_installs_the_projects_extras_and_pins() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = set(pyproject["project"]["optional-dependencies"])
    tests = next(b.strip() for b in BLOCKS if "pytest" in b)
    for command in (SETUP, tests):
        for step in _steps(command):
            for word in step:
                match = re.fullmatch(r"\.\[([a-z,]+)\]", word)
                if match:
                    assert set(match.group(1).split(",")) <= extras, word
    # the same torch and demo-model pins in both commands
    pins = [sorted(w for s in _steps(c) for w in s if "==" in w) for c in (SETUP, tests)]
    assert set(pins[0]) <= set(pins[1])


def test_the_quick_start_job_is_accepted_as_written(smollm2_dir: Path) -> None:
    quantize = _steps(SETUP)[-1]
    assert quantize[:3] == ["neuqi", "quantize", "smollm2"]
    options = quantize[3:]
    out = options.index("--out")
    del options[out:out + 2]
    # the built-in name, read from the converted model the other tests share
    r = neuqi("plan", "smollm2", *options, "--no-probe", "--device", "cpu",
              env={"NEUQI_CACHE": str(smollm2_dir.parent)})
    assert r.returncode == 0, r.stderr
    assert "plan: peak" in r.stdout


def test_every_neuqi_command_in_the_readme_parses() -> None:
    commands = [line.strip() for block in BLOCKS for line in block.splitlines()
                if line.strip().startswith("neuqi ")]
    assert len(commands) >= 3
    for command in commands:
        words = shlex.split(command)
        r = neuqi(words[1], "--help")
        assert r.returncode == 0, (command, r.stderr)
        for option in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
            assert option in r.stdout, f"{command}: {option} is not an option of {words[1]}"


@pytest.mark.slow
def test_the_quick_start_runs_word_for_word_in_a_fresh_environment(tmp_path: Path) -> None:
    """The whole set-up command, in a new virtual environment beside a clone of the repository."""
    clone = tmp_path / "neuqi"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    r = subprocess.run(["bash", "-c", SETUP], cwd=clone, env=env, capture_output=True,
                       text=True, check=False, timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("out/smollm2-w4g64")
    assert (clone / "out" / "smollm2-w4g64" / "neuqi.json").is_file()

