"""Progress bars for the package: tqdm.auto's, except that in a notebook a finished bar turns into
its final line of plain text.

A live bar in Jupyter is an ipywidget. A saved notebook keeps only a reference to it, so a
reopened notebook (or its HTML report) shows "Error displaying widget: model not found" where
the bar was. Here the bar is displayed with a display id and, when it closes, that output is
replaced by the text tqdm would print in a terminal (e.g. ``generate: 100%|██████| 16/16 [...]``),
which is what a reader of the saved notebook wants to see. Outside a notebook nothing changes.
"""
from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm as _auto   # (tqdm.auto silences autonotebook's warning)

try:
    from tqdm.notebook import tqdm as _notebook
except ImportError:   # no ipywidgets: tqdm.auto is the terminal bar anyway
    _notebook = None

__all__ = ["tqdm"]

if _notebook is not None and issubclass(_auto, _notebook):
    class tqdm(_auto):  # noqa: N801 - the name callers know
        def __init__(self, *args: Any, **kwargs: Any):
            show = kwargs.pop("display", True)
            super().__init__(*args, display=False, **kwargs)
            self._handle = None
            if show and not self.disable and getattr(self, "container", None) is not None:
                from IPython.display import display

                self._handle = display(self.container, display_id=True)
                self.displayed = True

        def close(self) -> None:
            handle, self._handle = getattr(self, "_handle", None), None
            super().close()
            if handle is not None:
                text = self.format_meter(**self.format_dict) if self.leave else ""
                handle.update({"text/plain": text}, raw=True)
else:
    tqdm = _auto
