"""Shell decomposition of atomic images (Urzhumtsev & Lunin): fitted tables and their use.

`get_shell_table` loads a shipped table; `python -m modelmap.shells.build` regenerates the tables.
The volume and renderer are `modelmap.ShellDecompositionVolume` and `modelmap.ShellRenderFn`.
"""

from ._table import D_RANGE as D_RANGE, ShellTable as ShellTable, get_shell_table as get_shell_table
