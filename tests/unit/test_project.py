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
    # The project itself, installed editable into pixi's environment, beside its dependencies.
    pypi = dict(pixi["pypi-dependencies"])
    assert pypi.pop(project["name"]) == {"path": ".", "editable": True}
    # pixi takes each Python package from PyPI or, where it links against system
    # libraries (mpi4py and its MPI), from conda-forge; either way with the same version range.
    in_pixi = {name.lower(): version.replace(" ", "")
               for table in (pypi, pixi["dependencies"]) for name, version in table.items()}
    assert {name: in_pixi.get(name) for name in declared} == declared
    assert set(pypi) <= set(declared)


def test_version_bounds_say_what_the_code_needs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = dict(requirement(s) for s in project["dependencies"])
    # Fused Adam/SGD on CPU (mnist/model.py) need torch 2.4; torchvision 0.20.1 is 2.5.1's.
    assert declared["torch"] == ">=2.5.1,<3" and declared["torchvision"] == ">=0.20.1,<1"
    assert "scikit-learn" not in declared and declared["tqdm"] == ">=4.60"
    assert project["optional-dependencies"]["tensorboard"] == ["tensorboard>=2.14"]
    assert "tensorboard>=2.14" in project["optional-dependencies"]["test"]
    # Caps that hold pip to the tested releases live in the constraints file, not in the package.
    assert not any("<=" in spec for spec in project["dependencies"])
    pins = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert pins == ["torch<=2.14.1", "torchvision<=0.29.1"]
    makefile = (ROOT / "Makefile").read_text()
    assert "CONSTRAINTS ?= constraints.txt" in makefile and "-c $(CONSTRAINTS)" in makefile


def test_the_package_installs_its_command_and_its_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["project"]["scripts"] == {"libe-cnn": "libe_cnn.__main__:main"}
    assert config["tool"]["setuptools"]["package-data"]["mnist"] == ["iris.csv"]
    assert (ROOT / "mnist" / "iris.csv").is_file()
    # Subpackages are packages too: a wheel of only the top-level ones would lack the strategies.
    assert set(config["tool"]["setuptools"]["packages"]["find"]["include"]) == {f"{p}*" for p in PACKAGES}


def test_pixi_has_the_system_dependencies_and_tasks():
    pixi = tomllib.loads((ROOT / "pixi.toml").read_text())
    assert {"python", "redis-server", "mpi4py"} <= pixi["dependencies"].keys()
    features, environments = pixi["feature"], pixi["environments"]
    # One MPI per environment: conda-forge's by default, the site's in the others.
    assert "openmpi" in features[environments["default"][0]]["dependencies"]
    for name in ("site-mpich", "site-openmpi"):
        (feature,) = environments[name]
        (mpi,) = features[feature]["dependencies"].values()
        assert mpi["channel"] == "conda-forge/label/mpi-external"
        assert [c["channel"] for c in features[feature]["channels"]] == [mpi["channel"]]
    tasks = pixi["tasks"]
    assert tasks["train"].startswith("python run_libe_cnn.py")
    assert tasks["test"] == {"cmd": "python -m pytest", "depends-on": ["fetch-data"]}
    # The data task is a real command of ours, with options it accepts.
    from libe_cnn.__main__ import build_parser

    command = tasks["fetch-data"].split()
    assert command[:3] == ["python", "-m", "libe_cnn"]
    assert build_parser().parse_args(command[3:]).dataset == "fashion-mnist"


def test_make_setup_leaves_mpi_to_setup_mpi_which_the_tests_and_job_scripts_use():
    makefile = (ROOT / "Makefile").read_text()
    targets = dict(re.findall(r"^([\w.$()/-]+):(.*)$", makefile, re.M))
    assert targets["test"].split() == ["setup", "setup-mpi"]
    assert targets["setup-mpi"].split() == ["$(VENV)/.installed-mpi"]
    assert "mpi" not in targets["setup"]
    assert "make setup-mpi" in (ROOT / "multinode" / "environment.sh").read_text()
    for script in ("slurm.sh", "pbs.sh"):
        assert "source multinode/environment.sh" in (ROOT / "multinode" / script).read_text()
    assert "make setup-mpi" in (ROOT / "multinode" / "README.md").read_text()


def test_every_open_mpi_4_setting_has_its_open_mpi_5_twin():
    """Open MPI 5 ignores OMPI_MCA_rmaps_base_oversubscribe; its PRRTE reads the mapping policy."""
    places = [ROOT, *(ROOT / d for d in (*PACKAGES, "tests", "multinode", "benchmarks", ".ci"))]
    files = {p for place in places for p in (place.glob("*") if place == ROOT else place.rglob("*"))
             if p.is_file() and p.suffix in (".py", ".sh", ".toml", ".md", "")}
    sets_it = [p for p in files if "OMPI_MCA_rmaps_base_oversubscribe" in p.read_text(errors="replace")]
    assert sets_it
    assert [p for p in sets_it if "PRTE_MCA_rmaps_default_mapping_policy" not in p.read_text()] == []


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


# The command line stands above every package, as run_libe_cnn.py does: it dispatches to them all.
COMMAND_LINE = ROOT / "libe_cnn" / "__main__.py"


def test_packages_import_one_way():
    wrong = {f"{p.relative_to(ROOT)} imports {other}" for package, allowed in MAY_IMPORT.items()
             for p in modules(package) if p != COMMAND_LINE
             for other in imported_packages(p) - allowed - {package}}
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
