"""The browser UI of ppsf-trainer: configure a run, start it as a child process, watch it, export it.

The run folder (runs/<name>/) is the only state; every view here is computed from its files.
"""
