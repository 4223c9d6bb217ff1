"""The project installs under one name, `dinat_batch`: its folders never collide with other distributions'
top-level packages (Hugging Face's `kernels`, the old `pipeline` on PyPI), and the model package stands
on its own, and the CPU stages load no torch."""

import ast
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.standalone

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("pipeline", "kernels", "jobs", "infra")
HF_KERNELS = "kernels==0.17.2"


def imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def project_files() -> list[Path]:
    return [p for folder in (*FOLDERS, "tests", "benchmarks") for p in (ROOT / folder).rglob("*.py")]


def test_the_project_imports_itself_by_its_installed_name():
    bare = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in project_files()
        for name in imported_modules(path)
        if name.split(".")[0] in FOLDERS
    ]
    assert bare == [], "import these as dinat_batch.<folder>..."


def test_the_model_package_imports_nothing_from_the_pipeline_stages():
    outside = [
        f"{path.name}: {name}"
        for path in (ROOT / "pipeline" / "model").glob("*.py")
        for name in imported_modules(path)
        if name.startswith("dinat_batch.")
        and not name.startswith(("dinat_batch.pipeline.model", "dinat_batch.kernels"))
    ]
    assert outside == []


# run in a fresh interpreter: a CPU worker's view
CPU_WORKER = """
import io, pickle, sys
import numpy as np
from PIL import Image
from dinat_batch.pipeline.stages import decode, read, write
from dinat_batch.pipeline.model.preprocessing import PreprocessConfig

config = pickle.loads(pickle.dumps(PreprocessConfig(size=32)))  # as Ray hands it to the task
jpeg = io.BytesIO()
Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(jpeg, "JPEG")
batch = {"key": np.array(["a", "b"], object), "data": np.array([jpeg.getvalue(), b"x"], object),
         "error": np.array([None, None], object)}
for to_device in (False, True):
    rows = decode.decode_batch(batch, config, 10**6, to_device)
    assert list(rows["width"]) == [50, 0], rows
print(sorted(name for name in sys.modules if name.split(".")[0] == "torch"))
"""


def test_the_cpu_stages_run_without_loading_torch():
    """The read, decode and write stages run in Ray tasks on CPU workers, many per machine: loading torch
    there would cost each worker process seconds to start and hundreds of MB for nothing."""
    done = subprocess.run([sys.executable, "-c", CPU_WORKER], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


def test_the_wheel_lists_every_package_of_the_tree():
    """The editable install finds any subfolder; a wheel (the container image) only the listed ones."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {f"dinat_batch.{folder}": folder for folder in FOLDERS}
    on_disk = {
        "dinat_batch." + ".".join(init.parent.relative_to(ROOT).parts)
        for folder in FOLDERS
        for init in (ROOT / folder).rglob("__init__.py")
    }
    assert set(setuptools["packages"]) == on_disk


def test_hugging_face_kernels_installs_beside_the_project(tmp_path):
    """A throwaway venv that sees this project's environment, with Hugging Face's `kernels` installed
    from the registry on top (as in an ML image with transformers): both import, each its own."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]
    (Path(site) / "project_env.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", HF_KERNELS],
        check=True,
        timeout=300,
    )
    check = (
        "import kernels, dinat_batch.kernels, dinat_batch.pipeline.cli\n"
        f"assert kernels.__file__.startswith({site!r}), kernels.__file__\n"
        "assert hasattr(kernels, 'get_kernel') and callable(dinat_batch.kernels.na2d)\n"
    )
    # run from elsewhere: the checkout's own folders must not be what is found
    done = subprocess.run([str(python), "-c", check], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
