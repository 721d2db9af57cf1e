"""viz: titles keep their own line breaks; interactive cells fall back to one static call."""

from __future__ import annotations

import numpy as np

from uniir_lite import viz


def test_image_grid_keeps_line_breaks_in_titles() -> None:
    fig = viz.image_grid([np.zeros((4, 4, 3)), None], ["rank 1\na red circle", "x" * 60], ncols=2, title_width=28)
    first, second = (ax.get_title() for ax in fig.axes[:2])
    assert first == "rank 1\na red circle"
    assert second.split("\n") == ["x" * 28, "x" * 28, "x" * 4]


def test_interactive_headless_calls_once_with_the_defaults(monkeypatch) -> None:
    monkeypatch.setenv("UNIIR_KIT_HEADLESS", "1")
    calls = []
    viz.interactive(lambda **kw: calls.append(kw), temperature=((0.01, 1.0, 0.01), 0.07), query="a red circle",
                    pool=(["local", "global"], "global"))
    assert calls == [{"temperature": 0.07, "query": "a red circle", "pool": "global"}]
