"""constraints.txt: the exact set CI installs, and `.ci/refresh-lock`, the one command that refreshes it.

The refresh is run here with stand-ins for python3/pip/pytest (a real one installs gigabytes and runs the
whole suite): they record what the script asks for, so the test checks the order of the steps and that only
a green suite writes the lock.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)$")


def _pins() -> dict[str, str]:
    out = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            m = PIN.match(line.strip())
            assert m, f"constraints.txt: not an exact pin: {line!r}"
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def _requirement_names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].strip().lower().replace("_", "-") for r in reqs}


def test_lock_pins_every_requirement_of_dev_and_dali_but_not_torch():
    pins = _pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _requirement_names(project["dependencies"] + project["optional-dependencies"]["dev"]
                                + project["optional-dependencies"]["dali"]) - {"torch"}
    assert wanted <= set(pins), f"not pinned: {sorted(wanted - set(pins))}"
    assert not {"torch", "torchvision", "fastmae"} & set(pins)


def test_ci_and_readme_install_with_the_lock():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()[-1]
    assert "pip install -c constraints.txt -e \".[dev,dali]\"" in ci
    assert ci in (ROOT / "README.md").read_text()


_STUB_PYTHON3 = r"""#!/usr/bin/env bash
# python3 -m venv DIR: make DIR/bin/{pip,python} stand-ins that log their arguments.
[ "$1 $2" = "-m venv" ] || exit 90
mkdir -p "$3/bin"
cat > "$3/bin/pip" <<'PIP'
#!/usr/bin/env bash
echo "pip $*" >> "$STUB_LOG"
if [ "$1" = freeze ]; then printf 'zeta-pkg==2.0\nAlpha_Pkg==1.0\n'; fi
PIP
cat > "$3/bin/python" <<'PY'
#!/usr/bin/env bash
echo "python $*" >> "$STUB_LOG"
case "$*" in *pytest*) exit "${STUB_PYTEST_RC:-0}";; *) echo 3.11.7;; esac
PY
chmod +x "$3/bin/pip" "$3/bin/python"
"""


def _run_refresh(tmp_path: Path, pytest_rc: int) -> tuple[subprocess.CompletedProcess, list[str], Path]:
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "refresh-lock", repo / ".ci" / "refresh-lock")
    (repo / "constraints.txt").write_text("old==1\n")
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    py3 = stubs / "python3"
    py3.write_text(_STUB_PYTHON3)
    py3.chmod(py3.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "log"
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(log),
           "STUB_PYTEST_RC": str(pytest_rc), "TMPDIR": str(tmp_path)}
    r = subprocess.run(["bash", str(repo / ".ci" / "refresh-lock")], capture_output=True, text=True, env=env,
                       timeout=60)
    return r, log.read_text().splitlines(), repo / "constraints.txt"


def test_refresh_installs_torch_first_then_newest_then_writes_the_lock_after_a_green_suite(tmp_path):
    r, calls, lock = _run_refresh(tmp_path, pytest_rc=0)
    assert r.returncode == 0, r.stderr
    assert calls[0] == "pip install torch==2.14.1 torchvision==0.29.1"
    assert calls[1] == "pip install -e .[dev,dali]"  # no -c: resolves today's newest releases
    assert calls[2].startswith("python -m pytest -n 2")
    body = [line for line in lock.read_text().splitlines() if not line.startswith("#")]
    assert body == ["Alpha_Pkg==1.0", "zeta-pkg==2.0"]
    assert any("--exclude torch --exclude torchvision" in c for c in calls if c.startswith("pip freeze"))


@pytest.mark.parametrize("rc", [1, 5])
def test_a_red_suite_leaves_the_lock_alone(tmp_path, rc):
    r, calls, lock = _run_refresh(tmp_path, pytest_rc=rc)
    assert r.returncode != 0
    assert lock.read_text() == "old==1\n"
    assert not any(c.startswith("pip freeze") for c in calls)
