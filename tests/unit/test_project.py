"""Project files agree with each other."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def requirement(spec: str) -> tuple[str, str]:
    name, version = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", spec).groups()
    return name.lower(), version.replace(" ", "")


def test_pixi_and_pyproject_declare_the_same_python_packages():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pixi = tomllib.loads((ROOT / "pixi.toml").read_text())
    extras = [spec for specs in project["optional-dependencies"].values() for spec in specs]
    declared = dict(requirement(s) for s in project["dependencies"] + extras)
    # pixi takes each Python package from PyPI or, where it links against system
    # libraries (mpi4py and its MPI), from conda-forge; either way with the same version range.
    in_pixi = {name.lower(): version.replace(" ", "")
               for table in ("pypi-dependencies", "dependencies") for name, version in pixi[table].items()}
    assert {name: in_pixi.get(name) for name in declared} == declared
    assert set(pixi["pypi-dependencies"]) <= set(declared)


def test_pixi_has_the_system_dependencies_and_tasks():
    pixi = tomllib.loads((ROOT / "pixi.toml").read_text())
    assert {"python", "redis-server", "mpi4py"} <= pixi["dependencies"].keys()
    assert {"openmpi", "mpich"} & pixi["dependencies"].keys()
    assert pixi["tasks"]["train"].startswith("python run_libe_cnn.py")
    assert pixi["tasks"]["test"] == "python -m pytest"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in ci and "make test" in readme and "make run" in readme


def test_nothing_on_the_tensor_path_unpickles_or_flushes():
    """The store's payloads are decoded by the raw codec only, and a run never empties a database."""
    forbidden = re.compile(r"^\s*(import pickle|from pickle)|pickle\.loads?\(|allow_pickle\s*=\s*True|"
                           r"\.flushdb\(|\.flushall\(|deserializer\s*=\s*None", re.M)
    sources = [p for package in ("libe_cnn", "gen_funcs", "sim_funcs", "mnist") for p in (ROOT / package).rglob("*.py")]
    assert sources
    offending = [str(p.relative_to(ROOT)) for p in sources + [ROOT / "run_libe_cnn.py"] if forbidden.search(p.read_text())]
    assert offending == []
    # torch.load (a pickle reader) reads only the run's own checkpoint, and only tensors.
    loads = re.compile(r"torch\.load\(([^)]*)\)")
    calls = [call for p in sources for call in loads.findall(p.read_text())]
    assert calls and all("weights_only=True" in call for call in calls)
