"""Monte-Carlo studies of the linear world, each returning a pandas DataFrame.

One module per study; each exposes ``run(preset="quick", ...) -> DataFrame`` (one row per
trial and setting), ``plot(frame, out_dir) -> list[Path]`` and ``PRESETS`` (the keyword
arguments of the "quick" and "full" presets).
"""
