# Sourced by the GPU session scripts: install drosim non-editable, as a user installs it (no
# network on the GPU machine: torch and transformers are already there). A wheel in dist/
# (made here with `python -m pip wheel --no-deps --no-build-isolation -w dist .` and carried
# along) needs nothing else; without one the tree is built there, which needs setuptools>=68.
# The scripts run Python with -P, which keeps the source folder off sys.path, so the
# installed drosim is the one imported. Expects $out/logs to exist.
wheel=$(ls dist/drosim-*.whl 2>/dev/null | tail -1)
if ! python3 -m pip install -q --no-deps --no-build-isolation --force-reinstall "${wheel:-.}" \
  > "$out/logs/install.txt" 2>&1
then
  echo "error: could not install drosim from ${wheel:-$PWD} (a tree needs pip and" \
    "setuptools>=68; carry a wheel in dist/ instead); see $out/logs/install.txt:" >&2
  tail -5 "$out/logs/install.txt" >&2
  exit 1
fi
