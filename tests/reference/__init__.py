"""An independent reference of cogedit's method, for differential tests (tests/test_reference.py).

`method` is written from the papers' equations and imports nothing of `engine`: the tests check
the engine's public API against it over the settings that change a result.
"""
