"""The library below the scripts: what both QDagger scripts share and is not the algorithm.

Each module is one concern (see its docstring); none imports the scripts, teacher_utils or the tools in
reincarnate_utils/, which sit above it.
"""
