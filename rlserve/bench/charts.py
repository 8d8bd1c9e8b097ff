"""matplotlib for the charts of ``rlserve demo`` and ``rlserve sweep``: an optional extra, never a server's.

``pip install "rlserve[bench]"`` installs it (``.[test]`` does too: the tests draw the charts).
"""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend; a clear error when matplotlib is not installed.

    Commands that draw call it before their work starts, so that a missing extra fails in a second, not after
    a sweep."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError('charts need matplotlib, an optional extra: pip install "rlserve[bench]"') from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
