"""What the package declares matches what its code imports and what the pin files install.

* every third-party module imported anywhere in ``tagi_jax/`` (top level or inside a function)
  belongs to a distribution that ``pyproject.toml`` declares, in the runtime or in the extra
  that module's job needs;
* ``requirements.txt`` (the main job's install) pins exactly the runtime + ``[data]`` names and
  no PyTorch; ``requirements-test.txt`` adds the ``[torch]`` and ``[test]`` names.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "tagi_jax")


def _name(requirement: str) -> str:
    """``"etils[epath]>=1.7"`` -> ``"etils"``, normalised as pip compares names."""
    return re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~;@ ]", requirement, maxsplit=1)[0]).lower()


def _project() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def _declared() -> dict[str, set[str]]:
    project = _project()
    groups = {"runtime": {_name(r) for r in project["dependencies"]}}
    for extra, requirements in project["optional-dependencies"].items():
        groups[extra] = {_name(r) for r in requirements if not r.startswith("tagi_jax")}
    return groups


def _third_party_imports() -> dict[str, set[str]]:
    """``{top-level module: {files importing it}}`` for every non-stdlib, non-tagi_jax import."""
    found: dict[str, set[str]] = {}
    for directory, _, files in os.walk(PACKAGE):
        for file in files:
            if not file.endswith(".py"):
                continue
            path = os.path.join(directory, file)
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top != "tagi_jax" and top not in sys.stdlib_module_names:
                        found.setdefault(top, set()).add(os.path.relpath(path, ROOT))
    return found


# Which declaration a module's distribution must be in, by where it is imported: PyTorch and
# the test tools only where they are for (conversion of .bin files, exports, testing helpers).
EXTRA_OF_MODULE = {
    "tensorflow": "data",
    "tensorflow_text": "data",
    "tensorflow_datasets": "data",
    "seqio": "data",
    "yaml": "data",
    "jinja2": "data",
    "torch": "torch",
    "transformers": "torch",
    "peft": "torch",
    "gcsfs": "gcs",
    "gcp_storage_emulator": "test",
}


def test_every_imported_package_is_declared():
    declared = _declared()
    distributions = importlib.metadata.packages_distributions()
    problems = []
    for module, files in sorted(_third_party_imports().items()):
        names = {_name(d) for d in distributions.get(module, [])}
        assert names, f"{module} (imported by {sorted(files)}) is not installed here"
        group = EXTRA_OF_MODULE.get(module, "runtime")
        if not names & declared[group]:
            problems.append(f"{module} ({'/'.join(sorted(names))}) not in [{group}]: {files}")
    assert not problems, "\n".join(problems)


def test_pytorch_is_imported_only_where_its_extra_says():
    """The main job's install has no torch: no module a training run imports may need it."""
    allowed = ("tagi_jax/convert/", "tagi_jax/testing/", "tagi_jax/demos/t5_parity.py")
    for module in ("torch", "transformers", "peft"):
        for file in _third_party_imports().get(module, ()):
            assert file.startswith(allowed), f"{file} imports {module}"


def _pins(file: str) -> dict[str, str]:
    pins = {}
    with open(os.path.join(ROOT, file)) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line and not line.startswith("-r"):
                pins[_name(line)] = line
    return pins


def test_pin_files_install_what_the_extras_declare():
    declared = _declared()
    run = _pins("requirements.txt")
    test = _pins("requirements-test.txt")
    for name in declared["runtime"] | declared["data"]:
        assert name in run, f"requirements.txt does not pin {name}"
        assert "==" in run[name] or name == "protobuf", run[name]
    assert not {"torch", "transformers", "peft"} & set(run), "the main job installs no PyTorch"
    for name in declared["torch"] | declared["gcs"] | declared["test"]:
        assert name in test or name in run, f"requirements-test.txt does not pin {name}"
    assert test["torch"] == "torch==2.13.0"  # the local CPU wheel; anything else is CUDA
