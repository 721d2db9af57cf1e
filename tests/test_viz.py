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


def test_interactive_live_builds_one_widget_per_control(monkeypatch) -> None:
    import IPython
    import ipywidgets

    monkeypatch.delenv("UNIIR_KIT_HEADLESS", raising=False)
    monkeypatch.setattr(IPython, "get_ipython", lambda: object())  # as inside a live kernel
    seen = {}
    monkeypatch.setattr(ipywidgets, "interact", lambda show, **widgets: seen.update(widgets))
    viz.interactive(lambda **kw: None, temperature=((0.01, 1.0, 0.01), 0.07), k=((1, 10, 1), 5), query="a red circle",
                    pool=(["local", "global"], "global"))
    assert isinstance(seen["temperature"], ipywidgets.FloatSlider) and seen["temperature"].value == 0.07
    assert isinstance(seen["k"], ipywidgets.IntSlider) and (seen["k"].min, seen["k"].max, seen["k"].value) == (1, 10, 5)
    assert isinstance(seen["query"], ipywidgets.Text) and seen["query"].value == "a red circle"
    assert isinstance(seen["pool"], ipywidgets.Dropdown) and seen["pool"].value == "global"
