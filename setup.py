"""Package discovery that pyproject.toml cannot express on its own: every package under src/ (found anew at
each build, so moved or new sub-packages need no edit here) plus ``stllava_med.conf`` mapped onto the
top-level ``conf/`` directory, so that the Hydra configs ship inside the wheel (as stllava_med/conf) while
``conf/`` stays at the top of the repository. Everything else is declared in pyproject.toml."""

from setuptools import find_namespace_packages, setup

code = find_namespace_packages("src", include=["stllava_med", "stllava_med.*"], exclude=["*.__pycache__"])
# conf/ and its groups (backbone/, data/, hydra/launcher/, ...): data-only packages, *.yaml via package-data.
conf = ["stllava_med.conf", *(f"stllava_med.conf.{p}" for p in find_namespace_packages("conf"))]

setup(packages=[*code, *conf], package_dir={"": "src", "stllava_med.conf": "conf"})
