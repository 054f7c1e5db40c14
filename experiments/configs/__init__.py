"""Experiment configs: one ``get_config() -> ml_collections.ConfigDict`` per file.

Pass a file to a launcher with ``--config=experiments/configs/<name>.py`` and override any value
with ``--config.<section>.<key>=<value>``. Each ``get_config`` docstring gives the command, the time
it takes on named hardware and the result to expect.
"""
