"""``pip install .`` (not editable) into a fresh virtual environment gives a working package: the
command, the bundled resources, py.typed, the license and the metadata. The dependencies are taken
from the running environment (a .pth file), so nothing is downloaded."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_pip_install_into_a_fresh_venv_passes_a_smoke_test(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the work tree
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", str(venv), cwd=tmp_path)
    python = venv / "bin" / "python"
    purelib = Path(
        run(
            str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path
        ).strip()
    )
    deps = [p for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    (purelib / "_deps_from_the_test_env.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    run(sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-build-isolation",
        "--disable-pip-version-check", "--quiet", str(source), cwd=tmp_path)  # fmt: skip

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    asymlora = str(venv / "bin" / "asymlora")
    assert run(asymlora, "--version", cwd=elsewhere).startswith("asymlora 0.")
    assert "lm-eval-task" in run(asymlora, "--help", cwd=elsewhere)
    assert "| fedalora |" in run(
        asymlora, "comm", "--model", "llama-2-7b", "--methods", "fedit,fedalora", cwd=elsewhere
    )
    check = (
        "import asymlora, importlib.metadata as md, pathlib, sys;"
        "pkg = pathlib.Path(asymlora.__file__).parent;"
        "assert str(pkg).startswith(str(pathlib.Path(sys.argv[1]).resolve())), pkg;"
        "assert (pkg / 'py.typed').is_file();"
        "assert (pkg / 'resources/shapes/llama-2-7b/config.json').is_file();"
        "meta = md.metadata('asymlora');"
        "assert meta['License-Expression'] == 'Apache-2.0', meta['License-Expression'];"
        "assert any(u.startswith('Paper') for u in meta.get_all('Project-URL'));"
        "assert 'Typing :: Typed' in meta.get_all('Classifier');"
        "files = [str(f) for f in md.files('asymlora')];"
        "assert any(f.endswith('licenses/LICENSE') for f in files), files;"
        "print('ok')"
    )
    assert run(str(python), "-c", check, str(venv), cwd=elsewhere).strip() == "ok"
