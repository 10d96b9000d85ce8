"""After training: a finished run and its model, greedy answers, eval before vs after, exports, inspect.

``trained`` opens a finished run (and an earlier run a new one starts from); ``generate`` greedy
answers; ``evaluate`` before/after scores; ``export`` adapter or merged folders; ``inspection`` the
component table behind `vlmtune inspect`.
"""
