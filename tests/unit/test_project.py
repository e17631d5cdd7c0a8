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


# --- the code's shape: strategies in one place, packages that import one way ---

PACKAGES = ("libe_cnn", "gen_funcs", "sim_funcs", "mnist")
# Who may import whom: each package only from those below it.
MAY_IMPORT = {"libe_cnn": set(), "mnist": {"libe_cnn"}, "gen_funcs": {"libe_cnn", "mnist"},
              "sim_funcs": {"libe_cnn", "mnist"}}


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imported_packages(path: Path) -> set[str]:
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & {*PACKAGES, "run_libe_cnn"}


def test_packages_import_one_way():
    wrong = {f"{p.relative_to(ROOT)} imports {other}" for package, allowed in MAY_IMPORT.items()
             for p in modules(package) for other in imported_packages(p) - allowed - {package}}
    assert sorted(wrong) == []


def test_modules_stay_small():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for package in ("libe_cnn", "gen_funcs", "sim_funcs") for p in modules(package)}
    assert {name: n for name, n in sizes.items() if n >= 350} == {}
    strategy_modules = {name: n for name, n in sizes.items() if name.startswith("libe_cnn/strategies/")
                        and not name.endswith(("__init__.py", "base.py"))}
    assert strategy_modules and {name: n for name, n in strategy_modules.items() if n >= 150} == {}


def test_only_the_strategies_name_strategies():
    """Outside libe_cnn/strategies no code compares --strategy with a name: it asks the registry."""
    import ast

    from libe_cnn.strategies import STRATEGIES

    offending = []
    sources = [p for package in PACKAGES for p in modules(package) if "strategies" not in p.parts]
    for path in [*sources, ROOT / "run_libe_cnn.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            # "local" is also a libEnsemble comms name: only comparisons with .strategy count for it.
            if isinstance(node, ast.Constant) and node.value in STRATEGIES and node.value != "local":
                offending.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
            if isinstance(node, ast.Compare):
                names = [n.attr if isinstance(n, ast.Attribute) else getattr(n, "id", None)
                         for n in [node.left, *node.comparators]]
                if "strategy" in names and any(isinstance(n, (ast.Constant, ast.Tuple)) for n in node.comparators):
                    offending.append(f"{path.relative_to(ROOT)}:{node.lineno} compares strategy")
    assert offending == []


def test_the_readme_strategy_table_lists_the_registry():
    from libe_cnn.strategies import STRATEGIES

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| strategy | what happens | source |"):]
    rows = re.findall(r"^\| `([a-z-]+)` \|", table.split("\n\n")[0], re.M)
    assert tuple(rows) == STRATEGIES
