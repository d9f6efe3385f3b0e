"""scripts/check_readme_commands.sh, on the CPU: it finds the README's two commands, runs them with
the build variables unset, and records their status, wall time and memory. Checked on a stand-in
README whose commands are quick (the real ones build for 25 minutes); and the real README has
both commands where the script looks for them."""

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_readme_commands.sh"

STAND_IN_README = """# a project

## Install and run the demo

```bash
python -m pip install torch --version && python -c "import os; print('CUDA_HOME', os.environ.get('CUDA_HOME'))"
```

## Run the tests

```bash
python -m pytest --version
```
"""


def run_script(folder: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=folder, capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=300)


def test_runs_both_commands_with_the_build_variables_unset(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text(STAND_IN_README)
    out = tmp_path / "out"
    done = run_script(tmp_path, str(out), CUDA_HOME="/somewhere")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split()[:2] for line in summary] == [["install", "rc=0"], ["tests", "rc=0"]]
    assert all(re.search(r"wall_s=\d+ peak_used_mib=\d+$", line) for line in summary), summary
    assert "CUDA_HOME None" in (out / "install.log").read_text()
    assert "pytest" in (out / "tests.log").read_text()
    environment = (out / "environment.txt").read_text()
    assert "install command: python -m pip install torch --version" in environment
    assert "test command: python -m pytest --version" in environment
    assert "set here, unset for the commands: CUDA_HOME=/somewhere" in environment


def test_a_failing_command_fails_the_script(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text(
        STAND_IN_README.replace("python -m pytest --version", "python -m pytest --no-such-flag"))
    out = tmp_path / "out"
    done = run_script(tmp_path, str(out), "test")
    assert done.returncode == 1
    assert (out / "summary.txt").read_text().startswith("tests rc=4")
    assert not (out / "install.log").exists()


def test_the_readme_has_both_commands_where_the_script_looks() -> None:
    readme = (ROOT / "README.md").read_text()
    install = re.search(r"^## Install and run the demo\n.*?^```bash\n(.*?)\n```", readme,
                        re.S | re.M)
    tests = re.search(r"^## Run the tests\n.*?^```bash\n(.*?)\n```", readme, re.S | re.M)
    assert install and install.group(1).startswith("python -m pip install torch")
    assert tests and tests.group(1).startswith("python -m pytest")
