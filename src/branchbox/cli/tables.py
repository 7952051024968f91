"""The CLI's listings (``ls``, ``ps``, ``pools``, ...): rich tables with three rules.

* A cell is plain text: what users chose (metadata, names, command lines, paths) is never read as rich markup,
  so ``[/]`` in a value prints as itself instead of failing the command.
* The ``keep`` columns (ids, times) are never wrapped or cut: users copy them. The other columns give way.
* Into a pipe or a file, each row is one line at the table's own width (for grep, awk, cut), whatever the
  terminal's width.
"""

from __future__ import annotations

from collections.abc import Collection

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

Cell = str | Text


class Listing:
    """A table built row by row, printed by :meth:`print`."""

    def __init__(self, *headers: str, keep: Collection[str] = ()) -> None:
        unknown = set(keep) - set(headers)
        if unknown:
            raise ValueError(f"keep names columns the listing lacks: {sorted(unknown)}")
        self.headers = headers
        self.keep = frozenset(keep)
        self.rows: list[list[Text]] = []

    def add(self, *cells: Cell) -> None:
        if len(cells) != len(self.headers):
            raise ValueError(f"a row of {len(cells)} cells for {len(self.headers)} columns")
        self.rows.append([c if isinstance(c, Text) else Text(c) for c in cells])

    def table(self) -> Table:
        table = Table(box=None, pad_edge=False)
        for i, header in enumerate(self.headers):
            if header in self.keep:
                width = max([len(header), *(row[i].cell_len for row in self.rows)])
                table.add_column(header, no_wrap=True, min_width=width)
            else:
                table.add_column(header, overflow="fold", min_width=len(header))
        for row in self.rows:
            table.add_row(*row)
        return table

    def print(self, console: Console) -> None:
        table = self.table()
        if console.is_terminal:
            console.print(table)
            return
        # a pipe or a file: as wide as the table wants, so that each row is one line
        wanted = Measurement.get(console, console.options.update_width(1 << 16), table).maximum
        width = console.width
        console.width = max(width, wanted)
        try:
            console.print(table)
        finally:
            console.width = width
