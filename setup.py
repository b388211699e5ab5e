"""Package discovery for setuptools; every other setting lives in pyproject.toml.

The wheel holds one top-level package, ``drosim``. Two of its subpackages live at the top of
the repository and are mapped into it: llm/ installs as ``drosim.llm`` and paper_checks/ as
``drosim.paper_checks``. setuptools' ``packages.find`` cannot rename a folder, so the package
list is computed here: each tree with every folder below it (``find_namespace_packages``,
which needs no ``__init__.py``), so no subpackage or data folder is left out of the wheel.
"""

from setuptools import find_namespace_packages, setup

# installed package name -> its folder in the repository
TREES = {"drosim": "drosim", "drosim.llm": "llm", "drosim.paper_checks": "paper_checks"}


def _packages() -> list[str]:
    packages = []
    for name, folder in TREES.items():
        found = find_namespace_packages(folder, exclude=["__pycache__", "*.__pycache__"])
        packages += [name, *(f"{name}.{sub}" for sub in found)]
    return packages


setup(packages=_packages(), package_dir={n: f for n, f in TREES.items() if n != f})
