"""Nothing of ours is importable as the bare name `kernels`, from any entry point run in the repository root.

transformers >= 5 imports PyPI's `kernels` distribution; our top-level `kernels/` folder once shadowed it
whenever the root was on sys.path (`python -m pytest`, `python train.py`, `python -m fastmae.cli`, a shell).
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = str(ROOT / "kernels")  # the venv may live inside the root too: compare against the folder itself


def _pypi_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _run(args: list[str], env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    env.pop("PYTHONSAFEPATH", None)  # the root must be first on sys.path, as for a user
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_root_is_first_on_sys_path_yet_kernels_is_not_ours():
    probe = textwrap.dedent("""
        import importlib.util, sys
        assert sys.path[0] in ("", ".") or sys.path[0] == __import__("os").getcwd(), sys.path[:2]
        spec = importlib.util.find_spec("kernels")
        print(spec.origin if spec else "")
        import kernels
        print(getattr(kernels, "__file__", None))
    """)
    r = _run([sys.executable, "-c", probe])
    assert r.returncode == 0 or "ModuleNotFoundError" in r.stderr, r.stderr[-2000:]
    for line in r.stdout.splitlines():
        assert not line.startswith(OURS), f"`import kernels` from the root finds ours: {line}"


@pytest.mark.skipif(not _pypi_kernels_installed(), reason="PyPI's `kernels` is not installed")
def test_transformers_vitmae_builds_and_runs_from_the_root():
    probe = textwrap.dedent("""
        import torch, transformers, kernels
        assert "site-packages" in kernels.__file__, kernels.__file__
        cfg = transformers.ViTMAEConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=64, decoder_hidden_size=32,
                                        decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                        decoder_intermediate_size=64)
        model = transformers.ViTMAEForPreTraining(cfg).eval()
        out = model(pixel_values=torch.randn(2, 3, 32, 32))
        assert torch.isfinite(out.loss), out.loss
        print("ok", tuple(out.logits.shape))
    """)
    r = _run([sys.executable, "-c", probe])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "ok (2, 16, 192)"


# Reports, as the program exits, what `import kernels` gives with the program's own sys.path (root first).
_SITECUSTOMIZE = textwrap.dedent("""
    import atexit, os, sys

    def _report():
        try:
            import kernels
            origin = getattr(kernels, "__file__", None) or list(getattr(kernels, "__path__", []))
        except ImportError as e:
            origin = f"ImportError: {e}"
        with open(os.environ["FASTMAE_KERNELS_PROBE"], "w") as f:
            f.write(f"{sys.path[0]!r}\\n{origin}\\n")

    atexit.register(_report)
""")


@pytest.mark.parametrize("cmd", [["train.py", "--help"], ["-m", "fastmae.cli", "export", "--help"]],
                         ids=["train.py", "fastmae.cli"])
def test_entry_points_run_from_the_root_do_not_shadow_kernels(cmd, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    report = tmp_path / "probe.txt"
    r = _run([sys.executable, *cmd], {"PYTHONPATH": str(tmp_path), "FASTMAE_KERNELS_PROBE": str(report)})
    assert r.returncode == 0, r.stderr[-2000:]
    first, origin = report.read_text().splitlines()
    assert first.strip("'") in (str(ROOT), ""), f"the root is not first on sys.path: {first}"
    assert OURS not in origin, f"`import kernels` inside {' '.join(cmd)} finds ours: {origin}"


def test_without_pypi_kernels_our_folder_still_does_not_import_as_kernels():
    # A finder placed first makes `kernels` resolve as if the distribution were not installed.
    probe = textwrap.dedent(f"""
        import sys
        from importlib.machinery import PathFinder

        class OnlyTheRoot:
            @staticmethod
            def find_spec(name, path=None, target=None):
                return PathFinder.find_spec(name, [{str(ROOT)!r}]) if name == "kernels" else None

        sys.meta_path.insert(0, OnlyTheRoot)
        import kernels
        assert getattr(kernels, "__file__", None) is None, kernels.__file__  # an empty namespace, no code of ours
        try:
            import kernels.patchify_gather
        except ImportError as e:
            print(e)
        else:
            raise SystemExit("kernels.patchify_gather imported")
    """)
    r = _run([sys.executable, "-c", probe])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "import only as fastmae.kernels" in r.stdout
